"""The shard stage: a dataset's new samples into deterministic WebDataset tars, written with Ray Data."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline import storage
from pipeline.config import Config, to_dict
from pipeline.fingerprint import digest, frame_digest
from pipeline.stages.base import StageResult, _commit, _log_artifact, _read_record, log
from pipeline.tracking.runs import Tracker, log_cached_stage, stage_run


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
        shard_core.write_quarantine(out, rejected, inputs, committed=quarantine)
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
        shard_core.write_sizes(out, manifest)  # <split>/sizes.json: open_clip_train reads the sample counts from it
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
