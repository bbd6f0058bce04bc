"""transformers extractor for dual-encoder vision-language models: CLIP, ALIGN, AltCLIP and GroupViT.

`features.model` is a local directory written by `save_pretrained` (model, image processor and tokenizer)
or a hub id already in the local HF cache: nothing is downloaded (HF_HUB_OFFLINE, local_files_only).
The model class is picked from the checkpoint's `config.json` `model_type`.

What the arrays mean per model (E = shared embedding width, W = tower width):
- `image_embed` / `text_embed`: `get_image_features` / `get_text_features`, projected, not normalised
  (ALIGN has no visual projection: its image embedding is the EfficientNet mean-pooled feature map).
- `patch_tokens`: the vision tower's last hidden state without its CLS token (CLIP, AltCLIP: ViT patches in
  row-major grid order, before `post_layernorm`), the flattened final feature map (ALIGN: H*W positions of
  C channels, row-major), or the final group (segment) tokens (GroupViT: no CLS, no patch grid left).
  `image_pooled` is their mean.
- `text_tokens`: the text tower's last hidden state at the attention-mask positions (special tokens kept;
  AltCLIP: after its `pre_LN` + `transformation`, so W is `project_dim`); `text_pooled` is their mean.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import FeaturesConfig
from pipeline.features.precision import autocast, resolve_precision

CODE_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """How one model_type is loaded and how its vision tower's last hidden state is laid out."""

    class_name: str  # in transformers
    vision_tokens: str  # "cls": (B, 1+L, W) with CLS first | "map": (B, W, H, W') feature map | "tokens": (B, L, W)


MODEL_TYPES = {
    "clip": ModelSpec("CLIPModel", "cls"),
    "align": ModelSpec("AlignModel", "map"),
    "altclip": ModelSpec("AltCLIPModel", "cls"),
    "groupvit": ModelSpec("GroupViTModel", "tokens"),
}


@dataclass
class HFExtractor:
    model: torch.nn.Module
    image_processor: Any  # transformers image processor: list[PIL] -> pixel_values
    tokenizer: Any  # transformers tokenizer
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    model_type: str  # a key of MODEL_TYPES
    max_length: int  # captions are truncated to this many tokens (special tokens included)


def resolve_model(model: str) -> tuple[Path, str]:
    """Returns (local model directory, model_type) for `features.model`: a directory saved with
    `save_pretrained` or a hub id in the local HF cache. Raises ValueError naming `features.model`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(model).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=model, local_files_only=True))
        except Exception as err:  # not a valid repo id, or not in the cache
            raise ValueError(f"features.model: {model!r} is neither a local model directory nor a hub id in the "
                             f"local HF cache (offline: nothing is downloaded; {type(err).__name__})") from None
    config = path / "config.json"
    try:
        model_type = json.loads(config.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"features.model: {model!r} has no readable config.json with a model_type "
                         f"({path}: {err})") from None
    if model_type not in MODEL_TYPES:
        raise ValueError(f"features.model: {model!r} has model_type {model_type!r}, not supported by the hf "
                         f"extractor (supported: {', '.join(sorted(MODEL_TYPES))})")
    return path.resolve(), model_type


def load(cfg: FeaturesConfig, device: torch.device) -> HFExtractor:
    """Returns the model (float32 weights, eval mode, on `device`) with its image processor and tokenizer."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    path, model_type = resolve_model(cfg.model)
    cls = getattr(transformers, MODEL_TYPES[model_type].class_name)
    torch.manual_seed(cfg.seed)  # any weight missing from the checkpoint is initialised the same everywhere
    model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    if info.get("missing_keys"):
        warnings.warn(f"features.model {cfg.model!r}: {len(info['missing_keys'])} weights missing from the "
                      f"checkpoint were randomly initialised (e.g. {sorted(info['missing_keys'])[:3]})")
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"features.model: {cfg.model!r} lacks a loadable image processor or tokenizer "
                         f"({path}: {err})") from None
    model = model.float().to(device).eval()
    return HFExtractor(
        model=model,
        image_processor=image_processor,
        tokenizer=tokenizer,
        device=device,
        precision=resolve_precision(cfg.precision, device),
        model_type=model_type,
        max_length=_max_length(tokenizer, model.config.text_config, model_type),
    )


def _max_length(tokenizer, text_config, model_type: str) -> int:
    """The tokenizer's model_max_length, capped by the text tower's position table."""
    limit = text_config.max_position_embeddings
    if model_type == "altclip":  # RoBERTa positions start after the padding index
        limit -= (text_config.pad_token_id if text_config.pad_token_id is not None else 1) + 1
    declared = tokenizer.model_max_length
    return int(min(declared, limit)) if declared and declared < 1_000_000 else int(limit)


def _split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (embedding, tower last hidden state or None) from get_*_features, which returns a projected
    tensor (transformers 4.x) or a model output whose pooler_output is projected (5.x)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple):  # return_dict=False: (last_hidden_state, pooler_output, ...)
        return out[1], out[0]
    return out.pooler_output, out.last_hidden_state


@torch.inference_mode()
def encode_images(ext: HFExtractor, images: list[Image.Image], with_tokens: bool) -> dict[str, np.ndarray]:
    """Returns float32 arrays: `image_embed` (B, E) from get_image_features (not normalised), `image_pooled`
    (B, W) = mean of the vision tower's output tokens (CLS excluded) and, with tokens, `patch_tokens` (B, L, W):
    ViT patches (CLIP, AltCLIP), flattened feature-map positions (ALIGN) or group tokens (GroupViT)."""
    pixels = ext.image_processor(images=images, return_tensors="pt")["pixel_values"].to(ext.device)
    with autocast(ext.precision, ext.device):
        embed, hidden = _split_output(ext.model.get_image_features(pixel_values=pixels))
        if hidden is None:
            hidden = ext.model.vision_model(pixel_values=pixels).last_hidden_state
    kind = MODEL_TYPES[ext.model_type].vision_tokens
    if kind == "cls":
        tokens = hidden[:, 1:]
    elif kind == "map":
        tokens = hidden.flatten(2).transpose(1, 2)
    else:
        tokens = hidden
    tokens = tokens.float()
    result = {"image_embed": embed.float().cpu().numpy(), "image_pooled": tokens.mean(1).cpu().numpy()}
    if with_tokens:
        result["patch_tokens"] = tokens.cpu().numpy()
    return result


@torch.inference_mode()
def encode_texts(ext: HFExtractor, texts: list[str], with_tokens: bool) -> dict[str, Any]:
    """Returns `text_embed` (B, E) from get_text_features (not normalised), `text_pooled` (B, W) = mean of the
    text tower's last hidden state over the attention mask and, with tokens, `text_tokens`: a list of
    (L_i, W) float32 arrays, one per caption, padding removed (special tokens kept). Each batch is padded to its
    longest caption only (`padding=True`), not to the model's context: exact, since the padded positions are masked
    out as keys (and CLIP's text tower is causal and pools at the EOS token), so no model pays for padding."""
    enc = ext.tokenizer(list(texts), padding=True, truncation=True, max_length=ext.max_length, return_tensors="pt")
    inputs = {k: enc[k].to(ext.device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    with autocast(ext.precision, ext.device):
        embed, hidden = _split_output(ext.model.get_text_features(**inputs))
        if hidden is None:
            hidden = ext.model.text_model(**inputs).last_hidden_state
    tokens = hidden.float()
    mask = inputs["attention_mask"].bool()
    m = mask.unsqueeze(-1).float()
    pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
    result: dict[str, Any] = {"text_embed": embed.float().cpu().numpy(), "text_pooled": pooled.cpu().numpy()}
    if with_tokens:
        tok, keep = tokens.cpu().numpy(), mask.cpu().numpy()
        result["text_tokens"] = [np.ascontiguousarray(tok[i][keep[i]]) for i in range(len(tok))]
    return result


def describe(cfg: FeaturesConfig) -> dict:
    """Returns what identifies this extractor's output (part of the feature-store fingerprint): the resolved
    model directory, model_type and the size and mtime of each file in it (weights, config, tokenizer,
    image processor). Raises ValueError like `load` when the model cannot be resolved."""
    path, model_type = resolve_model(cfg.model)
    files = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith("."):  # follows the HF cache's symlinks to their blobs
            st = f.stat()
            files[f.name] = f"{st.st_size}:{st.st_mtime_ns}"
    return {
        "extractor": "hf",
        "code_version": CODE_VERSION,
        "model": str(path),
        "model_type": model_type,
        "files": files,
        "store_tokens": cfg.store_tokens,
    }
