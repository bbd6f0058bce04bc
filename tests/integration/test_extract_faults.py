"""The extract stage killed with SIGKILL mid-run: whatever is committed is whole, nothing partial is visible
after the rerun, and the rerun extracts only the rest, ending with the features of an uninterrupted run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.features import store
from pipeline.stages import run_stages
from tests.integration.test_shard_stage import _kill_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigkill_mid_extract_then_rerun_completes_the_store(ray_cluster, tracker, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    overrides = TINY_OVERRIDES + ["shard.shard_size=10", "features.batch_size=16"]
    cfg = load_config(None, overrides + [f"workdir={tmp_path / 'w'}"])
    run_stages(cfg, tracker, "shard")
    temp_dir = Path(tempfile.mkdtemp(prefix="itr-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "extract", "jobs/configs/tiny.yaml", f"workdir={cfg.workdir}",
         "shard.shard_size=10", "features.batch_size=16", f"tracking.uri={tracker.uri}"],
        cwd=Path(__file__).parents[2], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    features = cfg.workdir_path / "features" / "synthetic"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(features.glob("*/manifest.parquet")):
        time.sleep(0.01)
    assert proc.poll() is None, "extraction ended before its first commit: nothing was killed"
    _kill_all(proc, str(temp_dir))  # after the first shard's commit, before the last
    shutil.rmtree(temp_dir, ignore_errors=True)
    (store_dir,) = features.iterdir()
    committed = store.read_manifest(store_dir)
    assert 1 <= len(committed) < 34
    for row in committed.itertuples():  # whatever is committed is whole
        assert len(store.read_split(store_dir, committed[committed["shard"] == row.shard], row.split).keys) == 10
    (store_dir / "test" / "shard-000099.x.images.parquet").write_bytes(b"orphan")  # as a killed write leaves

    result = run_stages(cfg, tracker, "extract")["extract"]
    store_dir2, manifest = store.open_selection(result.path)
    assert store_dir2 == store_dir and len(manifest) == 34
    runs = manifest.groupby("run_id").size()
    assert len(runs) == 2 and runs[result.run_id] == 34 - len(committed)  # only the rest was extracted
    files = {p.relative_to(store_dir).as_posix() for p in store_dir.glob("*/*") if p.is_file()}
    assert files == set(manifest["images_file"]) | set(manifest["captions_file"])  # no orphan, no temp file
    # the same features as a run that was never interrupted
    clean_cfg = load_config(None, overrides + [f"workdir={tmp_path / 'clean'}", f"data.root={cfg.data_root}"])
    clean = run_stages(clean_cfg, tracker, "extract")["extract"]
    for split in ("train", "test"):
        got = store.read_split(store_dir, manifest, split)
        want = store.read_split(*store.open_selection(clean.path), split)
        assert list(got.keys) == list(want.keys)
        np.testing.assert_array_equal(got.images["image_embed"], want.images["image_embed"])
        np.testing.assert_array_equal(got.captions["text_embed"], want.captions["text_embed"])
