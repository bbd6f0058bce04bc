"""Sharding speed: the shard stage's Ray Data writer vs a single-process `webdataset.ShardWriter` loop, same run.

Both write the same synthetic samples (JPEG files on disk, 5 captions each) into tars of `--shard-size`
samples, and both do the same per-sample work: read the image file, decode it fully (the shard stage's check
for corrupt or truncated images), and write jpg/json/txt members. Ours runs `plan_shards` (which stats every
file) and `pipeline.stages.write_shards` (one Ray task per tar) on a local Ray with every core; Ray start-up
and one untimed warm-up of each writer are excluded. The last line is the speed ratio (target >= 1.5 on 2
cores).

    .venv/bin/python benchmarks/shard.py [--images 6000] [--image-size 256] [--shard-size 500]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.data.shard import plan_shards, read_shard
from pipeline.data.sources import synthetic


def baseline(samples: list, out: Path, shard_size: int) -> int:
    """Writes the samples (sorted by key) with one `webdataset.ShardWriter`; returns the number written."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for s in sorted(samples, key=lambda s: s.key):
            data = Path(s.image).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # the same full decode as the shard stage's check
            record = {"key": s.key, "captions": s.captions, "labels": s.labels, "split": s.split, **s.meta}
            sink.write({"__key__": s.key, "jpg": data, "json": json.dumps(record, sort_keys=True).encode(),
                        "txt": s.captions[0]})
            written += 1
    return written


def ours(samples: list, out: Path, shard_size: int) -> int:
    """Plans and writes the tars as the shard stage does (Ray Data, one task per tar); returns the number written."""
    from pipeline.stages.shard import write_shards

    results = write_shards(plan_shards(samples, shard_size), out, jpeg_quality=95, progress=False)
    return sum(r["row"]["num_samples"] for r in results if r["row"])


def timed(fn, samples: list, out: Path, shard_size: int) -> tuple[float, int]:
    """Returns (seconds, samples written) of one call into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    n = fn(samples, out, shard_size)
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="itr-bench-shard-"))
    try:
        root = work / "data"
        synthetic.generate(root, seed=0, num_train=args.images, num_val=1, num_test=1, image_size=args.image_size,
                           progress=True)
        samples = [s for s in synthetic.load_samples(root, "synthetic")[0] if s.split == "train"]
        megabytes = sum(os.path.getsize(s.image) for s in samples) / 1e6
        print(f"{len(samples)} samples, {megabytes:.1f} MB of JPEG at {args.image_size} px, "
              f"{args.shard_size} per shard, {os.cpu_count()} cores")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        warm = samples[: 2 * args.shard_size]  # two tasks: both Ray workers started before timing
        timed(baseline, warm, work / "warm-baseline", args.shard_size)
        timed(ours, warm, work / "warm-ours", args.shard_size)
        base_s, base_n = timed(baseline, samples, work / "baseline", args.shard_size)
        ours_s, ours_n = timed(ours, samples, work / "ours", args.shard_size)
        ray.shutdown()
        keys_ours = sorted(s["key"] for p in (work / "ours").glob("*/*.tar") for s in read_shard(p))
        keys_base = sorted(s["key"] for p in (work / "baseline").glob("*.tar") for s in read_shard(p))
        if not (base_n == ours_n == len(samples) and keys_ours == keys_base):
            raise SystemExit(f"the writers disagree: baseline {base_n}, ours {ours_n} samples")
        print(f"webdataset.ShardWriter, 1 process  {base_s:7.2f} s  {base_n / base_s:8.0f} samples/s")
        print(f"Ray Data write_shards               {ours_s:7.2f} s  {ours_n / ours_s:8.0f} samples/s")
        print(f"ratio {base_s / ours_s:.2f} (target >= 1.5)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
