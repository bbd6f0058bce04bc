"""Feature extractors by name: each module has `load(cfg, device)`, `encode_images`, `encode_texts`, `describe(cfg)`,
and optionally the two halves of each encode: `preprocess_images(ext, images, boxes)` + `encode_pixels(ext, inputs,
with_tokens)` and `tokenize(ext, texts)` + `encode_tokens(ext, inputs, with_tokens)`, so that the extract stage
prepares the next batch in a background thread while the model runs (`pipeline.features.extract`)."""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRACTORS = {"open_clip": "pipeline.features.extractors.openclip", "hf": "pipeline.features.extractors.hf"}


def get_extractor(name: str) -> ModuleType:
    """Returns the extractor module registered under `name`."""
    if name not in EXTRACTORS:
        raise ValueError(f"features.extractor: unknown extractor {name!r} (known: {', '.join(sorted(EXTRACTORS))})")
    return importlib.import_module(EXTRACTORS[name])
