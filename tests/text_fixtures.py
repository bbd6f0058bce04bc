"""A tiny random BERT text encoder written offline (config, weights and a vocab.txt this module writes itself:
nothing comes from the hub), for the trainable text encoder's tests."""
from __future__ import annotations

import string
from pathlib import Path

import torch

from tests.hf_checkpoints import WORDS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EXTRA_WORDS = ["dog", "cat", "man", "woman", "sits", "runs", "with", "and", "in", "is", "grass", "street"]
CAPTION_WORDS = list(dict.fromkeys(WORDS + EXTRA_WORDS))  # whole words of the vocabulary (one word piece each)
MAX_POSITIONS = 64


def tiny_bert_vocab() -> list[str]:
    """Special tokens, whole words, single characters and their "##" continuations (any lowercase word made of
    letters and digits tokenizes), without duplicates."""
    chars = list(string.ascii_lowercase + string.digits)
    return list(dict.fromkeys(SPECIALS + CAPTION_WORDS + chars + ["##" + c for c in chars]))


def write_tiny_bert(folder: str | Path, layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0) -> Path:
    """Saves a random BertModel (`layers` layers of width `hidden`, `heads` heads, 64 positions) and its vocab.txt
    in `folder`; returns the folder."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_bert_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=MAX_POSITIONS, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder
