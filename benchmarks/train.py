"""Training speed: the Ray Train loop (2 CPU workers, DDP over gloo, synchronised queues) vs a bare
single-process loop doing the same math (the same global batches, method, queues and optimizer) in the
same run; plus the queue all-gather's share of the workers' step time.

Features are random (N captions, 2 x 256 dims per side), written once to a feature store with the store's own
writers, so both sides read them as training does: the columnar cache, memory-mapped (`FeatureInputs`), batches
collated behind the prefetch thread. No extraction is needed. Start-up is excluded: both sides
are timed per epoch, over the epochs after the first (the workers report their own epoch seconds). The
bare loop runs before and after the Ray one, so a drift of the machine's speed (a shared VM's varies by
+-10% from minute to minute) falls on both sides; each side's figure is the median of its epochs.

    .venv/bin/python benchmarks/train.py [--captions 40000] [--epochs 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import TrainConfig
from pipeline.features import store
from pipeline.features.precision import resolve_precision
from pipeline.methods.base import args_dict
from pipeline.stages.train import input_dims, resolve_method
from pipeline.train.inputs import open_feature_inputs, prefetch
from pipeline.train.loop import epoch_batches, new_training_state, train_step

SHARD_IMAGES = 2000


def random_store(root: Path, captions: int, dim: int = 256, per_image: int = 5, seed: int = 0) -> pd.DataFrame:
    """Writes a train split of random float16 features (`image_embed`, `image_pooled`, `text_embed`,
    `text_pooled`, `dim` wide each; `per_image` captions per image) into a feature store at `root`; returns its
    manifest."""
    rng = np.random.default_rng(seed)
    images, rows = captions // per_image, []
    (root / "train").mkdir(parents=True, exist_ok=True)
    for i, lo in enumerate(range(0, images, SHARD_IMAGES)):
        n = min(SHARD_IMAGES, images - lo)
        keys = [f"{k:09d}" for k in range(lo, lo + n)]
        feats = {name: rng.standard_normal((n, dim), dtype=np.float32) for name in ("image_embed", "image_pooled")}
        texts = {name: rng.standard_normal((n * per_image, dim), dtype=np.float32)
                 for name in ("text_embed", "text_pooled")}
        files = store.write_shard(root / "train", f"shard-{i:06d}.{i:016x}",
                                  store.image_table(keys, [[] for _ in keys], feats),
                                  store.caption_table([k for k in keys for _ in range(per_image)],
                                                      list(range(per_image)) * n, ["x"] * (n * per_image), texts))
        rows.append({"shard": f"shard-{i:06d}", "split": "train", "shard_sha256": f"{i:064x}",
                     "images_file": f"train/{files[0]}", "captions_file": f"train/{files[1]}",
                     "num_images": n, "num_captions": n * per_image})
    manifest = pd.DataFrame(rows)
    store.write_manifest(root, manifest)
    return manifest


def bare_loop(root: Path, manifest: pd.DataFrame, tc: TrainConfig, spec: dict, init_state: dict) -> list[float]:
    """Runs the same steps in this process on all its threads; returns the steps/s of epochs 1.."""
    device = torch.device("cpu")
    cls, args = resolve_method(tc)
    method = cls.from_checkpoint(spec, init_state).train()
    inputs = open_feature_inputs(cls, args, root, manifest, "train")
    steps_per_epoch = inputs.num_captions // tc.batch_size
    state, optimizer, scheduler = new_training_state(method, dataclasses.asdict(tc), steps_per_epoch, device)
    precision = resolve_precision("auto", device)
    rates = []
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        rows = epoch_batches(inputs.num_captions, tc.batch_size, tc.seed, epoch, 0, 1)
        for batch in prefetch((inputs.batch(r) for r in rows), tc.prefetch_batches):
            train_step(method, method, state, optimizer, scheduler, batch, dataclasses.asdict(tc), precision, device)
        if epoch > 0:
            rates.append(steps_per_epoch / (time.perf_counter() - t0))
    return rates


def ray_loop(root: Path, manifest: pd.DataFrame, tc: TrainConfig, spec: dict, init_state: dict,
             storage: str) -> tuple[list[float], float]:
    """Runs the Ray Train loop; returns (the steps/s of epochs 1.., queue all-gather share of their step time)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    steps_per_epoch = int(manifest["num_captions"].sum()) // tc.batch_size
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"method": tc.method, "spec": spec, "init_state": init_state, "train": dataclasses.asdict(tc),
                           "inputs": {"store": str(root), "manifest": manifest, "guide": None, "has_val": False},
                           "steps_per_epoch": steps_per_epoch, "threads_per_worker": 1},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage),
    )
    result = trainer.fit()
    reports = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    later = [r for r in reports if r["epoch"] > 0]
    seconds = sum(r["epoch_seconds"] for r in later)
    share = sum(r["queue_gather_seconds"] for r in later) / seconds
    return [steps_per_epoch / r["epoch_seconds"] for r in later], share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=40000)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    import ray

    tc = TrainConfig(method="infonce", method_args={"queue_size": 1024}, epochs=args.epochs, batch_size=512,
                     num_workers=2)
    cls, method_args = resolve_method(tc)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "store"
        manifest = random_store(root, args.captions)
        inputs = open_feature_inputs(cls, method_args, root, manifest, "train")  # the columnar cache, built once
        torch.manual_seed(tc.seed)
        method = cls(method_args, input_dims(inputs))
        method.prepare(inputs)
        spec, init_state = {"name": tc.method, "args": args_dict(method_args), "dims": method.dims}, method.state_dict()
        torch.set_num_threads(2)
        bare = bare_loop(root, manifest, tc, spec, init_state)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            ours, share = ray_loop(root, manifest, tc, spec, init_state, str(Path(work) / "ray_results"))
        finally:
            ray.shutdown()
        bare += bare_loop(root, manifest, tc, spec, init_state)
    print(f"bare single process   {np.median(bare):7.2f} steps/s  (global batch {tc.batch_size}, 2 threads; "
          f"epochs before and after: {' '.join(f'{v:.2f}' for v in bare)})")
    print(f"Ray Train, 2 workers  {np.median(ours):7.2f} steps/s  (2 x {tc.batch_size // 2}, DDP over gloo; "
          f"epochs: {' '.join(f'{v:.2f}' for v in ours)})")
    print(f"queue all-gather share of step time {100 * share:.1f}% (target <= 5%)")
    print(f"ratio {np.median(ours) / np.median(bare):.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
