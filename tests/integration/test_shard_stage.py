"""The shard stage through Ray and MLflow: SIGKILL mid-run then rerun, quarantine and its fail fraction,
a rerun with nothing new."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data.shard import read_committed, read_manifest, read_shard
from pipeline.stages import run_stages

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(workdir: Path, *extra: str):
    from tests.conftest import TINY_OVERRIDES

    return load_config(None, TINY_OVERRIDES + [f"workdir={workdir}", "shard.shard_size=10", *extra])


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.glob("*/*.tar"))}


def _kill_all(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILLs the process group of `proc` and every process whose command line holds `marker` (Ray's)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    for line in out:
        pid, _, args = line.strip().partition(" ")
        if marker in args and "ps -eo" not in args:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigkill_mid_run_then_rerun_leaves_every_sample_in_exactly_one_whole_shard(ray_cluster, tracker, tmp_path):
    cfg = _config(tmp_path / "w")
    run_stages(cfg, tracker, "synth")
    out = cfg.workdir_path / "shards" / "synthetic"
    temp_dir = Path(tempfile.mkdtemp(prefix="itr-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "shard", "jobs/configs/tiny.yaml", f"workdir={cfg.workdir}",
         "shard.shard_size=10", f"tracking.uri={tracker.uri}"],
        cwd=Path(__file__).parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*/*")):
        time.sleep(0.01)
    assert proc.poll() is None, "the shard run ended before any shard was written: nothing was killed"
    _kill_all(proc, str(temp_dir))  # mid-write: some tars written, the manifest not yet
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert list(out.glob("*/*")), "killed before any file was written"
    manifest, _, _ = read_committed(out)
    for row in manifest.itertuples():  # whatever is committed is whole
        assert hashlib.sha256((out / row.shard).read_bytes()).hexdigest() == row.sha256

    result = run_stages(cfg, tracker, "shard")["shard"]
    assert not result.cached
    manifest = read_manifest(out)
    keys = [s["key"] for name in manifest["shard"] for s in read_shard(out / name)]
    assert len(keys) == len(set(keys)) == 340
    assert set(_tars(out)) == set(manifest["shard"]) and not list(out.rglob(".*.tmp-*"))
    # the same bytes as a run that was never interrupted
    clean = _config(tmp_path / "clean", f"data.root={cfg.data_root}")
    reference = run_stages(clean, tracker, "shard")["shard"]
    assert _tars(reference.path) == _tars(out)


def test_bad_items_are_quarantined_and_logged_and_too_many_fail_the_stage(ray_cluster, tracker, tmp_path, capfd):
    cfg = _config(tmp_path / "w")
    run_stages(cfg, tracker, "synth")
    images = sorted((cfg.data_root / "images").glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:60])  # truncated JPEG
    images[1].unlink()  # missing file
    result = run_stages(cfg, tracker, "shard")["shard"]
    table = pd.read_parquet(result.path / "quarantine.parquet")
    assert len(table) == 2 and int(read_manifest(result.path)["num_samples"].sum()) == 338
    reasons = sorted(table["reason"])
    assert reasons[0].startswith("image file missing or unreadable") and reasons[1].startswith("image is not decodable")
    run = MlflowClient(tracker.uri).get_run(result.run_id)
    assert run.data.metrics["quarantined"] == 2 and run.data.metrics["samples"] == 338
    artifacts = {a.path for a in MlflowClient(tracker.uri).list_artifacts(result.run_id)}
    assert {"manifest.parquet", "quarantine.parquet"} <= artifacts
    assert "338 samples, 34 shards" in capfd.readouterr().err  # the one-line summary

    # a rerun with nothing new confirms it, and the known-bad items are not retried
    again = run_stages(cfg, tracker, "shard")["shard"]
    assert again.cached and again.run_id == result.run_id
    assert "shard: nothing new: 338 samples already in 34 shards, 2 quarantined" in capfd.readouterr().err

    # above the configured fraction: one clear error, nothing committed
    strict = _config(tmp_path / "strict", f"data.root={cfg.data_root}", "shard.max_quarantined=0.001")
    with pytest.raises(ValueError, match=r"2 of 340 input items quarantined \(0.6% > shard.max_quarantined"):
        run_stages(strict, tracker, "shard")
    folder = strict.workdir_path / "shards" / "synthetic"
    assert not (folder / "manifest.parquet").exists() and not list(folder.glob("*/*.tar"))
    assert len(pd.read_parquet(folder / "quarantine.parquet")) == 2
