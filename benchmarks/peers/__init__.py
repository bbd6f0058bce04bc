"""Benchmarks against the tools a user would pick instead of ours (clip-retrieval, open_clip_train), run side by
side in the same run, on the same shards and the same weights.

A peer runs in its own virtual environment, built once and cached outside the repository (`PEERS_HOME`, default
`~/.cache/itr-peers`): its pins (numpy<2, pyarrow<16, open_clip<3, ...) cannot live in the project's venv. torch and
torchvision are pinned to the versions of the running interpreter's, so pip takes them from the same local wheels
the project's venv was built from (pip's own configuration: find-links / extra index), not from a download.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PEERS_HOME = Path(os.environ.get("ITR_PEERS_HOME", Path.home() / ".cache" / "itr-peers"))

# One venv for both peers. clip-retrieval's own pins plus open_clip_train (shipped in the open_clip_torch wheel,
# [training] adds its dependencies); webdataset 0.2.86: open_clip_train's loader fails on later 0.2.x (open_clip#935)
PEERS = ["clip-retrieval==2.45.0", "open_clip_torch[training]<3", "numpy<2", "pyarrow<16", "webdataset==0.2.86"]
# installed last without dependencies: torch 2.14 declares setuptools>=77, which no longer has pkg_resources
LATE = ["setuptools<70"]


def torch_pins() -> list[str]:
    """torch and torchvision at the versions this interpreter has (the project's venv)."""
    return [f"{name}=={metadata.version(name)}" for name in ("torch", "torchvision")]


def peer_venv(name: str, requirements: list[str], late: list[str] = LATE, log=print) -> Path:
    """Returns the python executable of the cached venv `PEERS_HOME/<name>-venv` holding `requirements` plus
    `torch_pins()`, then `late` installed over them without dependencies; builds it the first time (and again when
    the requirements change: a stamp file records them). Raises RuntimeError with pip's tail when the build fails."""
    reqs = sorted(requirements + torch_pins())
    digest = hashlib.sha256(json.dumps([reqs, late]).encode()).hexdigest()[:16]
    root = PEERS_HOME / f"{name}-venv"
    python, stamp = root / "bin" / "python", root / ".itr-peer.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest:
        return python
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the {name} venv at {root} (once): {' '.join(reqs)}")
    t0 = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(root)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for cmd in (pip + reqs, pip + ["--no-deps"] + late if late else None):
        if cmd is None:
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building the {name} venv failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}"
                               f"{proc.stderr[-3000:]}")
    stamp.write_text(json.dumps({"digest": digest, "requirements": reqs, "late": late}))
    log(f"built in {time.perf_counter() - t0:.0f} s")
    return python


def peer_version(python: Path, dist: str) -> str:
    """Returns the version of distribution `dist` installed in the venv of `python`."""
    return subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({dist!r}))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def save_random_checkpoint(model: str, path: Path, seed: int = 0) -> Path:
    """Saves a random-init open_clip `model` (seeded) as a plain state dict that open_clip's `load_checkpoint`
    (`pretrained=<path>`) reads, in either open_clip version; returns `path`."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    clip = open_clip.create_model(model, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": clip.state_dict()}, path)
    return path


def busy_share(seconds: float = 1.0) -> float:
    """Returns the share of the machine's CPUs busy over `seconds` (0 on a quiet machine): a figure taken on a
    busy machine is noisy."""
    def busy() -> tuple[float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields[:8]) - fields[3] - fields[4], sum(fields[:8])

    (b0, t0), _, (b1, t1) = busy(), time.sleep(seconds), busy()
    return (b1 - b0) / max(1, t1 - t0)


def make_shards(root: Path, num_shards: int, shard_size: int, captions: int = 1, image_size: int = 224) -> Path:
    """Generates `num_shards * shard_size` synthetic train images (`image_size` px) with their first `captions`
    captions each (1: what a peer reading the tars' `KEY.txt` sees, so both sides do the same work), writes them as
    tars under `root/shards` with the shard stage's manifest and `train/sizes.json`; returns that folder."""
    import dataclasses

    import pandas as pd

    from benchmarks.extract import write_shard_manifest
    from pipeline.data.shard import MANIFEST_COLUMNS, plan_shards, write_shard, write_sizes
    from pipeline.data.sources import synthetic

    synthetic.generate(root / "synthetic", seed=0, num_train=num_shards * shard_size, num_val=0, num_test=1,
                       image_size=image_size, max_objects=3, progress=False)
    samples = [dataclasses.replace(s, captions=s.captions[:captions])
               for s in synthetic.load_samples(root / "synthetic", "synthetic")[0] if s.split == "train"]
    plans = plan_shards(samples, shard_size)
    assert len(plans) == num_shards, len(plans)
    out = root / "shards"
    rows = [{**write_shard(plan, out)["row"], "run_id": "bench"} for plan in plans]
    write_shard_manifest(out, rows)
    write_sizes(out, pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    return out


def brace_range(paths: list[Path]) -> str:
    """Returns the brace pattern (`.../shard-{000000..000007}.tar`) of consecutive shard tars of one folder, as
    webdataset loaders take them."""
    first, last = paths[0], paths[-1]
    lo, hi = first.stem.rsplit("-", 1)[1], last.stem.rsplit("-", 1)[1]
    assert len(paths) == int(hi) - int(lo) + 1, "shards must be consecutive"
    return str(first.parent / f"{first.stem.rsplit('-', 1)[0]}-{{{lo}..{hi}}}.tar")
