"""`itr` starts its own local Ray and shuts it down on SIGTERM / Ctrl-C: exit 130, no Ray process left,
and no half-written stage output."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ray_processes_of(session_marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if session_marker in line and "ps -eo" not in line]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_shuts_ray_down_and_leaves_no_partial_output(tmp_path, sig):
    from tests.conftest import TINY_OVERRIDES

    temp_dir = Path(tempfile.mkdtemp(prefix="itr-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "extract", "jobs/configs/tiny.yaml", f"workdir={tmp_path / 'w'}",
         *TINY_OVERRIDES[:-6]],
        cwd=Path(__file__).parents[2], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 240
    for line in proc.stderr:  # wait until the extract stage is running
        lines.append(line)
        if "[itr] extract:" in line or time.time() > deadline:
            break
    assert any("[itr] extract:" in line for line in lines), "".join(lines[-20:])
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-2000:]
    assert "itr: interrupted" in rest
    deadline = time.time() + 30
    while ray_processes_of(str(temp_dir)) and time.time() < deadline:
        time.sleep(1)
    assert ray_processes_of(str(temp_dir)) == []
    shutil.rmtree(temp_dir, ignore_errors=True)
    stores = list((tmp_path / "w" / "features").glob("*/*"))
    for store in stores:  # whatever was committed is whole; nothing half-written is visible
        assert not list(store.rglob(".*.tmp-*"))
        assert not (store / "inputs").exists()
