"""Flickr30K with the Karpathy split: `<root>/dataset_flickr30k.json`, images under
`<root>/flickr30k-images/`."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Sample


def load_samples(root: Path, name: str) -> list[Sample]:
    """Returns one sample per Flickr30K image of the Karpathy split file, keyed `{name}-{imgid}`."""
    return read_karpathy(root / "dataset_flickr30k.json", root / "flickr30k-images", key_prefix=name)
