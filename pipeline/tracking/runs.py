"""MLflow lineage: one parent run per pipeline invocation, one child run per stage.

Every stage run carries tags `itr.stage`, `itr.fingerprint` (its output's identity) and `itr.upstream`
(comma-separated run ids whose outputs it consumed), its flattened config as params and its input manifest
as a logged dataset (digest = content hash). A stage whose output already exists logs a cached run with
`itr.cached_from` and a note linking to the run that produced the output.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import pandas as pd

from pipeline.config import flatten


@dataclass
class Tracker:
    uri: str
    experiment_id: str


def open_tracker(uri: str, experiment: str) -> Tracker:
    """Points MLflow at `uri` (creating the sqlite file's folder) and returns the experiment's tracker."""
    import mlflow

    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
        experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
    else:
        experiment_id = exp.experiment_id
    return Tracker(uri, experiment_id)


@contextlib.contextmanager
def pipeline_run(tracker: Tracker, name: str, config: dict) -> Iterator[str]:
    """Opens the parent run of one `itr run`; yields its id."""
    import mlflow

    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=name, tags={"itr.stage": "pipeline"}) as run:
        mlflow.log_params(_params(config))
        yield run.info.run_id


def metric_names(metrics: dict) -> dict[str, float]:
    """Returns the metrics with MLflow-safe names ('@' is not allowed: `t2i_R@1` -> `t2i_R_at_1`)."""
    return {k.replace("@", "_at_"): float(v) for k, v in metrics.items()}


def _params(config: dict) -> dict:
    return {k: ("null" if v is None else str(v))[:500] for k, v in flatten(config).items()}


def _tags(stage: str, fingerprint: str, upstream: list[str]) -> dict[str, str]:
    return {"itr.stage": stage, "itr.fingerprint": fingerprint, "itr.upstream": ",".join(u for u in upstream if u)}


@contextlib.contextmanager
def stage_run(tracker: Tracker, stage: str, fingerprint: str, config: dict, upstream: list[str],
              inputs: pd.DataFrame | None = None, input_name: str = "", input_source: str = "",
              input_digest: str | None = None) -> Iterator[str]:
    """Opens a stage run (nested under the active parent run, if any) with params, tags and the logged
    input manifest; yields its run id. The run ends FAILED when the block raises."""
    import mlflow
    import mlflow.data

    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=stage, nested=nested,
                          tags=_tags(stage, fingerprint, upstream)) as run:
        mlflow.log_params(_params(config))
        if inputs is not None:
            with warnings.catch_warnings():  # schema inference warns about integer columns: not a model input
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(inputs, source=input_source or None, name=input_name,
                                                  digest=input_digest)
                mlflow.log_input(dataset, context=stage)
        yield run.info.run_id


def log_cached_stage(tracker: Tracker, stage: str, fingerprint: str, producer_run_id: str, upstream: list[str]) -> str:
    """Logs a stage whose output already exists as a run linking to `producer_run_id`; returns the new run id."""
    import mlflow

    link = f"#/experiments/{tracker.experiment_id}/runs/{producer_run_id}"
    tags = _tags(stage, fingerprint, upstream) | {
        "itr.cached": "true",
        "itr.cached_from": producer_run_id,
        "mlflow.note.content": f"Cached: output `{fingerprint}` was produced by run [{producer_run_id}]({link}).",
    }
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=f"{stage} (cached)", nested=nested,
                          tags=tags) as run:
        return run.info.run_id


def lineage(client, run_id: str) -> list[dict]:
    """Returns the chain of stage runs behind `run_id`, itself first, walking `itr.upstream` tags (a
    cached run stands for its producer, `itr.cached_from`): one dict per run with stage, run_id,
    fingerprint, cached_from, and the names and digests of its logged inputs."""
    chain, todo, seen = [], [run_id], set()
    while todo:
        rid = todo.pop(0)
        if rid in seen:
            continue
        seen.add(rid)
        run = client.get_run(rid)
        tags = run.data.tags
        chain.append({
            "stage": tags.get("itr.stage"), "run_id": rid, "fingerprint": tags.get("itr.fingerprint"),
            "cached_from": tags.get("itr.cached_from"),
            "inputs": [f"{d.dataset.name}@{d.dataset.digest}" for d in run.inputs.dataset_inputs],
        })
        todo += [u for u in tags.get("itr.upstream", "").split(",") if u]
        if tags.get("itr.cached_from"):
            todo.append(tags["itr.cached_from"])
    return chain
