"""A trainable BERT-family text encoder for the retrieval methods (USER fine-tunes BERT-base on all tokens, TGDT a
6-layer BERT): a transformers `AutoModel` plus its tokenizer, loaded from a local folder only (nothing is
downloaded), with USER's word-level training augmentation (METHODS.md 1.2).

Augmentation, as in USER's reference code (inherited from VSE infinity): each word of a caption draws one uniform
u; the word is hit when u < `hit_prob` (0.2), and u / `hit_prob` then picks what happens to *all* of its word
pieces: [MASK] (first `mask_prob` = 0.5 of the hits), a random vocabulary id per piece (next `random_prob` = 0.1),
deleted (next `delete_prob` = 0.4; the sequence is re-packed). Net: 10% of the words masked, 2% random, 8%
deleted (0.2 x 0.5 = 0.1: the "8% masked" of METHODS.md 1.2 is an arithmetic slip; zhangy0822/USER
lib/datasets/image_caption.py `process_caption` draws exactly this). Any rest of the hits (when the three
fractions sum below 1) is kept unchanged. Words are the tokenizer's pre-tokenised words (BERT: split on spaces
and punctuation, as the reference's basic tokenizer). [CLS], [SEP] and padding are never hit.
Deviations from the reference, both deliberate: random ids are drawn among the non-special vocabulary ids (the
reference can insert [PAD]/[CLS]/[SEP]), and captions are truncated to `max_tokens` after augmentation (the
reference does not truncate).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

HIT_PROB = 0.2  # of the words
MASK_PROB = 0.5  # of the hits
RANDOM_PROB = 0.1  # of the hits
DELETE_PROB = 0.4  # of the hits

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
               "tokenizer.model")

# word actions
KEEP, MASK, RANDOM, DELETE = 0, 1, 2, 3


def check_model_folder(path: str | Path) -> dict:
    """Checks that `path` holds a config.json, weights and a tokenizer vocabulary; returns the parsed config.
    Raises FileNotFoundError (naming the folder and the missing part) or ValueError (unreadable config)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {str(path)!r} does not exist (models load from local folders)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"text encoder folder {str(path)!r} has no config.json (the model configuration)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"text encoder folder {str(path)!r}: config.json is not readable JSON ({e})") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"text encoder folder {str(path)!r}: config.json has no model_type")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"text encoder folder {str(path)!r} has no model weights (one of {WEIGHT_FILES})")
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise FileNotFoundError(f"text encoder folder {str(path)!r} has no tokenizer vocabulary (one of {VOCAB_FILES})")
    return config


def load_text_encoder(path: str, max_tokens: int = 32, num_layers: int | None = None) -> TrainableTextEncoder:
    """Loads a BERT-family `AutoModel` and its `AutoTokenizer` from the local folder `path` (local_files_only);
    `num_layers` keeps only the first n encoder layers (TGDT: 6). The folder is checked before any model is built."""
    config = check_model_folder(path)
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and max_tokens > max_positions:
        raise ValueError(f"max_tokens={max_tokens} exceeds the {max_positions} positions of the model in {path!r}")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return TrainableTextEncoder(model, tokenizer, max_tokens=max_tokens, num_layers=num_layers)


def word_actions(num_words: int, generator: torch.Generator | None, hit_prob: float = HIT_PROB,
                 mask_prob: float = MASK_PROB, random_prob: float = RANDOM_PROB,
                 delete_prob: float = DELETE_PROB) -> torch.Tensor:
    """One action per word, (num_words,) long in {KEEP, MASK, RANDOM, DELETE}: one uniform u per word, hit when
    u < hit_prob, then u / hit_prob against the cumulative mask / random / delete fractions (the reference's draw)."""
    u = torch.rand(num_words, generator=generator, dtype=torch.float64)
    v = u / hit_prob if hit_prob > 0 else torch.full_like(u, 2.0)
    hit = u < hit_prob
    actions = torch.full((num_words,), KEEP, dtype=torch.long)
    bounds = torch.tensor([mask_prob, mask_prob + random_prob, mask_prob + random_prob + delete_prob],
                          dtype=torch.float64)
    category = torch.bucketize(v, bounds, right=True)  # 0: mask, 1: random, 2: delete, 3: kept hit
    kinds = torch.tensor([MASK, RANDOM, DELETE, KEEP])
    actions[hit] = kinds[category[hit]]
    return actions


def check_augment_probs(hit_prob: float, mask_prob: float, random_prob: float, delete_prob: float) -> None:
    """Raises ValueError unless every probability lies in [0, 1] and the fractions of the hits sum to at most 1."""
    probs = dict(hit_prob=hit_prob, mask_prob=mask_prob, random_prob=random_prob, delete_prob=delete_prob)
    bad = {k: p for k, p in probs.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ValueError(f"augmentation probabilities must lie in [0, 1]: {bad}")
    if mask_prob + random_prob + delete_prob > 1.0 + 1e-9:
        total = mask_prob + random_prob + delete_prob
        raise ValueError(f"the fractions of the hits sum above 1: mask_prob + random_prob + delete_prob = {total}")


class TrainableTextEncoder(nn.Module):
    """A transformers text model plus its tokenizer. The tokenizer is a plain attribute, not a module: state_dict
    holds only the model's weights, and deepcopy (EMA key encoders) copies the model but shares the tokenizer.
    The unused pooler head is dropped (its parameters would get no gradient, which DDP rejects)."""

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = 32, num_layers: int | None = None):
        super().__init__()
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        if num_layers is not None:
            truncate_layers(model, num_layers)
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        num_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
        if self.max_tokens < num_special + 1:
            raise ValueError(f"max_tokens={max_tokens} leaves no room for a word after {num_special} special tokens")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no padding token")
        special = set(tokenizer.all_special_ids)
        self._random_pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)

    @property
    def hidden_size(self) -> int:
        """Width H of the token features."""
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of transformer layers kept."""
        return int(self.model.config.num_hidden_layers)

    def __deepcopy__(self, memo: dict) -> TrainableTextEncoder:
        """Deep-copies the module (weights included) but shares the read-only tokenizer."""
        memo[id(self.tokenizer)] = self.tokenizer
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        return new

    def tokenize(self, captions: list[str], augment: bool = False, generator: torch.Generator | None = None, *,
                 hit_prob: float = HIT_PROB, mask_prob: float = MASK_PROB, random_prob: float = RANDOM_PROB,
                 delete_prob: float = DELETE_PROB) -> dict[str, torch.Tensor]:
        """Token ids of a batch: {input_ids (B, L) long, attention_mask (B, L) bool}, L = the longest caption
        (special tokens included), at most max_tokens. `augment` applies the word augmentation (module docstring),
        deterministic for a given `generator` (None: torch's global RNG)."""
        if not augment:
            enc = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
            return dict(input_ids=enc["input_ids"].long(), attention_mask=enc["attention_mask"].bool())
        check_augment_probs(hit_prob, mask_prob, random_prob, delete_prob)
        if self.tokenizer.mask_token_id is None:
            raise ValueError("augmentation needs a tokenizer with a mask token")
        sequences = self._augment(list(captions), generator, hit_prob, mask_prob, random_prob, delete_prob)
        return self.pad(sequences)

    def _augment(self, captions: list[str], generator: torch.Generator | None, hit_prob: float, mask_prob: float,
                 random_prob: float, delete_prob: float) -> list[list[int]]:
        """Augmented, truncated token ids of each caption, special tokens included (one RNG draw per batch)."""
        enc = self.tokenizer(captions, add_special_tokens=True)
        split = [self._split(enc, i) for i in range(len(captions))]
        words = [(b, w) for b, (_, body, word_ids, _) in enumerate(split) for w in sorted(set(word_ids))]
        first_word = {bw: k for k, bw in enumerate(words)}
        actions = word_actions(len(words), generator, hit_prob, mask_prob, random_prob, delete_prob)
        num_pieces = sum(len(body) for _, body, _, _ in split)
        randoms = self._random_pool[torch.randint(len(self._random_pool), (num_pieces,), generator=generator)]
        mask_id, out, k = self.tokenizer.mask_token_id, [], 0
        for b, (prefix, body, word_ids, suffix) in enumerate(split):
            kept = []
            for piece, w in zip(body, word_ids):
                action = int(actions[first_word[(b, w)]])
                if action == MASK:
                    kept.append(mask_id)
                elif action == RANDOM:
                    kept.append(int(randoms[k]))
                elif action == KEEP:
                    kept.append(piece)
                k += 1
            room = self.max_tokens - len(prefix) - len(suffix)
            out.append(prefix + kept[:room] + suffix)
        return out

    def _split(self, enc, i: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """(leading special ids, word-piece ids, word index of each piece, trailing special ids) of caption i of
        the tokenizer's output `enc` (special tokens added, not truncated)."""
        ids = list(enc["input_ids"][i])
        try:
            word_ids = enc.word_ids(i)
        except ValueError:  # a tokenizer without offsets: specials by id, "##" pieces continue a word
            special, word_ids, w = set(self.tokenizer.all_special_ids), [], -1
            for tok_id, tok in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
                w += 0 if tok_id in special or (tok.startswith("##") and w >= 0) else 1
                word_ids.append(None if tok_id in special else w)
        start = next((j for j, w in enumerate(word_ids) if w is not None), len(ids))
        end = start + sum(w is not None for w in word_ids[start:])
        return ids[:start], ids[start:end], [int(w) for w in word_ids[start:end]], ids[end:]

    def pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pads id lists to the longest: {input_ids (B, L) long, attention_mask (B, L) bool}."""
        length = max((len(s) for s in sequences), default=0)
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for b, seq in enumerate(sequences):
            input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[b, :len(seq)] = True
        return dict(input_ids=input_ids, attention_mask=attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states of every token, [CLS]/[SEP] included: (tokens (B, L, H) float, mask (B, L) bool) from
        input_ids (B, L) long and attention_mask (B, L) (True/1 = a real token). Inputs move to the model's device."""
        device = next(self.model.parameters()).device
        mask = attention_mask.to(device=device, dtype=torch.bool)
        out = self.model(input_ids=input_ids.to(device), attention_mask=mask.long())
        return out.last_hidden_state, mask


def truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keeps only the first `num_layers` transformer layers of a BERT-family model (`model.encoder.layer`), in
    place, and updates its config."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot truncate {type(model).__name__}: no encoder.layer list")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers={num_layers} must lie in 1..{len(layers)}")
    model.encoder.layer = nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
