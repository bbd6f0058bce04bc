"""MS-COCO with the Karpathy split: `<root>/dataset_coco.json`, images under `<root>/train2014/` and
`<root>/val2014/` (the `filepath` of each entry); `restval` is training data."""
from __future__ import annotations

from pipeline import storage
from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Rejected, Sample


def load_samples(root: storage.Location, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected entries): one sample per COCO image of the Karpathy split file,
    keyed `{name}-{cocoid}`."""
    return read_karpathy(storage.join(root, "dataset_coco.json"), root, key_prefix=name)
