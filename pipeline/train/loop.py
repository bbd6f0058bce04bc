"""The per-worker training loop (Ray Train `TorchTrainer`), and the plain pieces it is made of.

Features arrive once per worker through the object store (`features_ref`: zero-copy numpy). Every epoch
the caption rows are shuffled by (seed, epoch) and cut into global batches; each rank takes its slice of
each (`epoch_batches`), so training does not depend on the worker count and resumes exactly. Rank 0
writes checkpoints and MLflow metrics; every rank reports.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.eval.metrics import evaluate_embeddings
from pipeline.features.precision import autocast, pick_device, resolve_precision
from pipeline.methods import create_method
from pipeline.tracking.runs import metric_names
from pipeline.train.distributed import all_gather_no_grad
from pipeline.train.momentum import MomentumQueue, MomentumState, ema_update, enqueue_together, momentum_copy

CODE_VERSION = 1  # part of the train stage's fingerprint: bump when training results would change
CHECKPOINT_FILE = "state.pt"
LOG_EVERY_STEPS = 10  # per-step loss parts logged to MLflow every this many steps


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Returns the LR multiplier function: linear warmup, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def make_batch(split: dict, caption_rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Returns {"image", "text", "ids"} tensors for the given caption rows of a feature split dict
    {"image": (N, Di), "text": (M, Dt), "caption_image": (M,)}."""
    owner = split["caption_image"][caption_rows]
    return {
        "image": torch.from_numpy(np.asarray(split["image"][owner], dtype=np.float32)).to(device),
        "text": torch.from_numpy(np.asarray(split["text"][caption_rows], dtype=np.float32)).to(device),
        "ids": torch.from_numpy(owner.astype(np.int64)).to(device),
    }


@torch.no_grad()
def embed_split(model: torch.nn.Module, split: dict, device: torch.device, batch_size: int = 4096):
    """Returns (image embeddings (N, D), caption embeddings (M, D)) of a feature split."""
    img = torch.cat([model.encode_image({"image": torch.from_numpy(np.asarray(split["image"][i:i + batch_size],
                     dtype=np.float32)).to(device)}) for i in range(0, len(split["image"]), batch_size)])
    txt = torch.cat([model.encode_text({"text": torch.from_numpy(np.asarray(split["text"][i:i + batch_size],
                     dtype=np.float32)).to(device)}) for i in range(0, len(split["text"]), batch_size)])
    return img, txt


def validate(model: torch.nn.Module, split: dict, device: torch.device) -> dict[str, float]:
    """Returns R@K metrics of `model` on a feature split, prefixed `val_`."""
    model.eval()
    img, txt = embed_split(model, split, device)
    model.train()
    return {f"val_{k}": v for k, v in evaluate_embeddings(img, txt, split["caption_image"]).items()}


def epoch_batches(num_rows: int, global_batch: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """Returns this worker's part of every full global batch of the epoch: the rows are shuffled by
    (seed, epoch) alone, global batch b is rows [b*B, (b+1)*B) of that order, and rank r takes its r-th
    slice of B / world rows. So the global batches, hence the training, do not depend on the number of
    workers, and a run resumed at an epoch boundary sees exactly the batches it would have seen."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    local = global_batch // world
    return [order[b + rank * local:b + (rank + 1) * local] for b in range(0, num_rows - global_batch + 1, global_batch)]


def new_training_state(method: torch.nn.Module, tc: dict, steps_per_epoch: int, device: torch.device):
    """Returns (MomentumState with an EMA twin and, when `queue_size` > 0, the two queues, AdamW optimizer,
    warmup-cosine LR scheduler) for a method already on `device`; `tc` is TrainConfig as a dict."""
    momentum = MomentumState(momentum_copy(method))
    if tc["queue_size"]:
        momentum.image_queue = MomentumQueue(tc["queue_size"], tc["embed_dim"]).to(device)
        momentum.text_queue = MomentumQueue(tc["queue_size"], tc["embed_dim"]).to(device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    total_steps = tc["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc["warmup_steps"], total_steps))
    return momentum, optimizer, scheduler


def train_step(model: torch.nn.Module, method: torch.nn.Module, momentum: MomentumState, optimizer, scheduler,
               batch: dict, tc: dict, precision: str, device: torch.device) -> dict[str, float]:
    """One optimisation step: forward through `model` (the DDP wrapper of `method`, or `method` itself),
    the method's loss, clipped AdamW step, LR step, then the EMA update and the enqueue of the momentum
    keys (all-gathered across workers). A method that distills (`distill_alpha` > 0) follows ALBEF's order
    instead: EMA update, momentum outputs in `batch["momentum"]` for its loss, step, enqueue of those
    outputs. Returns the loss parts and `queue_gather_seconds` as floats."""
    distilling = getattr(method, "distill_alpha", 0.0) > 0
    if distilling:
        ema_update(momentum.model, method, tc["momentum"])
        with torch.no_grad():
            batch = {**batch, "momentum": {k: v.float() for k, v in momentum.model(batch).items()}}
    with autocast(precision, device):
        out = model(batch)
    parts = method.loss({k: v.float() for k, v in out.items()}, batch, momentum)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    torch.nn.utils.clip_grad_norm_(method.parameters(), tc["grad_clip"])
    optimizer.step()
    scheduler.step()
    result = {k: v.item() for k, v in parts.items()}
    if momentum.image_queue is not None:
        if distilling:
            keys = batch["momentum"]
        else:
            ema_update(momentum.model, method, tc["momentum"])
            with torch.no_grad():
                keys = momentum.model(batch)
        t0 = time.perf_counter()
        enqueue_together([momentum.image_queue, momentum.text_queue], [keys["image"], keys["text"]], batch["ids"])
        result["queue_gather_seconds"] = time.perf_counter() - t0
    return result


def worker_context(config: dict) -> tuple[int, int, torch.device, str]:
    """Returns (rank, world size, device, resolved autocast precision) of a Ray Train worker; on CPU, sets
    torch's threads to `config["threads_per_worker"]`."""
    import ray.train

    ctx = ray.train.get_context()
    device = pick_device(config["train"]["use_gpu"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    return ctx.get_world_rank(), ctx.get_world_size(), device, resolve_precision("auto", device)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config`: method, method_kwargs, init_state (the method's initial state dict,
    standardisation included), train (TrainConfig as dict), features_ref, threads_per_worker, mlflow_uri,
    mlflow_run_id, steps_per_epoch."""
    import ray
    import ray.train.torch

    tc = config["train"]
    rank, world, device, precision = worker_context(config)
    features = ray.get(config["features_ref"])
    train_split, val_split = features["train"], features.get("val")

    torch.manual_seed(tc["seed"])
    method = create_method(config["method"], **config["method_kwargs"])
    method.load_state_dict(config["init_state"])  # standardization buffers + identical init on every rank
    method.to(device)
    momentum, optimizer, scheduler = new_training_state(method, tc, config["steps_per_epoch"], device)
    model = ray.train.torch.prepare_model(method)

    def batches(epoch: int):
        rows = epoch_batches(len(train_split["caption_image"]), tc["batch_size"], tc["seed"], epoch, rank, world)
        return (make_batch(train_split, caption_rows, device) for caption_rows in rows)

    validate_epoch = None if val_split is None else lambda: validate(method, val_split, device)
    run_epochs(config, tc, model, method, momentum, optimizer, scheduler, batches, validate_epoch, device, precision)


def run_epochs(config: dict, tc: dict, model: torch.nn.Module, method: torch.nn.Module, momentum: MomentumState,
               optimizer, scheduler, batches: Callable[[int], Iterable[dict]],
               validate_epoch: Callable[[], dict[str, float]] | None, device: torch.device, precision: str) -> None:
    """The epochs of a Ray Train worker, whatever feeds it: resumes from `ray.train.get_checkpoint()` (model,
    momentum twin and queues, optimizer, scheduler, rng, epoch, step), then per epoch runs `train_step` on
    every batch of `batches(epoch)`, adds `validate_epoch()` (every rank calls it) and the queue checksum and
    cross-rank sync error to the metrics, logs them to MLflow from rank 0 (`mlflow_run_id` in `config`) and
    reports them with a checkpoint written by rank 0. Every rank must get the same number of batches."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        method.load_state_dict(state["model"])
        momentum.model.load_state_dict(state["momentum"])
        if momentum.image_queue is not None:
            momentum.image_queue.load_state_dict(state["image_queue"])
            momentum.text_queue.load_state_dict(state["text_queue"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())  # map_location may have moved it to the GPU
        start_epoch, step = state["epoch"] + 1, state["step"]

    client = monitor = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.entities import Metric
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["mlflow_uri"])
        monitor = SystemMetricsMonitor(config["mlflow_run_id"], sampling_interval=tc["system_metrics_seconds"],
                                       resume_logging=start_epoch > 0, tracking_uri=config["mlflow_uri"])
        monitor.start()
    for epoch in range(start_epoch, tc["epochs"]):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        step_metrics = []
        steps = 0
        for batch in batches(epoch):
            parts = train_step(model, method, momentum, optimizer, scheduler, batch, tc, precision, device)
            step += 1
            steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if client is not None and step % LOG_EVERY_STEPS == 0:
                now = int(time.time() * 1000)
                step_metrics += [Metric(f"step_{k}", v, now, step) for k, v in parts.items()]
        queue_seconds = sums.pop("queue_gather_seconds", 0.0)
        metrics = {f"train_{k}": v / max(1, steps) for k, v in sums.items()}
        metrics["queue_gather_seconds"] = queue_seconds
        metrics.update(epoch=epoch, step=step, lr=scheduler.get_last_lr()[0], epoch_seconds=time.perf_counter() - t0)
        if validate_epoch is not None:
            metrics.update(validate_epoch())
        if momentum.image_queue is not None:
            checksum = momentum.image_queue.checksum() + momentum.text_queue.checksum()
            every_rank = all_gather_no_grad(torch.tensor([checksum], dtype=torch.float64, device=device))
            metrics["queue_checksum"] = checksum
            metrics["queue_sync_error"] = float((every_rank - every_rank[0]).abs().max())  # 0: identical queues
        if client is not None:
            step_metrics += [Metric(k, v, int(time.time() * 1000), epoch) for k, v in metric_names(metrics).items()]
            for start in range(0, len(step_metrics), 1000):  # MLflow's limit per batch
                client.log_batch(config["mlflow_run_id"], metrics=step_metrics[start:start + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {
                    "model": method.state_dict(),
                    "momentum": momentum.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "step": step,
                }
                if momentum.image_queue is not None:
                    state["image_queue"] = momentum.image_queue.state_dict()
                    state["text_queue"] = momentum.text_queue.state_dict()
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
    if monitor is not None:
        monitor.finish()
