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

LOST_WORKER_RETRIES = 2  # new actor pools after actors lost with their nodes, before the stage fails


def run_extract(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """Extracts features of every shard not yet in the store (a Ray Data actor pool, one shard per call);
    returns the selection folder `<workdir>/features/<dataset>/<extractor fingerprint>/inputs/<fingerprint>`
    whose manifest lists the store rows of this input."""
    import mlflow

    from pipeline.data.shard import read_manifest as read_shard_manifest
    from pipeline.features import store
    from pipeline.features.extractors import get_extractor

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
            items = [{"shard_path": str(storage.join(shards.path, r.shard)), "shard": r.shard, "split": r.split,
                      "sha256": r.sha256} for r in todo.itertuples()]
            for attempt in range(LOST_WORKER_RETRIES + 1):
                try:
                    _extract_pool(cfg, store_dir, run_id, items, rows)
                    break
                except Exception as err:
                    if attempt == LOST_WORKER_RETRIES or not lost_worker(err):
                        raise
                    committed = {s for frame in rows for s in frame["shard"]}
                    items = [i for i in items if i["shard"] not in committed]
                    log(f"extract: an actor was lost ({type(err).__name__}: did its node leave the cluster?); the "
                        f"{len(items)} shards not committed go to a new pool on the nodes that remain")
            if attempt and (removed := store.remove_uncommitted(store_dir)):  # what the lost actors were writing
                log(f"extract: removed {len(removed)} files the lost actors left unfinished")
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


def _extract_pool(cfg: Config, store_dir, run_id: str, items: list[dict], rows: list) -> None:
    """Extracts the shards of `items` (shard_path, shard, split, sha256) with an actor pool sized from the cluster as
    it is now (and what its autoscaler can add), appending each shard's store manifest row to `rows` and committing
    the store manifest as soon as it comes. An actor whose node is lost is not restarted (max_restarts=0): its shard
    fails the pool, and `run_extract` gives the shards not committed to a new pool on the nodes that remain (a
    restarting actor would wait for a free CPU that the pool's other actors hold until the end)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.features import store
    from pipeline.features.extract import ShardFeatureWriter, actor_pool, pool_bounds
    from pipeline.ray_runtime import cluster_cpus, reachable_resources

    gpus, per_actor = cfg.features.num_gpus, cfg.features.cpus_per_actor
    node_cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    actors, threads = actor_pool(cluster_cpus(), node_cpus, ray.cluster_resources().get("GPU", 0), len(items),
                                 gpus, per_actor)
    reach = reachable_resources()  # with an autoscaler: the nodes it may still start
    reachable, _ = actor_pool(max(1, int(reach.get("CPU", 1))), node_cpus, reach.get("GPU", 0), len(items),
                              gpus, per_actor)
    low, high = pool_bounds(actors, reachable, len(items), cfg.features.min_actors, cfg.features.max_actors)
    log(f"extract: actor pool of {low}" + (f" to {high}" if high > low else "") + " actors")
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardFeatureWriter,
        fn_constructor_kwargs={"cfg": to_dict(cfg.features), "store_dir": str(store_dir),
                               "run_id": run_id, "threads": threads},
        batch_size=1,
        compute=ActorPoolStrategy(min_size=low, max_size=high,
                                  max_tasks_in_flight_per_actor=1),  # no actor idles at the end
        num_cpus=threads if gpus == 0 else 1,
        num_gpus=gpus,
        max_restarts=0,
    )
    for row in ds.iter_rows():  # commit each shard as soon as it is written
        rows.append(pd.DataFrame([row]))
        store.write_manifest(store_dir, pd.concat(rows, ignore_index=True))


def lost_worker(err: BaseException) -> bool:
    """Returns whether `err`, or an exception it was raised from, says that a Ray worker process or node died (an
    actor dead for another reason than its constructor, a crashed worker, a dead node, a lost object), rather than
    that the extraction itself failed."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, lost) and not getattr(err, "actor_init_failed", False):
            return True
        err = err.__cause__ or err.__context__
    return False


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
