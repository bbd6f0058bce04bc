"""Region features streamed to Ray Train: each worker's peak anonymous memory at N and 2N images, and the loader's
rows/s against a bare memory-mapped read of the same rows, same run.

Store: synthetic, random float16, written with the feature store's own writers (`pipeline.features.store`): per
image 36 regions x 2048 (`roi_feats`, with float32 `roi_boxes`), 5 captions per image of 32 tokens x 512
(`text_tokens`, plus the 512-wide `text_embed` / `text_pooled` every caption table has), shards of
`--shard-images` images. One store holds 2N images; the N-image run reads the manifest of its first N (a
selection), so the columnar cache of those shards is built once (by the driver, before training, as the train
stage does) and the 2N run adds the rest.

Training: the small pooling method `pool` (`pipeline/methods/pool.py`: a Linear per region and token, masked
mean, InfoNCE over the batch; no queues here) through the real worker entry
`pipeline.train.loop.train_loop_per_worker`, a `TorchTrainer` of 2 CPU workers launched as `run_train` does.

Memory: a thread of this process samples `RssAnon` (/proc/PID/status: anonymous pages only, so the pages of the
memory-mapped store, which the page cache holds and the kernel can drop, do not count) of every Ray Train worker
(a process under this driver whose title has "RayTrainWorker") every 10 ms; the peak of each is printed.
Growth = the largest worker peak at 2N / that at N: a worker holds its batches, never the split, so it should
not grow with the store.

Loader: after each training run, in this process, the rows of one epoch exactly as the 2 workers read them
(`epoch_batches`, rank 0 then rank 1, global batch `--batch-size`) go through `FeatureInputs.batch` behind
`prefetch` (gather, vectorised padding in float16 with masks, ids) against a bare read of the same rows:
`np.load(mmap_mode="r")` of the same `.npy` cache files, each batch's image and caption rows fancy-indexed
(float16, no padding, no conversion; a bare pass is short, so it is repeated for at least a second). The two
alternate `--repeats` times after an untimed warm-up pass; the figures are medians. The ratio on the last line is
the lower of the two sizes'.

    .venv/bin/python benchmarks/train_regions.py [--images 4000] [--shard-images 500] [--epochs 2] [--repeats 3]
    .venv/bin/python benchmarks/train_regions.py --coco     # 2N = 113,287 images: ~75 GB of disk (store + cache)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import TrainConfig
from pipeline.features import store
from pipeline.methods.base import args_dict
from pipeline.train.inputs import open_feature_inputs, prefetch
from pipeline.train.loop import epoch_batches, train_loop_per_worker

COCO_TRAIN = 113_287  # images of COCO's Karpathy train split (with restval)
SAMPLE_SECONDS = 0.01  # RssAnon sampling period
RESCAN_SECONDS = 0.5  # how often the sampler looks for new worker processes


# ---------------------------------------------------------------------------------------------------- the store
def image_bytes(a) -> int:
    """Returns the bytes of one image and its captions in the store (the columnar cache holds as much again)."""
    return (a.regions * a.region_dim * 2 + a.regions * 4 * 4
            + a.captions * (a.tokens * a.token_dim * 2 + 2 * a.token_dim * 2))


def write_store(root: Path, a, total: int, half: int) -> pd.DataFrame:
    """Writes `total` synthetic images as train shards of at most `a.shard_images` (none straddles image `half`);
    returns the store's manifest (also written)."""
    rng = np.random.default_rng(0)
    split_dir = root / "train"
    split_dir.mkdir(parents=True, exist_ok=True)
    bounds = sorted({*range(0, half, a.shard_images), *range(half, total, a.shard_images), total})
    rows = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        n, m = hi - lo, (hi - lo) * a.captions
        keys = [f"{k:012d}" for k in range(lo, hi)]
        regions = rng.standard_normal((n, a.regions, a.region_dim), dtype=np.float32).astype(np.float16)
        boxes = rng.random((n, a.regions, 4), dtype=np.float32)
        images = store.image_table(keys, [[] for _ in keys], {"roi_feats": list(regions), "roi_boxes": list(boxes)})
        del regions
        tokens = rng.standard_normal((m, a.tokens, a.token_dim), dtype=np.float32).astype(np.float16)
        embeds = rng.standard_normal((m, a.token_dim), dtype=np.float32).astype(np.float16)
        captions = store.caption_table([k for k in keys for _ in range(a.captions)], list(range(a.captions)) * n,
                                       [f"caption {j} of image {k}" for k in keys for j in range(a.captions)],
                                       {"text_embed": embeds, "text_pooled": embeds, "text_tokens": list(tokens)})
        del tokens
        sha = hashlib.sha256(f"bench-regions-{i}-{lo}-{hi}-{image_bytes(a)}".encode()).hexdigest()
        files = store.write_shard(split_dir, f"shard-{i:06d}.{sha[:16]}", images, captions, image_row_group_size=64)
        rows.append({"shard": f"shard-{i:06d}", "split": "train", "shard_sha256": sha,
                     "images_file": f"train/{files[0]}", "captions_file": f"train/{files[1]}",
                     "num_images": n, "num_captions": m})
    manifest = pd.DataFrame(rows)
    store.write_manifest(root, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------- memory
def rss_anon_kb(pid: int) -> int | None:
    """Returns RssAnon of a process in kB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class WorkerMemory:
    """Samples RssAnon of every Ray Train worker under this driver, in a thread; `peaks` = {pid: peak kB}."""

    def __init__(self):
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    @staticmethod
    def _workers() -> list[int]:
        import psutil

        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found

    def _run(self) -> None:
        pids: list[int] = []
        rescan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= rescan:
                pids, rescan = self._workers(), now + RESCAN_SECONDS
            for pid in pids:
                kb = rss_anon_kb(pid)
                if kb is not None:
                    self.peaks[pid] = max(kb, self.peaks.get(pid, 0))
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------- training
def train(root: Path, manifest: pd.DataFrame, tc: TrainConfig, inputs, method, storage: str) -> list[dict]:
    """Trains `method` (its initial state) with Ray Train as `run_train` launches it; returns rank 0's reports."""
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = {"name": tc.method, "args": args_dict(method.args), "dims": dict(method.dims)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "method": tc.method, "spec": spec, "init_state": method.state_dict(), "train": dataclasses.asdict(tc),
            "inputs": {"store": str(root), "manifest": manifest, "guide": None, "has_val": False},
            "steps_per_epoch": inputs.num_captions // tc.batch_size, "threads_per_worker": 1,
            "mlflow_uri": None, "mlflow_run_id": None,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-regions-{time.time_ns()}", storage_path=storage),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    return result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []


# ---------------------------------------------------------------------------------------------------- reading
def epoch_rows(inputs, tc: TrainConfig) -> list[np.ndarray]:
    """Returns the caption rows of epoch 0's batches as the workers read them: rank 0's, then rank 1's."""
    return [rows for rank in range(tc.num_workers)
            for rows in epoch_batches(inputs.num_captions, tc.batch_size, tc.seed, 0, rank, tc.num_workers)]


def loader_pass(inputs, batches: list[np.ndarray], depth: int, min_seconds: float = 1.0) -> float:
    """Returns the rows/s of `FeatureInputs.batch` over `batches` behind `prefetch`, over as many passes as take
    `min_seconds` (the same rule as the bare read's: one pass is short)."""
    t0, n = time.perf_counter(), 0
    while not n or time.perf_counter() - t0 < min_seconds:
        n += sum(len(b["ids"]) for b in prefetch((inputs.batch(rows) for rows in batches), depth))
    return n / (time.perf_counter() - t0)


class BareRead:
    """The same rows read straight from the `.npy` cache files: per shard, `np.load(mmap_mode="r")` of `roi_feats`
    and `text_tokens` seen as (n, items, width) (every image has the same region count and every caption the
    same token count in this store), fancy-indexed by the batch's rows."""

    def __init__(self, inputs, regions: int, tokens: int):
        split = inputs.main
        self.caption_image, self.image_starts, self.caption_starts = (split.caption_image, split.image_starts,
                                                                      split.caption_starts)
        self.regions = [self._map(img, "roi_feats", regions) for img, _ in split.folders]
        self.tokens = [self._map(cap, "text_tokens", tokens) for _, cap in split.folders]

    @staticmethod
    def _map(folder: Path, name: str, per: int) -> np.ndarray:
        values, offsets = np.load(folder / f"{name}.npy", mmap_mode="r"), np.load(folder / f"{name}.offsets.npy")
        if not np.array_equal(offsets, np.arange(len(offsets)) * per):
            raise ValueError(f"{folder}: {name} does not have {per} items per row")
        return values.reshape(len(offsets) - 1, per, values.shape[1])

    @staticmethod
    def _gather(maps: list[np.ndarray], starts: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        shard = np.searchsorted(starts, rows, side="right") - 1
        return [maps[s][rows[shard == s] - starts[s]] for s in np.unique(shard)]

    def batch(self, caption_rows: np.ndarray) -> int:
        """Reads the batch's image and caption rows; returns the number of caption rows."""
        self._gather(self.regions, self.image_starts, self.caption_image[caption_rows])
        self._gather(self.tokens, self.caption_starts, caption_rows)
        return len(caption_rows)

    def rate(self, batches: list[np.ndarray], min_seconds: float = 1.0) -> float:
        """Returns the rows/s of reading `batches`, over as many passes as take `min_seconds` (one is short)."""
        t0, n = time.perf_counter(), 0
        while not n or time.perf_counter() - t0 < min_seconds:
            n += sum(self.batch(rows) for rows in batches)
        return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- main
def run_size(root: Path, full: pd.DataFrame, images: int, a, tc: TrainConfig, storage: str) -> dict:
    """Trains on the first `images` images of the store and measures the loader; returns the figures."""
    from pipeline.stages.train import input_dims

    manifest = full[full["num_images"].cumsum() <= images].reset_index(drop=True)
    assert int(manifest["num_images"].sum()) == images
    from pipeline.stages.train import resolve_method

    cls, args = resolve_method(tc)
    t0 = time.perf_counter()
    inputs = open_feature_inputs(cls, args, root, manifest, "train")  # builds the columnar cache of new shards
    cache_s = time.perf_counter() - t0
    torch.manual_seed(tc.seed)
    method = cls(args, input_dims(inputs))
    t0 = time.perf_counter()
    with WorkerMemory() as memory:
        reports = train(root, manifest, tc, inputs, method, storage)
    fit_s = time.perf_counter() - t0
    if len(memory.peaks) != tc.num_workers:
        raise RuntimeError(f"found {len(memory.peaks)} Ray Train worker processes, expected {tc.num_workers}")
    batches = epoch_rows(inputs, tc)
    bare = BareRead(inputs, a.regions, a.tokens)
    bare.rate(batches, 0.0)  # warm-up: the page cache and the allocator
    loader_pass(inputs, batches, tc.prefetch_batches)
    bare_rates, loader_rates, batch_rates = [], [], []
    for _ in range(a.repeats):
        bare_rates.append(bare.rate(batches))
        loader_rates.append(loader_pass(inputs, batches, tc.prefetch_batches))
        batch_rates.append(loader_pass(inputs, batches, 0))  # the same without the prefetch thread
    epoch_seconds = [r["epoch_seconds"] for r in reports]
    return {"images": images, "captions": inputs.num_captions, "shards": len(manifest), "cache_s": cache_s,
            "fit_s": fit_s, "epoch_seconds": epoch_seconds, "peaks_mb": {p: kb / 1024 for p, kb in
                                                                          sorted(memory.peaks.items())},
            "bare": bare_rates, "loader": loader_rates, "batch": batch_rates, "rows": sum(len(b) for b in batches)}


def report(r: dict, tc: TrainConfig) -> None:
    per_worker = tc.batch_size // tc.num_workers
    rows_per_s = [r["captions"] // tc.batch_size * tc.batch_size / s for s in r["epoch_seconds"]]
    print(f"{r['images']} images, {r['captions']} captions, {r['shards']} shards (columnar cache built in "
          f"{r['cache_s']:.1f} s)")
    print(f"  training: {tc.num_workers} workers x {r['captions'] // tc.batch_size} steps x {tc.epochs} epochs, fit "
          f"{r['fit_s']:.1f} s; epochs {' '.join(f'{s:.1f}' for s in r['epoch_seconds'])} s = "
          f"{' '.join(f'{v:.0f}' for v in rows_per_s)} rows/s")
    print("  peak RssAnon per worker: " + ", ".join(f"pid {p} {mb:.0f} MiB" for p, mb in r["peaks_mb"].items()))
    bare, loader = np.median(r["bare"]), np.median(r["loader"])
    print(f"  bare mmap read        {bare:8.0f} rows/s  (float16 fancy-indexing; {r['rows']} rows in batches of "
          f"{per_worker}; repeats: {' '.join(f'{v:.0f}' for v in r['bare'])})")
    print(f"  loader (batch+prefetch) {loader:6.0f} rows/s  (padded float16 + masks + ids; repeats: "
          f"{' '.join(f'{v:.0f}' for v in r['loader'])}) -> ratio {loader / bare:.2f}")
    print(f"  (batch alone, no thread {np.median(r['batch']):6.0f} rows/s: a consumer that does no work of its own "
          "pays the thread hand-offs; training overlaps them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="the larger size, 2N (N = half of it)")
    parser.add_argument("--coco", action="store_true", help=f"--images {COCO_TRAIN} (COCO train)")
    parser.add_argument("--shard-images", type=int, default=500)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--region-dim", type=int, default=2048)
    parser.add_argument("--captions", type=int, default=5, help="per image")
    parser.add_argument("--tokens", type=int, default=32, help="per caption")
    parser.add_argument("--token-dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed loader / bare read passes per size")
    parser.add_argument("--workdir", default=None, help="where the store goes (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store and the cache")
    a = parser.parse_args()
    total = COCO_TRAIN if a.coco else a.images
    half = total // 2
    tc = TrainConfig(method="pool", method_args={"max_regions": a.regions, "max_tokens": a.tokens, "queue_size": 0},
                     epochs=a.epochs, batch_size=a.batch_size, warmup_steps=10, num_workers=2)
    if half * a.captions < a.batch_size:
        raise SystemExit(f"--images {total}: N = {half} images have fewer captions than one batch ({a.batch_size})")

    work = Path(a.workdir or tempfile.mkdtemp(prefix="itr-bench-regions-"))
    work.mkdir(parents=True, exist_ok=True)
    need = 2 * total * image_bytes(a)  # the Parquet store and its columnar cache
    free = shutil.disk_usage(work).free
    if need > 0.9 * free:
        raise SystemExit(f"needs about {need / 1e9:.1f} GB in {work}, which has {free / 1e9:.1f} GB free")
    print(f"Region features to Ray Train: {half} (N) and {total} (2N) images of {a.regions} regions x "
          f"{a.region_dim} float16, {a.captions} captions x {a.tokens} tokens x {a.token_dim}; "
          f"{need / 1e9:.1f} GB on disk (store + cache) in {work}")
    print(f"  memory: peak RssAnon (anonymous pages; the mapped store does not count) of each of the "
          f"{tc.num_workers} Ray Train workers, sampled every {SAMPLE_SECONDS * 1000:.0f} ms from the driver")
    print("  loader: FeatureInputs.batch behind prefetch vs np.load(mmap) fancy-indexing of the same rows, "
          f"medians of {a.repeats}; {os.cpu_count()} cores", flush=True)
    import ray

    try:
        t0 = time.perf_counter()
        root = work / "store"
        full = write_store(root, a, total, half)
        ray_dir = tempfile.mkdtemp(prefix="itr-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        print(f"store written in {time.perf_counter() - t0:.1f} s: {len(full)} shards", flush=True)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _temp_dir=ray_dir)
        try:
            results = [run_size(root, full, n, a, tc, str(work / "ray_results")) for n in (half, total)]
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    for r in results:
        report(r, tc)
    ratio = min(np.median(r["loader"]) / np.median(r["bare"]) for r in results)
    growth = max(results[1]["peaks_mb"].values()) / max(results[0]["peaks_mb"].values())
    print(f"ratio {ratio:.2f} (target >= 0.8); rss growth {growth:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
