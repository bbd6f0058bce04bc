"""The five stages with Ray and MLflow at the edge: synth -> shard -> extract -> train -> eval.

Each stage computes its output's fingerprint (inputs + config + code version). When that output exists
it logs a cached MLflow run linking to the run that produced it and returns; otherwise it does the work
inside an MLflow stage run and commits its output with a `stage.json` record written last.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.config import Config, to_dict
from pipeline.fingerprint import digest, frame_digest
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.tracking.runs import Tracker, log_cached_stage, metric_names, stage_run

STAGE_RECORD = "stage.json"


@dataclass
class StageResult:
    """What a stage hands downstream: its output folder, fingerprint and the MLflow run that made it."""

    stage: str
    fingerprint: str
    path: Path
    run_id: str  # the run that produced the output (for a cached stage: the original producer)
    cached: bool = False
    info: dict = field(default_factory=dict)


def log(message: str) -> None:
    """Prints a progress line to stderr."""
    print(f"[itr] {message}", file=sys.stderr, flush=True)


def _read_record(path) -> dict | None:
    location = storage.join(path, STAGE_RECORD)
    return json.loads(storage.read_bytes(location)) if storage.exists(location) else None


def _log_artifact(location) -> None:
    """Logs a local file or a remote object (through a local copy) as an MLflow artifact."""
    import tempfile

    import mlflow

    if not storage.is_uri(location):
        mlflow.log_artifact(str(location))
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / str(location).rsplit("/", 1)[-1]
        local.write_bytes(storage.read_bytes(location))
        mlflow.log_artifact(str(local))


def _cached(tracker: Tracker, stage: str, fingerprint: str, path: Path, upstream: list[str]) -> StageResult | None:
    record = _read_record(path)
    if not record or record.get("fingerprint") != fingerprint:
        return None
    log_cached_stage(tracker, stage, fingerprint, record["run_id"], upstream)
    log(f"{stage}: cached ({fingerprint}, produced by run {record['run_id']}) at {path}")
    return StageResult(stage, fingerprint, path, record["run_id"], cached=True, info=record.get("info", {}))


def _commit(path: Path, stage: str, fingerprint: str, run_id: str, info: dict) -> StageResult:
    record = {"stage": stage, "fingerprint": fingerprint, "run_id": run_id,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "info": info}
    storage.write_bytes(storage.join(path, STAGE_RECORD), json.dumps(record, indent=2, sort_keys=True).encode())
    return StageResult(stage, fingerprint, path, run_id, info=info)


# ---------------------------------------------------------------- synth
def run_synth(cfg: Config, tracker: Tracker) -> StageResult:
    """Generates the synthetic dataset into `cfg.data_root` unless the same one is already there."""
    import mlflow

    from pipeline.data.sources import synthetic

    params = to_dict(cfg.data.synth)
    fp = digest({"synth": params, "code": synthetic.CODE_VERSION})
    root = cfg.data_root
    if hit := _cached(tracker, "synth", fp, root, []):
        return hit
    with stage_run(tracker, "synth", fp, {"data": to_dict(cfg.data)}, []) as run_id:
        t0 = time.perf_counter()
        summary = synthetic.generate(root, **params)
        mlflow.log_metrics({"images": sum(summary["counts"].values()), "captions": summary["num_captions"],
                            "seconds": time.perf_counter() - t0})
        for name in ("synth.json", "ceiling.json", "preview.png"):
            if (root / name).is_file():
                mlflow.log_artifact(str(root / name))
        log(f"synth: {summary['counts']} images at {root}")
        return _commit(root, "synth", fp, run_id, {"counts": summary["counts"]})


# ---------------------------------------------------------------- shard
def write_shards(plans: list, out_dir: Path, jpeg_quality: int, progress: bool = True) -> list[dict]:
    """Writes the tars of `plans` with Ray Data, one task per tar; returns `write_shard`'s result per plan,
    in plan order. Shows a progress bar over samples when `progress`."""
    import ray
    from tqdm import tqdm

    from pipeline.data import shard as shard_core

    def write(row: dict) -> dict:
        return {"id": row["id"], "result": shard_core.write_shard(plans[row["id"]], out_dir, jpeg_quality)}

    results = {}
    context = ray.data.DataContext.get_current()
    reserving = context.op_resource_reservation_enabled
    # One operator, so nothing to reserve resources for; the reservation held the writes to half the CPUs of
    # a small cluster (8 x 0.5 s tasks on 2 CPUs: 3.3 s with it, 2.1 s without).
    context.op_resource_reservation_enabled = False
    try:
        ds = ray.data.range(len(plans), override_num_blocks=len(plans)).map(write, num_cpus=1)
        with tqdm(total=sum(len(p.samples) for p in plans), unit="sample", desc="shard", disable=not progress,
                  file=sys.stderr) as bar:
            for row in ds.iter_rows():
                results[row["id"]] = row["result"]
                bar.update(len(plans[row["id"]].samples))
    finally:
        context.op_resource_reservation_enabled = reserving
    return [results[i] for i in range(len(plans))]


def run_shard(cfg: Config, tracker: Tracker, upstream: list[str]) -> StageResult:
    """Adds the dataset's new samples to its append-only shard folder `<workdir>/shards/<dataset>` as
    deterministic WebDataset tars written with Ray Data; returns the folder. Items that cannot be sharded
    go to `quarantine.parquet`; more than `shard.max_quarantined` of the input quarantined fails the stage
    (ValueError) with nothing committed. A run with nothing new commits nothing and says so."""
    import mlflow

    from pipeline.data import shard as shard_core
    from pipeline.data.sample import Rejected
    from pipeline.data.sources import load_samples

    t0 = time.perf_counter()
    samples, rejected = load_samples(cfg.data.source, cfg.data_root, cfg.data.name)
    out = cfg.shard_dir
    manifest, index, quarantine = shard_core.read_committed(out)
    if removed := shard_core.remove_uncommitted(out, manifest):
        log(f"shard: removed {len(removed)} uncommitted files left by an interrupted run")
    inputs, missing = shard_core.source_manifest(samples)
    inc = shard_core.plan_increment(samples, inputs, index, manifest, quarantine, cfg.shard.shard_size)
    total = len(samples) + len(rejected)  # input items: the source's samples and the entries it rejected
    rejected = rejected + missing + inc.rejected
    shard_core.check_splits(set(index["split"]) | {p.split for p in inc.plans}, ["train", cfg.eval.split])
    record = _read_record(out) or {}
    prior = record.get("fingerprint", "") if len(manifest) else ""
    upstream = upstream + ([record["run_id"]] if prior else [])  # an increment builds on the previous state

    def check_quarantine(quarantined: list) -> None:
        if quarantined:
            log(f"shard: {len(quarantined)} items quarantined (first: {quarantined[0].item}: "
                f"{quarantined[0].reason}); see {storage.join(out, shard_core.QUARANTINE)}")
        if total and len(quarantined) / total > cfg.shard.max_quarantined:
            raise ValueError(f"shard: {len(quarantined)} of {total} input items quarantined "
                             f"({100 * len(quarantined) / total:.1f}% > shard.max_quarantined = "
                             f"{100 * cfg.shard.max_quarantined:g}%); first: {quarantined[0].item}: "
                             f"{quarantined[0].reason}. Nothing was committed; the list is in "
                             f"{storage.join(out, shard_core.QUARANTINE)}")

    if inc.gone:
        log(f"shard: {len(inc.gone)} sharded samples are no longer in the source (e.g. {inc.gone[0]}); "
            "they stay in their shards")
    if not inc.plans:
        shard_core.write_quarantine(out, rejected, inputs)
        check_quarantine(rejected)
        if prior:
            log(f"shard: nothing new: {inc.unchanged} samples already in {len(manifest)} shards, "
                f"{len(rejected)} quarantined, checked in {time.perf_counter() - t0:.1f} s")
            log_cached_stage(tracker, "shard", prior, record["run_id"], upstream)
            return StageResult("shard", prior, out, record["run_id"], cached=True, info=record.get("info", {}))
        raise ValueError(f"shard: {cfg.data.name} has no sample that can be sharded ({len(rejected)} quarantined)")
    added = [(p.name, [(s.key, s.split) for s in p.samples]) for p in inc.plans]
    input_digest = frame_digest(inputs)
    fp = digest({"prior": prior, "added": added, "source": input_digest, "jpeg_quality": cfg.shard.jpeg_quality,
                 "code": shard_core.CODE_VERSION})
    with stage_run(tracker, "shard", fp, {"data": to_dict(cfg.data), "shard": to_dict(cfg.shard)}, upstream,
                   inputs=inputs, input_name=f"{cfg.data.name}-samples", input_source=str(cfg.data_root),
                   input_digest=input_digest) as run_id:
        log(f"shard: {sum(len(p.samples) for p in inc.plans)} new samples into {len(inc.plans)} shards "
            f"({inc.unchanged} already sharded) -> {out}")
        results = write_shards(inc.plans, out, cfg.shard.jpeg_quality)
        quarantined = rejected + [Rejected(r["item"], r["reason"]) for res in results for r in res["rejected"]]
        table = shard_core.write_quarantine(out, quarantined, inputs)
        try:
            check_quarantine(quarantined)
        except ValueError:
            shard_core.remove_uncommitted(out, manifest)
            raise
        manifest = shard_core.commit(out, manifest, index, results, inputs, run_id)
        seconds = time.perf_counter() - t0
        new = manifest[manifest["run_id"] == run_id]
        counts = manifest.groupby("split")["num_samples"].sum().to_dict()
        mlflow.log_metrics({"samples": int(new["num_samples"].sum()), "shards": len(new),
                            "bytes": int(new["bytes"].sum()), "quarantined": len(table),
                            "quarantined_fraction": len(table) / max(1, total), "samples_total": sum(counts.values()),
                            "shards_total": len(manifest), "seconds": seconds,
                            "samples_per_second": float(new["num_samples"].sum() / seconds)})
        _log_artifact(storage.join(out, shard_core.MANIFEST))
        _log_artifact(storage.join(out, shard_core.QUARANTINE))
        log(f"shard: {int(new['num_samples'].sum())} samples, {len(new)} shards, "
            f"{int(new['bytes'].sum()) / 1e6:.1f} MB, {len(table)} quarantined, {seconds:.1f} s "
            f"({sum(counts.values())} samples in {len(manifest)} shards at {out})")
        return _commit(out, "shard", fp, run_id, {"counts": {k: int(v) for k, v in counts.items()}})


# ---------------------------------------------------------------- extract
def run_extract(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """Extracts features of every shard not yet in the store (a Ray Data actor pool, one shard per call);
    returns the selection folder `<workdir>/features/<dataset>/<extractor fingerprint>/inputs/<fingerprint>`
    whose manifest lists the store rows of this input."""
    import mlflow
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.data.shard import read_manifest as read_shard_manifest
    from pipeline.features import store
    from pipeline.features.extract import ShardFeatureWriter, actor_pool
    from pipeline.features.extractors import get_extractor
    from pipeline.ray_runtime import cluster_cpus

    described = get_extractor(cfg.features.extractor).describe(cfg.features)
    store_dir = cfg.workdir_path / "features" / cfg.data.name / digest(described)
    shard_manifest = read_shard_manifest(shards.path)
    input_digest = frame_digest(shard_manifest[["shard", "sha256"]])
    fp = digest({"extractor": described, "shards": input_digest})
    if removed := store.remove_uncommitted(store_dir):
        log(f"extract: removed {len(removed)} uncommitted files left by an interrupted run")
    done = store.read_manifest(store_dir)
    have = set(zip(done["shard"], done["shard_sha256"])) if len(done) else set()
    todo = shard_manifest[[(s, h) not in have for s, h in zip(shard_manifest["shard"], shard_manifest["sha256"])]]
    selection_dir = store_dir / store.SELECTIONS / fp
    if not len(todo) and (hit := _cached(tracker, "extract", fp, selection_dir, [shards.run_id])):
        return hit
    params = {"features": to_dict(cfg.features), "store": str(store_dir)}
    with stage_run(tracker, "extract", fp, params, [shards.run_id], inputs=shard_manifest,
                   input_name=f"{cfg.data.name}-shards", input_source=str(shards.path),
                   input_digest=input_digest) as run_id:
        t0 = time.perf_counter()
        log(f"extract: {len(todo)} of {len(shard_manifest)} shards to do -> {store_dir}")
        rows = [] if not len(done) else [done]
        if len(todo):
            gpus = cfg.features.num_gpus
            node_cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
            actors, threads = actor_pool(cluster_cpus(), node_cpus, ray.cluster_resources().get("GPU", 0), len(todo),
                                         gpus, cfg.features.cpus_per_actor)
            items = [{"shard_path": str(storage.join(shards.path, r.shard)), "shard": r.shard, "split": r.split,
                      "sha256": r.sha256} for r in todo.itertuples()]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                ShardFeatureWriter,
                fn_constructor_kwargs={"cfg": to_dict(cfg.features), "store_dir": str(store_dir),
                                       "run_id": run_id, "threads": threads},
                batch_size=1,
                compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),  # no actor idles at the end
                num_cpus=threads if gpus == 0 else 1,
                num_gpus=gpus,
            )
            for row in ds.iter_rows():  # commit each shard as soon as it is written
                rows.append(pd.DataFrame([row]))
                store.write_manifest(store_dir, pd.concat(rows, ignore_index=True))
        manifest = store.select(store.read_manifest(store_dir), shard_manifest)
        store.write_manifest(selection_dir, manifest)
        seconds = time.perf_counter() - t0
        new = manifest[manifest["run_id"] == run_id]
        mlflow.log_params({"fingerprint.extractor": store_dir.name})
        mlflow.log_metrics({"shards_extracted": len(new), "shards_reused": len(manifest) - len(new),
                            "images": int(new["num_images"].sum()), "captions": int(new["num_captions"].sum()),
                            "seconds": seconds,
                            "images_per_second": float(new["num_images"].sum() / seconds) if len(new) else 0.0})
        mlflow.log_dict(described, "extractor.json")
        log(f"extract: {int(new['num_images'].sum())} images, {int(new['num_captions'].sum())} captions "
            f"in {seconds:.1f} s")
        return _commit(selection_dir, "extract", fp, run_id, {"extractor": described})


def run_import(cfg: Config, tracker: Tracker) -> StageResult:
    """For a feature source (SCAN/VSE precomp: region features, no images): imports its region arrays and
    encodes its captions with the `features` extractor's text side straight into the feature store, unless
    already there; returns the selection folder, as `run_extract` does."""
    import mlflow

    from pipeline.data.sample import Rejected
    from pipeline.features import precomp, store
    from pipeline.features.extractors import get_extractor
    from pipeline.features.precision import pick_device

    root = cfg.data_root
    if storage.is_uri(root):
        raise ValueError(f"data.root: the precomp source reads local files only (memory-mapped), got {root}")
    module = get_extractor(cfg.features.extractor)
    described = {"precomp": precomp.CODE_VERSION, "text": module.describe(cfg.features)}
    store_dir = cfg.workdir_path / "features" / cfg.data.name / digest(described)
    files = pd.DataFrame([{"split": s, "file": n, "size": size, "mtime_ns": t}
                          for s in precomp.release_splits(root) for n, size, t in precomp.file_stats(root, s)])
    fp = digest({"store": store_dir.name, "files": frame_digest(files), "name": cfg.data.name})
    selection_dir = store_dir / store.SELECTIONS / fp
    if hit := _cached(tracker, "import", fp, selection_dir, []):
        return hit
    with stage_run(tracker, "import", fp, {"data": to_dict(cfg.data), "features": to_dict(cfg.features)}, [],
                   inputs=files, input_name=f"{cfg.data.name}-precomp", input_source=str(root),
                   input_digest=frame_digest(files)) as run_id:
        t0 = time.perf_counter()
        extractor = module.load(cfg.features, pick_device(cfg.features.num_gpus > 0))
        rejected: list[Rejected] = []
        rows = precomp.import_precomp(root, cfg.data.name, store_dir,
                                      lambda texts: module.encode_texts(extractor, texts, False),
                                      batch_size=cfg.features.batch_size, progress=True, run_id=run_id,
                                      rejected=rejected)
        store.write_manifest(selection_dir, rows)
        quarantine = pd.DataFrame([{"item": r.item, "reason": r.reason} for r in rejected], columns=["item", "reason"])
        storage.write_parquet(selection_dir / "quarantine.parquet", pa.Table.from_pandas(quarantine))
        new = rows[rows["run_id"] == run_id]
        seconds = time.perf_counter() - t0
        mlflow.log_metrics({"chunks_imported": len(new), "chunks_reused": len(rows) - len(new),
                            "images": int(rows["num_images"].sum()), "captions": int(rows["num_captions"].sum()),
                            "quarantined": len(quarantine), "seconds": seconds})
        mlflow.log_artifact(str(selection_dir / "quarantine.parquet"))
        log(f"import: {int(rows['num_images'].sum())} images, {int(rows['num_captions'].sum())} captions "
            f"({len(new)} of {len(rows)} chunks new), {len(quarantine)} quarantined, {seconds:.1f} s -> {store_dir}")
        return _commit(selection_dir, "import", fp, run_id, {"extractor": described})


# ---------------------------------------------------------------- train
def method_inputs(split, method) -> dict[str, np.ndarray]:
    """Returns {"image": (N, Di), "text": (M, Dt), "caption_image": (M,)} float16 inputs of a method from a
    `FeatureSplit` (its `image_inputs` / `text_inputs` columns concatenated)."""
    n_images, n_captions = len(split.keys), len(split.caption_image)
    return {
        "image": np.concatenate([split.images[c].reshape(n_images, -1) for c in method.image_inputs], 1),
        "text": np.concatenate([split.captions[c].reshape(n_captions, -1) for c in method.text_inputs], 1),
        "caption_image": split.caption_image,
    }


def method_kwargs(cls, tc, **dims) -> dict:
    """Returns the constructor arguments of method class `cls`: `dims` plus every train config field that
    the constructor names (embed_dim, hidden_dim, temperature, margin, gather_with_grad, ...)."""
    import inspect

    names = inspect.signature(cls.__init__).parameters
    return dims | {name: getattr(tc, name) for name in names if hasattr(tc, name)}


def load_trained(path: Path):
    """Returns the trained method saved by the train stage in folder `path` (eval mode, CPU)."""
    from pipeline.methods import create_method

    spec = json.loads((path / "method.json").read_text())
    method = create_method(spec["name"], **spec["kwargs"])
    method.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    return method.eval()


def _train_fingerprint(tc, **inputs) -> str:
    """Returns the train stage's fingerprint: its inputs and the train config, less where and how the run is
    kept (storage path, failure retries, system-metrics interval)."""
    operational = ("storage_path", "system_metrics_seconds", "max_failures")
    return digest({**inputs, "train": {k: v for k, v in to_dict(tc).items() if k not in operational}})


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


def run_train(cfg: Config, tracker: Tracker, features: StageResult) -> StageResult:
    """Trains `train.method` on the store's train split with Ray Train (DDP, momentum queues synchronised
    across workers); returns `<workdir>/train/<fingerprint>` holding model.pt and method.json."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.features import store
    from pipeline.methods import METHODS, create_method
    from pipeline.ray_runtime import cluster_cpus
    from pipeline.train.loop import CODE_VERSION as TRAIN_CODE_VERSION
    from pipeline.train.loop import train_loop_per_worker

    tc = cfg.train
    if tc.method not in METHODS:
        create_method(tc.method)  # raises the unknown-method error
    cls = METHODS[tc.method]
    store_root, manifest = store.open_selection(features.path)
    input_digest = frame_digest(manifest[["split", "shard", "shard_sha256"]])
    fp = _train_fingerprint(tc, features=features.fingerprint, code=TRAIN_CODE_VERSION)
    out = cfg.workdir_path / "train" / fp
    if hit := _cached(tracker, "train", fp, out, [features.run_id]):
        return hit

    def read(split: str) -> dict[str, np.ndarray]:
        return method_inputs(store.read_split(store_root, manifest, split, cls.image_inputs, cls.text_inputs), cls)

    train_split = read("train")
    splits = {"train": train_split}
    try:
        splits["val"] = read("val")
    except ValueError:
        log("train: no val split, training without per-epoch validation")
    kwargs = method_kwargs(cls, tc, image_dim=train_split["image"].shape[1], text_dim=train_split["text"].shape[1])
    torch.manual_seed(tc.seed)
    method = create_method(tc.method, **kwargs)
    method.set_standardization(torch.from_numpy(train_split["image"]), torch.from_numpy(train_split["text"]))
    num_captions = len(train_split["caption_image"])
    steps_per_epoch = num_captions // tc.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train split has {num_captions} captions, fewer than one global batch ({tc.batch_size})")
    cpus_per_worker = max(1, cluster_cpus() // tc.num_workers) if not tc.use_gpu else 1
    with stage_run(tracker, "train", fp, {"train": to_dict(tc)}, [features.run_id], inputs=manifest,
                   input_name=f"{cfg.data.name}-features", input_source=str(features.path),
                   input_digest=input_digest) as run_id:
        t0 = time.perf_counter()
        best = {"checkpoint_score_attribute": "val_rsum", "checkpoint_score_order": "max"} if "val" in splits else {}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "method": tc.method, "method_kwargs": kwargs, "init_state": method.state_dict(),
                "train": to_dict(tc), "features_ref": ray.put(splits), "steps_per_epoch": steps_per_epoch,
                "threads_per_worker": cpus_per_worker, "mlflow_uri": tracker.uri, "mlflow_run_id": run_id,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=f"train-{fp}", **_run_storage(cfg),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, **best),
                failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            ),
        )
        log(f"train: {tc.method} on {num_captions} captions, {tc.num_workers} workers x {steps_per_epoch} "
            f"steps x {tc.epochs} epochs")
        result = trainer.fit()
        state, chosen = _best_state(result, f"train-{fp}", bool(best))
        with atomic_dir(out) as tmp:
            torch.save(state["model"], tmp / "model.pt")  # the best epoch by validation RSUM, else the last
            atomic_write_json(tmp / "method.json", {"name": tc.method, "kwargs": kwargs, "epoch": state["epoch"]})
            atomic_write_json(tmp / "final_metrics.json", result.metrics)
        _log_trained(out, t0, state, result)
        return _commit(out, "train", fp, run_id, {"method": tc.method, "checkpoint": chosen.path,
                                                  "epoch": state["epoch"]})


def run_train_end_to_end(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """Fine-tunes the `features` open_clip model straight from the shards (Ray Data feeding Ray Train DDP,
    the same synchronised momentum queues); returns `<workdir>/train/<fingerprint>` holding model.pt (a plain
    open_clip checkpoint of the best epoch by validation RSUM, else the last) and method.json."""
    from pipeline.data.shard import read_manifest
    from pipeline.train import end_to_end

    tc, fc = cfg.train, cfg.features
    fp = _train_fingerprint(tc, shards=shards.fingerprint, model=fc.model, pretrained=fc.pretrained, seed=fc.seed,
                            code=end_to_end.CODE_VERSION)
    out = cfg.workdir_path / "train" / fp
    if hit := _cached(tracker, "train", fp, out, [shards.run_id]):
        return hit
    manifest = read_manifest(shards.path)
    with stage_run(tracker, "train", fp, {"train": to_dict(tc), "features": to_dict(fc)}, [shards.run_id],
                   inputs=manifest, input_name=f"{cfg.data.name}-shards", input_source=str(shards.path),
                   input_digest=frame_digest(manifest[["shard", "sha256"]])) as run_id:
        t0 = time.perf_counter()
        log(f"train: end-to-end fine-tuning of {fc.model} from {len(manifest)} shards, {tc.num_workers} workers")
        result = end_to_end.fit_end_to_end(shards.path, manifest, fc.model, fc.pretrained, to_dict(tc),
                                           _run_storage(cfg), f"train-{fp}",
                                           tracker.uri, run_id, tc.num_workers, tc.use_gpu)
        state, chosen = _best_state(result, f"train-{fp}", bool((manifest["split"] == "val").any()))
        spec = {"mode": "end_to_end", "model": fc.model, "temperature": tc.temperature, "epoch": state["epoch"]}
        with atomic_dir(out) as tmp:
            torch.save(end_to_end.open_clip_state(state["model"]), tmp / "model.pt")
            atomic_write_json(tmp / "method.json", spec)
            atomic_write_json(tmp / "final_metrics.json", result.metrics)
        _log_trained(out, t0, state, result)
        return _commit(out, "train", fp, run_id, {"method": f"{fc.model} end-to-end", "mode": "end_to_end",
                                                  "checkpoint": chosen.path, "epoch": state["epoch"]})


# ---------------------------------------------------------------- eval
def embed_eval_split(trained: StageResult, source: StageResult, split_name: str) -> dict:
    """Returns the trained model's embeddings of an eval split: {"image" (N, D), "text" (M, D), "caption_image"
    (M,), "labels", "keys", and "reference": the frozen features' (image, text) embeddings when they share a
    space, else None}. `source` is the extract (or import) stage for a method on features, the shard stage
    for an end-to-end model."""
    from pipeline.features import store

    device = torch.device("cpu")
    if trained.info.get("mode") == "end_to_end":
        from pipeline.data.shard import read_committed
        from pipeline.train import end_to_end

        spec = json.loads((trained.path / "method.json").read_text())
        manifest, index, _ = read_committed(source.path)
        shards = list(manifest[manifest["split"] == split_name]["shard"])
        paths = [str(storage.join(source.path, s)) for s in shards]
        if not paths:
            raise ValueError(f"eval split {split_name!r} has no shard")
        model, preprocess, tokenizer = end_to_end.load_clip(spec["model"], str(trained.path / "model.pt"), device,
                                                            temperature=spec["temperature"])
        img, txt, caption_image, labels = end_to_end.embed_shards(model, preprocess, tokenizer, paths, device)
        order = {s: i for i, s in enumerate(shards)}  # tars hold their samples in key order
        keys = list(index[index["shard"].isin(order)].sort_values("key").sort_values(
            "shard", key=lambda c: c.map(order), kind="stable")["key"])
        return {"image": img, "text": txt, "caption_image": caption_image, "labels": labels, "keys": keys,
                "reference": None}
    from pipeline.train.loop import embed_split

    method = load_trained(trained.path)
    split = store.read_split(*store.open_selection(source.path), split_name,
                             ("image_embed",) + tuple(method.image_inputs), ("text_embed",) + tuple(method.text_inputs))
    img, txt = embed_split(method, method_inputs(split, method), device)
    reference = (split.images["image_embed"], split.captions["text_embed"])
    shared = reference[0].shape[1] == reference[1].shape[1]  # an imported region set has no joint space
    return {"image": img, "text": txt, "caption_image": split.caption_image, "labels": split.labels,
            "keys": list(split.keys), "reference": reference if shared else None}


def run_eval(cfg: Config, tracker: Tracker, source: StageResult, trained: StageResult) -> StageResult:
    """Evaluates the trained model and, as a reference row, the frozen extractor's own global embeddings on
    `eval.split`; writes metrics.json, table.md and recall.png under `<workdir>/eval/<fingerprint>`. `source`:
    as `embed_eval_split`."""
    import mlflow

    from pipeline.eval.report import evaluate_split, write_report

    ec = cfg.eval
    emb = embed_eval_split(trained, source, ec.split)
    fp = digest({"train": trained.fingerprint, "features": source.fingerprint, "eval": to_dict(ec)})
    upstream = [source.run_id, trained.run_id]
    with stage_run(tracker, "eval", fp, {"eval": to_dict(ec)}, upstream,
                   inputs=pd.DataFrame({"key": emb["keys"]}), input_name=f"{cfg.data.name}-{ec.split}",
                   input_source=str(source.path)) as run_id:
        trained_name = f"{trained.info.get('method', 'trained')} (trained)"
        rows, ranks = {}, {}
        rows[trained_name], ranks["trained"] = evaluate_split(emb["image"], emb["text"], emb["caption_image"],
                                                              emb["labels"], ec)
        if emb["reference"] is not None:
            rows["frozen features (untrained)"], ranks["frozen features"] = evaluate_split(
                *emb["reference"], emb["caption_image"], emb["labels"], ec)
        ceiling = synthetic_ceiling(cfg)
        if ceiling:
            rows["perfect-model ceiling"] = ceiling
        metrics = dict(rows[trained_name])
        metrics.update({f"frozen_{k}": v for k, v in rows.get("frozen features (untrained)", {}).items()})
        metrics.update({f"ceiling_{k}": v for k, v in (ceiling or {}).items()})
        metrics.update(num_images=len(emb["keys"]), num_captions=len(emb["caption_image"]))
        out = cfg.workdir_path / "eval" / fp
        with atomic_dir(out) as tmp:
            table = write_report(tmp, rows, ranks, metrics, ec.ks, ceiling)
        mlflow.log_metrics(metric_names(metrics))
        mlflow.log_artifacts(str(out))
        return _commit(out, "eval", fp, run_id, {"table": table, "metrics": metrics})


def synthetic_ceiling(cfg: Config) -> dict | None:
    """Returns the perfect-model R@1 of the eval split recorded by `itr synth` (None for other sources)."""
    if cfg.data.source != "synthetic":
        return None
    from pipeline.data.sources.synthetic import read_ceiling

    ceiling = read_ceiling(cfg.data_root).get(cfg.eval.split) or {}
    return {k: v for k, v in ceiling.items() if v is not None} or None


# ---------------------------------------------------------------- zero-shot benchmark
def model_label(fc) -> str:
    """Returns a short row name for an extractor config: `extractor:model:weights` (weights: the pretrained
    tag or file name; for open_clip without weights, `random-seed<N>`)."""
    weights = Path(fc.pretrained).name if fc.pretrained else ""
    if not weights and fc.extractor == "open_clip":
        weights = f"random-seed{fc.seed}"
    return ":".join(part for part in (fc.extractor, Path(fc.model).name, weights) if part)


def run_zero_shot(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """Extracts (or reuses) the features of every extractor in `eval.zero_shot` (default: `features`) and
    evaluates their own global embeddings on `eval.split` under `eval.protocol`: one table, one row per
    model, in `<workdir>/zero_shot/<fingerprint>/` and in MLflow."""
    import dataclasses

    import mlflow

    from pipeline.eval.report import evaluate_split, write_report
    from pipeline.features import store

    ec = cfg.eval
    models = ec.zero_shot or [cfg.features]
    extracted = {model_label(fc): run_extract(dataclasses.replace(cfg, features=fc), tracker, shards) for fc in models}
    fp = digest({"features": [r.fingerprint for r in extracted.values()], "eval": to_dict(ec)})
    with stage_run(tracker, "zero-shot", fp, {"eval": to_dict(ec)}, [r.run_id for r in extracted.values()]) as run_id:
        rows, ranks = {}, {}
        for name, result in extracted.items():
            split = store.read_split(*store.open_selection(result.path), ec.split, ("image_embed",), ("text_embed",))
            rows[name], ranks[name] = evaluate_split(split.images["image_embed"], split.captions["text_embed"],
                                                     split.caption_image, split.labels, ec)
            log(f"zero-shot: {name}: t2i R@1 {rows[name]['t2i_R@1']:.1f}, rsum {rows[name]['rsum']:.1f}")
        metrics = {f"{name}/{k}": v for name, m in rows.items() for k, v in m.items()}
        out = cfg.workdir_path / "zero_shot" / fp
        with atomic_dir(out) as tmp:
            table = write_report(tmp, rows, ranks, metrics, ec.ks)
        mlflow.log_metrics(metric_names(metrics))
        mlflow.log_artifacts(str(out))
        return _commit(out, "zero-shot", fp, run_id, {"table": table, "metrics": metrics})


# ---------------------------------------------------------------- the whole chain
STAGES = ("synth", "shard", "extract", "train", "eval")


def run_stages(cfg: Config, tracker: Tracker, last: str = "eval", zero_shot: bool = False) -> dict[str, StageResult]:
    """Runs the chain up to and including stage `last` (earlier stages reuse their cached outputs);
    returns the results by stage name. The synth stage runs only for the synthetic source. With
    `zero_shot`, the eval stage is the zero-shot benchmark of `eval.zero_shot` (no training)."""
    if last not in STAGES:
        raise ValueError(f"unknown stage {last!r} (known: {', '.join(STAGES)})")
    stop = STAGES.index(last)
    results: dict[str, StageResult] = {}
    if cfg.data.source == "synthetic":
        results["synth"] = run_synth(cfg, tracker)
    elif last == "synth":
        raise ValueError(f"itr synth needs data.source=synthetic, got {cfg.data.source!r}")
    from pipeline.data.sources import FEATURE_SOURCES

    if cfg.data.source in FEATURE_SOURCES:
        if zero_shot or stop < 2:
            raise ValueError(f"data.source={cfg.data.source} holds features, not images: it has no shard stage and "
                             "no zero-shot benchmark")
        results["extract"] = run_import(cfg, tracker)
    elif stop >= 1:
        results["shard"] = run_shard(cfg, tracker, [r.run_id for r in results.values()])
    if zero_shot:
        results["zero-shot"] = run_zero_shot(cfg, tracker, results["shard"])
        return results
    end_to_end = cfg.train.mode == "end_to_end"
    if cfg.train.mode not in ("features", "end_to_end"):
        raise ValueError(f"train.mode: expected features or end_to_end, got {cfg.train.mode!r}")
    if end_to_end and "shard" not in results:
        raise ValueError(f"train.mode=end_to_end needs images: data.source={cfg.data.source} has none")
    if "extract" not in results and (stop == 2 or (stop >= 2 and not end_to_end)):
        results["extract"] = run_extract(cfg, tracker, results["shard"])
    if stop >= 3:
        results["train"] = (run_train_end_to_end(cfg, tracker, results["shard"]) if end_to_end
                            else run_train(cfg, tracker, results["extract"]))
    if stop >= 4:
        source = results["shard"] if end_to_end else results["extract"]
        results["eval"] = run_eval(cfg, tracker, source, results["train"])
    return results
