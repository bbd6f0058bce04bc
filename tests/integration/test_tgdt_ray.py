"""TGDT through the whole chain on 2 Ray Train workers: ragged regions with their boxes and per-token text features
from the store, its two default phases (`local`: the lower stacks with the local matching loss; `cmc`: the top
layers with the CMC loss), and the eval stage's two-stage rows (global top-k rescored by TGDT's rerank) in
metrics.json and table.md."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.stages import run_stages

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tgdt_trains_two_phases_and_evaluates_two_stage(ray_cluster, tracker, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [
        f"workdir={tmp_path / 'w'}", "train.method=tgdt", "train.lr=1e-3", "train.max_failures=0",
        "train.method_args={embed_dim: 32, ffn_dim: 64, region_layers: 1, lower_layers: 1, top_layers: 1, "
        "max_regions: 4, max_tokens: 16}",
        "eval.rerank_k={i2t: 20, t2i: 10}", "eval.full_rerank=true"])
    results = run_stages(cfg, tracker)
    trained = results["train"]

    client = MlflowClient(tracker.uri)
    assert [m.value for m in client.get_metric_history(trained.run_id, "phase")] == [0.0, 1.0]
    logged = client.get_run(trained.run_id).data.metrics
    assert {"train_loss_local_lower", "train_loss_global", "train_loss_intra", "train_loss_local"} <= set(logged)
    assert [m.step for m in client.get_metric_history(trained.run_id, "train_loss_local_lower")] == [0]
    assert [m.step for m in client.get_metric_history(trained.run_id, "train_loss_global")] == [1]

    metrics = results["eval"].info["metrics"]
    for key in ("two_stage_rsum", "two_stage_i2t_R@1", "two_stage_t2i_R@1", "two_stage_i2t_candidate_recall",
                "two_stage_t2i_candidate_recall", "two_stage_seconds", "one_stage_seconds", "rsum"):
        assert key in metrics, key
    for direction in ("i2t", "t2i"):  # a positive outside the candidates is a miss: recall <= candidate recall
        assert metrics[f"two_stage_{direction}_R@10"] <= metrics[f"two_stage_{direction}_candidate_recall"] + 1e-9
    assert "tgdt (trained), two-stage" in results["eval"].info["table"]
    # the full local row: every pair rescored, so no positive is ever outside the candidates
    assert "tgdt (trained), full local" in results["eval"].info["table"] and metrics["full_local_seconds"] > 0
    assert not any(k.startswith("full_local_") and k.endswith("candidate_recall") for k in metrics)
