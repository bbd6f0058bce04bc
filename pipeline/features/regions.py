"""Region geometry: where each patch-grid token lies in the original image, and RoIAlign features of annotated boxes.

A model's eval transform resizes and centre-crops (or pads) a W x H image into its input. `input_affine` follows the
transform's own steps (torchvision `Resize` / `CenterCrop`, open_clip `ResizeKeepRatio` / `CenterCropOrPad`, with
their rounding), so the mapping from image pixels to input pixels is exact. Boxes are (x0, y0, x1, y1), x right,
y down, in continuous pixel coordinates (pixel i spans [i, i + 1]); stored boxes are normalised by the original
image's width and height to [0, 1].

Region features of annotated boxes follow the RoIAlign of Mask R-CNN (He et al., 2017): the box is divided into
`ROI_BINS` x `ROI_BINS` bins, each bin's value is the mean of `ROI_SAMPLES` x `ROI_SAMPLES` bilinear samples of the
token feature map (`aligned=True`: token (i, j) is centred at (j + 0.5, i + 0.5) in grid units), and the region
feature is the mean over its bins. A box is first clipped to the part of the image the model sees; a box the crop
removes entirely yields no region.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ROI_BINS = 4
ROI_SAMPLES = 2
NON_GEOMETRIC = {"ToTensor", "MaybeToTensor", "Normalize", "MaybeConvertMode", "ConvertImageDtype", "function",
                 "Lambda"}


@dataclass(frozen=True)
class Affine:
    """Image pixel (x, y) -> model-input pixel (x * sx - ox, y * sy - oy). The image is `image_size` (W, H), the
    input `input_size` (W, H)."""

    sx: float
    sy: float
    ox: float
    oy: float
    image_size: tuple[int, int]
    input_size: tuple[int, int]


def _pair(size) -> tuple[int, int]:
    """(h, w) of a torchvision size argument."""
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _resized(step, w: int, h: int) -> tuple[int, int]:
    """(new w, new h) of a resize step, as the step computes it."""
    name = type(step).__name__
    if name == "ResizeKeepRatio":
        new_h, new_w = step.get_params(type("Image", (), {"size": (w, h)})(), step.size, step.longest)
        return new_w, new_h
    size = step.size
    if isinstance(size, int) or len(size) == 1:  # shortest side -> size, with torchvision's rounding
        short, long = sorted((w, h))
        new_short = size if isinstance(size, int) else size[0]
        new_long = int(new_short * long / short)
        if step.max_size is not None and new_long > step.max_size:
            new_short, new_long = int(step.max_size * new_short / new_long), step.max_size
        return (new_short, new_long) if w <= h else (new_long, new_short)
    return size[1], size[0]


def input_affine(transform, width: int, height: int) -> Affine:
    """Returns the `Affine` that `transform` (a torchvision Compose or one step) applies to a `width` x `height`
    image; raises ValueError naming a geometric step it cannot follow."""
    sx = sy = 1.0
    ox = oy = 0.0
    w, h = width, height
    for step in getattr(transform, "transforms", [transform]):
        name = type(step).__name__
        if name in ("Resize", "ResizeKeepRatio"):
            new_w, new_h = _resized(step, w, h)
            rx, ry = new_w / w, new_h / h
            sx, sy, ox, oy, w, h = sx * rx, sy * ry, ox * rx, oy * ry, new_w, new_h
        elif name in ("CenterCrop", "CenterCropOrPad"):
            crop_h, crop_w = _pair(step.size)
            if crop_w > w or crop_h > h:  # padded first, then cropped (torchvision and open_clip alike)
                pad_x, pad_y = max(0, (crop_w - w) // 2), max(0, (crop_h - h) // 2)
                ox, oy = ox - pad_x, oy - pad_y
                w, h = max(w, crop_w), max(h, crop_h)
            ox, oy = ox + int(round((w - crop_w) / 2.0)), oy + int(round((h - crop_h) / 2.0))
            w, h = crop_w, crop_h
        elif name not in NON_GEOMETRIC:
            raise ValueError(f"cannot map boxes through the eval transform step {step!r}")
    return Affine(sx, sy, ox, oy, (width, height), (w, h))


def to_input(boxes: np.ndarray, affine: Affine) -> np.ndarray:
    """Returns image-pixel boxes (N, 4) in model-input pixels, clipped to the input."""
    scale = np.array([affine.sx, affine.sy, affine.sx, affine.sy])
    shift = np.array([affine.ox, affine.oy, affine.ox, affine.oy])
    limit = np.array(affine.input_size * 2, dtype=np.float64)
    return np.clip(np.asarray(boxes, np.float64).reshape(-1, 4) * scale - shift, 0, limit)


def to_image(boxes: np.ndarray, affine: Affine) -> np.ndarray:
    """Returns model-input-pixel boxes (N, 4) as float32 boxes normalised to the original image, clipped to [0, 1]."""
    scale = np.array([affine.sx, affine.sy, affine.sx, affine.sy])
    shift = np.array([affine.ox, affine.oy, affine.ox, affine.oy])
    size = np.array(affine.image_size * 2, dtype=np.float64)
    return np.clip((np.asarray(boxes, np.float64).reshape(-1, 4) + shift) / scale / size, 0, 1).astype(np.float32)


def patch_boxes(affine: Affine, grid: tuple[int, int]) -> np.ndarray:
    """Returns the (gh * gw, 4) float32 normalised image boxes of a (gh, gw) token grid over the input, row-major
    (the order of the patch tokens); cells over padding are clipped to the image edge."""
    gh, gw = grid
    cw, ch = affine.input_size[0] / gw, affine.input_size[1] / gh
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    cells = np.stack([cols * cw, rows * ch, (cols + 1) * cw, (rows + 1) * ch], -1).reshape(-1, 4)
    return to_image(cells, affine)


def roi_features(fmap: torch.Tensor, affines: list[Affine],
                 boxes: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Returns (features, kept boxes) per image for a feature map (B, C, gh, gw) over the model input and each
    image's image-pixel boxes (N_i, 4): float32 (M_i, C) RoIAlign features and (M_i, 4) normalised image boxes of
    the visible part of each box (M_i <= N_i: boxes outside the model's view are dropped)."""
    from torchvision.ops import roi_align

    gh, gw = fmap.shape[2:]
    rois, kept, counts = [], [], []
    for i, (affine, image_boxes) in enumerate(zip(affines, boxes)):
        visible = to_input(image_boxes, affine)
        visible = visible[(visible[:, 2] > visible[:, 0]) & (visible[:, 3] > visible[:, 1])]
        kept.append(to_image(visible, affine))
        counts.append(len(visible))
        units = visible * np.array([gw / affine.input_size[0], gh / affine.input_size[1]] * 2)  # in grid cells
        rois.append(np.concatenate([np.full((len(units), 1), i), units], 1))
    if not sum(counts):
        return [np.zeros((0, fmap.shape[1]), np.float32) for _ in counts], kept
    pooled = roi_align(fmap.float(), torch.as_tensor(np.concatenate(rois), dtype=torch.float32, device=fmap.device),
                       output_size=ROI_BINS, spatial_scale=1.0, sampling_ratio=ROI_SAMPLES, aligned=True)
    feats = pooled.mean((2, 3)).cpu().numpy()
    return list(np.split(feats, np.cumsum(counts)[:-1])), kept
