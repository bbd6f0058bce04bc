"""In-memory feature splits with the `ColumnarSplit` interface, for testing methods and collation without a store."""
from __future__ import annotations

import numpy as np


class ArraySplit:
    """One split held in numpy: `images` / `captions` map a column to an (N, ...) array (fixed) or a list of
    (n_i, W) arrays (ragged); `caption_image` (M,) the image row of each caption."""

    def __init__(self, images: dict, captions: dict, caption_image: np.ndarray, keys: list[str] | None = None,
                 texts: list[str] | None = None):
        self.tables = {"images": images, "captions": captions}
        self.caption_image = np.asarray(caption_image, dtype=np.int64)
        self.num_captions = len(self.caption_image)
        self.num_images = int(self.caption_image.max()) + 1 if self.num_captions else 0
        self.keys = keys or [f"img{i:05d}" for i in range(self.num_images)]
        self.labels = [[] for _ in self.keys]
        self.texts = texts or [f"caption {j}" for j in range(self.num_captions)]

    def take(self, table: str, column: str, rows: np.ndarray):
        values = self.tables[table][column]
        if isinstance(values, list):
            items = [np.asarray(values[r]) for r in rows]
            width = next((a.shape[1] for a in values if len(a)), 1)
            flat = np.concatenate(items) if items else np.zeros((0, width), np.float32)
            return flat.reshape(-1, width), np.array([len(a) for a in items], dtype=np.int64)
        return np.asarray(values)[rows]

    def caption_text(self, rows) -> list[str]:
        return [self.texts[r] for r in rows]

    def row_index(self, keys: list[str]) -> np.ndarray:
        where = {k: i for i, k in enumerate(self.keys)}
        return np.array([where[k] for k in keys], dtype=np.int64)


def feature_inputs(method_cls, args, split: ArraySplit, guide: ArraySplit | None = None):
    """Returns the `FeatureInputs` of a method over in-memory splits."""
    from pipeline.train.inputs import FeatureInputs, method_caps

    return FeatureInputs(method_cls.columns(args), split, guide, method_caps(method_cls, args))
