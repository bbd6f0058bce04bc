"""Evaluation of one split's embeddings under the configured protocol, and the report it writes
(metrics.json, table.md, recall.png)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import EvalConfig
from pipeline.eval.metrics import map_at_k, multi_hot, plot_recall_curves
from pipeline.eval.protocols import evaluate_protocol
from pipeline.io import atomic_write_json


def _float_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x.float() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def evaluate_split(image_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray, caption_image: np.ndarray,
                   labels: list[list[str]], ec: EvalConfig) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Returns (metrics, (i2t ranks, t2i ranks)) of (N, D) image and (M, D) caption embeddings: R@K, ranks
    and RSUM under `ec.protocol`, plus `i2t_mAP@k`, `t2i_mAP@k`, `i2t_P@k`, `t2i_P@k` (relevant = shares a
    label; a caption has its image's labels) when the images carry labels and `ec.map_k` > 0."""
    img = torch.nn.functional.normalize(_float_tensor(image_emb), dim=-1)
    txt = torch.nn.functional.normalize(_float_tensor(text_emb), dim=-1)
    metrics, ranks = evaluate_protocol(ec.protocol, img, txt, caption_image, ec.ks, ec.chunk_size)
    if ec.map_k > 0 and any(labels):
        image_labels, _ = multi_hot(labels)
        caption_labels = image_labels[np.asarray(caption_image)]
        for direction, (q, d, ql, dl) in {"i2t": (img, txt, image_labels, caption_labels),
                                          "t2i": (txt, img, caption_labels, image_labels)}.items():
            for key, value in map_at_k(q, d, ql, dl, ec.map_k, ec.chunk_size).items():
                metrics[f"{direction}_{key}"] = value
    return metrics, ranks


def table_columns(rows: dict[str, dict], ks) -> list[str]:
    """Returns the table's metric columns: R@K both ways, rsum, then any mAP/P@k that a row has."""
    cols = [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["rsum"]
    extra = sorted({key for m in rows.values() for key in m if "mAP@" in key or "_P@" in key})
    return cols + extra


def format_table(rows: dict[str, dict], ks=(1, 5, 10)) -> str:
    """Returns a markdown table, one row per model (blank cells where a row lacks a metric)."""
    cols = table_columns(rows, ks)
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in rows.items():
        cells = [f"{m[c]:.1f}" if m.get(c) is not None else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: dict[str, dict], ranks: dict[str, tuple], metrics: dict, ks,
                 ceiling: dict | None = None) -> str:
    """Writes metrics.json, table.md and recall.png (curves of every ranked model, ceiling R@1 as a star)
    into folder `out`; returns the table."""
    table = format_table(rows, ks)
    atomic_write_json(out / "metrics.json", metrics)
    (out / "table.md").write_text(table + "\n")
    plot_recall_curves(ranks, out / "recall.png",
                       ceiling_r1=(ceiling["i2t_R@1"], ceiling["t2i_R@1"]) if ceiling else None)
    return table
