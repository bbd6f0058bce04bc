"""Locations that are local paths or fsspec URIs (`s3://bucket/prefix`, `gs://...`, `file:///...`).

Local paths stay `Path`s and use the atomic write-aside-then-rename of `pipeline.io`. A URI is a `str`; on an
object store a written object becomes visible only when its upload completes, so a single put is atomic too.
S3 credentials and endpoint come from the usual AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL_S3` for an S3-compatible server) of every node.
"""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_write_bytes, atomic_write_parquet

Location = Path | str


def is_uri(location: Location) -> bool:
    """True when `location` is a URI with a scheme (`s3://...`), False for a local path."""
    return isinstance(location, str) and "://" in location


def as_location(location: Location) -> Location:
    """Returns a URI unchanged and anything else as an absolute local `Path`."""
    return location if is_uri(location) else Path(location).expanduser().resolve()


def join(location: Location, *parts: str) -> Location:
    """Returns `location` with `parts` appended: a `Path` for a local path, a URI string for a URI."""
    if not is_uri(location):
        return Path(location).joinpath(*parts)
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def _fs(location: Location):
    from fsspec.core import url_to_fs

    return url_to_fs(str(location))


def read_bytes(location: Location) -> bytes:
    """Returns the bytes of a file or object; raises FileNotFoundError when it does not exist."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = _fs(location)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(location: Location, data: bytes) -> None:
    """Writes `data` atomically (local: aside then rename; object store: one upload)."""
    if not is_uri(location):
        atomic_write_bytes(location, data)
        return
    fs, path = _fs(location)
    fs.pipe_file(path, data)


def exists(location: Location) -> bool:
    """True when the file or object exists."""
    if not is_uri(location):
        return Path(location).exists()
    fs, path = _fs(location)
    return fs.exists(path)


def is_dir(location: Location) -> bool:
    """True when the folder (or object prefix) exists."""
    if not is_uri(location):
        return Path(location).is_dir()
    fs, path = _fs(location)
    return fs.isdir(path)


def stat_marker(location: Location) -> str:
    """Returns a cheap change marker: `size:mtime_ns` of a local file, `size:ETag` (or mtime) of an object.
    Raises OSError (FileNotFoundError) when it does not exist."""
    if not is_uri(location):
        st = Path(location).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    fs, path = _fs(location)
    info = fs.info(path)
    return f"{info['size']}:{info.get('ETag') or info.get('LastModified') or info.get('mtime')}"


def list_files(location: Location, pattern: str) -> list[str]:
    """Returns the names relative to `location` of the files matching `pattern` (glob, e.g. `*/*.tar`)."""
    if not is_uri(location):
        root = Path(location)
        return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    fs, path = _fs(location)
    path = path.rstrip("/")
    return sorted(p[len(path) + 1:] for p in fs.glob(f"{path}/{pattern}"))


def remove(location: Location) -> None:
    """Deletes a file or object if it exists."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm_file(path)


def read_parquet(location: Location) -> pd.DataFrame:
    """Returns a Parquet file as a DataFrame."""
    if not is_uri(location):
        return pd.read_parquet(location)
    return pd.read_parquet(io.BytesIO(read_bytes(location)))


def write_parquet(location: Location, table: pa.Table) -> None:
    """Writes an Arrow table as Parquet atomically."""
    if not is_uri(location):
        atomic_write_parquet(location, table)
        return
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(location, buffer.getvalue())
