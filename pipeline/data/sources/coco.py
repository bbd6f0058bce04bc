"""MS-COCO with the Karpathy split: `<root>/dataset_coco.json`, images under `<root>/train2014/` and
`<root>/val2014/` (the `filepath` of each entry); `restval` is training data.

Object boxes come from the official instances files, `<root>/annotations/instances_train2014.json` and
`<root>/annotations/instances_val2014.json` (the split draws from both), when present: without them the
samples have no boxes, and an image neither file lists gets none. An image with a malformed annotation is
rejected (see `pipeline.data.instances`)."""
from __future__ import annotations

from pipeline import storage
from pipeline.data.instances import attach_boxes, read_coco_instances
from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Rejected, Sample

INSTANCE_FILES = ("instances_train2014.json", "instances_val2014.json")


def load_samples(root: storage.Location, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected entries): one sample per COCO image of the Karpathy split file,
    keyed `{name}-{cocoid}`, with its object boxes when the instances files are there."""
    samples, rejected = read_karpathy(storage.join(root, "dataset_coco.json"), root, key_prefix=name)
    instances, problems = {}, {}
    for file in INSTANCE_FILES:
        path = storage.join(root, "annotations", file)
        if storage.exists(path):
            boxes, bad = read_coco_instances(path)
            instances.update(boxes)
            problems.update(bad)
    return attach_boxes(samples, rejected, instances, problems)
