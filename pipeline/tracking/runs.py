"""MLflow lineage: one parent run per pipeline invocation, one child run per stage.

Every stage run carries tags `itr.stage`, `itr.fingerprint` (its output's identity) and `itr.upstream`
(comma-separated run ids whose outputs it consumed), its flattened config as params and its input manifest
as a logged dataset (digest = content hash). A stage whose output already exists logs a cached run with
`itr.cached_from`. Every stage run's description (the MLflow note) links to its upstream runs (and, for a cached
run, to the run that produced its output); when the parent run ends, each child's description also names its
output folder (tag `itr.output`). Experiments are marked as model-training experiments (MLflow 3 opens them on
the runs table, not on the GenAI traces overview); parent runs are named after the command and the config.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from pipeline.config import flatten

if TYPE_CHECKING:
    import pandas as pd

NOTE = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3: a model-training experiment


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
        experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    else:
        experiment_id = exp.experiment_id
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                mlflow.MlflowClient(uri).set_experiment_tag(experiment_id, key, value)
    return Tracker(uri, experiment_id)


def parent_run_name(command: str, config_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Returns the name of a parent run: the command line less the program's path, e.g. `itr run demo.yaml
    train.epochs=4` (at most 250 characters, MLflow's limit)."""
    parts = [f"itr {command}"] + ([os.path.basename(str(config_path))] if config_path else []) + list(overrides)
    name = " ".join(parts)
    return name if len(name) <= 250 else name[:249] + "…"


@contextlib.contextmanager
def pipeline_run(tracker: Tracker, name: str, config: dict) -> Iterator[str]:
    """Opens the parent run of one `itr run`; yields its id."""
    import mlflow

    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=name, tags={"itr.stage": "pipeline"}) as run:
        mlflow.log_params(_params(config))
        try:
            yield run.info.run_id
        finally:
            describe_children(tracker, run.info.run_id, config)


# MLflow 3.17's UI opens every experiment in its GenAI view unless the address (or the user's last choice, kept in the
# browser) asks for the model-training view: it does not read the experiment's `mlflow.experimentKind` tag.
UI_VIEW = "?workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str | None = None) -> str:
    """Returns the MLflow UI route of a run (or of the experiment's runs table), relative to the UI's address (a
    markdown link target), in the model-training view."""
    return f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + UI_VIEW


def stage_note(client, run, output: str | None = None) -> str:
    """Returns the markdown description of stage run `run` (an `mlflow.entities.Run`): its stage and fingerprint,
    links to its upstream runs (stage and id of each), for a cached run the run that produced its output, and
    its output folder when known."""
    tags = run.data.tags
    lines = [f"**{tags.get('itr.stage', '?')}** stage, output fingerprint `{tags.get('itr.fingerprint', '?')}`."]
    if tags.get("itr.cached_from"):
        producer = tags["itr.cached_from"]
        lines.append(f"Cached: output `{tags.get('itr.fingerprint')}` was produced by run "
                     f"[{producer}]({run_link(run.info.experiment_id, producer)}).")
    links = []
    for upstream in (u for u in tags.get("itr.upstream", "").split(",") if u):
        try:
            up = client.get_run(upstream)
            links.append(f"[{up.data.tags.get('itr.stage', up.info.run_name)} `{upstream[:8]}`]"
                         f"({run_link(up.info.experiment_id, upstream)})")
        except Exception:  # noqa: BLE001  a run deleted since: name it without a link
            links.append(f"`{upstream}`")
    lines.append("Upstream: " + (", ".join(links) if links else "none (a source stage)."))
    if output:
        lines.append(f"Output: `{output}`")
    return "\n\n".join(lines)


def describe_children(tracker: Tracker, parent_run_id: str, config: dict) -> None:
    """Writes the description of every stage run under the parent run: `stage_note` with the output folder,
    found from the stage records (`stage.json`) under the config's workdir and shard folder; tags `itr.output`.
    A failure here is a warning: it never fails the pipeline."""
    import mlflow

    from pipeline.tracking.lineage import stage_outputs

    try:
        client = mlflow.MlflowClient(tracker.uri)
        outputs = stage_outputs(config)
        children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
        stages = []
        for child in sorted(children, key=lambda r: r.info.start_time):
            if "itr.stage" not in child.data.tags:
                continue
            stages.append(f"[{child.info.run_name}]({run_link(child.info.experiment_id, child.info.run_id)})")
            output = outputs.get(child.data.tags.get("itr.cached_from") or child.info.run_id)
            if output:  # a run with no output folder (the model registration) keeps the description it wrote
                client.set_tag(child.info.run_id, NOTE, stage_note(client, child, str(output)))
                client.set_tag(child.info.run_id, "itr.output", str(output))
        parent = client.get_run(parent_run_id)
        client.set_tag(parent_run_id, NOTE, f"`{parent.info.run_name}`: " + (" → ".join(stages) or "no stage ran")
                       + f".\n\nWorkdir: `{config.get('workdir')}`; the whole configuration is in the parameters.")
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"could not describe the stage runs of {parent_run_id}: {err}", stacklevel=2)


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
        mlflow.set_tag(NOTE, stage_note(mlflow.MlflowClient(tracker.uri), mlflow.get_run(run.info.run_id)))
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

    tags = _tags(stage, fingerprint, upstream) | {"itr.cached": "true", "itr.cached_from": producer_run_id}
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=f"{stage} (cached)", nested=nested,
                          tags=tags) as run:
        mlflow.set_tag(NOTE, stage_note(mlflow.MlflowClient(tracker.uri), mlflow.get_run(run.info.run_id)))
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
