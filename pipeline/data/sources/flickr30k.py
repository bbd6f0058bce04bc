"""Flickr30K with the Karpathy split: `<root>/dataset_flickr30k.json`, images under
`<root>/flickr30k-images/`."""
from __future__ import annotations

from pipeline import storage
from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Rejected, Sample


def load_samples(root: storage.Location, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected entries): one sample per Flickr30K image of the Karpathy split file,
    keyed `{name}-{imgid}`."""
    images = storage.join(root, "flickr30k-images")
    return read_karpathy(storage.join(root, "dataset_flickr30k.json"), images, key_prefix=name)
