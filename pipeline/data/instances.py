"""Reader for COCO "instances" annotation files (`annotations/instances_train2014.json`, ...): the object
boxes of each image, attached to a source's samples by image file name.

Format: {"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id", "image_id",
"bbox": [x, y, w, h] in pixels, "category_id", "iscrowd"}], "categories": [{"id", "name"}]}. Crowd
annotations (iscrowd = 1, one region over a group of objects) are skipped.
"""
from __future__ import annotations

import json
import math

from pipeline import storage
from pipeline.data.sample import Rejected, Sample

EDGE_TOLERANCE = 1.0  # pixels a box may extend beyond its image (it is clipped); further is malformed

Boxes = tuple[list[list[float]], list[str]]  # ([[x0, y0, x1, y1]] in pixels, category name of each box)


def read_coco_instances(path: storage.Location) -> tuple[dict[str, Boxes], dict[str, str]]:
    """Returns ({file_name: (boxes [[x0, y0, x1, y1]] in pixels clipped to the image, category names)} for every
    listed image none of whose annotations is malformed, in annotation order; {item: reason} per problem).

    An empty box (width or height <= 0 after clipping: official COCO has a few) is skipped, as detectron2 does.
    An image with a malformed annotation (bbox not 4 finite numbers, beyond the image by more than 1 px, unknown
    category_id) is a problem item under its file_name; an annotation whose image_id
    is not in `images` is one under `<instances file name>#annotation <id>`. Each reason names the instances
    file, the annotation id and the problem (an image's first problem when it has several).

    Raises FileNotFoundError or ValueError naming `path` when the file is missing or not an instances file.
    """
    if not storage.exists(path):
        raise FileNotFoundError(f"COCO instances file not found: {path}")
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    try:
        data = json.loads(storage.read_bytes(path).decode("utf-8"))
        categories = {c["id"]: str(c["name"]) for c in data["categories"]}
        images = {im["id"]: (str(im["file_name"]), float(im["width"]), float(im["height"])) for im in data["images"]}
        annotations = data["annotations"]
        if not all(isinstance(ann, dict) for ann in annotations):
            raise TypeError("an annotation is not an object")
    except (KeyError, TypeError, ValueError) as err:  # ValueError includes JSON and UTF-8 decoding errors
        raise ValueError(f"{path}: not a COCO instances file ({type(err).__name__}: {err})") from err
    boxes: dict[str, Boxes] = {file_name: ([], []) for file_name, _, _ in images.values()}
    problems: dict[str, str] = {}
    for n, ann in enumerate(annotations):
        if ann.get("iscrowd"):
            continue
        annotation = f"annotation {ann.get('id', f'#{n}')}"
        label = f"{name}: {annotation}"
        try:
            file_name, width, height = images[ann.get("image_id")]
        except (KeyError, TypeError):
            problems[f"{name}#{annotation}"] = f"{label}: image_id {ann.get('image_id')!r} is not in images"
            continue
        try:
            box = _xyxy(ann.get("bbox"), width, height)
            category = _category(ann.get("category_id"), categories)
        except ValueError as err:
            problems.setdefault(file_name, f"{label}: {err}")
            continue
        if box is None:  # empty (zero width or height): skipped, as detectron2 does
            continue
        boxes[file_name][0].append(box)
        boxes[file_name][1].append(category)
    return {file_name: b for file_name, b in boxes.items() if file_name not in problems}, problems


def _xyxy(bbox, width: float, height: float) -> list[float] | None:
    """Returns COCO's [x, y, w, h] as [x0, y0, x1, y1] clipped to the image, None for an empty box; raises ValueError
    saying what is wrong with a malformed one."""
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(type(v) in (int, float) and math.isfinite(v) for v in bbox)):
        raise ValueError(f"bbox {bbox!r} is not 4 finite numbers")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None
    image = f"the {width:g}x{height:g} image"
    if min(x, y) < -EDGE_TOLERANCE or x + w > width + EDGE_TOLERANCE or y + h > height + EDGE_TOLERANCE:
        raise ValueError(f"bbox {bbox!r} extends more than {EDGE_TOLERANCE:g} px beyond {image}")
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return [float(x0), float(y0), float(x1), float(y1)]


def _category(category_id, categories: dict) -> str:
    try:
        return categories[category_id]
    except (KeyError, TypeError):
        raise ValueError(f"category_id {category_id!r} is not in categories") from None


def attach_boxes(samples: list[Sample], rejected: list[Rejected], instances: dict[str, Boxes],
                 problems: dict[str, str]) -> tuple[list[Sample], list[Rejected]]:
    """Returns (the samples whose image has no annotation problem, with `boxes` and `box_labels` set from
    `instances` by `meta["filename"]` (left empty for an image it does not list); `rejected` plus a `Rejected`
    per sample whose image is in `problems` and per problem item that names no sample's image)."""
    kept, rejected = [], list(rejected)
    for sample in samples:
        filename = sample.meta["filename"]
        if filename in problems:
            rejected.append(Rejected(sample.key, problems[filename]))
            continue
        sample.boxes, sample.box_labels = instances.get(filename, ([], []))
        kept.append(sample)
    named = {sample.meta["filename"] for sample in samples}
    rejected += [Rejected(item, reason) for item, reason in problems.items() if item not in named]
    return kept, rejected
