"""`itr compare` on the tiny synthetic set with SCL, a zero-shot row and a listed method that is not implemented yet,
all under one MLflow parent; then a rerun that changes only SCL's stage 3 (the shared-space map) retrains only the
map: stages 1-2 are cached train runs linking to their producers."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.compare import execute_compare
from pipeline.config import load_config
from pipeline.methods import METHODS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["data.synth.num_train=240", "data.synth.num_val=40", "data.synth.num_test=60", "data.synth.image_size=32",
        "data.synth.max_objects=2", "shard.shard_size=100", "features.model=itr-vit-micro-32",
        "features.batch_size=64", "features.store_tokens=false", "train.epochs=1", "train.batch_size=64",
        "train.warmup_steps=2", "train.system_metrics_seconds=0.5", "train.max_failures=0",
        "train.num_workers=1"]
SCL_ARGS = ("{text: {embed_dim: 16, hidden_dim: 32}, image: {embed_dim: 16, hidden_dim: 32}, map_dim: 16, "
            "text_train: {epochs: 1}, image_train: {epochs: 1}")


@pytest.fixture
def unwritten_method():
    """A listed method whose module does not exist (whatever the other methods' state)."""
    METHODS.register("not_yet", "pipeline.methods.not_yet_written")
    yield "not_yet"
    METHODS._entries.pop("not_yet", None)


def parent_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("itr.stage") == "pipeline"]
    return {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
            for p in parents}


def test_compare_then_a_stage_3_change_retrains_only_the_map(ray_cluster, tmp_path, unwritten_method):
    base = TINY + [f"workdir={tmp_path / 'w'}", "tracking.experiment=cmp", "compare.zero_shot=true",
                   f"compare.methods=[scl, {unwritten_method}]"]
    first = execute_compare(load_config(None, base + [f"compare.method_args.scl={SCL_ARGS}}}"]))

    rows = {r["model"]: r for r in first.rows}
    assert {"scl", "perfect-model ceiling", f"{unwritten_method} (not implemented yet)"} <= set(rows)
    zero_shot = [r for r in first.rows if r["kind"] == "zero-shot"]
    assert len(zero_shot) == 1 and 0 <= zero_shot[0]["rsum"] <= 600
    assert rows["scl"]["params"] > 0 and rows["scl"]["train_seconds"] > 0 and 0 <= rows["scl"]["rsum"] <= 600
    assert {"table.md", "table.csv", "table.png", "compare.json"} <= set(first.files)
    assert f"| {unwritten_method} (not implemented yet) |" in (first.path / "table.md").read_text()
    assert json.loads((first.path / "compare.json").read_text())["missing"] == [unwritten_method]

    client = MlflowClient(f"sqlite:///{tmp_path / 'w'}/mlflow.db")
    (children,) = parent_runs(client, "cmp").values()
    trains = [r for r in children if r.data.tags.get("itr.stage") == "train"]
    assert len(trains) == 3 and not any(r.data.tags.get("itr.cached") for r in trains)  # stages 1, 2 and 3
    assert [r.info.run_name for r in children if r.data.tags.get("itr.stage") == "compare"] == ["compare"]
    producers = {r.info.run_id for r in trains}

    second = execute_compare(load_config(None, base + [
        f"compare.method_args.scl={SCL_ARGS}, map_loss: literal}}"]))  # stage 3 only: least squares
    assert second.path != first.path
    first_children, children = parent_runs(client, "cmp").values()  # in start order
    trains = [r for r in children if r.data.tags.get("itr.stage") == "train"]
    cached = [r for r in trains if r.data.tags.get("itr.cached") == "true"]
    fresh = [r for r in trains if not r.data.tags.get("itr.cached")]
    assert {r.data.tags["itr.cached_from"] for r in cached} <= producers and len(cached) == 2  # stages 1-2
    assert len(fresh) == 1 and fresh[0].info.run_id not in producers  # stage 3 retrained
    assert set(fresh[0].data.tags["itr.upstream"].split(",")) >= {r.data.tags["itr.cached_from"] for r in cached}
    assert {r["model"] for r in second.rows if r["kind"] == "trained"} == {"scl"}
