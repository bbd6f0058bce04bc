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


PAD_ID = 0  # open_clip's tokenizers pad with 0


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip causal text tower that `text_forward` runs: the built-in CLIP keeps them on the
    model itself, CustomTextCLIP on its `text` (a `TextTransformer`)."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor  # (context length, W)
    transformer: torch.nn.Module
    attn_mask: torch.Tensor  # (context length, context length) additive causal mask
    ln_final: torch.nn.Module
    text_projection: Any  # nn.Linear, a (W, E) tensor or None
    pool_type: str  # argmax | eos | first
    eos_id: int | None


def text_tower(model: torch.nn.Module) -> TextTower | None:
    """Returns the causal text tower of an open_clip model when running it on a batch trimmed to its longest caption
    is exact, else None (the full context is run): a causal mask (so a token never sees the padding after it), no
    class token appended at the end (CoCa), no padding mask, and a pooling that picks a position inside the caption
    (`argmax` = the EOT token, `eos`, `first`; not `last` or `none`). HF text towers (`HFTextEncoder`) are not
    trimmed."""
    tower = getattr(model, "text", None)
    tower = model if tower is None else tower
    parts = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(isinstance(getattr(tower, p, None), (torch.nn.Module, torch.Tensor)) for p in parts):
        return None
    mask = getattr(tower, "attn_mask", None)
    if mask is None or getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        return None
    pool = getattr(tower, "text_pool_type" if tower is model else "pool_type", None)
    eos = getattr(tower, "text_eos_id" if tower is model else "eos_id", None)
    if pool not in ("argmax", "eos", "first") or (pool == "eos" and (eos is None or eos == PAD_ID)):
        return None
    return TextTower(tower.token_embedding, tower.positional_embedding, tower.transformer, mask, tower.ln_final,
                     getattr(tower, "text_projection", None), pool, eos)


def trimmed_length(ids: torch.Tensor) -> int:
    """Returns the length of the batch's longest caption: one past the last non-padding position of any row (at
    least 1)."""
    used = (ids != PAD_ID).any(0).nonzero()
    return int(used[-1]) + 1 if len(used) else 1


def text_forward(tower: TextTower, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the causal text tower on token ids (B, L) of any length L up to the context length, as open_clip's
    `encode_text` does on the full context: token + position embeddings (the first L), the causal mask's top-left
    L x L, the final norm, pooling and projection. Returns (final-normed token features (B, L, W), text embedding
    (B, E)). On ids trimmed to `trimmed_length` both equal the full-context ones at the kept positions: a causal
    token never attends to the padding after it, and the pooled position lies inside the caption."""
    length = ids.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:length, :length]))
    rows = torch.arange(x.shape[0], device=x.device)
    if tower.pool_type == "argmax":  # the EOT token has the highest id
        pooled = x[rows, ids.argmax(dim=-1)]
    elif tower.pool_type == "eos":
        pooled = x[rows, (ids == tower.eos_id).int().argmax(dim=-1)]
    else:
        pooled = x[:, 0]
    proj = tower.text_projection
    if isinstance(proj, torch.nn.Linear):
        pooled = proj(pooled)
    elif proj is not None:
        pooled = pooled @ proj
    return x, pooled


@torch.inference_mode()
def encode_tokens(ext: OpenClipExtractor, ids: torch.Tensor, with_tokens: bool) -> dict[str, Any]:
    """Returns, for token ids (B, L) from `tokenize`: `text_embed` (B, E) and `text_pooled` (B, W) = mean of the
    valid final-normed token features and, with tokens, `text_tokens`: a list of (L_i, W) float32 arrays, one per
    caption, padding removed. A causal text tower runs on the batch trimmed to its longest caption (`text_forward`:
    the same features as the full context, without the cost of the padding); any other runs on the full context."""
    ids = ids.to(ext.device)
    tower = text_tower(ext.model)
    if tower is not None:
        ids = ids[:, :trimmed_length(ids)]
    mask = ids != PAD_ID
    with autocast(ext.precision, ext.device):
        if tower is not None:
            tokens, embed = text_forward(tower, ids)
        else:
            out = ext.model.forward_intermediates(text=ids, text_indices=1, normalize=False,
                                                  normalize_intermediates=True)
            tokens, embed = out["text_intermediates"][-1], out["text_features"]
    tokens = tokens.float()
    m = mask.unsqueeze(-1).float()
    pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
    result: dict[str, Any] = {"text_embed": embed.float().cpu().numpy(), "text_pooled": pooled.cpu().numpy()}
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
