"""A method on the contract through the whole chain on 2 Ray Train workers: `pool` over ragged RoIAlign regions
streamed from the memory-mapped store, a fine-tuned local BERT in its own parameter group, two phases (the first
freezes BERT, the second trains everything: DDP is rebuilt at the phase change), queues identical on both ranks,
and the eval stage on the trained method."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.nn.text_encoder import load_text_encoder
from pipeline.stages import run_stages
from tests.text_fixtures import write_tiny_bert

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_pool_with_a_local_bert_trains_in_two_phases_on_two_workers(ray_cluster, tracker, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    bert = write_tiny_bert(tmp_path / "bert")
    cfg = load_config(None, TINY_OVERRIDES + [
        f"workdir={tmp_path / 'w'}", "train.method=pool",
        f"train.method_args={{embed_dim: 32, queue_size: 128, max_regions: 4, text_encoder: {bert}}}",
        "train.phases=[{name: heads, epochs: 1, train: [image_proj, text_proj]}, {name: joint, epochs: 1}]",
        "train.max_failures=0"])
    results = run_stages(cfg, tracker)
    trained = results["train"]

    client = MlflowClient(tracker.uri)
    assert [m.value for m in client.get_metric_history(trained.run_id, "phase")] == [0.0, 1.0]
    sync = client.get_metric_history(trained.run_id, "queue_sync_error")
    assert len(sync) == 2 and all(m.value == 0.0 for m in sync)  # identical queues on both ranks, both phases

    init = load_text_encoder(str(bert), 32).state_dict()
    checkpoints = sorted(p for p in Path(trained.info["checkpoint"]).parent.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    by_epoch = {}
    for ckpt in checkpoints:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        by_epoch[state["epoch"]] = state
    bert_after = [{k.removeprefix("text_encoder."): v for k, v in by_epoch[e]["model"].items()
                   if k.startswith("text_encoder.")} for e in (0, 1)]
    assert all(torch.equal(bert_after[0][k], init[k]) for k in init)  # phase 1 froze BERT
    assert any(not torch.equal(bert_after[1][k], init[k]) for k in init)  # phase 2 trained it
    assert by_epoch[1]["phase"] == 1 and {"queues.image.ids", "queues.text.ids"} <= set(by_epoch[1]["momentum"])

    metrics = results["eval"].info["metrics"]
    assert 0.0 <= metrics["rsum"] <= 600.0 and metrics["num_captions"] > 0
