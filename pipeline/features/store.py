"""Feature store: `<features>/<dataset>/<extractor-fingerprint>/<split>/<shard>.<sha>.{images,captions}.parquet`.

One pair of Parquet files per (input shard, shard content), arrays as fixed-size lists of float16
(variable-length token lists as flat float16 lists with a length column), and `manifest.parquet` as the
commit record: a shard's features count as present only when its manifest row exists. A store serves
every version of a dataset; a selection (a manifest subset, written by the extract stage per input)
says which rows one input uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_write_parquet

MANIFEST = "manifest.parquet"
SELECTIONS = "inputs"  # <store>/inputs/<extract fingerprint>/manifest.parquet
IMAGE_ARRAYS = ("image_embed", "image_pooled", "patch_tokens", "patch_boxes", "region_feats")  # region_feats: precomp
REGION_ARRAYS = ("roi_feats", "roi_boxes")  # RoIAlign regions of annotated boxes: (M_i, ...) per image, `roi_count`
CAPTION_ARRAYS = ("text_embed", "text_pooled")
FLOAT32_ARRAYS = {"patch_boxes", "roi_boxes"}  # boxes stay float32; features are stored as float16


def _dtype(name: str) -> type:
    return np.float32 if name in FLOAT32_ARRAYS else np.float16


def _fixed_list(array: np.ndarray, dtype: type = np.float16) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(array, dtype=dtype).reshape(len(array), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def _ragged_list(arrays: list[np.ndarray], width: int, dtype: type) -> tuple[pa.ListArray, np.ndarray]:
    """Returns (one flat list per item of its (n_i, width) array, the n_i as int32)."""
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths) * width]).astype(np.int32)
    flat = np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays] + [np.zeros(0, dtype)])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)), lengths


def image_table(keys: list[str], labels: list[list[str]], arrays: dict) -> pa.Table:
    """Returns the image table of one shard: key, labels, each (N, ...) array as a fixed-size list and, when
    present, the RoIAlign regions (lists of (M_i, ...) arrays) as flat lists with `roi_count`."""
    cols = {"key": pa.array(keys, pa.string()), "labels": pa.array(labels, pa.list_(pa.string()))}
    meta = {}
    for name in IMAGE_ARRAYS:
        if name in arrays:
            cols[name] = _fixed_list(arrays[name], _dtype(name))
            meta[f"shape.{name}"] = ",".join(map(str, arrays[name].shape[1:]))
    for name in REGION_ARRAYS:
        if name in arrays:
            width = arrays[name][0].shape[1]
            cols[name], cols["roi_count"] = _ragged_list(arrays[name], width, _dtype(name))
            meta[f"shape.{name}"] = str(width)
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
        width = arrays["text_tokens"][0].shape[1]
        cols["text_tokens"], cols["text_len"] = _ragged_list(arrays["text_tokens"], width, np.float16)
        meta["shape.text_tokens"] = str(width)
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
    """Features of one split. Arrays are float16 (boxes float32) (N, ...) numpy arrays; `caption_image[j]` is the row
    in the image arrays of caption j's image (any number of captions per image). A variable-length column (`roi_feats`,
    `roi_boxes`, `text_tokens`) is one flat (sum of n_i, width) array with `offsets[name]` (N + 1,): item i's rows
    are `array[offsets[i]:offsets[i + 1]]`."""

    keys: list[str]
    labels: list[list[str]]
    images: dict[str, np.ndarray]
    captions: dict[str, np.ndarray]
    caption_image: np.ndarray
    caption_text: list[str]
    offsets: dict[str, np.ndarray] = field(default_factory=dict)


def column_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (the column's values as a zero-copy (N, ...) view, or a flat (sum n_i, width) one for a variable-length
    column; that column's item offsets (N + 1,), else None)."""
    if name not in table.column_names:
        raise ValueError(f"feature column {name!r} is not in the store (it has {', '.join(table.column_names)}): "
                         "extract with features.store_tokens=true for tokens and regions")
    col = table.column(name).combine_chunks()
    shape = tuple(int(s) for s in table.schema.metadata.get(f"shape.{name}".encode(), b"").decode().split(",") if s)
    values = col.values.to_numpy(zero_copy_only=True)  # a view over the memory-mapped file
    if pa.types.is_fixed_size_list(col.type):
        return values.reshape((len(col),) + (shape or (col.type.list_size,))), None
    offsets = col.offsets.to_numpy() // shape[0]
    return values[offsets[0] * shape[0]:offsets[-1] * shape[0]].reshape(-1, shape[0]), offsets - offsets[0]


def _join(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenates the `column_values` parts of several shards (a single part stays a zero-copy view)."""
    if len(parts) == 1:
        return parts[0]
    values = np.concatenate([v for v, _ in parts])
    if parts[0][1] is None:
        return values, None
    starts = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    return values, np.concatenate([[0]] + [o[1:] + start for (_, o), start in zip(parts, starts)])


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
            img_parts[c].append(column_values(it, c))
        for c in caption_columns:
            cap_parts[c].append(column_values(ct, c))
    joined = {c: _join(p) for c, p in {**img_parts, **cap_parts}.items()}
    return FeatureSplit(
        keys=keys,
        labels=labels,
        images={c: joined[c][0] for c in image_columns},
        captions={c: joined[c][0] for c in caption_columns},
        caption_image=owner[0] if len(owner) == 1 else np.concatenate(owner),
        caption_text=texts,
        offsets={c: o for c, (_, o) in joined.items() if o is not None},
    )
