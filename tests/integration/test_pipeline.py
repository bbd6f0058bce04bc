"""The whole chain on a tiny synthetic set through a local Ray (2 CPUs) and MLflow on sqlite:
every stage real, lineage tags and logged inputs present, and a second run reusing cached stages."""
from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config, to_dict
from pipeline.data.shard import read_manifest, read_shard
from pipeline.features import store
from pipeline.stages import run_stages
from pipeline.tracking.runs import lineage, pipeline_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_chain_then_cached_rerun(ray_cluster, tracker, tmp_path, monkeypatch):
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}"])
    with pipeline_run(tracker, "itr run", to_dict(cfg)) as parent:
        first = run_stages(cfg, tracker)
    assert not any(r.cached for r in first.values())

    # shard: deterministic names, every sample exactly once, captions intact
    manifest = read_manifest(first["shard"].path)
    assert manifest.groupby("split")["num_samples"].sum().to_dict() == {"test": 60, "train": 240, "val": 40}
    keys = [s["key"] for shard in manifest["shard"] for s in read_shard(first["shard"].path / shard)]
    assert len(keys) == len(set(keys)) == 340
    # extract: the store covers every shard, 5 captions per image
    test = store.read_split(*store.open_selection(first["extract"].path), "test",
                            image_columns=("image_embed", "patch_boxes", "roi_feats", "roi_boxes"))
    assert len(test.keys) == 60 and len(test.caption_image) == 300
    # regions: one RoIAlign feature per synthetic object (all in view: square images), boxes as in the shards
    boxes = {s["key"]: s["json"]["boxes"] for shard in manifest[manifest["split"] == "test"]["shard"]
             for s in read_shard(first["shard"].path / shard)}
    size = cfg.data.synth.image_size
    counts = test.offsets["roi_feats"][1:] - test.offsets["roi_feats"][:-1]
    assert counts.tolist() == [len(boxes[k]) for k in test.keys] and counts.min() >= 1
    first_boxes = test.images["roi_boxes"][test.offsets["roi_boxes"][:-1]]
    assert abs(first_boxes - [[v / size for v in boxes[k][0]] for k in test.keys]).max() < 1e-6
    assert test.images["roi_feats"].shape == (counts.sum(), 64) and test.images["patch_boxes"].shape == (60, 16, 4)
    # eval: metrics.json with the standard keys, trained beats the frozen features
    metrics = json.loads((first["eval"].path / "metrics.json").read_text())
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum", "frozen_rsum",
                "ceiling_t2i_R@1", "i2t_mAP@100", "t2i_mAP@100", "t2i_P@100", "i2t_medr"):
        assert key in metrics
    assert metrics["rsum"] > metrics["frozen_rsum"]
    assert (first["eval"].path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert (first["train"].path / "model.pt").is_file()

    client = MlflowClient(tracker.uri)
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_stage = {r.data.tags["itr.stage"]: r for r in children}
    assert set(by_stage) == {"synth", "shard", "extract", "train", "eval"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_stage["extract"].data.tags["itr.upstream"] == first["shard"].run_id
    assert by_stage["eval"].data.tags["itr.upstream"] == f"{first['extract'].run_id},{first['train'].run_id}"
    assert by_stage["shard"].data.tags["itr.fingerprint"] == first["shard"].fingerprint
    shard_inputs = by_stage["shard"].inputs.dataset_inputs
    assert len(shard_inputs) == 1 and shard_inputs[0].dataset.digest
    assert by_stage["train"].data.params["train.method"] == "infonce"
    history = client.get_metric_history(by_stage["train"].info.run_id, "val_rsum")
    assert [m.step for m in history] == [0, 1]
    steps = client.get_metric_history(by_stage["train"].info.run_id, "step_loss")  # every 10 steps
    assert [m.step for m in steps] == [10, 20, 30] and all(m.value > 0 for m in steps)
    # system metrics through MLflow's public API: at least one sample whatever the timing (training waits for the
    # first one when it ends sooner than one sampling interval)
    assert client.get_metric_history(by_stage["train"].info.run_id, "system/cpu_utilization_percentage")
    assert by_stage["eval"].data.metrics["t2i_R_at_1"] == pytest.approx(metrics["t2i_R@1"])
    artifacts = {a.path for a in client.list_artifacts(by_stage["eval"].info.run_id)}
    assert {"metrics.json", "recall.png", "table.md"} <= artifacts
    chain = lineage(client, by_stage["eval"].info.run_id)  # from the metric back to the shards
    assert [c["stage"] for c in chain] == ["eval", "extract", "train", "shard", "synth"]
    assert chain[3]["inputs"] == [f"synthetic-samples@{shard_inputs[0].dataset.digest}"]
    notebook_tables = run_lineage_notebook(tracker, monkeypatch)
    assert notebook_tables["lineage"]["run_id"].iloc[0] == by_stage["eval"].info.run_id

    with pipeline_run(tracker, "itr run", to_dict(cfg)) as parent2:
        second = run_stages(cfg, tracker)
    assert [s for s, r in second.items() if r.cached] == ["synth", "shard", "extract", "train"]
    again = {r.data.tags["itr.stage"]: r for r in
             client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent2}'")}
    for stage in ("synth", "shard", "extract", "train"):
        assert again[stage].data.tags["itr.cached_from"] == first[stage].run_id
        assert first[stage].run_id in again[stage].data.tags["mlflow.note.content"]
    def numbers(m: dict) -> dict:  # the same metrics; the timings of the two evaluations differ
        return {k: v for k, v in m.items() if not k.endswith("_seconds")}

    assert numbers(json.loads((second["eval"].path / "metrics.json").read_text())) == numbers(metrics)
    mlflow.end_run()


def run_lineage_notebook(tracker, monkeypatch) -> dict:
    """Executes the code cells of notebooks/lineage.ipynb (all but the image display) against `tracker`;
    returns the lineage table the notebook shows."""
    from pathlib import Path

    cells = json.loads((Path(__file__).parents[2] / "notebooks" / "lineage.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    monkeypatch.setenv("ITR_EXPERIMENT", mlflow.get_experiment(tracker.experiment_id).name)
    scope: dict = {}
    for source in code[:-1]:
        exec(compile(source, "lineage.ipynb", "exec"), scope)  # noqa: S102
    return {"lineage": eval(code[2].strip(), scope)}  # noqa: S307


def test_grown_dataset_shards_and_extracts_only_new_samples(ray_cluster, tracker, tmp_path):
    """A grown dataset (100 more test images, all files rewritten by synth): the old tars stay as they are,
    the new samples go into one new shard, and only that shard is extracted."""
    from tests.conftest import TINY_OVERRIDES

    base = TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}"]
    first = run_stages(load_config(None, base), tracker, "extract")
    bigger = run_stages(load_config(None, base + ["data.synth.num_test=160"]), tracker, "extract")
    store_dir, manifest = store.open_selection(bigger["extract"].path)
    assert store_dir == store.open_selection(first["extract"].path)[0]  # same extractor, same store
    shards = read_manifest(bigger["shard"].path)
    assert bigger["shard"].path == first["shard"].path and bigger["shard"].run_id != first["shard"].run_id
    assert shards.groupby("run_id")["shard"].apply(list).to_dict() == {
        first["shard"].run_id: ["test/shard-000000.tar", "train/shard-000000.tar", "train/shard-000001.tar",
                                "train/shard-000002.tar", "val/shard-000000.tar"],
        bigger["shard"].run_id: ["test/shard-000001.tar"]}
    runs = manifest.groupby("run_id").size().to_dict()
    assert runs == {first["extract"].run_id: 5, bigger["extract"].run_id: 1}  # only the new shard extracted
    assert len(manifest) == 6 and pd.Series(manifest["shard"]).is_unique
    assert len(store.read_manifest(store_dir)) == 6
    assert len(store.read_split(store_dir, manifest, "test").keys) == 160


def test_zero_shot_benchmark_one_table_per_model(ray_cluster, tracker, tmp_path, hf_checkpoints):
    """open_clip and the four transformers VLMs (tiny random checkpoints) over one split: one table."""
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}"])
    models = [["features.model=itr-vit-micro-32"]] + [
        ["features.extractor=hf", f"features.model={path}"] for path in hf_checkpoints.values()]
    cfg.eval.zero_shot = [load_config(None, m + ["features.batch_size=64"]).features for m in models]
    with pipeline_run(tracker, "itr eval --zero-shot", to_dict(cfg)):
        results = run_stages(cfg, tracker, zero_shot=True)
    assert set(results) == {"synth", "shard", "zero-shot"}
    table = (results["zero-shot"].path / "table.md").read_text().splitlines()
    assert len(table) == 2 + 5 and "t2i_mAP@100" in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| open_clip:itr-vit-micro-32:random-seed0", "| hf:clip", "| hf:align", "| hf:altclip", "| hf:groupvit"]
    metrics = json.loads((results["zero-shot"].path / "metrics.json").read_text())
    assert 0 <= metrics["hf:groupvit/t2i_R@1"] <= 100 and metrics["hf:align/i2t_mAP@100"] > 0
    assert len(list((tmp_path / "w" / "features" / "synthetic").iterdir())) == 5  # one store per model
