"""Flickr30K with the Karpathy split: `<root>/dataset_flickr30k.json`, images under
`<root>/flickr30k-images/`."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Rejected, Sample


def load_samples(root: Path, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected entries): one sample per Flickr30K image of the Karpathy split file,
    keyed `{name}-{imgid}`."""
    return read_karpathy(root / "dataset_flickr30k.json", root / "flickr30k-images", key_prefix=name)
