"""The per-worker training loop (Ray Train `TorchTrainer`), whatever the method, and the plain pieces it is made of.

Each worker reads its own rows of the feature store (`pipeline.train.inputs`: memory-mapped, prefetched in a
thread). Every epoch the caption rows are shuffled by (seed, epoch) and cut into global batches; each rank takes
its slice of each (`epoch_batches`), so training does not depend on the worker count and resumes exactly. The
method owns its step (`before_step`, `loss`, `momentum_keys`), its momentum state, its phases and its hooks; the
loop runs phases (freezing what a phase does not train, a fresh optimizer and schedule per phase), checkpoints
everything (method, momentum state, optimizer, scheduler, rng, epoch, phase) from rank 0, and prints one line per
epoch.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.config import PhaseConfig
from pipeline.eval.metrics import evaluate_embeddings
from pipeline.features.precision import autocast, pick_device, resolve_precision
from pipeline.nn.distributed import all_gather_no_grad
from pipeline.nn.momentum import WHOLE, MomentumState
from pipeline.tracking.runs import metric_names
from pipeline.train.inputs import embed_inputs, prefetch, to_device

CODE_VERSION = 2  # part of the train stage's fingerprint: bump when training results would change
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


def warmup_step_decay(warmup_steps: int, milestones: list[int], gamma: float):
    """Returns the LR multiplier function: linear warmup, then x `gamma` at each step in `milestones`."""
    def factor(step: int) -> float:
        warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        return warm * gamma ** sum(step >= m for m in milestones)
    return factor


def epoch_batches(num_rows: int, global_batch: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """Returns this worker's part of every full global batch of the epoch: the rows are shuffled by
    (seed, epoch) alone, global batch b is rows [b*B, (b+1)*B) of that order, and rank r takes its r-th
    slice of B / world rows. So the global batches, hence the training, do not depend on the number of
    workers, and a run resumed at an epoch boundary sees exactly the batches it would have seen."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    local = global_batch // world
    return [order[b + rank * local:b + (rank + 1) * local] for b in range(0, num_rows - global_batch + 1, global_batch)]


# ---------------------------------------------------------------- phases
def phases_of(method, tc: dict) -> list[PhaseConfig]:
    """Returns the training phases: `train.phases` when given (as dicts or PhaseConfig), else the method's default;
    a phase without `lr` gets `train.lr`."""
    given = [p if isinstance(p, PhaseConfig) else PhaseConfig(**p) for p in tc.get("phases") or []]
    phases = given or method.default_phases(tc["epochs"], tc["lr"])
    return [PhaseConfig(p.name, p.epochs, tc["lr"] if p.lr is None else p.lr, list(p.train)) for p in phases]


def phase_at(phases: list[PhaseConfig], epoch: int) -> int:
    """Returns the index of the phase that epoch `epoch` belongs to (phases run in order)."""
    end = 0
    for i, p in enumerate(phases):
        end += p.epochs
        if epoch < end:
            return i
    raise ValueError(f"epoch {epoch} is past the last phase (the phases have {end} epochs)")


def apply_phase(method: torch.nn.Module, phase: PhaseConfig) -> int:
    """Sets requires_grad: True exactly for the parameters of the modules `phase.train` names ("*": all), False
    for the rest; returns the number of trainable parameters. Raises ValueError naming an unknown module or a
    phase that trains nothing."""
    known = dict(method.named_children())
    unknown = [n for n in phase.train if n != WHOLE and n not in known]
    if unknown:
        raise ValueError(f"train.phases ({phase.name}): {type(method).__name__} has no module {unknown[0]!r} "
                         f"(modules: {', '.join(known)})")
    trained = {id(p) for n in phase.train for p in (method if n == WHOLE else known[n]).parameters()}
    count = 0
    for p in method.parameters():
        p.requires_grad_(id(p) in trained)
        count += p.numel() if id(p) in trained else 0
    if not count:
        raise ValueError(f"train.phases ({phase.name}): trains no parameter")
    return count


def new_optimizer(method, phase: PhaseConfig, tc: dict, steps_per_epoch: int):
    """Returns (AdamW over the method's `param_groups(phase)`, the phase's LR scheduler: warmup, then cosine over
    the phase's steps or, with `lr_schedule: step`, x `lr_gamma` at each of `lr_milestones` (epochs of the
    phase))."""
    optimizer = torch.optim.AdamW(method.param_groups(phase), lr=phase.lr, weight_decay=tc["weight_decay"])
    total = phase.epochs * steps_per_epoch
    warmup = min(tc["warmup_steps"], total)
    if tc.get("lr_schedule", "cosine") == "step":
        factor = warmup_step_decay(warmup, [m * steps_per_epoch for m in tc["lr_milestones"]], tc["lr_gamma"])
    else:
        factor = warmup_cosine(warmup, total)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- one step
def train_step(model: torch.nn.Module, method, state: MomentumState, optimizer, scheduler, batch: dict, tc: dict,
               precision: str, device: torch.device) -> dict[str, float]:
    """One optimisation step: the method's `before_step`, forward through `model` (the DDP wrapper of `method`, or
    `method` itself), the method's loss, clipped AdamW step, LR step, then the method's `momentum_keys` enqueued
    into its queues (one all-gather across workers). Returns the loss parts and `queue_gather_seconds` as floats."""
    batch = method.before_step(batch, state)
    with autocast(precision, device):
        out = model(batch)
    parts = method.loss({k: v.float() for k, v in out.items()}, batch, state)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.requires_grad], tc["grad_clip"])
    optimizer.step()
    scheduler.step()
    result = {k: v.item() for k, v in parts.items()}
    keys = method.momentum_keys(batch, out, state)
    if keys is not None:
        t0 = time.perf_counter()
        state.enqueue(*keys)
        result["queue_gather_seconds"] = time.perf_counter() - t0
    return result


def validate(method, inputs, device: torch.device) -> dict[str, float]:
    """Returns R@K metrics of `method` on a split's inputs, prefixed `val_`."""
    img, txt = embed_inputs(method, inputs, device)
    return {f"val_{k}": v for k, v in evaluate_embeddings(img, txt, inputs.caption_image).items()}


# ---------------------------------------------------------------- the worker
def quiet_ray_train() -> None:
    """Silences Ray Train's per-report INFO lines (the whole metrics dict of every rank, twice per epoch, and a
    line per checkpoint): the loop prints one readable line per epoch instead."""
    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def start_system_metrics(uri: str, run_id: str, seconds: float) -> None:
    """Starts MLflow's system metrics (CPU, memory, disk, network; GPUs through nvidia-ml-py) of this worker's
    machine into the driver's stage run `run_id`, sampled every `seconds`, through MLflow's public API: the run is
    resumed in this process with `log_system_metrics=True`, and after a restart the samples continue the steps."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_system_metrics_sampling_interval(seconds)
    mlflow.start_run(run_id=run_id, log_system_metrics=True)


def finish_system_metrics(client, run_id: str, seconds: float) -> None:
    """Waits until the run holds a first system-metrics sample (a run shorter than one sampling interval would
    otherwise end with none; at most `2 * seconds + 60` s), then stops the sampling and leaves the run RUNNING: the
    driver owns it and ends it."""
    import mlflow

    deadline = time.monotonic() + 2 * seconds + 60
    while time.monotonic() < deadline and not any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
        time.sleep(min(1.0, seconds / 4))
    mlflow.end_run(status="RUNNING")  # stops and flushes the monitor; the run's status stays the driver's


def tag_worker_node(uri: str, run_id: str, rank: int) -> None:
    """Tags the run with the Ray node this worker runs on (`ray.node_id.rank<r>`), whose system metrics these are:
    host names and IPs do not tell nodes apart when several share a machine."""
    import ray
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_tag(run_id, f"ray.node_id.rank{rank}", ray.get_runtime_context().get_node_id())


def worker_context(config: dict) -> tuple[int, int, torch.device, str]:
    """Returns (rank, world size, device, resolved autocast precision) of a Ray Train worker; on CPU, sets
    torch's threads to `config["threads_per_worker"]`."""
    import ray.train

    quiet_ray_train()
    ctx = ray.train.get_context()
    device = pick_device(config["train"]["use_gpu"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    return ctx.get_world_rank(), ctx.get_world_size(), device, resolve_precision("auto", device)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point of a method on features. `config`: method, spec (method.json: name, args, dims),
    init_state (the method's state after `prepare`, identical init on every rank), train (TrainConfig as dict),
    inputs: {"store", "manifest", "guide"} (where each worker reads its rows), threads_per_worker, mlflow_uri,
    mlflow_run_id, steps_per_epoch."""
    import ray.train.torch

    from pipeline.methods import method_class
    from pipeline.train.inputs import open_feature_inputs

    tc = config["train"]
    rank, world, device, precision = worker_context(config)
    cls = method_class(config["method"])
    method = cls.from_checkpoint(config["spec"], config["init_state"]).train().to(device)
    src = config["inputs"]

    def open_inputs(split: str):
        return open_feature_inputs(cls, method.args, src["store"], src["manifest"], split, src.get("guide"))

    train_inputs = open_inputs("train")
    val_inputs = open_inputs("val") if src["has_val"] else None

    def batches(epoch: int):
        rows = epoch_batches(train_inputs.num_captions, tc["batch_size"], tc["seed"], epoch, rank, world)
        return (to_device(b, device) for b in prefetch((train_inputs.batch(r) for r in rows), tc["prefetch_batches"]))

    validate_epoch = None if val_inputs is None else lambda: validate(method, val_inputs, device)
    run_epochs(config, tc, method, batches, validate_epoch, device, precision, ray.train.torch.prepare_model,
               train_inputs)


def _load_checkpoint(method, state: MomentumState, device: torch.device) -> dict | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
    method.load_state_dict(saved["model"])
    state.load_state_dict(saved["momentum"])
    torch.set_rng_state(saved["rng"].cpu())  # map_location may have moved it to the GPU
    return saved


def epoch_line(metrics: dict, total_epochs: int, phase: str, seconds_left: float) -> str:
    """Returns the console line of an epoch: epoch, phase, loss parts, val R@1 both ways and RSUM, seconds, ETA."""
    losses = " ".join(f"{k.removeprefix('train_')} {v:.4f}" for k, v in metrics.items()
                      if k.startswith("train_loss"))
    val = ""
    if "val_rsum" in metrics:
        val = (f" | val R@1 i2t {metrics['val_i2t_R@1']:.1f} t2i {metrics['val_t2i_R@1']:.1f} "
               f"rsum {metrics['val_rsum']:.1f}")
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds_left)))
    return (f"[itr] train epoch {metrics['epoch'] + 1}/{total_epochs} ({phase}) {losses}{val} | "
            f"{metrics['epoch_seconds']:.1f} s, ETA {eta}")


def run_epochs(config: dict, tc: dict, method, batches: Callable[[int], Iterable[dict]],
               validate_epoch: Callable[[], dict[str, float]] | None, device: torch.device, precision: str,
               wrap: Callable[[torch.nn.Module], torch.nn.Module], inputs=None) -> None:
    """The epochs of a Ray Train worker, whatever feeds it. Builds the method's momentum state, resumes from
    `ray.train.get_checkpoint()` (method, momentum state, optimizer and scheduler of the phase, rng, epoch,
    step), then per epoch: at a phase start, freezes what the phase does not train, wraps the method for DDP
    (`wrap`) and makes the phase's optimizer; calls the method's `on_epoch_start(epoch, inputs, state)`; runs
    `train_step` on every batch of `batches(epoch)`; adds `validate_epoch()` (every rank calls it), the queue
    checksum and cross-rank sync error; logs to MLflow from rank 0 and prints one line; reports with a
    checkpoint written by rank 0. Every rank must get the same number of batches."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    state = method.new_state().to(device)
    phases = phases_of(method, tc)
    total_epochs = sum(p.epochs for p in phases)
    saved = _load_checkpoint(method, state, device)
    start_epoch, step = (saved["epoch"] + 1, saved["step"]) if saved else (0, 0)

    client = None
    if config.get("mlflow_run_id"):
        tag_worker_node(config["mlflow_uri"], config["mlflow_run_id"], rank)
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["mlflow_uri"])
        start_system_metrics(config["mlflow_uri"], config["mlflow_run_id"], tc["system_metrics_seconds"])
    current, model, optimizer, scheduler = None, None, None, None
    run_t0, run_epochs_done = time.perf_counter(), 0
    for epoch in range(start_epoch, total_epochs):
        index = phase_at(phases, epoch)
        if index != current:
            current, phase = index, phases[index]
            apply_phase(method, phase)
            model = wrap(method)
            optimizer, scheduler = new_optimizer(method, phase, tc, config["steps_per_epoch"])
            if saved and saved.get("phase") == index:  # resuming inside this phase
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
        t0 = time.perf_counter()
        method.on_epoch_start(epoch, inputs, state)
        sums: dict[str, float] = {}
        step_metrics = []
        steps = 0
        for batch in batches(epoch):
            parts = train_step(model, method, state, optimizer, scheduler, batch, tc, precision, device)
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
        metrics.update(epoch=epoch, step=step, phase=index, lr=scheduler.get_last_lr()[0],
                       epoch_seconds=time.perf_counter() - t0)
        if validate_epoch is not None:
            metrics.update(validate_epoch())
        if state.queues:
            checksum = state.checksum()
            every_rank = all_gather_no_grad(torch.tensor([checksum], dtype=torch.float64, device=device))
            metrics["queue_checksum"] = checksum
            metrics["queue_sync_error"] = float((every_rank - every_rank[0]).abs().max())  # 0: identical queues
        if client is not None:
            step_metrics += [Metric(k, v, int(time.time() * 1000), epoch) for k, v in metric_names(metrics).items()]
            for start in range(0, len(step_metrics), 1000):  # MLflow's limit per batch
                client.log_batch(config["mlflow_run_id"], metrics=step_metrics[start:start + 1000])
        run_epochs_done += 1
        if rank == 0:
            per_epoch = (time.perf_counter() - run_t0) / run_epochs_done
            print(epoch_line(metrics, total_epochs, phases[index].name, per_epoch * (total_epochs - epoch - 1)),
                  file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": method.state_dict(), "momentum": state.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rng": torch.get_rng_state(), "epoch": epoch, "step": step, "phase": index},
                           os.path.join(tmp, CHECKPOINT_FILE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
    if client is not None:
        finish_system_metrics(client, config["mlflow_run_id"], tc["system_metrics_seconds"])


def new_training_state(method, tc: dict, steps_per_epoch: int, device: torch.device):
    """Returns (the method's momentum state on `device`, the optimizer and scheduler of its first phase, which
    is applied): what `run_epochs` starts from, for single-process use (tests, the bare-loop benchmark)."""
    phase = phases_of(method, tc)[0]
    apply_phase(method, phase)
    return method.new_state().to(device), *new_optimizer(method, phase, tc, steps_per_epoch)
