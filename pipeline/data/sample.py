"""The record every dataset source yields."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Sample:
    """One image with its captions: `image` is a file path or the encoded bytes."""

    key: str
    image: str | bytes
    captions: list[str]
    split: str
    labels: list[str] = field(default_factory=list)
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
