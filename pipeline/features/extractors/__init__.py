"""Feature extractors by name: each module has `load(cfg, device)`, `encode_images`, `encode_texts`, `describe(cfg)`,
and optionally the two halves of each encode: `preprocess_images(ext, images, boxes)` + `encode_pixels(ext, inputs,
with_tokens)` and `tokenize(ext, texts)` + `encode_tokens(ext, inputs, with_tokens)`, so that the extract stage
prepares the next batch in a background thread while the model runs (`pipeline.features.extract`)."""
from __future__ import annotations

from types import ModuleType

from pipeline.registry import Registry

EXTRACTORS = Registry("extractor", "features.extractor")
EXTRACTORS.register("open_clip", "pipeline.features.extractors.openclip")
EXTRACTORS.register("hf", "pipeline.features.extractors.hf")


def get_extractor(name: str) -> ModuleType:
    """Returns the extractor module registered under `name`."""
    return EXTRACTORS.get(name)
