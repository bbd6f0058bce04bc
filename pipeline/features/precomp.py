"""Import of the SCAN / VSE++ precomp region features (`pipeline.data.sources.precomp`) into the feature store.

Each release split present goes to its store split (`PRECOMP_SPLITS`, the first present per store split: COCO's
testall before test), cut into store shards of `chunk_size` array rows, `<store split>/precomp-<split>-<chunk>`.
Image table: `region_feats` (n, R, D), `image_pooled` = their mean over regions (n, D), `image_embed` = that mean
L2-normalised (n, D); caption table: the captions and `text_encoder`'s `text_embed` and `text_pooled`. A chunk's
`shard_sha256` fingerprints the split's three files (name, size, mtime), the dataset name, the chunk and the code
version: a rerun imports only the chunks of changed files. Region rows are read a few at a time through short-lived
memory maps, so memory stays bounded by the chunk, not the array.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.data.sample import Rejected
from pipeline.data.sources.precomp import PRECOMP_SPLITS, PrecompSplit, precomp_files, read_precomp
from pipeline.features import store
from pipeline.fingerprint import digest

CODE_VERSION = 1
CHUNK_SIZE = 1000  # array rows per store shard
READ_ROWS = 16  # array rows mapped at a time
GROUP_VALUES = 1 << 20  # region values per Parquet row group: the writer's memory is ~8 bytes per value of a group

TextEncoder = Callable[[list[str]], dict]  # texts -> {"text_embed": (n, d), "text_pooled": (n, d), ...}


def release_splits(root: Path) -> list[str]:
    """Returns the release splits to import from `root`: per store split, the first of `PRECOMP_SPLITS` that has any
    of its three files; raises FileNotFoundError naming `root` when there is none."""
    chosen: dict[str, str] = {}
    for split, store_split in PRECOMP_SPLITS.items():
        if store_split not in chosen and any(p.exists() for p in precomp_files(root, split)):
            chosen[store_split] = split
    if not chosen:
        raise FileNotFoundError(f"no precomp split under {root}: expected {{split}}_ims.npy, {{split}}_caps.txt and "
                                f"{{split}}_ids.txt for a split of {', '.join(PRECOMP_SPLITS)}")
    return list(chosen.values())


def file_stats(root: Path, split: str) -> list[tuple[str, int, int]]:
    """Returns (name, size, mtime_ns) of each existing file of release split `split`. Taken before the files are
    read, so a file changed meanwhile leaves a stale fingerprint (imported again next time), never a wrong one."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in precomp_files(root, split) if p.is_file()]


def chunk_fingerprint(stats: list[tuple[str, int, int]], name: str, split: str, chunk: int, chunk_size: int) -> str:
    """Returns the 64-hex `shard_sha256` of one chunk of a release split whose files have `file_stats` `stats`."""
    return digest({"files": stats, "name": name, "split": split, "chunk": chunk, "chunk_size": chunk_size,
                   "code": CODE_VERSION}, length=64)


def _read_rows(regions: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Returns the given ascending rows of the region array as a float32 (n, R, D) array, read through a map of rows
    rows[0]..rows[-1] alone, unmapped on return (pages read through one long-lived map stay in the process's RSS)."""
    row_bytes = regions.itemsize * regions.shape[1] * regions.shape[2]
    part = np.memmap(regions.filename, regions.dtype, "r", offset=regions.offset + int(rows[0]) * row_bytes,
                     shape=(int(rows[-1] - rows[0]) + 1,) + regions.shape[1:])
    return np.asarray(part[rows - rows[0]], dtype=np.float32)


def image_arrays(split: PrecompSplit, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Returns `region_feats` (n, R, D) float16, `image_pooled` (n, D) and `image_embed` (n, D) float32 of the given
    ascending array rows; raises ValueError naming the file when a value is not finite in float16."""
    regions = split.regions
    feats = np.empty((len(rows),) + regions.shape[1:], np.float16)
    pooled = np.empty((len(rows), regions.shape[2]), np.float32)
    for s in range(0, len(rows), READ_ROWS):
        block = _read_rows(regions, rows[s:s + READ_ROWS])
        feats[s:s + len(block)] = block
        if not np.isfinite(feats[s:s + len(block)]).all():
            raise ValueError(f"{split.files[0]}: rows {rows[s]}-{rows[s + len(block) - 1]} hold a value that is NaN, "
                             "infinite or beyond float16's range")
        pooled[s:s + len(block)] = block.mean(1)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return {"region_feats": feats, "image_pooled": pooled, "image_embed": pooled / np.maximum(norm, 1e-12)}


def text_arrays(text_encoder: TextEncoder, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Returns `text_embed` and `text_pooled` (n, d) of `texts` from `text_encoder`, each distinct text encoded once,
    `batch_size` texts per call; raises ValueError when the encoder's output lacks a column or has the wrong rows."""
    unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
    parts: dict[str, list] = {c: [] for c in store.CAPTION_ARRAYS}
    for start in range(0, len(unique), batch_size):
        batch = [str(t) for t in unique[start:start + batch_size]]
        out = text_encoder(batch)
        for c in parts:
            if c not in out or len(out[c]) != len(batch):
                raise ValueError(f"text_encoder: expected {c!r} with {len(batch)} rows, got "
                                 f"{len(out[c]) if c in out else 'no such column'}")
            parts[c].append(np.asarray(out[c]))
    return {c: np.concatenate(p)[inverse] for c, p in parts.items()}


def write_chunk(split: PrecompSplit, lo: int, hi: int, split_dir: Path, stem: str, text_encoder: TextEncoder,
                batch_size: int) -> dict:
    """Writes the kept images lo..hi-1 of `split` (and their captions) as `<stem>.images/.captions.parquet` in
    `split_dir`; returns {images_file, captions_file (names in split_dir), num_images, num_captions, seconds}."""
    t0 = time.perf_counter()
    keys, captions = split.keys[lo:hi], split.captions[lo:hi]
    cap_keys = [key for key, caps in zip(keys, captions) for _ in caps]
    cap_index = [j for caps in captions for j in range(len(caps))]
    texts = [c for caps in captions for c in caps]
    images_file, captions_file = store.write_shard(
        split_dir, stem,
        store.image_table(keys, [[] for _ in keys], image_arrays(split, split.rows[lo:hi])),
        store.caption_table(cap_keys, cap_index, texts, text_arrays(text_encoder, texts, batch_size)),
        image_row_group_size=max(1, GROUP_VALUES // (split.regions.shape[1] * split.regions.shape[2])),
    )
    return {"images_file": images_file, "captions_file": captions_file, "num_images": len(keys),
            "num_captions": len(texts), "seconds": time.perf_counter() - t0}


def import_precomp(root: str | Path, name: str, store_dir: str | Path, text_encoder: TextEncoder,
                   batch_size: int = 256, progress: bool = False, chunk_size: int = CHUNK_SIZE, run_id: str = "",
                   rejected: list[Rejected] | None = None) -> pd.DataFrame:
    """Imports the precomp splits under `root` (`release_splits`) into the feature store `store_dir`, keys
    `{name}-{split}-{id}`; returns the store manifest rows of this input, one per chunk (its selection), sorted by
    split and shard. Chunks whose fingerprint the store already holds are kept, not rewritten; each new chunk is
    committed to the store manifest (row fields as the extract stage's, `run_id` as given) once written.

    `text_encoder(texts)` returns {"text_embed": (n, d), "text_pooled": (n, d)}, e.g.
    `lambda texts: openclip.encode_texts(extractor, texts, False)`; the store folder should identify it.
    When `rejected` is a list, every split's rejected captions and images are appended to it. Raises what
    `read_precomp` raises, and ValueError when a split has no image left.
    """
    root, store_dir = Path(root), Path(store_dir)
    splits = release_splits(root)
    done = store.read_manifest(store_dir)
    have = set(zip(done["shard"], done["shard_sha256"])) if len(done) else set()
    committed = [done] if len(done) else []
    wanted = []
    for release in splits:
        stats = file_stats(root, release)
        split = read_precomp(root, release, name)
        if rejected is not None:
            rejected.extend(split.rejected)
        if not split.keys:
            first = split.rejected[0]
            raise ValueError(f"precomp split {release} under {root}: all {len(split.regions)} images rejected "
                             f"(first: {first.item}: {first.reason})")
        starts = range(0, len(split.regions), chunk_size)
        for chunk, start in enumerate(tqdm(starts, desc=f"precomp {release}", disable=not progress, file=sys.stderr)):
            lo, hi = np.searchsorted(split.rows, [start, start + chunk_size])
            if lo == hi:  # every image of these rows was rejected
                continue
            shard = f"{split.store_split}/precomp-{release}-{chunk:06d}"
            sha = chunk_fingerprint(stats, name, release, chunk, chunk_size)
            wanted.append((shard, sha))
            if (shard, sha) in have:
                continue
            row = write_chunk(split, int(lo), int(hi), store_dir / split.store_split,
                              f"precomp-{release}-{chunk:06d}.{sha[:16]}", text_encoder, batch_size)
            row["images_file"] = f"{split.store_split}/{row['images_file']}"
            row["captions_file"] = f"{split.store_split}/{row['captions_file']}"
            committed.append(pd.DataFrame([{"shard": shard, "split": split.store_split, "shard_sha256": sha,
                                            "run_id": run_id, **row}]))
            store.write_manifest(store_dir, pd.concat(committed, ignore_index=True))
    return store.select(store.read_manifest(store_dir), pd.DataFrame(wanted, columns=["shard", "sha256"]))
