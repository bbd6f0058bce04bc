"""Training engine through Ray Train on 2 CPU workers (gloo): a worker killed mid-run is replaced, training
resumes from the last checkpoint, nothing reported is lost, and the result equals an uninterrupted run; a
lost driver's run is continued by rerunning it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.stages import run_stages, run_train

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCHS = 6


def train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [int(line.split()[0]) for line in out if "ray::RayTrainWorker" in line]


def kill_a_worker_after_checkpoints(results_dir, wanted: int, killed: list, stop: threading.Event) -> None:
    """Waits until `wanted` checkpoints exist under `results_dir`, then SIGKILLs one training worker."""
    while not stop.is_set():
        if results_dir.exists() and len(list(results_dir.glob("*/checkpoint_*"))) >= wanted:
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.2)


def overrides() -> list[str]:
    from tests.conftest import TINY_OVERRIDES

    return TINY_OVERRIDES + [f"train.epochs={EPOCHS}", "train.max_failures=3"]


@pytest.fixture(scope="module")
def clean_model(ray_cluster, tmp_path_factory) -> tuple[dict, int, dict]:
    """(state dict, epoch, the method's momentum state in that epoch's checkpoint) of the same training,
    uninterrupted, in its own workdir."""
    from pipeline.tracking.runs import open_tracker

    workdir = tmp_path_factory.mktemp("clean")
    tracker = open_tracker(f"sqlite:///{workdir}/mlflow.db", "clean")
    clean = run_stages(load_config(None, overrides() + [f"workdir={workdir}"]), tracker, "train")["train"]
    return (torch.load(clean.path / "model.pt", weights_only=True), clean.info["epoch"],
            checkpoint_state(clean)["momentum"])


def checkpoint_state(trained) -> dict:
    return torch.load(Path(trained.info["checkpoint"]) / "state.pt", map_location="cpu", weights_only=True)


def assert_same_model(trained, clean_model) -> None:
    state, epoch, momentum = clean_model
    assert trained.info["epoch"] == epoch
    got = torch.load(trained.path / "model.pt", weights_only=True)
    for name in got:
        assert torch.allclose(got[name], state[name], atol=1e-5), name
    # the state the method owns (EMA copy, both queues with their ids and write pointers) survives the restart
    resumed = checkpoint_state(trained)["momentum"]
    assert set(resumed) == set(momentum) and {"queues.image.ids", "queues.text.ptr"} <= set(resumed)
    for name, value in resumed.items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, momentum[name], atol=1e-5), name
        else:
            assert torch.equal(value, momentum[name]), name  # ids and pointers: bit for bit


def test_killed_worker_resumes_from_checkpoint_and_ends_like_an_uninterrupted_run(ray_cluster, tracker, tmp_path,
                                                                                   clean_model):
    base = load_config(None, overrides() + [f"workdir={tmp_path / 'a'}"])
    features = run_stages(base, tracker, "extract")["extract"]

    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=kill_a_worker_after_checkpoints,
                               args=(tmp_path / "a" / "ray_results", 2, killed, stop), daemon=True)
    watcher.start()
    try:
        interrupted = run_train(base, tracker, features)
    finally:
        stop.set()
    assert killed, "no worker was killed: training ended before the second checkpoint"

    client = MlflowClient(tracker.uri)
    history = client.get_metric_history(interrupted.run_id, "val_rsum")
    assert {m.step for m in history} == set(range(EPOCHS))  # every epoch reported, none lost
    sync = client.get_metric_history(interrupted.run_id, "queue_sync_error")
    assert sync and all(m.value == 0.0 for m in sync)  # queues identical on both ranks, every epoch

    assert_same_model(interrupted, clean_model)


def test_lost_driver_rerun_of_the_same_run_continues_from_its_last_checkpoint(ray_cluster, tracker, tmp_path,
                                                                              clean_model):
    """The whole `itr train` (driver and its Ray) SIGKILLed after two checkpoints; rerunning the same stage
    resumes that run from its last checkpoint (same run name and storage path) and ends like a clean run."""
    from tests.integration.test_shard_stage import _kill_all

    cfg = load_config(None, overrides() + [f"workdir={tmp_path / 'a'}"])
    features = run_stages(cfg, tracker, "extract")["extract"]
    temp_dir = Path(tempfile.mkdtemp(prefix="itr-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "jobs/configs/tiny.yaml", f"workdir={cfg.workdir}",
         f"train.epochs={EPOCHS}", "train.max_failures=3", f"tracking.uri={tracker.uri}"],
        cwd=Path(__file__).parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    results = cfg.workdir_path / "ray_results"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(results.glob("*/checkpoint_*"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before its second checkpoint: nothing was killed"
    _kill_all(proc, str(temp_dir))
    shutil.rmtree(temp_dir, ignore_errors=True)
    done_before = len(list(results.glob("*/checkpoint_*")))
    assert not (cfg.workdir_path / "train").exists() or not list((cfg.workdir_path / "train").iterdir())

    resumed = run_train(cfg, tracker, features)
    history = MlflowClient(tracker.uri).get_metric_history(resumed.run_id, "val_rsum")
    epochs = sorted(m.step for m in history)
    assert epochs == list(range(epochs[0], EPOCHS)) and 1 <= epochs[0] <= done_before  # continued, not restarted
    assert_same_model(resumed, clean_model)
