"""USER through the whole chain on 2 Ray Train workers (the tiny synthetic set): ragged RoIAlign regions and text
tokens from the memory-mapped store, the CLIP guide joined from the guide store, momentum key encoders and two
queues identical on both ranks. A worker is killed mid-run: training resumes from the last checkpoint and ends with
the model, the key encoders and both queues of an uninterrupted run; then eval runs on the trained method."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.stages import run_stages
from tests.integration.test_train_faults import assert_same_model, checkpoint_state

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCHS = 3


def overrides(workdir, storage) -> list[str]:
    from tests.conftest import TINY_OVERRIDES

    return TINY_OVERRIDES + [
        f"workdir={workdir}", f"train.storage_path={storage}", "train.method=user", f"train.epochs={EPOCHS}",
        "train.max_failures=3",
        "train.method_args={embed_dim: 32, region_column: roi_feats, max_regions: 4, max_tokens: 16, "
        "queue_size: 128, gpo_dim: 8}",
        "train.guide={model: itr-vit-micro-32, batch_size: 64}",  # = features: the guide stage reuses that store
    ]


def kill_one_train_worker_of_this_cluster(address: str, results_dir, killed: list, stop: threading.Event) -> None:
    """Waits for the first checkpoint under `results_dir`, then SIGKILLs one live RayTrainWorker actor of the Ray
    cluster at `address` (found through Ray's state API: never a process of another Ray on the machine)."""
    from ray.util.state import list_actors

    while not stop.is_set():
        if results_dir.exists() and list(results_dir.glob("*/checkpoint_*")):
            workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("state", "=", "ALIVE")], detail=True)
            pids = sorted(a.pid for a in workers if a.pid)
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.2)


def clean_then_killed(ray_cluster, tracker, tmp_path, overrides) -> tuple:
    """Trains `overrides(workdir, storage)` uninterrupted (its output folder then moved aside, so the second run is
    not a cache hit; each run keeps its checkpoints in its own storage path), then runs the whole chain in the same
    workdir with one train worker killed after the first checkpoint. Returns (the clean train result, (its
    model.pt, epoch, momentum state), the second run's stage results)."""
    clean = run_stages(load_config(None, overrides(tmp_path / "w", tmp_path / "ray_clean")), tracker, "train")["train"]
    clean_model = (torch.load(clean.path / "model.pt", weights_only=True), clean.info["epoch"],
                   checkpoint_state(clean)["momentum"])
    shutil.move(clean.path, tmp_path / "clean_train")

    cfg = load_config(None, overrides(tmp_path / "w", tmp_path / "ray_killed"))
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=kill_one_train_worker_of_this_cluster,
                               args=(ray_cluster.get_runtime_context().gcs_address, tmp_path / "ray_killed", killed,
                                     stop), daemon=True)
    watcher.start()
    try:
        results = run_stages(cfg, tracker)
    finally:
        stop.set()
    assert killed, "no worker was killed: training ended before the first checkpoint was seen"
    return clean, clean_model, results


def test_user_chain_with_a_killed_worker_ends_like_an_uninterrupted_run(ray_cluster, tracker, tmp_path):
    """One workdir: an uninterrupted training first (its output folder then moved aside, so the second one is not
    a cache hit; each run keeps its checkpoints in its own storage path), then the whole chain with a worker
    killed after the first checkpoint, reusing the synth, shard, extract and guide stages."""
    clean, clean_model, results = clean_then_killed(ray_cluster, tracker, tmp_path, overrides)
    assert {"guide", "train", "eval"} <= set(results) and results["extract"].cached

    trained = results["train"]
    assert not trained.cached and trained.fingerprint == clean.fingerprint
    client = MlflowClient(tracker.uri)
    assert {m.step for m in client.get_metric_history(trained.run_id, "val_rsum")} == set(range(EPOCHS))
    sync = client.get_metric_history(trained.run_id, "queue_sync_error")
    assert sync and all(m.value == 0.0 for m in sync)  # both queues identical on both ranks, every epoch
    for part in ("train_loss_batch", "train_loss_queue"):  # the two UTO terms, logged every epoch
        assert {m.step for m in client.get_metric_history(trained.run_id, part)} == set(range(EPOCHS))
    momentum = checkpoint_state(trained)["momentum"]
    assert {"ema.*.image_encoder.clip_guide.mlp.1.weight", "queues.image.features", "queues.text.features"} \
        <= set(momentum)
    assert_same_model(trained, clean_model)  # model, EMA key encoders, both queues, ids and pointers

    metrics = results["eval"].info["metrics"]
    assert 0.0 <= metrics["rsum"] <= 600.0 and metrics["num_captions"] > 0
