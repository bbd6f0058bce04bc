"""CODER through the whole chain on 2 Ray Train workers (the tiny synthetic set): ragged RoIAlign regions and text
tokens from the memory-mapped store, the concept graph built from the training captions on the driver and logged
to the train stage's MLflow run, four momentum queues identical on both ranks, Sinkhorn pseudo-labels on learnable
prototypes. A worker is killed mid-run: training resumes from the last checkpoint and ends with the model
(prototypes and concept graph included), the key encoders and every queue of an uninterrupted run; the trained
model beats the frozen features at eval."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.integration.test_train_faults import assert_same_model, checkpoint_state
from tests.integration.test_user_ray import clean_then_killed

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCHS = 3


def overrides(workdir, storage) -> list[str]:
    from tests.conftest import TINY_OVERRIDES

    return TINY_OVERRIDES + [
        f"workdir={workdir}", f"train.storage_path={storage}", "train.method=coder", f"train.epochs={EPOCHS}",
        "train.max_failures=3", "train.lr=1e-3",
        "train.method_args={embed_dim: 32, region_column: roi_feats, max_regions: 4, max_tokens: 16, guide: self, "
        "gpo_dim: 8, dropout: 0.1, queue_size: 128, momentum: 0.99, num_prototypes: 16, num_concepts: 40, "
        "word_dim: 16, gcn_hidden: 32}",
    ]


def test_coder_chain_with_a_killed_worker_ends_like_an_uninterrupted_run(ray_cluster, tracker, tmp_path):
    """One workdir: an uninterrupted training first (its output folder then moved aside, so the second one is not a
    cache hit; each run keeps its checkpoints in its own storage path), then the whole chain with a worker killed
    after the first checkpoint, reusing the synth, shard and extract stages."""
    clean, clean_model, results = clean_then_killed(ray_cluster, tracker, tmp_path, overrides)
    trained = results["train"]
    assert not trained.cached and trained.fingerprint == clean.fingerprint and results["extract"].cached

    # prototypes, concept graph (buffers and vocabulary), key encoders and all four queues equal the clean run's
    assert_same_model(trained, clean_model)
    model = torch.load(trained.path / "model.pt", weights_only=True)
    for key in ("clusters.weight", "concept_head.weight", "concept_graph.adjacency", "concept_graph.layer1.weight"):
        assert torch.equal(model[key], clean_model[0][key]), key
    graph = json.loads(bytes(model["concept_graph._extra_state"].tolist()).decode())
    assert {"circle", "square", "red", "blue"} <= set(graph["vocabulary"])  # the synthetic captions' words
    momentum = checkpoint_state(trained)["momentum"]
    assert {"queues.concept_image.features", "queues.concept_text.ids", "ema.*.clusters.weight",
            "ema.*.concept_graph.adjacency"} <= set(momentum)

    client = MlflowClient(tracker.uri)
    files = {f.path for f in client.list_artifacts(trained.run_id, "concept_graph")}
    assert files == {"concept_graph/vocabulary.json", "concept_graph/edges.csv", "concept_graph/graph.png"}
    assert client.get_run(trained.run_id).data.tags["coder.concept_graph"] == graph["fingerprint"]
    sync = client.get_metric_history(trained.run_id, "queue_sync_error")
    assert sync and all(m.value == 0.0 for m in sync)  # the four queues identical on both ranks, every epoch
    for part in ("train_loss_instance", "train_loss_swap", "train_loss_concept", "train_loss_pl"):
        assert {m.step for m in client.get_metric_history(trained.run_id, part)} == set(range(EPOCHS)), part

    metrics = results["eval"].info["metrics"]
    assert metrics["rsum"] > metrics["frozen_rsum"] + 10.0, (metrics["rsum"], metrics["frozen_rsum"])
