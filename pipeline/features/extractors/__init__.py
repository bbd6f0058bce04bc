"""Feature extractors by name: each module has `load(cfg, device)`, `encode_images`, `encode_texts`, `describe(cfg)`."""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRACTORS = {"open_clip": "pipeline.features.extractors.openclip", "hf": "pipeline.features.extractors.hf"}


def get_extractor(name: str) -> ModuleType:
    """Returns the extractor module registered under `name`."""
    if name not in EXTRACTORS:
        raise ValueError(f"features.extractor: unknown extractor {name!r} (known: {', '.join(sorted(EXTRACTORS))})")
    return importlib.import_module(EXTRACTORS[name])
