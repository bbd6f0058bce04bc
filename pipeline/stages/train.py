"""The train stage: a registered method trained with Ray Train on the feature store (or, for a method on shards,
straight from the tars), its momentum state kept identical on every worker."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.config import OPERATIONAL_FEATURES, Config, TrainConfig, to_dict
from pipeline.fingerprint import digest, frame_digest
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.stages.base import StageResult, _cached, _commit, log
from pipeline.tracking.runs import Tracker, stage_run

OPERATIONAL = ("storage_path", "system_metrics_seconds", "max_failures", "prefetch_batches")  # not in fingerprint


def resolve_method(tc: TrainConfig):
    """Returns (the method class of `train.method`, its Args built from `train.method_args`); raises ValueError
    naming an unknown method, an unknown or mistyped argument, or a queue that the global batch does not divide.
    Cheap: called before Ray starts."""
    from pipeline.methods import method_class
    from pipeline.methods.base import parse_args

    cls = method_class(tc.method)
    args = parse_args(cls, tc.method_args, f"train.method_args ({tc.method})")
    queue = getattr(args, "queue_size", 0)
    if queue and queue % tc.batch_size:
        raise ValueError(f"train.method_args.queue_size: {queue} is not a multiple of the global batch "
                         f"{tc.batch_size} (every step writes one whole global batch into the queue)")
    return cls, args


def train_identity(tc: TrainConfig) -> dict:
    """Returns the train config as a dict less where and how the run is kept (`OPERATIONAL`, and the guide
    extractor's `OPERATIONAL_FEATURES`): what a trained model's identity depends on."""
    train = {k: v for k, v in to_dict(tc).items() if k not in OPERATIONAL}
    if train.get("guide"):
        train["guide"] = {k: v for k, v in train["guide"].items() if k not in OPERATIONAL_FEATURES}
    return train


def train_fingerprint(tc: TrainConfig, args, **inputs) -> str:
    """Returns the train stage's fingerprint: its inputs, the train config less where and how the run is kept, and
    the method's own arguments with their defaults filled in (another method's arguments never enter it)."""
    from pipeline.methods import method_class
    from pipeline.methods.base import args_dict

    return digest({**inputs, "train": {**train_identity(tc), "method_args": args_dict(args)},
                   "method_version": method_class(tc.method).version})


def load_trained(path: Path):
    """Returns the trained method saved by the train stage in folder `path` (eval mode, CPU)."""
    from pipeline.methods import method_class

    spec = json.loads((path / "method.json").read_text())
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    return method_class(spec["name"]).from_checkpoint(spec, state).eval()


def _run_storage(cfg: Config) -> dict:
    """Returns {"storage_path", "storage_filesystem"} of the training runs: `train.storage_path` (a shared path
    or s3://...), default `<workdir>/ray_results`."""
    path, fs = storage.ray_storage(cfg.train.storage_path or cfg.workdir_path / "ray_results")
    return {"storage_path": path, "storage_filesystem": fs}


def _best_state(result, run_name: str, scored: bool) -> tuple[dict, object]:
    """Returns (the state saved in the best checkpoint of a Ray Train result by `val_rsum` when `scored`, else
    the last one; that checkpoint). Raises RuntimeError when the run left no checkpoint."""
    from pipeline.train.loop import CHECKPOINT_FILE

    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint ({result.error})")
    chosen = result.get_best_checkpoint("val_rsum", "max") if scored else result.checkpoint
    with chosen.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True), chosen


def _log_trained(out: Path, t0: float, state: dict, result) -> None:
    import mlflow

    mlflow.log_metric("train_seconds", time.perf_counter() - t0)
    mlflow.log_artifacts(str(out), artifact_path="model")
    mlflow.log_metric("best_epoch", state["epoch"])
    log(f"train: done in {time.perf_counter() - t0:.1f} s, kept epoch {state['epoch']}, final val rsum "
        f"{(result.metrics or {}).get('val_rsum', float('nan')):.1f} -> {out}")


def input_dims(inputs) -> dict[str, int]:
    """Returns {batch key: feature width} of a method's inputs (read from their first rows)."""
    batch = {**inputs.images(np.arange(1)), **inputs.captions(np.arange(1))}
    return {k: int(v.shape[-1]) for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point()}


def run_train(cfg: Config, tracker: Tracker, features: StageResult, guide: StageResult | None = None) -> StageResult:
    """Trains `train.method` on the store's train split with Ray Train (DDP, the method's momentum state kept
    identical across workers; every worker reads its own rows of the memory-mapped store); returns
    `<workdir>/train/<fingerprint>` holding model.pt and method.json. `guide`: the extract stage of `train.guide`
    for methods that read a second store."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.features import store
    from pipeline.methods.base import args_dict
    from pipeline.ray_runtime import cluster_cpus
    from pipeline.train.inputs import open_feature_inputs
    from pipeline.train.loop import CODE_VERSION, apply_phase, phases_of, train_loop_per_worker

    tc = cfg.train
    cls, args = resolve_method(tc)
    parts = {key: run_train(dataclasses.replace(cfg, train=dataclasses.replace(
        tc, method=name, method_args=method_args, phases=[], **overrides)), tracker, features, guide)
        for key, (name, method_args, overrides) in cls.requires(args).items()}  # each cached and tracked itself
    store_root, manifest = store.open_selection(features.path)
    guide_src = store.open_selection(guide.path) if guide else None  # (store folder, selection manifest)
    input_digest = frame_digest(manifest[["split", "shard", "shard_sha256"]])
    fp = train_fingerprint(tc, args, features=features.fingerprint, code=CODE_VERSION,
                           **({"guide": guide.fingerprint} if guide else {}),
                           **({"parts": {k: p.fingerprint for k, p in parts.items()}} if parts else {}))
    out = cfg.workdir_path / "train" / fp
    upstream = [features.run_id] + ([guide.run_id] if guide else []) + [p.run_id for p in parts.values()]
    if hit := _cached(tracker, "train", fp, out, upstream):
        return hit
    train_inputs = open_feature_inputs(cls, args, store_root, manifest, "train", guide_src)
    has_val = bool((manifest["split"] == "val").any())
    if not has_val:
        log("train: no val split, training without per-epoch validation")
    dims = input_dims(train_inputs)
    torch.manual_seed(tc.seed)
    method = cls(args, dims)
    method.attach({key: load_trained(part.path) for key, part in parts.items()})
    tcd = to_dict(tc)
    for phase in phases_of(method, tcd):  # unknown module names fail here, before any worker starts
        apply_phase(method, phase)
    for p in method.parameters():
        p.requires_grad_(True)
    method.prepare(train_inputs)
    num_captions = train_inputs.num_captions
    steps_per_epoch = num_captions // tc.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train split has {num_captions} captions, fewer than one global batch ({tc.batch_size})")
    cpus_per_worker = max(1, cluster_cpus() // tc.num_workers) if not tc.use_gpu else 1
    spec = {"name": tc.method, "args": args_dict(args), "dims": dims}
    with stage_run(tracker, "train", fp, {"train": tcd}, upstream, inputs=manifest,
                   input_name=f"{cfg.data.name}-features", input_source=str(features.path),
                   input_digest=input_digest) as run_id:
        t0 = time.perf_counter()
        best = {"checkpoint_score_attribute": "val_rsum", "checkpoint_score_order": "max"} if has_val else {}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "method": tc.method, "spec": spec, "init_state": method.state_dict(), "train": tcd,
                "inputs": {"store": str(store_root), "manifest": manifest, "guide": guide_src, "has_val": has_val},
                "steps_per_epoch": steps_per_epoch, "threads_per_worker": cpus_per_worker,
                "mlflow_uri": tracker.uri, "mlflow_run_id": run_id,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=f"train-{fp}", **_run_storage(cfg),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, **best),
                failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            ),
        )
        phases = phases_of(method, tcd)
        log(f"train: {tc.method} on {num_captions} captions, {tc.num_workers} workers x {steps_per_epoch} "
            f"steps x {sum(p.epochs for p in phases)} epochs ({', '.join(p.name for p in phases)})")
        result = trainer.fit()
        state, chosen = _best_state(result, f"train-{fp}", has_val)
        with atomic_dir(out) as tmp:
            torch.save(state["model"], tmp / "model.pt")  # the best epoch by validation RSUM, else the last
            atomic_write_json(tmp / "method.json", {**spec, "epoch": state["epoch"]})
            atomic_write_json(tmp / "final_metrics.json", result.metrics)
            if getattr(method, "write_artifacts", None) is not None:  # a method's own files (CODER's concept graph)
                method.load_state_dict(state["model"])
                method.write_artifacts(tmp / "artifacts")
        _log_trained(out, t0, state, result)
        return _commit(out, "train", fp, run_id, {"method": tc.method, "checkpoint": chosen.path,
                                                  "epoch": state["epoch"]})


def run_train_shards(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """Trains a method on shards (`clip_finetune`: `features.model` fine-tuned end to end, Ray Data feeding Ray
    Train DDP, the same synchronised queues); returns `<workdir>/train/<fingerprint>` holding model.pt (a plain
    open_clip checkpoint of the best epoch by validation RSUM, else the last) and method.json."""
    from pipeline.data.shard import read_manifest
    from pipeline.methods.base import args_dict
    from pipeline.train import end_to_end

    tc, fc = cfg.train, cfg.features
    cls, args = resolve_method(tc)
    fp = train_fingerprint(tc, args, shards=shards.fingerprint, model=fc.model, pretrained=fc.pretrained,
                           seed=fc.seed, code=end_to_end.CODE_VERSION)
    out = cfg.workdir_path / "train" / fp
    if hit := _cached(tracker, "train", fp, out, [shards.run_id]):
        return hit
    manifest = read_manifest(shards.path)
    with stage_run(tracker, "train", fp, {"train": to_dict(tc), "features": to_dict(fc)}, [shards.run_id],
                   inputs=manifest, input_name=f"{cfg.data.name}-shards", input_source=str(shards.path),
                   input_digest=frame_digest(manifest[["shard", "sha256"]])) as run_id:
        t0 = time.perf_counter()
        log(f"train: {tc.method}: end-to-end fine-tuning of {fc.model} from {len(manifest)} shards, "
            f"{tc.num_workers} workers")
        result = end_to_end.fit_end_to_end(shards.path, manifest, fc.model, fc.pretrained, to_dict(tc),
                                           args_dict(args), _run_storage(cfg), f"train-{fp}",
                                           tracker.uri, run_id, tc.num_workers, tc.use_gpu)
        state, chosen = _best_state(result, f"train-{fp}", bool((manifest["split"] == "val").any()))
        spec = {"name": tc.method, "args": args_dict(args), "dims": {}, "model": fc.model, "epoch": state["epoch"]}
        with atomic_dir(out) as tmp:
            torch.save(end_to_end.open_clip_state(state["model"]), tmp / "model.pt")  # a plain open_clip checkpoint
            atomic_write_json(tmp / "method.json", spec)
            atomic_write_json(tmp / "final_metrics.json", result.metrics)
        _log_trained(out, t0, state, result)
        return _commit(out, "train", fp, run_id, {"method": f"{tc.method} ({fc.model})", "checkpoint": chosen.path,
                                                  "epoch": state["epoch"]})

