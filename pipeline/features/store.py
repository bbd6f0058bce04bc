"""Feature store: `<features>/<dataset>/<extractor-fingerprint>/<split>/<shard>.<sha>.{images,captions}.parquet`.

One pair of Parquet files per (input shard, shard content), arrays as fixed-size lists of float16
(variable-length token lists as flat float16 lists with a length column), and `manifest.parquet` as the
commit record: a shard's features count as present only when its manifest row exists. A store serves
every version of a dataset; a selection (a manifest subset, written by the extract stage per input)
says which rows one input uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_write_parquet

MANIFEST = "manifest.parquet"
SELECTIONS = "inputs"  # <store>/inputs/<extract fingerprint>/manifest.parquet
IMAGE_ARRAYS = ("image_embed", "image_pooled", "patch_tokens", "region_feats")  # region_feats: precomp (N, R, D)
CAPTION_ARRAYS = ("text_embed", "text_pooled")


def _fixed_list(array: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(array, dtype=np.float16).reshape(len(array), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def image_table(keys: list[str], labels: list[list[str]], arrays: dict[str, np.ndarray]) -> pa.Table:
    """Returns the image table of one shard: key, labels and each (N, ...) array as a float16 fixed-size list."""
    cols = {"key": pa.array(keys, pa.string()), "labels": pa.array(labels, pa.list_(pa.string()))}
    meta = {}
    for name in IMAGE_ARRAYS:
        if name in arrays:
            cols[name] = _fixed_list(arrays[name])
            meta[f"shape.{name}"] = ",".join(map(str, arrays[name].shape[1:]))
    return pa.table(cols).replace_schema_metadata(meta)


def caption_table(keys: list[str], caption_index: list[int], captions: list[str], arrays: dict) -> pa.Table:
    """Returns the caption table of one shard: image key, caption index and text, embeddings as float16
    fixed-size lists and, when present, `text_tokens` as flat float16 lists with `text_len`."""
    cols = {
        "key": pa.array(keys, pa.string()),
        "caption_index": pa.array(caption_index, pa.int32()),
        "caption": pa.array(captions, pa.string()),
    }
    for name in CAPTION_ARRAYS:
        cols[name] = _fixed_list(arrays[name])
    meta = {}
    if "text_tokens" in arrays:
        tokens = arrays["text_tokens"]
        lengths = np.array([len(t) for t in tokens], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths) * tokens[0].shape[1]]).astype(np.int32)
        flat = np.concatenate([t.reshape(-1) for t in tokens]).astype(np.float16)
        cols["text_tokens"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        cols["text_len"] = pa.array(lengths)
        meta["shape.text_tokens"] = str(tokens[0].shape[1])
    return pa.table(cols).replace_schema_metadata(meta)


def write_shard(split_dir: Path, stem: str, images: pa.Table, captions: pa.Table,
                image_row_group_size: int | None = None) -> tuple[str, str]:
    """Writes both tables atomically; returns their file names relative to the split folder. `image_row_group_size`:
    images per Parquet row group (None: pyarrow's default, one group up to 1M rows); small groups bound the writer's
    memory for large arrays (it holds ~8 bytes per float16 value of a group)."""
    names = (f"{stem}.images.parquet", f"{stem}.captions.parquet")
    atomic_write_parquet(split_dir / names[0], images, compression="none", row_group_size=image_row_group_size)
    atomic_write_parquet(split_dir / names[1], captions, compression="none")
    return names


def read_manifest(store: Path) -> pd.DataFrame:
    """Returns the store's manifest (one row per extracted input shard), empty when there is none."""
    path = Path(store) / MANIFEST
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def write_manifest(store: Path, manifest: pd.DataFrame) -> Path:
    """Writes the manifest atomically, rows sorted by split and shard, one row per (shard, content)."""
    keys = [c for c in ("shard", "shard_sha256") if c in manifest]
    manifest = manifest.drop_duplicates(keys, keep="last").sort_values(["split", "shard"]).reset_index(drop=True)
    return atomic_write_parquet(Path(store) / MANIFEST, pa.Table.from_pandas(manifest, preserve_index=False))


def remove_uncommitted(store: Path) -> list[str]:
    """Deletes the temp files and the feature files no manifest row lists (what a killed run left; a store
    has one writer at a time); returns their paths relative to the store."""
    store = Path(store)
    manifest = read_manifest(store)
    listed = set(manifest["images_file"]) | set(manifest["captions_file"]) if len(manifest) else set()
    removed = []
    for path in sorted(store.glob("*/*")):
        name = path.relative_to(store).as_posix()
        if path.is_file() and name.split("/")[0] != SELECTIONS and (
                path.name.startswith(".") or (name.endswith(".parquet") and name not in listed)):
            path.unlink()
            removed.append(name)
    return removed


def select(manifest: pd.DataFrame, shards: pd.DataFrame) -> pd.DataFrame:
    """Returns the store rows of the given shard manifest's (shard, sha256) pairs; raises ValueError
    naming the first shard that has no features."""
    have = set(zip(manifest["shard"], manifest["shard_sha256"])) if len(manifest) else set()
    missing = [s for s, h in zip(shards["shard"], shards["sha256"]) if (s, h) not in have]
    if missing:
        raise ValueError(f"feature store has no features for shard {missing[0]} ({len(missing)} missing)")
    wanted = set(zip(shards["shard"], shards["sha256"]))
    keep = [(s, h) in wanted for s, h in zip(manifest["shard"], manifest["shard_sha256"])]
    return manifest[keep].reset_index(drop=True)


def open_selection(selection: str | Path) -> tuple[Path, pd.DataFrame]:
    """Returns (store folder, selection manifest) for a selection folder written by the extract stage."""
    selection = Path(selection)
    manifest = read_manifest(selection)
    if not len(manifest):
        raise FileNotFoundError(f"no feature selection at {selection}: run the extract stage first")
    return selection.parent.parent, manifest


@dataclass
class FeatureSplit:
    """Features of one split. Arrays are float16 (N, ...) numpy arrays; `caption_image[j]` is the row in the
    image arrays of caption j's image (any number of captions per image)."""

    keys: list[str]
    labels: list[list[str]]
    images: dict[str, np.ndarray]
    captions: dict[str, np.ndarray]
    caption_image: np.ndarray
    caption_text: list[str]


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    shape = tuple(int(s) for s in table.schema.metadata.get(f"shape.{name}".encode(), b"").decode().split(",") if s)
    values = col.values.to_numpy(zero_copy_only=True)  # a view over the memory-mapped file
    return values.reshape((len(col),) + (shape or (col.type.list_size,)))


def read_split(store: str | Path, manifest: pd.DataFrame, split: str, image_columns=("image_embed", "image_pooled"),
               caption_columns=("text_embed", "text_pooled")) -> FeatureSplit:
    """Returns the requested columns of the shards of `split` listed in `manifest` (the store's manifest
    or a selection of it), in manifest order; files are read relative to the store folder.

    Each shard's arrays are zero-copy views over its memory-mapped file; several shards are concatenated."""
    store = Path(store)
    image_columns, caption_columns = tuple(dict.fromkeys(image_columns)), tuple(dict.fromkeys(caption_columns))
    rows = manifest[manifest["split"] == split] if len(manifest) else manifest
    if not len(rows):
        raise ValueError(f"feature store {store} has no shard of split {split!r}")
    keys, labels, texts, owner = [], [], [], []
    img_parts: dict[str, list] = {c: [] for c in image_columns}
    cap_parts: dict[str, list] = {c: [] for c in caption_columns}
    for row in rows.itertuples():
        it = pq.read_table(store / row.images_file, memory_map=True)
        ct = pq.read_table(store / row.captions_file, memory_map=True)
        offset = len(keys)
        shard_keys = it.column("key").to_pylist()
        position = {k: offset + i for i, k in enumerate(shard_keys)}
        keys += shard_keys
        labels += it.column("labels").to_pylist()
        texts += ct.column("caption").to_pylist()
        owner.append(np.array([position[k] for k in ct.column("key").to_pylist()], dtype=np.int64))
        for c in image_columns:
            img_parts[c].append(_column(it, c))
        for c in caption_columns:
            cap_parts[c].append(_column(ct, c))
    join = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731
    return FeatureSplit(
        keys=keys,
        labels=labels,
        images={c: join(p) for c, p in img_parts.items()},
        captions={c: join(p) for c, p in cap_parts.items()},
        caption_image=join(owner),
        caption_text=texts,
    )
