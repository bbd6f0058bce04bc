"""Checks the cost model of docs/scale.md: measures the per-sample costs at two sizes and fails when the model's
prediction is off by more than 25%.

Per sample, on synthetic 224 px images with 5 captions each (one tar per size, written by our shard code) and an
open_clip model (random init; default ViT-B-32), `extract_shard` with tokens stored, on this machine:
- shard bytes: the tar's bytes; model: bytes per image measured at the small size, times the images.
- store bytes: the two Parquet files; model: bytes per image and per caption measured at the small size, times the
  images and captions. Also shown: the raw widths (float16 features: image_embed E, image_pooled W, patch_tokens
  G x W, patch_boxes G x 4 float32; text_embed E, text_pooled W, text_tokens L_i x W), an upper bound that Parquet's
  compression undercuts; per column from the Parquet metadata.
- extract FLOPs (FlopCounterMode, per image and per caption at the batch's trimmed length), wall and CPU seconds
  (this process, all its threads), after an untimed warm-up extraction; model: the FLOPs of the large size over the
  FLOPs per CPU second achieved at the small size (CPU seconds, not wall: on a shared machine the wall time
  follows the other processes' load).
- queue gather bytes per step: the packed all-gather of `enqueue_together` (two queues of E floats + the ids) for a
  global batch; model: B x (2E + 2) x 4 bytes.

Last line: `max error X% (target <= 25%)`; exit status 1 when over.

    .venv/bin/python benchmarks/scale_check.py [--model ViT-B-32] [--small 64] [--large 192]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.25


def column_bytes(path: Path) -> dict[str, int]:
    """Returns {column: compressed bytes} of a Parquet file (the top-level column of each leaf)."""
    meta = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def caption_flops(ext, texts: list[str]) -> float:
    """Returns the FLOPs of encoding `texts` as the extractor does (trimmed to the batch's longest caption)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.features.extractors import openclip

    with FlopCounterMode(display=False) as counter:
        openclip.encode_tokens(ext, openclip.tokenize(ext, texts), False)
    return float(counter.get_total_flops())


def image_flops(ext) -> float:
    """Returns the FLOPs of encoding one image (counted on a batch of 2). Counted with autograd on: in inference mode
    nn.MultiheadAttention takes its fused fast path, whose projections FlopCounterMode does not see (a third of a
    ViT's FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = getattr(ext.model.visual, "image_size", (224, 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        ext.model.encode_image(torch.zeros(2, 3, *size))
    return counter.get_total_flops() / 2


def measure(root: Path, ext, images: int, batch_size: int) -> dict:
    """Shards `images` synthetic samples into one tar and extracts it with tokens; returns the measured costs."""
    from benchmarks.extract import make_shards
    from pipeline.data.shard import read_shard
    from pipeline.features import store
    from pipeline.features.extract import extract_shard
    from pipeline.features.extractors import openclip

    rows = make_shards(root, 1, images)
    tar = root / "shards" / rows[0]["shard"]
    samples = read_shard(tar)
    unique = sorted({c for s in samples for c in s["json"]["captions"]})
    t0, c0 = time.perf_counter(), time.process_time()
    out = extract_shard(openclip, ext, tar, root / "store", "shard", batch_size, with_tokens=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    img_cols = column_bytes(root / "store" / out["images_file"])
    cap_cols = column_bytes(root / "store" / out["captions_file"])
    split = store.read_split(root / "store", _manifest(out), "train", caption_columns=("text_tokens",))
    lengths = np.diff(split.offsets["text_tokens"])
    flops = images * image_flops(ext) + sum(caption_flops(ext, unique[i:i + batch_size])
                                            for i in range(0, len(unique), batch_size))
    return {"images": images, "captions": out["num_captions"], "unique": len(unique), "seconds": seconds, "cpu": cpu,
            "shard_bytes": int(rows[0]["bytes"]), "img_cols": img_cols, "cap_cols": cap_cols,
            "store_bytes": sum(img_cols.values()) + sum(cap_cols.values()), "tokens": float(lengths.mean()),
            "flops": flops}


def _manifest(out: dict):
    import pandas as pd

    return pd.DataFrame([{"split": "train", "images_file": out["images_file"],
                          "captions_file": out["captions_file"]}])


def predicted_store_bytes(images: int, captions: int, tokens: float, embed: int, width: int, text_width: int,
                          grid: int) -> float:
    """The store's raw bytes: float16 features, float32 boxes, int32 lengths (no compression, no RoI features)."""
    per_image = 2 * (embed + width) + 2 * grid * width + 16 * grid
    per_caption = 2 * (embed + text_width) + 2 * tokens * text_width + 4
    return images * per_image + captions * per_caption


def gather_bytes(embed: int, batch: int) -> tuple[int, int]:
    """Returns (measured, predicted) bytes of the packed queue all-gather of one step of global batch `batch`."""
    import torch

    from pipeline.nn import momentum

    seen = []
    original = momentum.all_gather_no_grad
    momentum.all_gather_no_grad = lambda t: seen.append(t.numel() * t.element_size()) or t
    try:
        queues = [momentum.MomentumQueue(4 * batch, embed), momentum.MomentumQueue(4 * batch, embed)]
        keys = [torch.randn(batch, embed, dtype=torch.bfloat16), torch.randn(batch, embed)]
        ids = torch.arange(batch)
        momentum.enqueue_together(queues, keys, [ids, ids])
    finally:
        momentum.all_gather_no_grad = original
    return sum(seen), batch * (2 * embed + 2) * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--small", type=int, default=64, help="images of the first measurement")
    parser.add_argument("--large", type=int, default=192, help="images of the second (predicted from the first)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import logging

    import torch

    from pipeline.config import FeaturesConfig
    from pipeline.features.extractors import openclip

    logging.getLogger().setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = openclip.load(FeaturesConfig(model=args.model, precision="auto"), torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="scale-check-") as tmp:
        measure(Path(tmp) / "warm-up", ext, 8, args.batch_size)  # first calls build the kernels
        small = measure(Path(tmp) / "small", ext, args.small, args.batch_size)
        large = measure(Path(tmp) / "large", ext, args.large, args.batch_size)
    import open_clip

    cfg = open_clip.get_model_config(args.model)
    embed, width, text_width = cfg["embed_dim"], cfg["vision_cfg"]["width"], cfg["text_cfg"]["width"]
    size, patch = cfg["vision_cfg"]["image_size"], cfg["vision_cfg"].get("patch_size", 32)
    grid = (size // patch) ** 2
    rate = small["flops"] / small["cpu"]
    measured_gather, predicted_gather = gather_bytes(embed, 1024)
    checks = [
        ("shard bytes", large["shard_bytes"], small["shard_bytes"] / small["images"] * large["images"]),
        ("store bytes", large["store_bytes"],
         sum(small["img_cols"].values()) / small["images"] * large["images"]
         + sum(small["cap_cols"].values()) / small["captions"] * large["captions"]),
        ("extract CPU seconds", large["cpu"], large["flops"] / rate),
        ("queue gather bytes/step (B=1024)", measured_gather, predicted_gather),
    ]
    print(f"{args.model} (random init), {ext.precision}, {torch.get_num_threads()} torch threads; synthetic 224 px, "
          f"5 captions per image; sizes {args.small} and {args.large} images")
    for m in (small, large):
        print(f"{m['images']:5d} images, {m['captions']} captions ({m['unique']} unique, {m['tokens']:.1f} tokens "
              f"each): shard {m['shard_bytes'] / m['images'] / 1e3:.1f} kB/image, store "
              f"{sum(m['img_cols'].values()) / m['images'] / 1e3:.1f} kB/image + "
              f"{sum(m['cap_cols'].values()) / m['captions'] / 1e3:.2f} kB/caption, extract "
              f"{m['flops'] / m['images'] / 1e9:.2f} GFLOP, {m['seconds'] / m['images']:.3f} s and "
              f"{m['cpu'] / m['images']:.3f} CPU s per image (captions included), "
              f"{m['flops'] / m['seconds'] / 1e9:.1f} GFLOP/s, {m['flops'] / m['cpu'] / 1e9:.1f} GFLOP per CPU second")
    print("store columns, bytes per row (large): "
          + ", ".join(f"{k} {v / large['images']:.0f}" for k, v in large["img_cols"].items() if v > 1000)
          + "; " + ", ".join(f"{k} {v / large['captions']:.0f}" for k, v in large["cap_cols"].items() if v > 1000))
    raw = predicted_store_bytes(large["images"], large["captions"], large["tokens"], embed, width, text_width, grid)
    print(f"store, raw widths (no Parquet compression, no RoI features): {raw / 1e6:.2f} MB, measured "
          f"{large['store_bytes'] / 1e6:.2f} MB")
    worst = 0.0
    print(f"{'':36}{'measured':>14}{'predicted':>14}{'error':>8}")
    for name, got, want in checks:
        err = abs(want - got) / got
        worst = max(worst, err)
        print(f"{name:36}{got:14.4g}{want:14.4g}{100 * err:7.1f}%")
    print(f"max error {100 * worst:.1f}% (target <= {100 * TOLERANCE:.0f}%)")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
