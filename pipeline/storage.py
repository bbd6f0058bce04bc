"""Locations that are local paths or URIs that pyarrow's filesystems understand (`s3://bucket/prefix`,
`gs://...`, `hdfs://...`), the same filesystems Ray Train writes checkpoints through.

Local paths stay `Path`s and use the atomic write-aside-then-rename of `pipeline.io`. A URI is a `str`; on an
object store a written object becomes visible only when its upload completes, so a single put is atomic too.
S3 credentials, region and endpoint come from the usual AWS environment of every node (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible server).
"""
from __future__ import annotations

import io
from fnmatch import fnmatchcase
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


def filesystem(location: str):
    """Returns (pyarrow filesystem, path inside it) of a URI. `s3://` uses `S3FileSystem()` configured from the
    environment (no region lookup call, so an S3-compatible endpoint works)."""
    import os

    import pyarrow.fs as pafs

    if location.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region) if region else pafs.S3FileSystem(
            endpoint_override=endpoint)
        return fs, location[len("s3://"):].rstrip("/")
    return pafs.FileSystem.from_uri(location)


def ray_storage(location: Location) -> tuple[str, object]:
    """Returns (storage_path, storage_filesystem) for Ray Train's `RunConfig`: a local path and None, or the
    path inside the URI's filesystem and that filesystem (so an S3-compatible endpoint is honoured)."""
    if not is_uri(location):
        return str(as_location(location)), None
    fs, path = filesystem(str(location))
    return path, fs


def _info(location: str):
    fs, path = filesystem(location)
    return fs, path, fs.get_file_info(path)


def read_bytes(location: Location) -> bytes:
    """Returns the bytes of a file or object; raises FileNotFoundError when it does not exist."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path, info = _info(location)
    if info.type.name != "File":
        raise FileNotFoundError(f"no such object: {location}")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: Location, data: bytes) -> None:
    """Writes `data` atomically (local: aside then rename; object store: one upload)."""
    if not is_uri(location):
        atomic_write_bytes(location, data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(location: Location) -> bool:
    """True when the file or object exists."""
    if not is_uri(location):
        return Path(location).exists()
    return _info(location)[2].type.name != "NotFound"


def is_dir(location: Location) -> bool:
    """True when the folder (or object prefix) exists."""
    if not is_uri(location):
        return Path(location).is_dir()
    return _info(location)[2].type.name == "Directory"


def stat_marker(location: Location) -> str:
    """Returns a cheap change marker, `size:mtime_ns` of a file or object. Raises FileNotFoundError when it
    does not exist."""
    if not is_uri(location):
        st = Path(location).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    _, _, info = _info(location)
    if info.type.name != "File":
        raise FileNotFoundError(f"no such object: {location}")
    return f"{info.size}:{info.mtime_ns}"


def list_files(location: Location, pattern: str) -> list[str]:
    """Returns the names relative to `location` of the files matching `pattern`, a glob whose `*` does not
    cross `/` (e.g. `*/*.tar`)."""
    if not is_uri(location):
        root = Path(location)
        return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    parts = pattern.split("/")
    names = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        name = info.path[len(path) + 1:]
        components = name.split("/")
        if info.type.name == "File" and len(components) == len(parts) and all(
                fnmatchcase(c, p) for c, p in zip(components, parts)):
            names.append(name)
    return sorted(names)


def remove(location: Location) -> None:
    """Deletes a file or object if it exists."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path, info = _info(location)
    if info.type.name == "File":
        fs.delete_file(path)


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
