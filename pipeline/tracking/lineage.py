"""`itr lineage [RUN_ID | latest]`: from a run (default: the latest eval run) back through train and extract to the
shard folder, one block per stage run: stage, run id, fingerprint, logged inputs (dataset name@digest), output
folder and the run's address in the MLflow UI.

    itr lineage                                   the latest eval run of jobs/configs/demo.yaml's store
    itr lineage latest --config jobs/configs/tiny.yaml workdir=/tmp/w
    itr lineage 3f2a...                           any stage run (a cached run stands for the run it reused)

Output folders come from the stage records (`stage.json`, written by each stage with the id of the run that made
the output) under the config's workdir, or from the run's `itr.output` tag (set when its pipeline run ended).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "jobs/configs/demo.yaml"  # used when neither --config nor MLFLOW_TRACKING_URI is given
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store (see pipeline.cli.mlflow_ui_command)
RECORD_GLOBS = ("*/stage.json", "*/*/stage.json", "features/*/*/inputs/*/stage.json")  # under the workdir


@dataclass
class StageRun:
    """One run of a lineage chain. `run_id`: the run itself (a cached run keeps its own id; `cached_from` is the
    producer of its output); `inputs`: its logged datasets as `name@digest`; `output`: its output folder when
    known; `link`: its address in the MLflow UI."""

    stage: str
    run_id: str
    name: str
    status: str
    fingerprint: str | None
    cached_from: str | None
    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    link: str = ""


def ui_base(uri: str) -> str:
    """Returns the MLflow UI's address for tracking store `uri`: a tracking server serves its own UI; a local store
    is browsed with `mlflow ui` on 127.0.0.1:5000 (override with $ITR_MLFLOW_UI)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("ITR_MLFLOW_UI", DEFAULT_UI).rstrip("/")


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Returns the full UI address of a run."""
    from pipeline.tracking.runs import run_link

    return f"{ui_base(uri)}/{run_link(experiment_id, run_id)}"


def _as_config(config: Any):
    from pipeline.config import Config, build_dataclass

    return config if isinstance(config, Config) else build_dataclass(Config, dict(config), "")


def stage_outputs(config: Any) -> dict[str, Path | str]:
    """Returns {run id: output folder} of every stage output recorded under a config's workdir (a `Config` or its
    `to_dict`), its shard folder and its dataset folder: each output's `stage.json` names the run that produced
    it."""
    import json

    from pipeline import storage

    cfg = _as_config(config)
    records: dict[str, Path | str] = {}
    workdir = cfg.workdir_path
    for pattern in RECORD_GLOBS:
        for path in workdir.glob(pattern) if workdir.is_dir() else []:
            try:
                records[json.loads(path.read_text())["run_id"]] = path.parent
            except (OSError, ValueError, KeyError):
                continue  # a record being written, or not a stage record
    for folder in (cfg.shard_dir, cfg.data_root):
        record = storage.join(folder, "stage.json")
        try:
            if storage.exists(record):
                records[json.loads(storage.read_bytes(record))["run_id"]] = folder
        except (OSError, ValueError, KeyError):
            continue
    return records


def chain(client, run_id: str, outputs: dict[str, Any] | None = None) -> list[StageRun]:
    """Returns the lineage of `run_id` (itself first, then its upstream runs breadth-first, a cached run followed
    by the run that produced its output), each with its output folder from `outputs` ({producer run id: folder},
    see `stage_outputs`) or its `itr.output` tag."""
    from pipeline.tracking.runs import lineage

    outputs = outputs or {}
    rows = []
    for item in lineage(client, run_id):
        run = client.get_run(item["run_id"])
        producer = item["cached_from"] or item["run_id"]
        output = outputs.get(producer) or run.data.tags.get("itr.output")
        rows.append(StageRun(stage=item["stage"] or "?", run_id=item["run_id"], name=run.info.run_name or "",
                             status=run.info.status, fingerprint=item["fingerprint"], cached_from=item["cached_from"],
                             inputs=item["inputs"], output=str(output) if output else None,
                             link=run_url(client.tracking_uri, run.info.experiment_id, item["run_id"])))
    return rows


def latest_run(client, experiment_ids: list[str], stage: str = "eval"):
    """Returns the latest finished run of `stage` in the experiments (None when there is none)."""
    runs = client.search_runs(experiment_ids, f"tags.`itr.stage` = '{stage}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def format_chain(rows: list[StageRun]) -> str:
    """Returns the lineage as text: one block per stage run."""
    blocks = []
    for r in rows:
        named = f"  ({r.name})" if r.name not in ("", r.stage) else ""
        head = f"{r.stage:<8} run {r.run_id}  {r.status.lower()}{named}"
        lines = [head, f"{'':8} fingerprint  {r.fingerprint or '-'}"]
        if r.cached_from:
            lines.append(f"{'':8} cached from  {r.cached_from}")
        for dataset in r.inputs:
            lines.append(f"{'':8} input        {dataset}")
        lines += [f"{'':8} output       {r.output or '-'}", f"{'':8} mlflow       {r.link}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `itr lineage`'s arguments."""
    parser.add_argument("run", nargs="?", default="latest", help="a stage run id, or `latest` (default): the latest "
                        "finished eval run of the config's experiment")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--config", help=f"experiment YAML whose tracking store and workdir to read (default: "
                        f"$MLFLOW_TRACKING_URI, else {DEFAULT_CONFIG})")


def main(args: argparse.Namespace) -> int:
    """`itr lineage`: prints the lineage chain; returns the exit status (2: no such run)."""
    from mlflow import MlflowClient

    from pipeline.config import load_config

    overrides = list(args.overrides)
    if "=" in args.run:  # `itr lineage workdir=/tmp/w`: no run id given
        overrides.insert(0, args.run)
        args.run = "latest"
    config_path = args.config or (None if os.environ.get("MLFLOW_TRACKING_URI") and not overrides else DEFAULT_CONFIG)
    cfg = load_config(config_path, overrides) if config_path and Path(config_path).is_file() else None
    if config_path and cfg is None:
        raise FileNotFoundError(f"config file not found: {config_path} (pass --config CONFIG)")
    uri = cfg.tracking_uri if cfg else os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    if args.run == "latest":
        if cfg:
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            ids = [experiment.experiment_id] if experiment else []
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        run = latest_run(client, ids) if ids else None
        if run is None:
            print(f"itr: error: no finished eval run in {uri}" + (f" (experiment {cfg.tracking.experiment})"
                                                                  if cfg else ""), file=sys.stderr)
            return 2
        run_id = run.info.run_id
    else:
        run_id = args.run
    try:
        rows = chain(client, run_id, stage_outputs(cfg) if cfg else None)
    except Exception as err:  # noqa: BLE001  MLflow raises its own exception type for an unknown run
        print(f"itr: error: run {run_id}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_chain(rows))
    return 0
