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
from pipeline.features import regions
from pipeline.features.precision import autocast, resolve_precision

CODE_VERSION = 2  # 2: patch boxes and RoIAlign region features
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"


@dataclass
class OpenClipExtractor:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16


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
    return OpenClipExtractor(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(cfg.model),
        device=device,
        precision=resolve_precision(cfg.precision, device),
    )


@dataclass
class ImageBatch:
    """Model inputs of a batch of images: `pixels` (B, 3, H, W) float32 on the CPU, the eval transform's `affines`
    and each image's annotated boxes (N_i, 4) in image pixels (N_i may be 0)."""

    pixels: torch.Tensor
    affines: list[regions.Affine]
    boxes: list[np.ndarray]


def preprocess_images(ext: OpenClipExtractor, images: list[Image.Image],
                      boxes: list[list] | None = None) -> ImageBatch:
    """Returns the `ImageBatch` of `images` and their optional per-image xyxy pixel boxes."""
    boxes = boxes or [[] for _ in images]
    return ImageBatch(pixels=torch.stack([ext.preprocess(im) for im in images]),
                      affines=[regions.input_affine(ext.preprocess, *im.size) for im in images],
                      boxes=[np.asarray(b, np.float64).reshape(-1, 4) for b in boxes])


@torch.inference_mode()
def encode_pixels(ext: OpenClipExtractor, batch: ImageBatch, with_tokens: bool) -> dict[str, Any]:
    """Returns float32 arrays of an `ImageBatch`: `image_embed` (B, E), `image_pooled` (B, W) = mean of the
    final-normed patch tokens and, with tokens, `patch_tokens` (B, gh * gw, W) in row-major grid order (the vision
    tower's last feature map: ViT patch tokens, a ResNet's cells), `patch_boxes` (B, gh * gw, 4) their normalised
    image boxes, and the RoIAlign region features of the annotated boxes (`pipeline.features.regions`): lists
    `roi_feats` of (M_i, W) and `roi_boxes` of (M_i, 4)."""
    with autocast(ext.precision, ext.device):
        out = ext.model.forward_intermediates(
            image=batch.pixels.to(ext.device), image_indices=1, normalize=False, normalize_intermediates=True,
            image_output_fmt="NCHW",
        )
    fmap = out["image_intermediates"][-1].float()  # (B, W, gh, gw): ViT patch tokens or a ResNet's last map
    grid = tuple(fmap.shape[2:])
    tokens = fmap.flatten(2).transpose(1, 2)
    result = {"image_embed": out["image_features"].float().cpu().numpy(), "image_pooled": tokens.mean(1).cpu().numpy()}
    if with_tokens:
        result["patch_tokens"] = tokens.cpu().numpy()
        result["patch_boxes"] = np.stack([regions.patch_boxes(a, grid) for a in batch.affines])
        result["roi_feats"], result["roi_boxes"] = regions.roi_features(fmap, batch.affines, batch.boxes)
    return result


def encode_images(ext: OpenClipExtractor, images: list[Image.Image], with_tokens: bool,
                  boxes: list[list] | None = None) -> dict[str, Any]:
    """Returns `encode_pixels` of the preprocessed `images` (and their optional xyxy pixel boxes)."""
    return encode_pixels(ext, preprocess_images(ext, images, boxes), with_tokens)


def tokenize(ext: OpenClipExtractor, texts: list[str]) -> torch.Tensor:
    """Returns the token ids of `texts`: an int64 (B, context length) tensor on the CPU, padded with 0."""
    return ext.tokenizer(list(texts))


@torch.inference_mode()
def encode_tokens(ext: OpenClipExtractor, ids: torch.Tensor, with_tokens: bool) -> dict[str, Any]:
    """Returns, for token ids (B, L) from `tokenize`: `text_embed` (B, E) and `text_pooled` (B, W) = mean of the
    valid final-normed token features and, with tokens, `text_tokens`: a list of (L_i, W) float32 arrays, one per
    caption, padding removed."""
    ids = ids.to(ext.device)
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


def encode_texts(ext: OpenClipExtractor, texts: list[str], with_tokens: bool) -> dict[str, Any]:
    """Returns `encode_tokens` of the tokenised `texts`: `text_embed` (B, E), `text_pooled` (B, W) and, with tokens,
    `text_tokens` (a list of (L_i, W) arrays)."""
    return encode_tokens(ext, tokenize(ext, texts), with_tokens)


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
