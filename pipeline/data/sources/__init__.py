"""Dataset sources by name. Each entry names a module exposing `load_samples(root, name) -> (list[Sample],
list[Rejected])`, or `module:function` for another function of that signature. It returns the well-formed
samples and, for each input item that cannot become one (a malformed entry, an empty or undecodable caption,
an unsafe key), a `Rejected` record. Only a problem with the dataset as a whole (a missing or unreadable
annotation file) raises."""
from __future__ import annotations

from pathlib import Path

from pipeline import storage
from pipeline.data.sample import Rejected, Sample
from pipeline.registry import Registry

SOURCES = Registry("data source", "data.source")
for _name, _entry in {
    "synthetic": "pipeline.data.sources.synthetic:load_samples",
    "coco": "pipeline.data.sources.coco:load_samples",
    "flickr30k": "pipeline.data.sources.flickr30k:load_samples",
    "flickr8k": "pipeline.data.sources.flickr8k:load_samples",
    "nuswide": "pipeline.data.sources.nuswide:load_samples",
    "nuswide10k": "pipeline.data.sources.nuswide:load_nuswide10k",
    "precomp": "pipeline.data.sources.precomp",  # features, not images: no load_samples
}.items():
    SOURCES.register(_name, _entry)
FEATURE_SOURCES = {"precomp"}  # no images: imported straight into the feature store (pipeline.features.precomp)


def check_source(source: str, root: str | Path) -> None:
    """Raises ValueError for an unknown source, FileNotFoundError naming `root` when it is missing."""
    SOURCES.check(source)
    if not storage.is_dir(root):
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}")


def load_samples(source: str, root: str | Path, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (every sample, every rejected item) of dataset `name` read by source `source` from `root`."""
    check_source(source, root)
    if source in FEATURE_SOURCES:
        raise ValueError(f"data.source: {source} holds features, not images: it has no shard stage (`itr extract` "
                         "imports it into the feature store)")
    return SOURCES.get(source)(storage.as_location(root), name)
