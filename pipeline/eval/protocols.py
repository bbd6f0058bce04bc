"""Standard ITR evaluation protocols over image and caption embeddings of a test split.

- `coco-1k`: MS-COCO 5-fold 1K test (Karpathy 5K test split cut into 5 folds of 1,000 consecutive
  images with their captions); every metric, RSUM and ranks included, is computed per fold and then
  averaged over the folds (VSE++ `evalrank(fold5=True)`).
- `coco-5k`: the full 5,000-image COCO test split.
- `f30k-1k`: the 1,000-image Flickr30K test split.
- `generic`: all images and captions of any split.
Images are in split order (the feature store's order: shards sorted by key); captions may number any
count per image.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import PROTOCOL_SIZES
from pipeline.eval.metrics import recall_metrics, retrieval_ranks


def folds(num_images: int, protocol: str) -> list[np.ndarray]:
    """Returns the image index arrays the protocol evaluates separately (one array = one fold)."""
    if protocol not in PROTOCOL_SIZES:
        raise ValueError(f"eval.protocol: unknown protocol {protocol!r} (known: {', '.join(PROTOCOL_SIZES)})")
    expected = PROTOCOL_SIZES[protocol]
    if expected is not None and num_images != expected:
        raise ValueError(f"eval.protocol {protocol} needs {expected} test images, the split has {num_images}")
    if protocol == "coco-1k":
        return [np.arange(f * 1000, (f + 1) * 1000) for f in range(5)]
    return [np.arange(num_images)]


def evaluate_protocol(protocol: str, image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: np.ndarray,
                      ks=(1, 5, 10), chunk_size: int = 1024) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Returns (metrics averaged over the protocol's folds, (i2t ranks, t2i ranks) concatenated over folds)
    for L2-normalised embeddings; `caption_image[j]` is the image index of caption j."""
    caption_image = np.asarray(caption_image)
    per_fold, i2t_all, t2i_all = [], [], []
    for fold in folds(len(image_emb), protocol):
        caps = np.flatnonzero(np.isin(caption_image, fold))
        local_owner = np.searchsorted(fold, caption_image[caps])
        i2t, t2i = retrieval_ranks(image_emb[torch.from_numpy(fold)], text_emb[torch.from_numpy(caps)], local_owner,
                                   chunk_size)
        per_fold.append(recall_metrics(i2t, t2i, ks))
        i2t_all.append(i2t)
        t2i_all.append(t2i)
    metrics = {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}
    return metrics, (np.concatenate(i2t_all), np.concatenate(t2i_all))
