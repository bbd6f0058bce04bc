"""What every stage shares: the `Stage` contract, its result, the cache check and the commit record.

Each stage computes its output's fingerprint (inputs + config + code version). When that output exists it logs a
cached MLflow run linking to the run that produced it and returns; otherwise it does the work inside an MLflow
stage run and commits its output with a `stage.json` record written last.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline import storage
from pipeline.config import Config
from pipeline.tracking.runs import Tracker, log_cached_stage

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


@dataclass(frozen=True)
class Stage:
    """One stage of the chain: `run(cfg, tracker, *results of inputs)` computes the output's fingerprint from its
    inputs' fingerprints, its config and its code version, returns the cached result when that output exists,
    and otherwise does the work in an MLflow stage run and commits it. `inputs`: the stages whose results it
    takes (optional ones, such as the guide store, are passed when they ran); `when`: whether the stage is part
    of the chain for a config."""

    name: str
    inputs: tuple[str, ...]
    run: Callable[..., "StageResult"]
    when: Callable[[Config], bool] = lambda cfg: True
    optional: tuple[str, ...] = ()


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
