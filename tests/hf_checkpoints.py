"""Tiny random CLIP, ALIGN, AltCLIP and GroupViT checkpoints built offline (models, image processors and
tokenizers from in-code vocabularies: nothing comes from the hub), for the hf extractor and zero-shot tests."""
from __future__ import annotations

import string
from pathlib import Path

import torch

MAX_LEN = 16  # tokens, special ones included
WORDS = ["a", "red", "blue", "green", "big", "small", "circle", "square", "on", "the", "left", "of"]
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
           patch_size=8)  # 4x4 patches + CLS
MODEL_TYPES = ("clip", "align", "altclip", "groupvit")


def _clip_tokenizer():
    """CLIP's byte-level BPE over single bytes plus a few word merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for w in WORDS[:6]:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN)


def _bert_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(string.ascii_lowercase + string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=MAX_LEN)


def _xlmr_tokenizer():
    """An XLM-R (SentencePiece Unigram) tokenizer from an in-test piece list."""
    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS] + [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=MAX_LEN)


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _build(model_type: str):
    """Returns (model, image processor, tokenizer) of a tiny random checkpoint of `model_type`."""
    import transformers as tf

    if model_type in ("clip", "groupvit"):
        tok = _clip_tokenizer()
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if model_type == "clip":
            return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=VIT, projection_dim=24)), \
                _clip_image_processor(), tok
        vision = dict(hidden_size=32, intermediate_size=64, depths=[1, 1], num_hidden_layers=2, num_group_tokens=[4, 0],
                      num_output_groups=[4, 4], num_attention_heads=2, image_size=32, patch_size=8)
        return tf.GroupViTModel(tf.GroupViTConfig(text_config=text, vision_config=vision, projection_dim=24,
                                                  projection_intermediate_dim=48)), _clip_image_processor(), tok
    if model_type == "align":
        tok = _bert_tokenizer()
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=MAX_LEN)
        # EfficientNet: stem (stride 2, 32 ch) + 2 blocks -> 8x8 map of 32 channels = the projection width
        vision = dict(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=[3, 3],
                      in_channels=[32, 16], out_channels=[16, 32], strides=[1, 2], num_block_repeats=[1, 1],
                      expand_ratios=[1, 2], hidden_dim=32, depthwise_padding=[])
        model = tf.AlignModel(tf.AlignConfig(text_config=text, vision_config=vision, projection_dim=32))
        return model, tf.EfficientNetImageProcessor(size={"height": 32, "width": 32}), tok
    assert model_type == "altclip"
    tok = _xlmr_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=MAX_LEN + 2, project_dim=20, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = tf.AltCLIPModel(tf.AltCLIPConfig(text_config=text, vision_config=VIT, projection_dim=24))
    return model, _clip_image_processor(), tok


def build_checkpoints(root: Path) -> dict[str, str]:
    """Saves one tiny random checkpoint per model type under `root`; returns model_type -> directory."""
    out = {}
    for model_type in MODEL_TYPES:
        torch.manual_seed(0)
        model, image_processor, tokenizer = _build(model_type)
        path = root / model_type
        model.save_pretrained(path)
        image_processor.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[model_type] = str(path)
    return out
