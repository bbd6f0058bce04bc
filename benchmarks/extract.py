"""Extraction speed: the Ray Data extract stage vs the bare model forward on the same batches, same run; the
model's achieved GFLOP/s over a matmul roofline; incremental reruns; the extraction actors' peak memory.

Data: synthetic 224 px images with 5 captions each, sharded into WebDataset tars without Ray. Model: an
open_clip built-in config with random weights (no download), bf16 autocast on a bf16-capable CPU (else fp32).

(a) bare forward, the ceiling: `model.encode_image` on the preprocessed image tensors and `model.encode_text` on
    the tokenised unique captions of every shard, in exactly the batches (b) computes, spread evenly (by FLOPs)
    over as many processes with as many torch threads each as the stage gives its actors, at the actors'
    niceness; decoding, preprocessing, tokenising and a 2-item warm-up of each tower happen before the clock.
(b) `pipeline.stages.run_extract` over the same shards: Ray Data actor pool, tar reads, decoding, the model,
    Parquet writes, manifest commits, MLflow. Ray start-up is excluded: `ray.init` and a two-row Ray Data run
    (which starts Ray Data's own actors, as the shard stage does in a pipeline run) come first. The actors'
    start-up (process, imports, model load) is included; the time outside `extract_shard` is reported.
(c) bf16 and fp32 matmul roofline (2048^3), timed in the (a) processes right after (a), all at once.
(d) the stage rerun with nothing changed, (e) with 10% more shards: each as % of (b).
Memory: each extraction actor's peak RSS after each of its shards (column `peak_rss_mb` of the store
manifest), in (b) and in (e). CPU: what the actors and the rest of Ray used in (b), and the share of the
machine other processes took during (a) and (b) (timings on a busy machine are noisy).

Headline: (b)/(a) in images+captions per second (target >= 0.85).

    .venv/bin/python benchmarks/extract.py [--model ViT-B-32] [--images 640] [--shard-size 32] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

MATMUL_N = 2048
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", 15))  # Ray runs its workers at this niceness


class CpuAccount:
    """Accounts the CPU time spent while a block runs: `other` = share of the machine's CPUs used by processes
    outside this process tree (0 on a quiet machine), `actors` = CPU seconds of the extraction actors,
    `rest` = CPU seconds of the rest of this tree (driver, raylet, GCS, Ray Data's own actors, (a)'s workers).
    Descendants are sampled every 0.5 s, so the last moments of one that exits are missed."""

    def __enter__(self) -> "CpuAccount":
        import threading

        self.seen: dict[int, list] = {}  # pid -> [cpu seconds before the block, latest, is an extraction actor]
        self._sample(before=True)
        self.start = (time.perf_counter(), _busy_cpu_seconds(), sum(os.times()[:2]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def _sample(self, before: bool = False) -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                cpu, actor = sum(child.cpu_times()[:2]), "ShardFeatureWriter" in " ".join(child.cmdline())
            except psutil.Error:
                continue
            entry = self.seen.setdefault(child.pid, [cpu if before else 0.0, cpu, actor])
            entry[1], entry[2] = cpu, entry[2] or actor

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall, busy = time.perf_counter(), _busy_cpu_seconds()
        mine = sum(os.times()[:2]) - self.start[2] + sum(last - first for first, last, _ in self.seen.values())
        self.actors = sum(last - first for first, last, actor in self.seen.values() if actor)
        self.rest = mine - self.actors
        others = (busy - self.start[1]) - mine
        self.other = max(0.0, others) / ((wall - self.start[0]) * os.cpu_count())


def _busy_cpu_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def make_shards(root: Path, num_shards: int, shard_size: int) -> list[dict]:
    """Generates `num_shards * shard_size` synthetic 224 px train images and writes them as tars under
    `root/shards`; returns the shard manifest rows, in shard order."""
    from pipeline.data.shard import plan_shards, write_shard
    from pipeline.data.sources import synthetic

    synthetic.generate(root / "synthetic", seed=0, num_train=num_shards * shard_size, num_val=0, num_test=1,
                       image_size=224, max_objects=3, progress=False)
    samples = [s for s in synthetic.load_samples(root / "synthetic", "synthetic")[0] if s.split == "train"]
    plans = plan_shards(samples, shard_size)
    assert len(plans) == num_shards, len(plans)
    return [{**write_shard(plan, root / "shards")["row"], "run_id": "bench"} for plan in plans]


def write_shard_manifest(shards_dir: Path, rows: list[dict]) -> None:
    """Writes the shard stage's manifest of `rows` (what the extract stage reads)."""
    import pyarrow as pa

    from pipeline.data.shard import MANIFEST, MANIFEST_COLUMNS
    from pipeline.io import atomic_write_parquet

    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    atomic_write_parquet(shards_dir / MANIFEST, pa.Table.from_pandas(frame, preserve_index=False))


def shard_batches(paths: list[Path], batch_size: int) -> list[tuple[str, int, int, int]]:
    """Returns the model batches `extract_shard` computes, as (kind "image" | "text", shard index, start, stop)
    over each shard's samples or its sorted unique captions."""
    from pipeline.data.shard import read_shard

    batches = []
    for i, path in enumerate(paths):
        samples = read_shard(path)
        unique = len({c for s in samples for c in s["json"]["captions"]})
        batches += [("image", i, lo, min(lo + batch_size, len(samples))) for lo in range(0, len(samples), batch_size)]
        batches += [("text", i, lo, min(lo + batch_size, unique)) for lo in range(0, unique, batch_size)]
    return batches


def text_lengths(model: str, paths: list[Path], batches: list[tuple]) -> dict[tuple, int]:
    """Returns {text batch: the number of tokens the text tower runs it at} (its longest caption's, when the model's
    text tower is trimmed; else the full context)."""
    from pipeline.config import FeaturesConfig
    from pipeline.data.shard import read_shard
    from pipeline.features.extract import unique_captions
    from pipeline.features.extractors import openclip

    ext = openclip.load(FeaturesConfig(model=model, precision="fp32"), __import__("torch").device("cpu"))
    trimmed = openclip.text_tower(ext.model) is not None
    out, uniques = {}, {}
    for batch in batches:
        kind, i, lo, hi = batch
        if kind != "text":
            continue
        if i not in uniques:
            uniques[i] = unique_captions([c for s in read_shard(paths[i]) for c in s["json"]["captions"]])[0]
        ids = ext.tokenizer(list(uniques[i][lo:hi]))
        out[batch] = openclip.trimmed_length(ids) if trimmed else ids.shape[1]
    return out


def count_flops(model: str, precision: str, lengths: set[int]) -> tuple[float, dict[int, float]]:
    """Returns (FLOPs per image, {tokens: FLOPs per caption run at that many tokens}) of the extractor's forward,
    counted by FlopCounterMode on a batch of 2 under the extractor's autocast, with autograd on (in inference mode
    nn.MultiheadAttention takes a fused path whose projections the counter does not see)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import FeaturesConfig
    from pipeline.features.extractors import openclip
    from pipeline.features.precision import autocast

    ext = openclip.load(FeaturesConfig(model=model, precision=precision), torch.device("cpu"))
    size = getattr(ext.model.visual, "image_size", (224, 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    tower = openclip.text_tower(ext.model)

    def count(fn, x) -> float:
        with torch.enable_grad(), autocast(ext.precision, ext.device), FlopCounterMode(display=False) as counter:
            fn(x)
        return counter.get_total_flops() / 2

    per_caption = {}
    for n in sorted(lengths):
        ids = torch.ones(2, n, dtype=torch.long)  # any ids: the FLOPs depend on the length only
        ids[:, -1] = ext.tokenizer(["x"]).max()  # the EOT token, where the tower pools
        per_caption[n] = count(ext.model.encode_text if tower is None else lambda t: openclip.text_forward(tower, t),
                               ids)
    return count(ext.model.encode_image, torch.zeros(2, 3, *size)), per_caption


def assign(batches: list[tuple], costs: list[float], workers: int) -> list[list[tuple]]:
    """Returns the batches split into `workers` lists of about equal cost (longest first, to the least loaded)."""
    loads, out = [0.0] * workers, [[] for _ in range(workers)]
    for cost, batch in sorted(zip(costs, batches), key=lambda cb: -cb[0]):
        w = loads.index(min(loads))
        loads[w] += cost
        out[w].append(batch)
    return out


def _bare_worker(model: str, precision: str, threads: int, paths: list[str], batches: list[tuple], barrier,
                 queue) -> None:
    import io

    import torch
    from PIL import Image

    from pipeline.config import FeaturesConfig
    from pipeline.data.shard import read_shard
    from pipeline.features.extract import unique_captions
    from pipeline.features.extractors import openclip
    from pipeline.features.precision import autocast

    os.nice(RAY_WORKER_NICENESS - os.nice(0))  # the actors' scheduling priority
    torch.set_num_threads(threads)
    ext = openclip.load(FeaturesConfig(model=model, precision=precision), torch.device("cpu"))
    tower = openclip.text_tower(ext.model)
    shards: dict[int, tuple[list, np.ndarray]] = {}
    inputs = []
    for kind, i, lo, hi in batches:
        if i not in shards:
            samples = read_shard(paths[i])
            shards[i] = (samples, unique_captions([c for s in samples for c in s["json"]["captions"]])[0])
        samples, unique = shards[i]
        if kind == "image":
            images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples[lo:hi]]
            inputs.append((kind, torch.stack([ext.preprocess(im) for im in images])))
        else:
            ids = ext.tokenizer(list(unique[lo:hi]))
            inputs.append((kind, ids if tower is None else ids[:, :openclip.trimmed_length(ids)]))
    shards.clear()
    encode = {"image": ext.model.encode_image,  # the text tower as the extractor runs it: on the longest caption
              "text": ext.model.encode_text if tower is None else lambda ids: openclip.text_forward(tower, ids)}
    with torch.inference_mode(), autocast(ext.precision, ext.device):
        for kind, x in {kind: x for kind, x in inputs}.items():  # warm-up: 2 items of each kind, untimed
            encode[kind](x[:2])
        barrier.wait()
        t0 = time.perf_counter()
        for kind, x in inputs:
            encode[kind](x)
        seconds = time.perf_counter() - t0
    barrier.wait()
    roofline = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(MATMUL_N, MATMUL_N).to(dtype), torch.randn(MATMUL_N, MATMUL_N).to(dtype)
        a @ b
        barrier.wait()
        reps, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < 3.0 or reps < 3:
            a @ b
            reps += 1
        roofline[str(dtype).removeprefix("torch.")] = 2 * MATMUL_N ** 3 * reps / elapsed
    queue.put({"seconds": seconds, "roofline": roofline})


def bare_forward(model: str, precision: str, workers: int, threads: int, paths: list[Path],
                 shares: list[list[tuple]]) -> tuple[float, dict[str, float]]:
    """Runs (a) and (c) in `workers` fresh processes of `threads` torch threads; returns (seconds of the slowest
    worker's forward, {dtype: summed matmul FLOP/s})."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_bare_worker, args=(model, precision, threads, [str(p) for p in paths], share,
                                                     barrier, queue)) for share in shares]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return (max(r["seconds"] for r in results),
            {k: sum(r["roofline"][k] for r in results) for k in results[0]["roofline"]})


def per_worker(rows: pd.DataFrame) -> pd.DataFrame:
    """Returns one row per extraction actor of a store manifest's rows: shards, busy seconds (in extract_shard)
    and `peaks`, its peak RSS (MiB) after each of its shards in the order it did them (the peak never falls)."""
    return rows.groupby("worker", sort=False).agg(
        shards=("shard", "size"), busy=("seconds", "sum"), peaks=("peak_rss_mb", sorted)).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init)")
    parser.add_argument("--images", type=int, default=640,
                        help="images of the first run (whole shards); 640 takes about 8 minutes on 2 CPUs")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import logging

    import ray
    import torch

    from pipeline.config import FeaturesConfig, load_config
    from pipeline.features import store
    from pipeline.features.extract import actor_pool
    from pipeline.features.precision import resolve_precision
    from pipeline.stages import StageResult, run_extract
    from pipeline.tracking.runs import open_tracker

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the weights are random
    num_shards = max(1, args.images // args.shard_size)
    extra = max(1, math.ceil(num_shards / 10))
    precision = resolve_precision("auto", torch.device("cpu"))
    actors, threads = actor_pool(args.cpus, args.cpus, 0, num_shards, 0, FeaturesConfig().cpus_per_actor)
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        tmp = Path(tmp)
        rows = make_shards(tmp, num_shards + extra, args.shard_size)
        shards_dir = tmp / "shards"
        paths = [shards_dir / r["shard"] for r in rows[:num_shards]]
        images = sum(r["num_samples"] for r in rows[:num_shards])
        captions = sum(r["num_captions"] for r in rows[:num_shards])
        batches = shard_batches(paths, args.batch_size)
        unique = sum(hi - lo for kind, _, lo, hi in batches if kind == "text")
        lengths = text_lengths(args.model, paths, batches)
        per_image, per_caption = count_flops(args.model, precision, set(lengths.values()))
        costs = [(b[3] - b[2]) * (per_image if b[0] == "image" else per_caption[lengths[b]]) for b in batches]
        flops = sum(costs)
        print(f"{args.model} (random init), {precision} autocast, 224 px images; {args.cpus} CPUs: {actors} "
              f"worker(s) x {threads} torch thread(s), as the stage sizes its actor pool")
        print(f"first run: {num_shards} shards x {args.shard_size} = {images} images, {captions} captions "
              f"({unique} unique), batch {args.batch_size}; then +{extra} shard(s)")
        text_flops = sum(c for b, c in zip(batches, costs) if b[0] == "text")
        slots = sum((b[3] - b[2]) * lengths[b] for b in batches if b[0] == "text")
        print(f"model FLOPs (FlopCounterMode): {per_image / 1e9:.2f} G per image, {text_flops / unique / 1e9:.2f} G "
              f"per caption (run at {slots / unique:.1f} tokens on average, each batch at its longest caption); "
              f"{flops / 1e12:.2f} TFLOP for the first run", flush=True)

        with CpuAccount() as a_cpu:
            a_s, roofline = bare_forward(args.model, precision, actors, threads, paths,
                                         assign(batches, costs, actors))

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp / "ray"))
        try:  # Ray start-up, excluded: the cluster, and Ray Data's own actors (started by its first dataset)
            ray.data.range(2, override_num_blocks=2).map(lambda row: row).take_all()
            tracker = open_tracker(f"sqlite:///{tmp}/mlflow.db", "bench-extract")
            cfg = load_config(None, [f"workdir={tmp / 'work'}", f"features.model={args.model}",
                                     f"features.batch_size={args.batch_size}", "features.precision=auto"])
            shards = StageResult("shard", "bench", shards_dir, "")
            write_shard_manifest(shards_dir, rows[:num_shards])
            with CpuAccount() as b_cpu:
                t0 = time.perf_counter()
                first = run_extract(cfg, tracker, shards)
                b_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_extract(cfg, tracker, shards)
            d_s = time.perf_counter() - t0
            write_shard_manifest(shards_dir, rows)
            t0 = time.perf_counter()
            grown = run_extract(cfg, tracker, shards)
            e_s = time.perf_counter() - t0
        finally:
            ray.shutdown()
        manifest = store.read_manifest(store.open_selection(first.path)[0])
        b_workers = per_worker(manifest[manifest["run_id"] == first.run_id])
        e_workers = per_worker(manifest[manifest["run_id"] == grown.run_id])

    items = images + captions
    steady = b_workers["busy"].max()
    top = roofline["bfloat16" if precision == "bf16" else "float32"]
    print()
    print(f"{'':34}{'seconds':>8}{'items/s':>9}{'GFLOP/s':>9}{'of (c)':>8}   (items = images + captions)")
    for name, seconds in (("(a) bare forward (ceiling)", a_s), ("(b) Ray Data extract stage", b_s),
                          ("    (b) in extract_shard only", steady)):
        print(f"{name:34}{seconds:8.1f}{items / seconds:9.2f}{flops / seconds / 1e9:9.1f}"
              f"{100 * flops / seconds / top:7.1f}%")
    print(f"(c) matmul roofline, {MATMUL_N}^3, {actors} x {threads} thread(s): bf16 {roofline['bfloat16'] / 1e9:.1f} "
          f"GFLOP/s, fp32 {roofline['float32'] / 1e9:.1f} GFLOP/s")
    print("(b) per actor: " + "; ".join(f"{r.shards} shards, {r.busy:.1f} s in extract_shard"
                                         for r in b_workers.itertuples())
          + f"; the rest of (b) ({b_s - steady:.1f} s for the busiest actor) is actor start-up (process, imports, "
          "model load), scheduling and manifest commits")
    print(f"(d) rerun, nothing changed   {d_s:7.2f} s = {100 * d_s / b_s:5.1f}% of (b) (target <= 5%)")
    print(f"(e) rerun, +{extra} shard(s) (10%)  {e_s:7.2f} s = {100 * e_s / b_s:5.1f}% of (b) (target <= 20%)")
    print(f"peak RSS per extraction actor, MiB, after each of its shards: first run ({num_shards} shards): "
          + "; ".join(" ".join(f"{v:.0f}" for v in r.peaks) for r in b_workers.itertuples())
          + f"; run (e) ({extra} shard(s)): " + "; ".join(" ".join(f"{v:.0f}" for v in r.peaks)
                                                        for r in e_workers.itertuples()))
    print(f"(b) CPU: actors {b_cpu.actors:.1f} s, the rest of Ray and the driver {b_cpu.rest:.1f} s "
          f"({100 * b_cpu.rest / (b_s * os.cpu_count()):.0f}% of the CPUs over (b))")
    print(f"other processes on this machine used {100 * a_cpu.other:.0f}% of its CPUs during (a) (with its set-up and "
          f"(c)), {100 * b_cpu.other:.0f}% during (b): 0% is a quiet machine")
    print(f"ratio {a_s / b_s:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
