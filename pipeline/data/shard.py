"""Shard stage core: samples -> deterministic WebDataset tars + `manifest.parquet`.

Each tar holds, per sample in key order, `KEY.jpg` (the image), `KEY.json` (all captions, labels, ids,
split) and `KEY.txt` (the first caption, for open_clip's webdataset loader). Members carry fixed metadata
(mtime 0, uid/gid 0, no user names, mode 0644), so the same samples give byte-identical tars.
Shard names are `{split}/shard-{n:06d}.tar` over the samples of a split sorted by key.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
from PIL import Image

from pipeline.data.sample import Sample, check_key
from pipeline.io import atomic_write_parquet

CODE_VERSION = 1


@dataclass
class ShardPlan:
    """One tar to write: its relative name, split and the samples it holds, in key order."""

    name: str
    split: str
    samples: list[Sample]


def check_splits(samples: list[Sample], required: list[str]) -> None:
    """Raises ValueError naming the first split in `required` that has no sample."""
    present = {s.split for s in samples}
    for split in required:
        if split not in present:
            raise ValueError(f"split {split!r} is empty (the dataset has: {', '.join(sorted(present)) or 'nothing'})")


def plan_shards(samples: list[Sample], shard_size: int) -> list[ShardPlan]:
    """Returns the shard plans: each split's samples sorted by key, cut every `shard_size` samples.

    Raises ValueError on a duplicate key."""
    seen: set[str] = set()
    by_split: dict[str, list[Sample]] = {}
    for s in samples:
        check_key(s.key)
        if s.key in seen:
            raise ValueError(f"duplicate sample key {s.key!r}")
        seen.add(s.key)
        by_split.setdefault(s.split, []).append(s)
    plans = []
    for split in sorted(by_split):
        ordered = sorted(by_split[split], key=lambda s: s.key)
        for n, start in enumerate(range(0, len(ordered), shard_size)):
            plans.append(ShardPlan(f"{split}/shard-{n:06d}.tar", split, ordered[start:start + shard_size]))
    return plans


def image_jpeg_bytes(sample: Sample, quality: int) -> bytes:
    """Returns the sample's image as JPEG bytes: a JPEG file as it is, anything else re-encoded.

    Raises ValueError naming the sample when the image is missing or cannot be decoded."""
    try:
        data = sample.image if isinstance(sample.image, bytes) else Path(sample.image).read_bytes()
    except OSError as err:
        raise ValueError(f"sample {sample.key}: cannot read image {sample.image}: {err.strerror}") from err
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # decodes fully: catches truncated files
            if fmt == "JPEG":
                return data
            out = io.BytesIO()
            im.convert("RGB").save(out, format="JPEG", quality=quality)
            return out.getvalue()
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"sample {sample.key}: image is not decodable ({err})") from err


def sample_json(sample: Sample) -> bytes:
    """Returns the `KEY.json` member: captions, labels, split and source ids."""
    record = {"key": sample.key, "captions": sample.captions, "labels": sample.labels,
              "split": sample.split, **sample.meta}
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(plan: ShardPlan, out_dir: str | Path, jpeg_quality: int = 95) -> dict:
    """Writes one tar atomically under `out_dir`; returns its manifest row
    (shard, split, num_samples, num_captions, bytes, sha256, first_key, last_key)."""
    path = Path(out_dir) / plan.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in plan.samples:
                if not s.captions or not all(c.strip() for c in s.captions):
                    raise ValueError(f"sample {s.key}: empty caption")
                _add(tar, f"{s.key}.jpg", image_jpeg_bytes(s, jpeg_quality))
                _add(tar, f"{s.key}.json", sample_json(s))
                _add(tar, f"{s.key}.txt", s.captions[0].encode("utf-8"))
        data = tmp.read_bytes()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "shard": plan.name,
        "split": plan.split,
        "num_samples": len(plan.samples),
        "num_captions": sum(len(s.captions) for s in plan.samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_key": plan.samples[0].key,
        "last_key": plan.samples[-1].key,
    }


def read_shard(path: str | Path) -> list[dict]:
    """Returns the samples of one tar in member order: [{"key", "jpg": bytes, "json": dict, "txt": str}]."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            value = json.loads(data) if ext == "json" else data.decode("utf-8") if ext == "txt" else data
            samples.setdefault(key, {"key": key})[ext] = value
    return list(samples.values())


def source_manifest(samples: list[Sample]) -> pd.DataFrame:
    """Returns one row per sample (key, split, image, num_captions, captions_sha) in key order: the
    shard stage's input, logged to MLflow and hashed into its fingerprint together with image stats."""
    rows = []
    for s in sorted(samples, key=lambda s: s.key):
        if isinstance(s.image, bytes):
            image, stat = "<bytes>", hashlib.sha256(s.image).hexdigest()[:16]
        else:
            try:
                st = os.stat(s.image)
            except OSError as err:
                raise ValueError(f"sample {s.key}: image file missing: {s.image}") from err
            image, stat = s.image, f"{st.st_size}:{st.st_mtime_ns}"
        text = "\n".join(s.captions) + "\x00" + ",".join(s.labels)
        rows.append({"key": s.key, "split": s.split, "image": image, "image_stat": stat,
                     "num_captions": len(s.captions),
                     "text_sha": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]})
    return pd.DataFrame(rows)


MANIFEST = "manifest.parquet"


def write_manifest(out_dir: str | Path, rows: list[dict], source_fingerprint: str) -> pd.DataFrame:
    """Writes `manifest.parquet` (one row per tar, sorted by split and shard) atomically; returns it."""
    manifest = pd.DataFrame(rows).sort_values(["split", "shard"]).reset_index(drop=True)
    manifest["source_fingerprint"] = source_fingerprint
    atomic_write_parquet(Path(out_dir) / MANIFEST, pa.Table.from_pandas(manifest, preserve_index=False))
    return manifest


def read_manifest(out_dir: str | Path) -> pd.DataFrame:
    """Returns the shard manifest of a shard folder; raises FileNotFoundError naming it when absent."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}: run the shard stage first")
    return pd.read_parquet(path)
