"""End-to-end mode through the stages on Ray Data and Ray Train with 2 CPU workers (gloo): the micro open_clip
model fine-tuned from the tars for 2 epochs with a momentum queue; checkpoints hold the model and the queues,
the queues stay identical on both ranks every epoch, validation R@K is logged, the saved model is evaluated
on the test tars, and rerunning the run with one more epoch resumes from its last checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config, to_dict
from pipeline.data.shard import read_manifest
from pipeline.stages import run_stages
from pipeline.train.end_to_end import fit_end_to_end, load_clip

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_stages_fine_tune_from_the_shards_with_identical_queues_and_evaluate(ray_cluster, tracker, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [
        f"workdir={tmp_path / 'w'}", "data.synth.num_train=40", "data.synth.num_val=8", "data.synth.num_test=8",
        "train.method=clip_finetune", "train.method_args={queue_size: 80}", "train.epochs=2", "train.batch_size=40",
        "train.lr=1e-3",
        "train.warmup_steps=2", "train.max_failures=0"])
    results = run_stages(cfg, tracker)
    assert set(results) == {"synth", "shard", "train", "eval"}  # no feature extraction in this mode
    trained = results["train"]
    assert trained.info["method"].startswith("clip_finetune") and trained.info["epoch"] in (0, 1)
    with (Path(trained.info["checkpoint"]) / "state.pt").open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    assert {"model", "momentum", "optimizer", "scheduler", "rng"} <= set(state)
    queue_ids = state["momentum"]["queues.image.ids"]
    assert state["momentum"]["queues.image.features"].shape == (80, 64) and bool((queue_ids >= 0).all())
    load_clip("itr-vit-micro-32", str(trained.path / "model.pt"), torch.device("cpu"))  # a plain open_clip checkpoint

    client = MlflowClient(tracker.uri)
    sync = client.get_metric_history(trained.run_id, "queue_sync_error")
    assert {m.step for m in sync} == {0, 1} and all(m.value == 0.0 for m in sync)  # identical queues, every epoch
    assert {m.step for m in client.get_metric_history(trained.run_id, "val_rsum")} == {0, 1}
    metrics = json.loads((results["eval"].path / "metrics.json").read_text())
    assert metrics["num_images"] == 8 and metrics["num_captions"] == 40 and "frozen_rsum" not in metrics
    assert 0.0 <= metrics["t2i_R@1"] <= 100.0

    # the same run (name, storage path) with a third epoch resumes from its last checkpoint
    manifest = read_manifest(results["shard"].path)
    storage = {"storage_path": str(cfg.workdir_path / "ray_results")}
    resumed = fit_end_to_end(results["shard"].path, manifest, "itr-vit-micro-32", None,
                             to_dict(cfg.train) | {"epochs": 3}, cfg.train.method_args, storage,
                             f"train-{trained.fingerprint}", tracker.uri, trained.run_id, num_workers=2, use_gpu=False)
    assert resumed.metrics["epoch"] == 2 and resumed.metrics["step"] == 3 * (200 // 40)
    assert resumed.metrics["queue_sync_error"] == 0.0
