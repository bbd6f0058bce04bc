"""Dataset sources by name. Each module exposes `load_samples(root, name) -> list[Sample]`."""
from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.data.sample import Sample

SOURCES = {
    "synthetic": "pipeline.data.sources.synthetic",
}


def load_samples(source: str, root: str | Path, name: str) -> list[Sample]:
    """Returns every sample of dataset `name` read by source `source` from folder `root`."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r} (known: {', '.join(sorted(SOURCES))})")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    return importlib.import_module(SOURCES[source]).load_samples(root, name)
