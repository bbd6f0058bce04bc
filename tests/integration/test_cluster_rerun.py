"""A rerun with nothing new writes nothing: the append-only shard folder that readers on other nodes of a cluster
see stays exactly as it was (no file rewritten, quarantine.parquet included), also when items are quarantined."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.stages import run_stages

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    """{relative path: (inode, mtime in ns, size)} of every file under `folder`: any rewrite changes one of them."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_with_nothing_new_leaves_the_shard_folder_untouched(ray_cluster, tracker, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}"])
    run_stages(cfg, tracker, "synth")
    (cfg.data_root / "images" / sorted(p.name for p in (cfg.data_root / "images").glob("*.jpg"))[0]).unlink()
    first = run_stages(cfg, tracker, "shard")["shard"]
    assert (first.path / "quarantine.parquet").is_file()  # one item quarantined: the file has a row
    before = _files(first.path)

    again = run_stages(cfg, tracker, "shard")["shard"]
    assert again.cached and again.run_id == first.run_id
    assert _files(first.path) == before
