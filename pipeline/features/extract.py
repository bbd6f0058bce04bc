"""Extract stage core: one WebDataset shard -> its image and caption feature tables in the store.

`extract_shard` is plain Python (tested without Ray); `ShardFeatureWriter` is the Ray Data actor that
loads the model once and calls it for each shard it is given.
"""
from __future__ import annotations

import ctypes
import io
import math
import os
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import FeaturesConfig
from pipeline.data.shard import read_shard
from pipeline.features import store
from pipeline.features.extractors import get_extractor
from pipeline.features.precision import pick_device

ACTORS_PER_NODE = 4  # default bound on the model copies a node holds without GPUs
_PREPARE: list[ThreadPoolExecutor] = []  # one thread for the process, reused by every shard
_PREPARE_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_PREPARE.clear)  # a forked child has no copy of the thread


def _prepare_pool() -> ThreadPoolExecutor:
    """Returns the process's batch-preparing thread (one, so that shard after shard reuses its heap arena)."""
    with _PREPARE_LOCK:
        if not _PREPARE:
            _PREPARE.append(ThreadPoolExecutor(1, thread_name_prefix="extract-prepare"))
        return _PREPARE[0]


def _steps(module: ModuleType) -> dict[str, tuple[Callable, Callable]]:
    """Returns {"image": (prepare, encode), "text": (prepare, encode)} of an extractor module. `prepare(ext, images,
    boxes)` / `prepare(ext, captions)` turns decoded images (with their annotated xyxy pixel boxes) / caption strings
    into model inputs (runs in a background thread); `encode(ext, inputs, with_tokens)` runs the model. Modules
    without `preprocess_images` / `tokenize` prepare nothing."""
    def keep(ext, items, *_):
        return items

    image = (getattr(module, "preprocess_images", keep), getattr(module, "encode_pixels", module.encode_images))
    text = (getattr(module, "tokenize", keep), getattr(module, "encode_tokens", module.encode_texts))
    return {"image": image, "text": text}


def unique_captions(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns (the distinct captions, shortest first, so that each batch's captions are of similar length: the text
    tower runs a batch at its longest caption; inverse: the row in it of each of `captions`)."""
    unique, inverse = np.unique(np.array(captions, dtype=object), return_inverse=True)
    by_length = np.argsort([len(c) for c in unique], kind="stable")
    return unique[by_length], np.argsort(by_length)[inverse]


def extract_shard(module: ModuleType, extractor, shard_path: str | Path, out_dir: str | Path, stem: str,
                  batch_size: int, with_tokens: bool, progress: bool = False) -> dict:
    """Encodes every image and caption of one tar and writes `<stem>.images/.captions.parquet` atomically
    into `out_dir`; returns {images_file, captions_file (names in out_dir), num_images, num_captions, seconds}.

    Identical caption strings within the shard are encoded once, in batches of similar length
    (`unique_captions`). A background thread decodes and preprocesses
    (or tokenises) the next batch while the model runs on the current one."""
    t0 = time.perf_counter()
    samples = read_shard(shard_path)
    if not samples:
        raise ValueError(f"shard {shard_path} holds no sample")
    cap_keys, cap_index, cap_text = [], [], []
    for s in samples:
        for i, c in enumerate(s["json"]["captions"]):
            cap_keys.append(s["key"])
            cap_index.append(i)
            cap_text.append(c)
    unique, inverse = unique_captions(cap_text)
    steps = _steps(module)

    def prepare(kind: str, start: int) -> Any:
        if kind == "text":
            return steps[kind][0](extractor, list(unique[start:start + batch_size]))
        chunk = samples[start:start + batch_size]
        try:
            images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in chunk]
        except Exception as err:  # PIL raises many types for corrupt data
            raise ValueError(f"shard {shard_path}: an image of {chunk[0]['key']}..{chunk[-1]['key']} "
                             f"cannot be decoded ({err})") from err
        return steps[kind][0](extractor, images, [s["json"].get("boxes", []) for s in chunk])

    batches = [("image", start) for start in range(0, len(samples), batch_size)]
    batches += [("text", start) for start in range(0, len(unique), batch_size)]
    parts: dict[str, dict[str, list]] = {"image": {}, "text": {}}
    ragged: set[str] = set()
    pool = _prepare_pool()
    pending = pool.submit(prepare, *batches[0])
    try:
        for n, (kind, _) in enumerate(tqdm(batches, desc=f"batches {Path(shard_path).name}", disable=not progress)):
            inputs = pending.result()
            if n + 1 < len(batches):
                pending = pool.submit(prepare, *batches[n + 1])
            for k, v in steps[kind][1](extractor, inputs, with_tokens).items():
                if isinstance(v, list):  # one array per item (variable length)
                    ragged.add(k)
                parts[kind].setdefault(k, []).extend(v if isinstance(v, list) else [v])
            del inputs
    finally:
        if not pending.cancel():
            pending.exception()  # waits for a batch still being prepared, so none outlives the call
    image_arrays = {k: v if k in ragged else np.concatenate(v) for k, v in parts["image"].items()}
    text_arrays = {k: [v[j] for j in inverse] if k in ragged else np.concatenate(v)[inverse]
                   for k, v in parts["text"].items()}

    images_file, captions_file = store.write_shard(
        Path(out_dir), stem,
        store.image_table([s["key"] for s in samples], [s["json"].get("labels", []) for s in samples], image_arrays),
        store.caption_table(cap_keys, cap_index, cap_text, text_arrays),
    )
    return {"images_file": images_file, "captions_file": captions_file, "num_images": len(samples),
            "num_captions": len(cap_text), "seconds": time.perf_counter() - t0}


def actor_pool(cpus: int, node_cpus: int, gpus: float, shards: int, num_gpus: float,
               cpus_per_actor: int) -> tuple[int, int]:
    """Returns (actors, torch threads per actor) of the extract stage on a cluster of `cpus` CPUs (`node_cpus` on its
    largest node) and `gpus` GPUs for `shards` shards to do: one actor per `num_gpus` GPUs when set, else one per
    `cpus_per_actor` CPUs (0: enough CPUs per actor that a node runs at most `ACTORS_PER_NODE`, since each actor
    holds a copy of the model); never more actors than shards, the cluster's CPUs shared out as threads."""
    per_actor = cpus_per_actor or math.ceil(node_cpus / ACTORS_PER_NODE)
    actors = int(gpus / num_gpus) if num_gpus > 0 else cpus // max(1, min(per_actor, cpus))
    actors = max(1, min(shards, actors))
    return actors, max(1, cpus // actors)


def pool_bounds(now: int, reachable: int, shards: int, min_size: int = 0, max_size: int = 0) -> tuple[int, int]:
    """Returns (min_size, max_size) of the extract actor pool for `shards` shards to do: `min_size` / `max_size` when
    set (> 0), else the actors that fit the cluster now (`now`, from `actor_pool`) and the actors that fit what the
    cluster can reach (`reachable`: `actor_pool` over what its autoscaler may add too); never more than the shards,
    at least 1, min <= max. Ray Data starts the min and grows the pool towards the max while shards wait and
    resources appear (GPU nodes the autoscaler starts on demand), so a cluster that starts with no GPU worker does
    not extract with one actor to the end."""
    high = max(1, min(shards, max_size or max(now, reachable)))
    return max(1, min(min_size or now, high)), high


def release_free_memory() -> None:
    """Returns the C heap's free pages to the OS (glibc `malloc_trim`; a no-op elsewhere), so that freed
    batch buffers do not pile up as fragmented heap from one shard to the next."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the symbols already loaded into the process, libc's among them
    except (OSError, AttributeError):
        pass


def _ray_node_id() -> str:
    """Returns the Ray node id of this process ("" outside Ray): several nodes may share a host name."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class ShardFeatureWriter:
    """Ray Data actor: loads the extractor once; each call extracts the shards of a batch of manifest rows
    (columns shard_path, shard, split, sha256) and returns their store manifest rows, each with the actor's
    `worker` (host:pid), Ray `node_id` and `peak_rss_mb` so far. Output files are named by shard and content
    (`<split>/<shard>.<sha256[:16]>.*.parquet`), so versions never collide."""

    def __init__(self, cfg: dict, store_dir: str, run_id: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = FeaturesConfig(**cfg)
        self.store_dir = Path(store_dir)
        self.run_id = run_id
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.node_id = _ray_node_id()
        self.module = get_extractor(self.cfg.extractor)
        self.extractor = self.module.load(self.cfg, pick_device(self.cfg.num_gpus > 0))

    def __call__(self, batch: dict) -> dict:
        rows = []
        for path, shard, split, sha in zip(batch["shard_path"], batch["shard"], batch["split"], batch["sha256"]):
            stem = f"{Path(shard).name.removesuffix('.tar')}.{sha[:16]}"
            row = extract_shard(self.module, self.extractor, path, self.store_dir / split, stem,
                                self.cfg.batch_size, self.cfg.store_tokens)
            release_free_memory()
            row["images_file"] = f"{split}/{row['images_file']}"
            row["captions_file"] = f"{split}/{row['captions_file']}"
            rows.append({"shard": shard, "split": split, "shard_sha256": sha, "run_id": self.run_id, **row,
                         "worker": self.worker, "node_id": self.node_id,
                         "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}
