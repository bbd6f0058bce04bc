"""The record every dataset source yields."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Sample:
    """One image with its captions: `image` is a file path or the encoded bytes.

    `labels` are the image's concept names (relevance for mAP). `boxes` are its objects, one `[x0, y0, x1, y1]`
    each in pixels of the original image (x right, y down, x1 > x0, y1 > y0), and `box_labels` the category
    name of each box (same length); both are empty when the source has no boxes."""

    key: str
    image: str | bytes
    captions: list[str]
    split: str
    labels: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list, kw_only=True)  # keyword-only: `meta` stays 6th
    box_labels: list[str] = field(default_factory=list, kw_only=True)
    meta: dict = field(default_factory=dict)  # source ids (imgid, cocoid, filename, ...)


@dataclass
class Rejected:
    """An input item that did not become a sample: `item` names it (a sample key, or file#entry), `reason`
    says why. Rejected items go to the shard stage's quarantine table instead of stopping the run."""

    item: str
    reason: str


def check_key(key: str) -> str:
    """Returns `key` if it is a safe WebDataset key (no '.', '/', '..'); raises ValueError otherwise."""
    if not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} is not allowed: use letters, digits, '_' and '-' only")
    return key
