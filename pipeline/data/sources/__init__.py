"""Dataset sources by name. Each module exposes `load_samples(root, name) -> list[Sample]`."""
from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.data.sample import Sample

SOURCES = {
    "synthetic": "pipeline.data.sources.synthetic",
    "coco": "pipeline.data.sources.coco",
    "flickr30k": "pipeline.data.sources.flickr30k",
}


def check_source(source: str, root: str | Path) -> None:
    """Raises ValueError for an unknown source, FileNotFoundError naming `root` when it is missing."""
    if source not in SOURCES:
        raise ValueError(f"data.source: unknown data source {source!r} (known: {', '.join(sorted(SOURCES))})")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}")


def load_samples(source: str, root: str | Path, name: str) -> list[Sample]:
    """Returns every sample of dataset `name` read by source `source` from folder `root`."""
    check_source(source, root)
    return importlib.import_module(SOURCES[source]).load_samples(Path(root), name)
