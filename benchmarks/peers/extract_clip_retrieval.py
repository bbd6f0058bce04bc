"""Extraction against clip-retrieval: `clip-retrieval inference` (webdataset input) and our extract stage over the
same shards with the same weights, in the same run, each on the whole machine.

- Shards: synthetic 224 px images with one caption each (`KEY.txt`, what clip-retrieval reads, is then the only
  caption ours reads too), written by our shard code, so both sides encode the same images and captions.
- Weights: one random-init open_clip model (default ViT-B-32) saved to a checkpoint file that both sides load
  (`--clip_model open_clip:ViT-B-32/<checkpoint>`, `features.pretrained=<checkpoint>`).
- Precision: what clip-retrieval uses on the device (fp32 on a CPU, bf16 autocast on a bf16 GPU); ours is set to the
  same. `--ours-precision auto` runs ours at its own default as well (reported, not the ratio).
- clip-retrieval runs in its own venv (numpy<2, pyarrow<16, open_clip<3: `benchmarks.peers.peer_venv`, built once).
  Its time is the whole command (process start, model load and its warm-up on one batch, reading, encoding,
  writing). Ours is the whole stage (`run_extract`: Ray Data actors started, model load, tars read, Parquet written,
  manifest, MLflow) after Ray itself is up (a running cluster is the stage's normal setting, as in
  `benchmarks/extract.py`).
- Check: both produce the same embeddings, cosine >= 0.99 per image and per caption (matched by key).

Last line: `ratio X (target >= 1.2)` = our items/s over clip-retrieval's, items = images + captions.

    .venv/bin/python benchmarks/peers/extract_clip_retrieval.py [--images 2000] [--shard-size 250] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.extract import CpuAccount  # noqa: E402
from benchmarks.peers import PEERS, brace_range, make_shards, peer_venv, peer_version, save_random_checkpoint  # noqa


def run_clip_retrieval(python: Path, pattern: str, out: Path, model: str, checkpoint: Path, batch_size: int,
                       workers: int) -> tuple[float, float, list[str]]:
    """Runs `clip-retrieval inference` over the tars of `pattern` into `out`; returns (seconds, seconds of its
    model warm-up as it logs them (2 batches of each tower, part of its start-up), command line)."""
    cmd = [str(python.parent / "clip-retrieval"), "inference", "--input_dataset", pattern, "--input_format",
           "webdataset", "--output_folder", str(out), "--clip_model", f"open_clip:{model}/{checkpoint}",
           "--batch_size", str(batch_size), "--num_prepro_workers", str(workers), "--enable_metadata", "False",
           "--use_jit", "False"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"clip-retrieval failed ({shlex.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    warmup = sum(float(s) for s in re.findall(r"done warming up in ([\d.]+)s", proc.stdout + proc.stderr))
    return seconds, warmup, cmd


def read_clip_retrieval(out: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Returns ({key: image embedding}, {key: caption embedding}) of a clip-retrieval output folder."""
    import pandas as pd

    keys, images, texts = [], [], []
    for meta in sorted((out / "metadata").glob("metadata_*.parquet")):
        part = meta.stem.removeprefix("metadata_")
        keys += pd.read_parquet(meta)["image_path"].tolist()
        images.append(np.load(out / "img_emb" / f"img_emb_{part}.npy"))
        texts.append(np.load(out / "text_emb" / f"text_emb_{part}.npy"))
    images, texts = np.concatenate(images), np.concatenate(texts)
    return dict(zip(keys, images)), dict(zip(keys, texts))


def run_ours(tmp: Path, shards_dir: Path, model: str, checkpoint: Path, batch_size: int, precision: str,
             cpus: int) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Runs our extract stage over the shard folder (Ray started first, excluded); returns (seconds,
    {key: image embedding}, {key: first caption's embedding}, seconds the busiest actor spent in extract_shard)."""
    import logging

    import ray

    from pipeline.config import load_config
    from pipeline.features import store
    from pipeline.stages import StageResult, run_extract
    from pipeline.tracking.runs import open_tracker

    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    work = tmp / f"work-{precision}"
    work.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp / "ray"))
    try:
        ray.data.range(2, override_num_blocks=2).map(lambda row: row).take_all()  # Ray Data's own actors
        tracker = open_tracker(f"sqlite:///{work}/mlflow.db", "bench-peers")
        cfg = load_config(None, [f"workdir={work}", f"features.model={model}", f"features.pretrained={checkpoint}",
                                 f"features.batch_size={batch_size}", f"features.precision={precision}",
                                 "features.store_tokens=false"])
        t0 = time.perf_counter()
        result = run_extract(cfg, tracker, StageResult("shard", "bench", shards_dir, ""))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    store_dir, manifest = store.open_selection(result.path)
    split = store.read_split(store_dir, manifest, "train")
    images = dict(zip(split.keys, np.asarray(split.images["image_embed"], np.float32)))
    texts = {}
    for j, row in enumerate(split.caption_image):
        texts.setdefault(split.keys[row], np.asarray(split.captions["text_embed"][j], np.float32))
    busy = store.read_manifest(store_dir).groupby("worker")["seconds"].sum().max()
    return seconds, images, texts, float(busy)


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Returns the smallest cosine between the embeddings of the same key in `a` and `b` (same keys required)."""
    assert set(a) == set(b), f"{len(set(a) ^ set(b))} keys differ"
    x = np.stack([a[k] for k in sorted(a)]).astype(np.float32)
    y = np.stack([b[k] for k in sorted(a)]).astype(np.float32)
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init, saved once)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--ours-precision", default="", help="also run ours at this precision (e.g. auto)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    python = peer_venv("peers", PEERS)
    versions = {d: peer_version(python, d) for d in ("clip-retrieval", "open_clip_torch", "torch")}
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "fp32"
    num_shards = max(1, args.images // args.shard_size)
    with tempfile.TemporaryDirectory(prefix="bench-peer-extract-") as tmp:
        tmp = Path(tmp)
        shards_dir = make_shards(tmp, num_shards, args.shard_size, captions=1)
        paths = sorted((shards_dir / "train").glob("shard-*.tar"))
        images = num_shards * args.shard_size
        items = 2 * images  # one caption per image
        checkpoint = save_random_checkpoint(args.model, tmp / f"{args.model}-random.pt")
        print(f"{args.model} (random init, one checkpoint both load), {precision} on both sides; {num_shards} shards "
              f"x {args.shard_size} = {images} images + {images} captions (224 px synthetic), batch {args.batch_size}, "
              f"{args.cpus} CPUs; clip-retrieval {versions['clip-retrieval']} (open_clip "
              f"{versions['open_clip_torch']}, torch {versions['torch']}) in {python.parent.parent}", flush=True)

        with CpuAccount() as peer_cpu:
            peer_s, warmup, cmd = run_clip_retrieval(python, brace_range(paths), tmp / "clip-retrieval", args.model,
                                             checkpoint, args.batch_size, args.cpus)
        print(f"clip-retrieval: {shlex.join(cmd)}", flush=True)
        peer_images, peer_texts = read_clip_retrieval(tmp / "clip-retrieval")
        with CpuAccount() as ours_cpu:
            ours_s, our_images, our_texts, busy = run_ours(tmp, shards_dir, args.model, checkpoint, args.batch_size,
                                                           precision, args.cpus)
        extra = []
        if args.ours_precision and args.ours_precision != precision:
            s, *_ = run_ours(tmp, shards_dir, args.model, checkpoint, args.batch_size, args.ours_precision, args.cpus)
            extra.append(f"ours at features.precision={args.ours_precision}: {s:.1f} s, {items / s:.2f} items/s "
                         f"({peer_s / s:.2f}x clip-retrieval)")
    cos_images, cos_texts = min_cosine(our_images, peer_images), min_cosine(our_texts, peer_texts)
    print()
    print(f"{'':36}{'seconds':>8}{'items/s':>9}   (items = images + captions)")
    print(f"{'clip-retrieval inference':36}{peer_s:8.1f}{items / peer_s:9.2f}   (of which {warmup:.1f} s its "
          f"model warm-up)")
    print(f"{'ours: extract stage (Ray Data)':36}{ours_s:8.1f}{items / ours_s:9.2f}   "
          f"(busiest actor {busy:.1f} s in extract_shard)")
    for line in extra:
        print(line)
    print(f"same embeddings: min cosine per image {cos_images:.5f}, per caption {cos_texts:.5f} (target >= 0.99)")
    print(f"other processes on this machine used {100 * peer_cpu.other:.0f}% of its CPUs during clip-retrieval, "
          f"{100 * ours_cpu.other:.0f}% during ours: 0% is a quiet machine")
    if min(cos_images, cos_texts) < 0.99:
        print("FAIL: the two sides' embeddings differ")
    print(f"ratio {peer_s / ours_s:.2f} (target >= 1.2)")


if __name__ == "__main__":
    main()
