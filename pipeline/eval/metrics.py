"""Image-text retrieval metrics over a positives relation (any number of captions per image).

Definitions (VSE++, Faghri et al. 2018; VSE-infinity, Chen et al. 2021), with ranks 0-based:
- a query's rank r = the number of *negatives* scoring >= its best-scoring positive. Ties count against
  the model (a negative tied with the best positive is ranked ahead of it), so a collapsed model that
  scores everything equally gets R@K = 0, not 100.
- R@K = 100 * mean(r < K); medr = floor(median(r)) + 1; meanr = mean(r) + 1.
- i2t: the query is an image, its positives are all of its captions (hit if any is in the top K);
  t2i: the query is a caption, its one positive is its image.
- rsum = sum of R@1, R@5, R@10 over both directions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _first_positive_ranks(queries: torch.Tensor, gallery: torch.Tensor, positive_mask, chunk_size: int) -> np.ndarray:
    """Returns (Q,) int64 ranks; `positive_mask(rows)` gives the (len(rows), G) bool positives of those queries."""
    out = []
    for start in range(0, len(queries), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(queries)), device=queries.device)
        scores = queries[rows] @ gallery.T  # (c, G): one chunk, bounded memory
        pos = positive_mask(rows)
        if not bool(pos.any(1).all()):
            raise ValueError(f"query {int(rows[~pos.any(1)][0])} has no positive in the gallery")
        best = scores.masked_fill(~pos, float("-inf")).max(1, keepdim=True).values
        out.append(((scores >= best) & ~pos).sum(1).cpu())
    return torch.cat(out).numpy().astype(np.int64)


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor | np.ndarray,
                    chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Returns (i2t ranks (N,), t2i ranks (M,)) for N image and M caption embeddings scored by dot product
    (pass L2-normalised embeddings for cosine); `caption_image[j]` is the image index of caption j."""
    owner = torch.tensor(np.asarray(caption_image), dtype=torch.long, device=text_emb.device)
    image_emb, text_emb = image_emb.float(), text_emb.float()
    image_ids = torch.arange(len(image_emb), device=image_emb.device)
    i2t = _first_positive_ranks(image_emb, text_emb, lambda rows: owner[None, :] == rows[:, None], chunk_size)
    t2i = _first_positive_ranks(text_emb, image_emb, lambda rows: image_ids[None, :] == owner[rows][:, None], chunk_size)
    return i2t, t2i


def recall_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Returns {"i2t_R@K", "t2i_R@K" for each K, "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "rsum"}
    (recalls in percent; rsum over R@1/5/10 of both directions)."""
    metrics: dict[str, float] = {}
    for name, ranks in (("i2t", np.asarray(i2t_ranks)), ("t2i", np.asarray(t2i_ranks))):
        for k in sorted(set(ks) | {1, 5, 10}):
            metrics[f"{name}_R@{k}"] = float(100.0 * np.mean(ranks < k))
        metrics[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{name}_meanr"] = float(ranks.mean() + 1)
    metrics["rsum"] = sum(metrics[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return metrics


def evaluate_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image, ks=(1, 5, 10),
                        chunk_size: int = 1024) -> dict[str, float]:
    """Returns `recall_metrics` of cosine retrieval between the two embedding sets."""
    img = torch.nn.functional.normalize(torch.as_tensor(image_emb).float(), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(text_emb).float(), dim=-1)
    return recall_metrics(*retrieval_ranks(img, txt, caption_image, chunk_size), ks=ks)


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Returns R@K in percent for K = 1..max_k, shape (max_k,)."""
    counts = np.bincount(np.minimum(np.asarray(ranks), max_k), minlength=max_k + 1)[:max_k]
    return 100.0 * np.cumsum(counts) / len(ranks)


def plot_recall_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, max_k: int = 50,
                       ceiling_r1: tuple[float, float] | None = None) -> Path:
    """Draws R@K against K (log scale) for each named model's (i2t ranks, t2i ranks), the two directions
    side by side, with the perfect-model R@1 (i2t, t2i) as a star when given; saves a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ks = np.arange(1, max_k + 1)
    for ax, direction, idx in ((axes[0], "image -> text", 0), (axes[1], "text -> image", 1)):
        for name, ranks in curves.items():
            ax.plot(ks, recall_curve(ranks[idx], max_k), label=name)
        if ceiling_r1 is not None:
            ax.plot([1], [ceiling_r1[idx]], "*", markersize=12, color="black", label="perfect-model R@1")
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(direction)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("R@K (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
