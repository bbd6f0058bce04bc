"""Columnar cache of the feature store: each worker reads its own rows, memory-mapped, never a whole split.

Decoding Parquet copies into anonymous memory, so every store file gets, once, a folder of `.npy` files that
`np.load(mmap_mode="r")` maps without copying; training gathers rows from those maps (`ColumnarSplit.take`).

Cache layout: `<cache_root>/<store file path relative to the store, minus .parquet>/`, e.g.
`<cache_root>/train/shard-000000.0123456789abcdef.images/`, holding

- `<column>.npy`: a fixed column's values (n, ...), or a ragged column's flat values (sum of n_i, W) with
  `<column>.offsets.npy` (n + 1,) int64 item offsets (item i is `values[offsets[i]:offsets[i + 1]]`); a numeric
  scalar column (e.g. `roi_count`) is a fixed column of shape (n,);
- `key.utf8.npy` (uint8 blob) + `key.utf8.offsets.npy` (n + 1,) int64 byte offsets: the sample keys; the caption
  table has `caption.utf8.npy` + `caption.utf8.offsets.npy` (the caption texts) and `caption_image.npy` (m,) int64,
  each caption's row in the paired image file; the image table has `labels.json`;
- `meta.json`, the commit record: the columns listed there are complete. It is replaced atomically after the
  column files it lists, so a killed build leaves files that no meta lists (rebuilt) or temp files (removed).

Builds take `fcntl.flock` on `<folder>/.lock`, so processes that build the same file at once (workers of one node,
or of several nodes over a shared file system) do it once; the others wait, then find it done. Only the columns
asked for are built; more are added when asked. The store is content-addressed (file names carry the input
shard's digest): a cached column is reused while the local store file keeps its size (a URI store is not
re-checked once cached).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.features.store import column_values
from pipeline.io import atomic_write_bytes

CACHE_VERSION = 1
META = "meta.json"
LOCK = ".lock"
TABLES = ("images", "captions")
FILE_FIELDS = {"images": "images_file", "captions": "captions_file"}
# Cached for every file whatever is asked: sample keys (+ labels), caption texts (+ their image rows).
BASE = {"images": ("key", "labels"), "captions": ("caption", "caption_image")}


# ---------------------------------------------------------------------------------------------------- locations


def default_cache_root(store: str | Path) -> Path:
    """Returns where the cache of `store` goes by default: `<store>/columns` for a local store; for a URI store
    (`s3://...`) a local per-node folder, `$ITR_CACHE_DIR/columns/<digest>` (default `~/.cache/itr/columns/
    <digest>`), `<digest>` being the first 16 hex digits of the SHA-256 of the URI (without a trailing `/`)."""
    if not storage.is_uri(store):
        return Path(store) / "columns"
    base = Path(os.environ.get("ITR_CACHE_DIR") or Path.home() / ".cache" / "itr").expanduser()
    return base / "columns" / hashlib.sha256(str(store).rstrip("/").encode()).hexdigest()[:16]


def _field(row: Any, name: str) -> Any:
    """Returns field `name` of a manifest row (a pandas Series, an `itertuples` tuple or a dict)."""
    return getattr(row, name) if hasattr(row, name) else row[name]


def cache_folder(cache_root: str | Path, manifest_row: Any, table: str) -> Path:
    """Returns the cache folder of one store file: `<cache_root>/<its path relative to the store, minus
    .parquet>`."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    rel = str(_field(manifest_row, FILE_FIELDS[table]))
    return Path(cache_root) / rel.removesuffix(".parquet")


@contextlib.contextmanager
def _parquet(store: str | Path, rel: str) -> Iterator[tuple[pq.ParquetFile, int, str]]:
    """Yields (the opened Parquet file `rel` of `store`, its size in bytes, its name for messages); a local file is
    memory-mapped, a URI store's is read through pyarrow's filesystem."""
    if storage.is_uri(store):
        fs, base = storage.filesystem(str(store))
        path, name = f"{base}/{rel}", storage.join(str(store), rel)
        info = fs.get_file_info(path)
        if info.type.name != "File":
            raise FileNotFoundError(f"feature store file {name} does not exist")
        source = fs.open_input_file(path)
        size = info.size
    else:
        path = name = str(Path(store) / rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feature store file {name} does not exist")
        source, size = pa.memory_map(path), os.path.getsize(path)
    try:
        pf = pq.ParquetFile(source)
        yield pf, size, name
    finally:
        source.close()


def _local_size(store: str | Path, rel: str) -> int | None:
    """Returns the size of a local store file (None for a URI store or a missing file): the cheap freshness check."""
    if storage.is_uri(store):
        return None
    try:
        return os.path.getsize(Path(store) / rel)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- npy writing


def _temp(path: Path) -> Path:
    """Returns a unique temporary sibling of `path` (a dot name with `.tmp-`, which builds remove as stale)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


class _NpyWriter:
    """Appends blocks of rows (k, ...) to a temporary `.npy` file; `commit` writes the final row count into the header
    (numpy pads the header so the first axis can grow in place) and renames the file to `path`."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, _temp(path)
        self.file = None
        self.rows = 0
        self.tail: tuple[int, ...] = ()
        self.dtype: np.dtype | None = None
        self.header_len = 0

    def _header(self, rows: int) -> None:
        assert self.file is not None and self.dtype is not None
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (rows,) + self.tail}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, block: np.ndarray) -> None:
        """Appends `block` (k, *tail); every block must have the first block's dtype and tail shape."""
        block = np.ascontiguousarray(block)
        if self.file is None:
            self.dtype, self.tail = block.dtype, tuple(block.shape[1:])
            self.file = open(self.tmp, "wb")
            self._header(0)
            self.header_len = self.file.tell()
        elif block.dtype != self.dtype or tuple(block.shape[1:]) != self.tail:
            raise ValueError(f"{self.path.name}: a block of {block.dtype} {block.shape[1:]} after "
                             f"{self.dtype} {self.tail}")
        if block.size:
            self.file.write(memoryview(block.reshape(-1).view(np.uint8)))
        self.rows += len(block)

    def commit(self) -> None:
        """Writes the row count into the header, syncs and renames the file to its final name."""
        if self.file is None:
            raise ValueError(f"{self.path.name}: nothing was written")
        self.file.seek(0)
        self._header(self.rows)
        if self.file.tell() != self.header_len:  # cannot happen with numpy's growth padding; never write garbage
            raise RuntimeError(f"{self.path.name}: the .npy header changed length")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Closes and deletes the temporary file."""
        if self.file is not None:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _write_npy(path: Path, array: np.ndarray) -> None:
    """Writes one array as `.npy` atomically."""
    writer = _NpyWriter(path)
    try:
        writer.append(array)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------------------------------------------- column builders


class _Builder:
    """Accumulates one cached column over the row groups of a file; `commit` writes its files and returns its meta
    entry."""

    def add(self, table: pa.Table) -> None:
        raise NotImplementedError

    def commit(self) -> dict:
        raise NotImplementedError

    def abort(self) -> None:
        pass


class _ArrayBuilder(_Builder):
    """A numeric column: fixed-size list (n, ...), numeric list (ragged: flat (sum n_i, W) + offsets) or scalar
    (n,). List columns are decoded by `store.column_values`."""

    def __init__(self, folder: Path, name: str, kind: str):
        self.name, self.kind = name, kind
        self.values = _NpyWriter(folder / f"{name}.npy")
        self.offsets_path = folder / f"{name}.offsets.npy"
        self.offsets: list[np.ndarray] = [np.zeros(1, np.int64)]

    def add(self, table: pa.Table) -> None:
        if self.kind == "scalar":
            self.values.append(table.column(self.name).to_numpy())
            return
        metadata = dict(table.schema.metadata or {})  # a row group of a file without metadata has None
        if self.kind == "ragged" and f"shape.{self.name}".encode() not in metadata:
            metadata[f"shape.{self.name}".encode()] = b"1"  # a plain numeric list column: items of width 1
        values, offsets = column_values(table.replace_schema_metadata(metadata), self.name)
        self.values.append(values)
        if offsets is not None:
            self.offsets.append(offsets[1:].astype(np.int64) + self.offsets[-1][-1])

    def commit(self) -> dict:
        self.values.commit()
        if self.kind == "ragged":
            _write_npy(self.offsets_path, np.concatenate(self.offsets))
        return {"kind": "fixed" if self.kind == "scalar" else self.kind, "dtype": str(self.values.dtype),
                "shape": list(self.values.tail)}

    def abort(self) -> None:
        self.values.abort()


class _TextBuilder(_Builder):
    """A string column as a UTF-8 blob `<name>.utf8.npy` (uint8) with byte offsets `<name>.utf8.offsets.npy`."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.blob = _NpyWriter(folder / f"{name}.utf8.npy")
        self.offsets_path = folder / f"{name}.utf8.offsets.npy"
        self.offsets: list[np.ndarray] = [np.zeros(1, np.int64)]

    def add(self, table: pa.Table) -> None:
        encoded = [s.encode() for s in table.column(self.name).to_pylist()]
        self.blob.append(np.frombuffer(b"".join(encoded), np.uint8))
        self.offsets.append(np.cumsum([len(e) for e in encoded], dtype=np.int64) + self.offsets[-1][-1])

    def commit(self) -> dict:
        self.blob.commit()
        _write_npy(self.offsets_path, np.concatenate(self.offsets))
        return {"kind": "text"}

    def abort(self) -> None:
        self.blob.abort()


class _LabelsBuilder(_Builder):
    """The image labels (lists of strings) as `labels.json`."""

    def __init__(self, folder: Path):
        self.path = folder / "labels.json"
        self.labels: list[list[str]] = []

    def add(self, table: pa.Table) -> None:
        self.labels += table.column("labels").to_pylist()

    def commit(self) -> dict:
        atomic_write_bytes(self.path, json.dumps(self.labels).encode())
        return {"kind": "json"}


class _CaptionImageBuilder(_Builder):
    """Each caption's row in the paired image file (`caption_image.npy`, (m,) int64), from the caption keys."""

    def __init__(self, folder: Path, image_keys: list[str], name: str):
        self.path, self.name = folder / "caption_image.npy", name
        self.position = {k: i for i, k in reversed(list(enumerate(image_keys)))}
        self.rows: list[np.ndarray] = [np.zeros(0, np.int64)]

    def add(self, table: pa.Table) -> None:
        keys = table.column("key").to_pylist()
        missing = [k for k in keys if k not in self.position]
        if missing:
            raise ValueError(f"{self.name}: caption key {missing[0]!r} has no image in the paired image file")
        self.rows.append(np.array([self.position[k] for k in keys], dtype=np.int64))

    def commit(self) -> dict:
        _write_npy(self.path, np.concatenate(self.rows))
        return {"kind": "fixed", "dtype": "int64", "shape": []}


def _kind(pf: pq.ParquetFile, name: str, column: str) -> str:
    """Returns how a Parquet column is cached: fixed, ragged, scalar or text; raises ValueError naming the file when
    it is missing or of an unsupported type."""
    schema = pf.schema_arrow
    if column not in schema.names:
        raise ValueError(f"feature column {column!r} is not in {name} (it has {', '.join(schema.names)}): "
                         "extract with features.store_tokens=true for tokens and regions")
    kind = schema.field(column).type
    if pa.types.is_fixed_size_list(kind):
        return "fixed"
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        return "ragged"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return "scalar"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    raise ValueError(f"feature column {column!r} of {name} has type {kind}, which the columnar cache cannot hold")


# ---------------------------------------------------------------------------------------------------- build


def _read_meta(folder: Path) -> dict | None:
    """Returns the folder's meta.json, None when there is none (or it is unreadable, e.g. an older version)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("version") == CACHE_VERSION else None


def _complete(meta: dict | None, columns: Sequence[str], size: int | None) -> bool:
    """True when `meta` lists every column of `columns` (and the local source still has the cached size)."""
    return (meta is not None and all(c in meta["columns"] for c in columns)
            and (size is None or meta["source_size"] == size))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Holds an exclusive `flock` on `<folder>/.lock` (blocking until other builders of the folder are done)."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear(folder: Path, everything: bool) -> None:
    """Deletes stale temp files of killed builds (every file but the lock when `everything`). Call with the lock
    held: only lock holders write there."""
    for path in folder.iterdir():
        if path.name != LOCK and path.is_file() and (everything or _is_temp(path.name)):
            path.unlink(missing_ok=True)


def _image_keys(store: str | Path, manifest_row: Any) -> list[str]:
    """Returns the keys of a manifest row's image file."""
    with _parquet(store, str(_field(manifest_row, "images_file"))) as (pf, _, _):
        return pf.read(columns=["key"]).column("key").to_pylist()


def build_cache(store: str | Path, manifest_row: Any, table: str, columns: Sequence[str],
                cache_root: str | Path) -> Path:
    """Caches `columns` (plus keys/labels, or caption texts and image rows) of one store file, the `table`
    ("images" or "captions") file of `manifest_row`; returns its cache folder. Columns already cached are kept
    (a no-op when all are); safe when several processes build the same file at once. Raises FileNotFoundError
    when the store file is missing, ValueError naming the file when a column is missing or of an unsupported
    type, or the file's row count differs from the manifest's."""
    folder = cache_folder(cache_root, manifest_row, table)
    rel = str(_field(manifest_row, FILE_FIELDS[table]))
    wanted = tuple(dict.fromkeys(BASE[table] + tuple(columns)))
    meta = _read_meta(folder)
    if _complete(meta, wanted, _local_size(store, rel)) and _manifest_rows(manifest_row, table) in (
            None, meta["num_rows"]):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        _clear(folder, everything=False)
        meta = _read_meta(folder)
        with _parquet(store, rel) as (pf, size, name):
            rows = pf.metadata.num_rows
            expected = _manifest_rows(manifest_row, table)
            if expected is not None and expected != rows:
                raise ValueError(f"{name} has {rows} rows, its manifest row says {expected}")
            if meta is not None and (meta["source_size"] != size or meta["num_rows"] != rows):
                meta = None  # the store file changed: start over
            if meta is None:
                _clear(folder, everything=True)
                meta = {"version": CACHE_VERSION, "source": rel, "source_size": size, "num_rows": rows,
                        "columns": {}}
            missing = [c for c in wanted if c not in meta["columns"]]
            if missing:
                meta["columns"].update(_build_columns(store, manifest_row, table, pf, name, folder, missing))
                atomic_write_bytes(folder / META, json.dumps(meta, indent=1).encode())
    return folder


def _manifest_rows(manifest_row: Any, table: str) -> int | None:
    """Returns the manifest row's num_images / num_captions, None when it has none."""
    try:
        value = _field(manifest_row, "num_images" if table == "images" else "num_captions")
    except (KeyError, AttributeError):
        return None
    return None if value is None or pd.isna(value) else int(value)


def _build_columns(store: str | Path, manifest_row: Any, table: str, pf: pq.ParquetFile, name: str, folder: Path,
                   columns: list[str]) -> dict[str, dict]:
    """Writes the cache files of `columns` of one opened store file in one pass over its row groups (one row
    group's columns in memory at a time); returns their meta entries."""
    builders: dict[str, _Builder] = {}
    read: list[str] = []
    for column in columns:
        if column == "labels" and table == "images":
            builders[column], read = _LabelsBuilder(folder), read + ["labels"]
        elif column == "caption_image" and table == "captions":
            builders[column] = _CaptionImageBuilder(folder, _image_keys(store, manifest_row), name)
            read.append("key")
        else:
            kind = _kind(pf, name, column)
            builders[column] = _TextBuilder(folder, column) if kind == "text" else _ArrayBuilder(folder, column, kind)
            read.append(column)
    read = list(dict.fromkeys(read))
    try:
        groups = range(pf.num_row_groups)
        parts = (pf.read_row_group(g, columns=read) for g in groups) if len(groups) else [pf.read(columns=read)]
        for part in parts:
            for builder in builders.values():
                builder.add(part)
        return {column: builder.commit() for column, builder in builders.items()}
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise


# ---------------------------------------------------------------------------------------------------- reading


def _load(path: Path) -> np.ndarray:
    """Memory-maps one cached `.npy` file (read-only, no copy)."""
    return np.load(path, mmap_mode="r")


@dataclass
class _Mapped:
    """One cached column over the shards of a split: per shard values (n_s, ...) or flat (sum n_i, W) maps, and for
    a ragged column its (n_s + 1,) offsets maps."""

    dtype: np.dtype
    shape: tuple[int, ...]
    values: list[np.ndarray]
    offsets: list[np.ndarray] | None
    uniform: list[int] | None = None  # ragged: per shard, the items' common count, or 0 when counts differ

    def __post_init__(self):
        if self.offsets is not None and self.uniform is None:
            self.uniform = [_uniform_count(o) for o in self.offsets]


def _uniform_count(offsets: np.ndarray) -> int:
    """Returns the common item count of a ragged shard's (n + 1,) offsets (36 BUTD regions a image, say), or 0
    when the counts differ (or are all 0): such a shard is gathered as (n, count, W) blocks, one copy per item."""
    offsets = np.asarray(offsets)
    counts = np.diff(offsets)
    uniform = len(counts) and offsets[0] == 0 and counts[0] > 0 and bool((counts == counts[0]).all())
    return int(counts[0]) if uniform else 0


def _group(shard: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Returns (shard, positions in `shard` of that shard's entries) for each shard present, positions ascending."""
    if not len(shard):
        return []
    order = np.argsort(shard, kind="stable")
    cuts = np.flatnonzero(np.diff(shard[order])) + 1
    return [(int(shard[p[0]]), p) for p in np.split(order, cuts)]


def _contiguous(positions: np.ndarray) -> bool:
    """Returns True when ascending `positions` are consecutive integers (a slice of the output)."""
    return len(positions) > 0 and int(positions[-1]) - int(positions[0]) == len(positions) - 1


def ragged_items(values: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Splits the (flat values (sum n_i, W), lengths (k,)) of a ragged `take` into its k (n_i, W) arrays (views)."""
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


class SplitSizes:
    """`num_images` and `num_captions` of a split that has `keys` (one per image) and `caption_image` (one per
    caption)."""

    @property
    def num_images(self) -> int:
        return len(self.keys)

    @property
    def num_captions(self) -> int:
        return len(self.caption_image)


@dataclass
class ColumnarSplit(SplitSizes):
    """One split of the feature store, memory-mapped from the columnar cache (`open_split`).

    `keys` (N,) sample keys and `labels` in store order (manifest order, then file order), `caption_image` (M,) int64
    the image row of each caption. `take` gathers rows of a column: a fixed column gives a (k, ...) array, a ragged
    one (`roi_feats`, `roi_boxes`, `text_tokens`, any numeric list column) gives `(flat values (sum n_i, W), lengths
    (k,) int64)`, item j being the next `lengths[j]` rows of the flat values (`ragged_items` splits them)."""

    keys: list[str]
    labels: list[list[str]]
    caption_image: np.ndarray
    image_starts: np.ndarray  # (S + 1,) first global image row of each shard, then N
    caption_starts: np.ndarray  # (S + 1,) first global caption row of each shard, then M
    folders: list[tuple[Path, Path]] = field(repr=False)  # (image, caption) cache folder of each shard
    columns: dict[str, dict[str, _Mapped]] = field(repr=False)  # table -> column -> maps
    texts: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)  # per shard (caption UTF-8 blob, byte offsets)
    _key_rows: dict[str, int] | None = field(default=None, repr=False)

    def __reduce__(self):
        """Pickles as its cache folders and column names, and maps them again when unpickled: sending a split to
        another process never copies its arrays (the folders must be readable there)."""
        return map_split, (self.folders, tuple(self.columns["images"]), tuple(self.columns["captions"]))

    def _mapped(self, table: str, column: str) -> _Mapped:
        if table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, got {table!r}")
        if column not in self.columns[table]:
            raise ValueError(f"column {column!r} of the {table} table was not opened (opened: "
                             f"{', '.join(self.columns[table]) or 'none'}): pass it to open_split")
        return self.columns[table][column]

    def _locate(self, table: str, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (rows as int64 (k,), their shard, their row inside the shard); raises IndexError when out of
        range."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        starts = self.image_starts if table == "images" else self.caption_starts
        if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
            bad = rows[(rows < 0) | (rows >= starts[-1])][0]
            raise IndexError(f"{table} row {bad} is out of range (the split has {starts[-1]})")
        shard = np.searchsorted(starts, rows, side="right") - 1
        return rows, shard, rows - starts[shard]

    def is_ragged(self, table: str, column: str) -> bool:
        """True when `column` of `table` is ragged (take gives (flat values, lengths))."""
        return self._mapped(table, column).offsets is not None

    def item_shape(self, table: str, column: str) -> tuple[int, ...]:
        """Returns the shape of one row of a fixed column, (W,) of one item row of a ragged one."""
        return self._mapped(table, column).shape

    def take(self, table: str, column: str, rows: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Returns the given rows (int (k,), any order, repeats allowed) of `column` of `table` ("images" or
        "captions") as new arrays: (k, ...) for a fixed column, (flat values (sum n_i, W), lengths (k,) int64) for
        a ragged one. Raises ValueError for a column not opened, IndexError for a row out of range."""
        mapped = self._mapped(table, column)
        rows, shard, local = self._locate(table, rows)
        groups = _group(shard)
        if mapped.offsets is None:
            out = np.empty((len(rows),) + mapped.shape, mapped.dtype)
            for s, pos in groups:
                if _contiguous(pos):  # rows sorted by shard (as batches are): one gather straight into place
                    np.take(mapped.values[s], local[pos], axis=0, out=out[pos[0]:pos[-1] + 1], mode="clip")
                else:
                    out[pos] = mapped.values[s][local[pos]]
            return out
        begins, lengths = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
        for s, pos in groups:
            offsets = mapped.offsets[s]
            begins[pos] = offsets[local[pos]]
            lengths[pos] = offsets[local[pos] + 1] - begins[pos]
        dest = np.cumsum(lengths) - lengths  # where each item starts in the flat output
        flat = np.empty((int(lengths.sum()),) + mapped.shape, mapped.dtype)
        for s, pos in groups:
            counts = lengths[pos]
            total = int(counts.sum())
            if not total:
                continue
            start, count = int(dest[pos[0]]), mapped.uniform[s]
            if count and _contiguous(pos):  # consecutive in the output, every item `count` rows: (count, W) blocks
                values = mapped.values[s].reshape((-1, count) + mapped.shape)
                np.take(values, local[pos], axis=0, mode="clip",
                        out=flat[start:start + total].reshape((-1, count) + mapped.shape))
                continue
            within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            source = np.repeat(begins[pos], counts) + within
            if _contiguous(pos):  # its items are consecutive in the output: gather straight into place
                np.take(mapped.values[s], source, axis=0, out=flat[start:start + total], mode="clip")
            else:
                flat[np.repeat(dest[pos], counts) + within] = mapped.values[s][source]
        return flat, lengths

    def caption_text(self, rows: Any) -> list[str]:
        """Returns the caption texts of the given caption rows (int (k,))."""
        rows, shard, local = self._locate("captions", rows)
        out: list[str] = [""] * len(rows)
        for s, pos in _group(shard):
            blob, offsets = self.texts[s]
            for p, lo, hi in zip(pos.tolist(), offsets[local[pos]].tolist(), offsets[local[pos] + 1].tolist()):
                out[p] = blob[lo:hi].tobytes().decode()
        return out

    def row_index(self, keys: Sequence[str]) -> np.ndarray:
        """Returns the image rows (k,) int64 of sample keys (a key's first row); raises KeyError naming the first
        key this split does not have. Joins a column of a second store by sample key."""
        if self._key_rows is None:
            self._key_rows = {k: i for i, k in reversed(list(enumerate(self.keys)))}
        position = self._key_rows
        try:
            return np.fromiter((position[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as e:
            missing = sum(k not in position for k in keys)
            raise KeyError(f"sample key {e.args[0]!r} is not in this split ({missing} of {len(keys)} keys missing)") \
                from None


def _decode_keys(folder: Path, name: str) -> list[str]:
    """Returns the strings of a cached text column (the whole column: keys are small)."""
    blob = bytes(_load(folder / f"{name}.utf8.npy"))
    offsets = _load(folder / f"{name}.utf8.offsets.npy").tolist()
    return [blob[lo:hi].decode() for lo, hi in zip(offsets[:-1], offsets[1:])]


def _map_column(folders: list[Path], metas: list[dict], column: str, table: str) -> _Mapped:
    """Memory-maps one column over the shard folders; raises ValueError when two shards disagree on its layout."""
    first = metas[0]["columns"][column]
    if first["kind"] not in ("fixed", "ragged"):
        raise ValueError(f"column {column!r} of the {table} table is a {first['kind']} column: read it with "
                         "keys / caption_text")
    for folder, meta in zip(folders[1:], metas[1:]):
        entry = meta["columns"][column]
        if (entry["kind"], entry["dtype"], entry["shape"]) != (first["kind"], first["dtype"], first["shape"]):
            raise ValueError(f"column {column!r}: {folder} has {entry['kind']} {entry['dtype']} {entry['shape']}, "
                             f"{folders[0]} has {first['kind']} {first['dtype']} {first['shape']}")
    ragged = first["kind"] == "ragged"
    return _Mapped(dtype=np.dtype(first["dtype"]), shape=tuple(first["shape"]),
                   values=[_load(f / f"{column}.npy") for f in folders],
                   offsets=[_load(f / f"{column}.offsets.npy") for f in folders] if ragged else None)


def open_split(store: str | Path, manifest: pd.DataFrame, split: str, image_columns: Sequence[str],
               caption_columns: Sequence[str], cache_root: str | Path | None = None) -> ColumnarSplit:
    """Returns the shards of `split` listed in `manifest` (the store's manifest or a selection of it), rows in
    `store.read_split`'s order (manifest order, then file order), with `image_columns` and `caption_columns`
    memory-mapped from the columnar cache under `cache_root` (default: `default_cache_root(store)`), which is built
    first where missing. Raises ValueError when the split has no shard, and what `build_cache` raises."""
    image_columns, caption_columns = tuple(dict.fromkeys(image_columns)), tuple(dict.fromkeys(caption_columns))
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root(store)
    rows = manifest[manifest["split"] == split] if len(manifest) else manifest
    if not len(rows):
        raise ValueError(f"feature store {store} has no shard of split {split!r}")
    folders = [(build_cache(store, row, "images", image_columns, cache_root),
                build_cache(store, row, "captions", caption_columns, cache_root)) for _, row in rows.iterrows()]
    return map_split(folders, image_columns, caption_columns)


def map_split(folders: Sequence[tuple[Path, Path]], image_columns: Sequence[str],
              caption_columns: Sequence[str]) -> ColumnarSplit:
    """Returns the split whose shards' (image, caption) cache folders are `folders` (in row order), with those
    columns memory-mapped; they must be cached already (`open_split` builds them). Raises FileNotFoundError naming
    a folder that has no cache."""
    folders = [(Path(i), Path(c)) for i, c in folders]
    metas = []
    for pair in folders:
        metas.append(tuple(_read_meta(f) for f in pair))
        for folder, meta, columns in zip(pair, metas[-1], (image_columns, caption_columns)):
            if meta is None or not all(c in meta["columns"] for c in columns):
                raise FileNotFoundError(f"{folder} has no columnar cache of {', '.join(columns) or 'its keys'}: "
                                        "build it with open_split")
    keys: list[str] = []
    labels: list[list[str]] = []
    owners, texts = [], []
    image_counts, caption_counts = [], []
    for (img, cap), (img_meta, cap_meta) in zip(folders, metas):
        owners.append(np.asarray(_load(cap / "caption_image.npy")) + len(keys))
        keys += _decode_keys(img, "key")
        labels += json.loads((img / "labels.json").read_text())
        texts.append((_load(cap / "caption.utf8.npy"), _load(cap / "caption.utf8.offsets.npy")))
        image_counts.append(img_meta["num_rows"])
        caption_counts.append(cap_meta["num_rows"])
    columns = {}
    for side, (table, names) in enumerate((("images", image_columns), ("captions", caption_columns))):
        side_folders, side_metas = [f[side] for f in folders], [m[side] for m in metas]
        columns[table] = {c: _map_column(side_folders, side_metas, c, table) for c in dict.fromkeys(names)}
    return ColumnarSplit(
        keys=keys, labels=labels, caption_image=np.concatenate(owners).astype(np.int64),
        image_starts=np.concatenate([[0], np.cumsum(image_counts)]).astype(np.int64),
        caption_starts=np.concatenate([[0], np.cumsum(caption_counts)]).astype(np.int64),
        folders=folders, columns=columns, texts=texts)
