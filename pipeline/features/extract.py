"""Extract stage core: one WebDataset shard -> its image and caption feature tables in the store.

`extract_shard` is plain Python (tested without Ray); `ShardFeatureWriter` is the Ray Data actor that
loads the model once and calls it for each shard it is given.
"""
from __future__ import annotations

import io
import resource
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import FeaturesConfig
from pipeline.data.shard import read_shard
from pipeline.features import store
from pipeline.features.extractors import get_extractor
from pipeline.features.precision import pick_device


def extract_shard(module: ModuleType, extractor, shard_path: str | Path, out_dir: str | Path, stem: str,
                  batch_size: int, with_tokens: bool, progress: bool = False) -> dict:
    """Encodes every image and caption of one tar and writes `<stem>.images/.captions.parquet` atomically
    into `out_dir`; returns {images_file, captions_file (names in out_dir), num_images, num_captions, seconds}.

    Identical caption strings within the shard are encoded once."""
    t0 = time.perf_counter()
    samples = read_shard(shard_path)
    if not samples:
        raise ValueError(f"shard {shard_path} holds no sample")
    img_parts: dict[str, list] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc=f"images {Path(shard_path).name}", disable=not progress):
        chunk = samples[start:start + batch_size]
        try:
            images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in chunk]
        except Exception as err:  # PIL raises many types for corrupt data
            raise ValueError(f"shard {shard_path}: an image of {chunk[0]['key']}..{chunk[-1]['key']} "
                             f"cannot be decoded ({err})") from err
        for k, v in module.encode_images(extractor, images, with_tokens).items():
            img_parts.setdefault(k, []).append(v)
    image_arrays = {k: np.concatenate(v) for k, v in img_parts.items()}

    cap_keys, cap_index, cap_text = [], [], []
    for s in samples:
        for i, c in enumerate(s["json"]["captions"]):
            cap_keys.append(s["key"])
            cap_index.append(i)
            cap_text.append(c)
    unique, inverse = np.unique(np.array(cap_text, dtype=object), return_inverse=True)
    txt_parts: dict[str, list] = {}
    for start in range(0, len(unique), batch_size):
        for k, v in module.encode_texts(extractor, list(unique[start:start + batch_size]), with_tokens).items():
            txt_parts.setdefault(k, []).extend(v if isinstance(v, list) else [v])
    text_arrays = {}
    for k, parts in txt_parts.items():
        if k == "text_tokens":
            text_arrays[k] = [parts[j] for j in inverse]
        else:
            text_arrays[k] = np.concatenate(parts)[inverse]

    images_file, captions_file = store.write_shard(
        Path(out_dir), stem,
        store.image_table([s["key"] for s in samples], [s["json"].get("labels", []) for s in samples], image_arrays),
        store.caption_table(cap_keys, cap_index, cap_text, text_arrays),
    )
    return {"images_file": images_file, "captions_file": captions_file, "num_images": len(samples),
            "num_captions": len(cap_text), "seconds": time.perf_counter() - t0}


class ShardFeatureWriter:
    """Ray Data actor: loads the extractor once; each call extracts the shards of a batch of manifest rows
    (columns shard_path, shard, split, sha256) and returns their store manifest rows. Output files are
    named by shard and content (`<split>/<shard>.<sha256[:16]>.*.parquet`), so versions never collide."""

    def __init__(self, cfg: dict, store_dir: str, run_id: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = FeaturesConfig(**cfg)
        self.store_dir = Path(store_dir)
        self.run_id = run_id
        self.module = get_extractor(self.cfg.extractor)
        self.extractor = self.module.load(self.cfg, pick_device(self.cfg.num_gpus > 0))

    def __call__(self, batch: dict) -> dict:
        rows = []
        for path, shard, split, sha in zip(batch["shard_path"], batch["shard"], batch["split"], batch["sha256"]):
            stem = f"{Path(shard).name.removesuffix('.tar')}.{sha[:16]}"
            row = extract_shard(self.module, self.extractor, path, self.store_dir / split, stem,
                                self.cfg.batch_size, self.cfg.store_tokens)
            row["images_file"] = f"{split}/{row['images_file']}"
            row["captions_file"] = f"{split}/{row['captions_file']}"
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this actor's, so far
            rows.append({"shard": shard, "split": split, "shard_sha256": sha, "run_id": self.run_id, **row})
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}
