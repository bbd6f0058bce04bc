"""Flickr8K (Hodosh et al. 2013) with the Karpathy split: `<root>/dataset_flickr8k.json` (6,000 / 1,000 / 1,000
images, 5 captions each), images in the folder of the official `Flickr8k_Dataset.zip`, which unpacks to
`Flicker8k_Dataset/` (sic); `Flickr8k_Dataset/` and `Images/` (a common re-upload) are also read. The SCL paper
(seed 003, Table 3) tests COCO-trained models zero-shot on its test split."""
from __future__ import annotations

from pipeline import storage
from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Rejected, Sample

SPLIT_FILE = "dataset_flickr8k.json"
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")  # the first that exists; the official one first


def image_dir(root: storage.Location) -> storage.Location:
    """Returns the image folder under `root`: the first of IMAGE_DIRS that exists (the official name when none
    does: every sample is then quarantined as a missing image file, naming the path looked for)."""
    return next((d for d in (storage.join(root, n) for n in IMAGE_DIRS) if storage.is_dir(d)),
                storage.join(root, IMAGE_DIRS[0]))


def load_samples(root: storage.Location, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected entries): one sample per Flickr8K image of the Karpathy split file, keyed
    `{name}-{imgid}`."""
    return read_karpathy(storage.join(root, SPLIT_FILE), image_dir(root), key_prefix=name)
