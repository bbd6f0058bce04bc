"""The extract stage (a Ray Data actor pool over the shards) and, for feature sources, the import stage."""
from __future__ import annotations

import time

import pandas as pd
import pyarrow as pa

from pipeline import storage
from pipeline.config import Config, to_dict
from pipeline.fingerprint import digest, frame_digest
from pipeline.stages.base import StageResult, _cached, _commit, log
from pipeline.tracking.runs import Tracker, stage_run


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
