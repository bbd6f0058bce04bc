"""open_clip extractor: global image/text embeddings, patch-grid tokens and per-token text features.

`pretrained` is an open_clip tag resolved from the local cache (no download: HF_HUB_OFFLINE is set), a
local checkpoint path, or None for a seeded random init (the offline demo).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from pipeline.config import FeaturesConfig
from pipeline.features.precision import autocast, resolve_precision

CODE_VERSION = 1
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


@dataclass
class OpenClipExtractor:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    patch_grid: tuple[int, int]


def load(cfg: FeaturesConfig, device: torch.device) -> OpenClipExtractor:
    """Returns the open_clip model in eval mode on `device`, with its eval transform and tokenizer."""
    import open_clip

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(MODEL_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    if cfg.model not in open_clip.list_models():
        raise ValueError(f"features.model: unknown open_clip model {cfg.model!r}")
    torch.manual_seed(cfg.seed)  # random init is identical in every actor
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=cfg.pretrained)
    except RuntimeError as err:
        raise RuntimeError(
            f"features.pretrained={cfg.pretrained!r}: cannot load weights for {cfg.model} offline ({err}); "
            "pass a local checkpoint path or pre-populate the open_clip/HF cache"
        ) from err
    model = model.to(device).eval()
    grid = getattr(model.visual, "grid_size", (0, 0))
    return OpenClipExtractor(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(cfg.model),
        device=device,
        precision=resolve_precision(cfg.precision, device),
        patch_grid=tuple(grid),
    )


@torch.inference_mode()
def encode_images(ext: OpenClipExtractor, images: list[Image.Image], with_tokens: bool) -> dict[str, np.ndarray]:
    """Returns float32 arrays: `image_embed` (B, E), `image_pooled` (B, W) = mean of the final-normed patch
    tokens and, with tokens, `patch_tokens` (B, H*W, W) in row-major grid order."""
    pixels = torch.stack([ext.preprocess(im) for im in images]).to(ext.device)
    with autocast(ext.precision, ext.device):
        out = ext.model.forward_intermediates(
            image=pixels, image_indices=1, normalize=False, normalize_intermediates=True, image_output_fmt="NLC"
        )
    tokens = out["image_intermediates"][-1].float()
    result = {"image_embed": out["image_features"].float().cpu().numpy(), "image_pooled": tokens.mean(1).cpu().numpy()}
    if with_tokens:
        result["patch_tokens"] = tokens.cpu().numpy()
    return result


@torch.inference_mode()
def encode_texts(ext: OpenClipExtractor, texts: list[str], with_tokens: bool) -> dict[str, Any]:
    """Returns `text_embed` (B, E) and `text_pooled` (B, W) = mean of the valid final-normed token features
    and, with tokens, `text_tokens`: a list of (L_i, W) arrays, one per caption, padding removed."""
    ids = ext.tokenizer(texts).to(ext.device)
    mask = ids != 0  # open_clip's tokenizers pad with 0
    with autocast(ext.precision, ext.device):
        out = ext.model.forward_intermediates(text=ids, text_indices=1, normalize=False, normalize_intermediates=True)
    tokens = out["text_intermediates"][-1].float()
    m = mask.unsqueeze(-1).float()
    pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
    result: dict[str, Any] = {"text_embed": out["text_features"].float().cpu().numpy(),
                              "text_pooled": pooled.cpu().numpy()}
    if with_tokens:
        lengths = mask.sum(1).tolist()
        tok = tokens.cpu().numpy()
        result["text_tokens"] = [tok[i, :n] for i, n in enumerate(lengths)]
    return result


def describe(cfg: FeaturesConfig) -> dict:
    """Returns what identifies this extractor's output (part of the feature-store fingerprint)."""
    return {
        "extractor": "open_clip",
        "code_version": CODE_VERSION,
        "model": cfg.model,
        "pretrained": _pretrained_identity(cfg.pretrained),
        "seed": cfg.seed if cfg.pretrained is None else None,
        "store_tokens": cfg.store_tokens,
    }


def _pretrained_identity(pretrained: str | None) -> str | None:
    """A checkpoint path is identified by its size and mtime, a tag by its name."""
    if pretrained and Path(pretrained).is_file():
        st = Path(pretrained).stat()
        return f"{Path(pretrained).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return pretrained
