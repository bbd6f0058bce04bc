"""Training speed: the Ray Train loop (2 CPU workers, DDP over gloo, synchronised queues) vs a bare
single-process loop doing the same math (the same global batches, method, queues and optimizer) in the
same run; plus the queue all-gather's share of the workers' step time.

Features are random (N captions x 512 dims), so no extraction is needed. Start-up is excluded: both sides
are timed per epoch, over the epochs after the first (the workers report their own epoch seconds). The
bare loop runs before and after the Ray one, so a drift of the machine's speed (a shared VM's varies by
+-10% from minute to minute) falls on both sides; each side's figure is the median of its epochs.

    .venv/bin/python benchmarks/train.py [--captions 40000] [--epochs 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.features.precision import resolve_precision
from pipeline.methods import create_method
from pipeline.train.loop import epoch_batches, make_batch, new_training_state, train_step


def random_split(captions: int, dim: int = 512, per_image: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Returns a feature split dict with random float16 inputs, `per_image` captions per image."""
    rng = np.random.default_rng(seed)
    images = captions // per_image
    return {"image": rng.standard_normal((images, dim), dtype=np.float32).astype(np.float16),
            "text": rng.standard_normal((captions, dim), dtype=np.float32).astype(np.float16),
            "caption_image": np.repeat(np.arange(images), per_image)}


def bare_loop(split: dict, tc: TrainConfig, kwargs: dict, init_state: dict) -> list[float]:
    """Runs the same steps in this process on all its threads; returns the steps/s of epochs 1.."""
    device = torch.device("cpu")
    torch.manual_seed(tc.seed)
    method = create_method(tc.method, **kwargs)
    method.load_state_dict(init_state)
    steps_per_epoch = len(split["caption_image"]) // tc.batch_size
    momentum, optimizer, scheduler = new_training_state(method, dataclasses.asdict(tc), steps_per_epoch, device)
    precision = resolve_precision("auto", device)
    rates = []
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        for rows in epoch_batches(len(split["caption_image"]), tc.batch_size, tc.seed, epoch, 0, 1):
            train_step(method, method, momentum, optimizer, scheduler, make_batch(split, rows, device),
                       dataclasses.asdict(tc), precision, device)
        if epoch > 0:
            rates.append(steps_per_epoch / (time.perf_counter() - t0))
    return rates


def ray_loop(split: dict, tc: TrainConfig, kwargs: dict, init_state: dict,
             storage: str) -> tuple[list[float], float]:
    """Runs the Ray Train loop; returns (the steps/s of epochs 1.., queue all-gather share of their step time)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    steps_per_epoch = len(split["caption_image"]) // tc.batch_size
    reports: list[dict] = []

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"method": tc.method, "method_kwargs": kwargs, "init_state": init_state,
                           "train": dataclasses.asdict(tc), "features_ref": ray.put({"train": split}),
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
    import tempfile

    import ray

    tc = TrainConfig(epochs=args.epochs, batch_size=512, queue_size=1024, num_workers=2)
    split = random_split(args.captions)
    kwargs = {"image_dim": 512, "text_dim": 512, "embed_dim": tc.embed_dim, "hidden_dim": tc.hidden_dim,
              "temperature": tc.temperature}
    torch.manual_seed(tc.seed)
    init_state = create_method(tc.method, **kwargs).state_dict()
    torch.set_num_threads(2)
    bare = bare_loop(split, tc, kwargs, init_state)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            ours, share = ray_loop(split, tc, kwargs, init_state, storage)
    finally:
        ray.shutdown()
    bare += bare_loop(split, tc, kwargs, init_state)
    print(f"bare single process   {np.median(bare):7.2f} steps/s  (global batch {tc.batch_size}, 2 threads; "
          f"epochs before and after: {' '.join(f'{v:.2f}' for v in bare)})")
    print(f"Ray Train, 2 workers  {np.median(ours):7.2f} steps/s  (2 x {tc.batch_size // 2}, DDP over gloo; "
          f"epochs: {' '.join(f'{v:.2f}' for v in ours)})")
    print(f"queue all-gather share of step time {100 * share:.1f}% (target <= 5%)")
    print(f"ratio {np.median(ours) / np.median(bare):.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
