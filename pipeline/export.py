"""Exports that other tools read.

- `sizes.json` in each split folder of the shards (open_clip_train's convention: `{"shard-000000.tar": samples}`),
  so `open_clip_train --dataset-type webdataset` needs no `--train-num-samples`; written by the shard stage.
- `itr export CONFIG --format clip-retrieval [--split test|all] [--out DIR] [--frozen]`: the trained method's (or
  the frozen extractor's) embeddings in clip-retrieval's output layout, which autofaiss and clip-retrieval's back
  end read:

      DIR/img_emb/img_emb_<p>.npy       (n_p, D) float16, L2-normalised, one row per image
      DIR/text_emb/text_emb_<p>.npy     (n_p, D) float16, the image's first caption (the shards' KEY.txt)
      DIR/metadata/metadata_<p>.parquet image_path (the sample key, as clip-retrieval's webdataset reader names
                                        it), caption, then key, split, shard, captions (all), labels

  one partition `p` per split (numbered from 0, zero-padded to the width of the partition count), rows in the
  same order in the three files.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

FORMATS = ("clip-retrieval",)


def partition_name(index: int, count: int) -> str:
    """Returns clip-retrieval's partition suffix: `index` zero-padded to the digits of `count`."""
    return str(index).zfill(int(math.log10(max(1, count))) + 1)


def first_captions(caption_image: np.ndarray, num_images: int) -> np.ndarray:
    """Returns (num_images,) the first caption row of each image (captions of an image keep their order)."""
    caption_image = np.asarray(caption_image)
    rows = np.full(num_images, -1, dtype=np.int64)
    owners, first = np.unique(caption_image, return_index=True)
    rows[owners] = first
    if (rows < 0).any():
        raise ValueError(f"image row {int(np.argmax(rows < 0))} has no caption")
    return rows


def clip_retrieval_partition(searcher, out: Path, index: int, count: int) -> int:
    """Writes one partition (the searcher's split) into `out`; returns its number of rows."""
    import pandas as pd

    g = searcher.gallery
    first = first_captions(g.caption_image, len(g.keys))
    by_image = searcher.captions_by_image()
    labels = searcher.inputs.labels
    name = partition_name(index, count)
    for folder in ("img_emb", "text_emb", "metadata"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    np.save(out / "img_emb" / f"img_emb_{name}.npy", g.images.astype(np.float16))
    np.save(out / "text_emb" / f"text_emb_{name}.npy", g.captions[first].astype(np.float16))
    meta = pd.DataFrame({"image_path": g.keys, "caption": [g.caption_text[r] for r in first], "key": g.keys,
                         "split": searcher.split, "shard": [searcher.shard_of(k) for k in g.keys],
                         "captions": by_image, "labels": [list(x) for x in labels]})
    meta.to_parquet(out / "metadata" / f"metadata_{name}.parquet", index=False)
    return len(meta)


def export_clip_retrieval(cfg, out: Path, splits: list[str], frozen: bool = False, run_id: str | None = None) -> dict:
    """Writes `splits` of the config's trained model (or the frozen features) in clip-retrieval's layout into
    folder `out` (replaced atomically); returns {"out", "rows" per split, "model"}."""
    from pipeline.io import atomic_dir, atomic_write_json
    from pipeline.search import Searcher, locate

    located = locate(cfg, run_id)
    rows = {}
    with atomic_dir(out) as tmp:
        for i, split in enumerate(splits):
            searcher = Searcher(cfg, split, frozen=frozen, located=located)
            rows[split] = clip_retrieval_partition(searcher, tmp, i, len(splits))
        info = {"format": "clip-retrieval", "splits": rows, "frozen": frozen, "dataset": cfg.data.name,
                "model": "frozen features" if frozen else cfg.train.method,
                "train_run": located.trained.run_id, "train_fingerprint": located.trained.fingerprint}
        atomic_write_json(tmp / "export.json", info)
    return {"out": out, "rows": rows, "model": info["model"]}


def store_splits(cfg, run_id: str | None = None) -> list[str]:
    """Returns the splits of the config's feature store (or shards), in the order train, val, test, others."""
    from pipeline.search import locate

    located = locate(cfg, run_id)
    if "extract" in located.sources:
        from pipeline.features import store

        names = set(store.open_selection(located.sources["extract"].path)[1]["split"])
    else:
        from pipeline.data.shard import read_manifest

        names = set(read_manifest(located.sources["shard"].path)["split"])
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(names, key=lambda s: (order.get(s, 3), s))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `itr export`'s arguments."""
    parser.add_argument("config", help="experiment YAML (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--format", choices=FORMATS, default="clip-retrieval", help="output layout")
    parser.add_argument("--split", default=None, help="a split, or `all` (default: eval.split)")
    parser.add_argument("--out", help="output folder (default: <workdir>/export/<format>)")
    parser.add_argument("--frozen", action="store_true", help="the extractor's own embeddings, not the trained method")
    parser.add_argument("--run", help="the eval or train run whose model to use (default: the latest of this config)")


def main(args: argparse.Namespace) -> int:
    """`itr export`: writes the export and prints where; returns the exit status."""
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    splits = store_splits(cfg, args.run) if args.split == "all" else [args.split or cfg.eval.split]
    out = Path(args.out).expanduser().resolve() if args.out else cfg.workdir_path / "export" / args.format
    result = export_clip_retrieval(cfg, out, splits, frozen=args.frozen, run_id=args.run)
    counts = ", ".join(f"{split}: {n}" for split, n in result["rows"].items())
    print(f"{args.format}: {result['model']} embeddings of {counts} images -> {out}", file=sys.stderr)
    print(out)
    return 0
