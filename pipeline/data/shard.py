"""Shard stage core: samples -> deterministic, append-only WebDataset tars in one folder per dataset.

Each tar holds, per sample in key order, `KEY.jpg` (the image), `KEY.json` (all captions, labels, ids,
split; for a sample with object boxes also `boxes`, [x0, y0, x1, y1] in pixels of the original image, and
`box_labels`, their category names) and `KEY.txt` (the first caption, for open_clip's webdataset loader).
Members carry fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644), so the same samples give
byte-identical tars.

The folder is append-only. `manifest.parquet` (one row per tar) is the commit record: a tar counts only
once its row is there, and a run first deletes any tar that is not (what a killed run left). A run shards
only the samples whose key no committed shard holds, into new tars numbered after the split's last one
(`{split}/shard-{n:06d}.tar`, new samples sorted by key); committed tars are never rewritten. Per sample,
`samples.parquet` records its shard and content digests (image stat and sha256, text sha256), and
`quarantine.parquet` lists the items the latest run could not shard, with the reason.

The folder and the images may be local paths or URIs (`s3://...`, see `pipeline.storage`).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
from PIL import Image

from pipeline import storage
from pipeline.data.sample import Rejected, Sample, check_key

CODE_VERSION = 2
MANIFEST = "manifest.parquet"
INDEX = "samples.parquet"
QUARANTINE = "quarantine.parquet"
SIZES = "sizes.json"  # per split folder: {tar file name: samples}
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)/shard-(?P<n>\d{6})\.tar$")
MANIFEST_COLUMNS = ["shard", "split", "num_samples", "num_captions", "bytes", "sha256", "first_key", "last_key",
                    "run_id"]
INDEX_COLUMNS = ["key", "split", "shard", "image_stat", "image_sha", "text_sha"]
QUARANTINE_COLUMNS = ["item", "reason", "image_stat", "text_sha"]


@dataclass
class ShardPlan:
    """One tar to write: its relative name, split and the samples it holds, in key order."""

    name: str
    split: str
    samples: list[Sample]


@dataclass
class Increment:
    """What a run has to do: `plans` for the new samples, the input items it `rejected` before writing
    (duplicate keys, missing images, samples changed since they were sharded, items quarantined earlier
    and unchanged since), the number of samples already sharded, and the keys of sharded samples that
    are no longer in the source (they stay in their shards)."""

    plans: list[ShardPlan]
    rejected: list[Rejected] = field(default_factory=list)
    unchanged: int = 0
    gone: list[str] = field(default_factory=list)


def check_splits(splits: set[str], required: list[str]) -> None:
    """Raises ValueError naming the first split in `required` that is not in `splits`."""
    for split in required:
        if split not in splits:
            raise ValueError(f"split {split!r} is empty (the dataset has: {', '.join(sorted(splits)) or 'nothing'})")


def text_sha(sample: Sample) -> str:
    """Returns a sha256 prefix of the sample's captions and labels, and of its boxes and box labels when it has
    boxes (a box-less sample keeps the digest it had before samples carried boxes)."""
    text = "\n".join(sample.captions) + "\x00" + ",".join(sample.labels)
    if sample.boxes:
        text += "\x00" + json.dumps([sample.boxes, sample.box_labels])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def image_stat(sample: Sample) -> str:
    """Returns a cheap change marker of the sample's image (`storage.stat_marker` of its file, or a sha256
    prefix of in-memory bytes). Raises OSError when the file is missing."""
    if isinstance(sample.image, bytes):
        return hashlib.sha256(sample.image).hexdigest()[:16]
    return storage.stat_marker(sample.image)


def source_manifest(samples: list[Sample]) -> tuple[pd.DataFrame, list[Rejected]]:
    """Returns (one row per sample with a readable image: key, split, image, image_stat, num_captions,
    text_sha, in key order; a `Rejected` per sample whose image file is missing). The table is the shard
    stage's logged input."""
    rows, rejected = [], []
    for s in samples:
        try:
            stat = image_stat(s)
        except OSError as err:
            rejected.append(Rejected(s.key, f"image file missing or unreadable: {s.image} ({err.strerror or err})"))
            continue
        rows.append({"key": s.key, "split": s.split, "image": s.image if isinstance(s.image, str) else "<bytes>",
                     "image_stat": stat, "num_captions": len(s.captions), "text_sha": text_sha(s)})
    frame = pd.DataFrame(rows, columns=["key", "split", "image", "image_stat", "num_captions", "text_sha"])
    return frame.sort_values("key", kind="stable").reset_index(drop=True), rejected


def _file_sha(sample: Sample) -> str:
    data = sample.image if isinstance(sample.image, bytes) else storage.read_bytes(sample.image)
    return hashlib.sha256(data).hexdigest()


def plan_increment(samples: list[Sample], inputs: pd.DataFrame, index: pd.DataFrame, manifest: pd.DataFrame,
                   quarantine: pd.DataFrame, shard_size: int) -> Increment:
    """Returns the `Increment` for `samples` (those listed in `inputs`, from `source_manifest`) against the
    committed `index` and `manifest` and the previous `quarantine`.

    A key seen twice keeps its first occurrence; the others are rejected. A committed sample whose image
    stat differs is re-hashed: only a real content change rejects it (shards are append-only)."""
    by_key = {row.key: row for row in inputs.itertuples(index=False)}
    committed = {row.key: row for row in index.itertuples(index=False)}
    held = {row.item: row for row in quarantine.itertuples(index=False)} if len(quarantine) else {}
    seen: dict[str, int] = {}
    new: dict[str, list[Sample]] = {}
    inc = Increment(plans=[])
    for position, s in enumerate(samples):
        if s.key not in by_key:
            continue  # its image is missing: rejected by source_manifest
        try:
            check_key(s.key)
        except ValueError as err:
            inc.rejected.append(Rejected(s.key, str(err)))
            continue
        if s.key in seen:
            inc.rejected.append(Rejected(s.key, f"duplicate key (input item {position}; first seen as item "
                                                f"{seen[s.key]}, which is kept)"))
            continue
        seen[s.key] = position
        row = by_key[s.key]
        if (old := committed.get(s.key)) is not None:
            same_text = old.text_sha == row.text_sha and old.split == row.split
            if same_text and (old.image_stat == row.image_stat or _file_sha(s) == old.image_sha):
                inc.unchanged += 1
            else:
                inc.rejected.append(Rejected(s.key, f"changed since it was sharded into {old.shard}: shards are "
                                                    "append-only (shard into a new data.name to take the change)"))
            continue
        if (q := held.get(s.key)) is not None and q.image_stat == row.image_stat and q.text_sha == row.text_sha:
            inc.rejected.append(Rejected(s.key, q.reason))  # unchanged since it was quarantined: not retried
            continue
        new.setdefault(s.split, []).append(s)
    inc.gone = sorted(set(committed) - set(seen))
    next_number = Counter()
    for name in manifest["shard"] if len(manifest) else []:
        m = SHARD_NAME.match(name)
        next_number[m["split"]] = max(next_number[m["split"]], int(m["n"]) + 1)
    for split in sorted(new):
        ordered = sorted(new[split], key=lambda s: s.key)
        for i, start in enumerate(range(0, len(ordered), shard_size)):
            name = f"{split}/shard-{next_number[split] + i:06d}.tar"
            inc.plans.append(ShardPlan(name, split, ordered[start:start + shard_size]))
    return inc


def plan_shards(samples: list[Sample], shard_size: int) -> list[ShardPlan]:
    """Returns the shard plans of a fresh folder: each split's samples sorted by key, cut every `shard_size`.
    Raises ValueError on a duplicate or unsafe key."""
    inputs, missing = source_manifest(samples)
    empty = pd.DataFrame(columns=INDEX_COLUMNS)
    inc = plan_increment(samples, inputs, empty, pd.DataFrame(columns=MANIFEST_COLUMNS),
                         pd.DataFrame(columns=QUARANTINE_COLUMNS), shard_size)
    if bad := missing + inc.rejected:
        raise ValueError(f"sample {bad[0].item}: {bad[0].reason}")
    return inc.plans


def image_jpeg_bytes(sample: Sample, quality: int) -> tuple[bytes, str]:
    """Returns (the sample's image as JPEG bytes: a JPEG file as it is, anything else re-encoded; sha256 of
    the source image bytes). Raises ValueError naming the sample when the image is missing or cannot be
    decoded (a truncated file included: the image is decoded fully)."""
    try:
        data = sample.image if isinstance(sample.image, bytes) else storage.read_bytes(sample.image)
    except OSError as err:
        raise ValueError(f"sample {sample.key}: cannot read image {sample.image}: {err.strerror or err}") from err
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            if fmt == "JPEG":
                return data, sha
            out = io.BytesIO()
            im.convert("RGB").save(out, format="JPEG", quality=quality)
            return out.getvalue(), sha
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"sample {sample.key}: image is not decodable ({err})") from err


def sample_json(sample: Sample) -> bytes:
    """Returns the `KEY.json` member: captions, labels, split and source ids, and `boxes` and `box_labels` when
    the sample has boxes (a box-less sample's member is the same as before samples carried boxes)."""
    boxes = {"boxes": sample.boxes, "box_labels": sample.box_labels} if sample.boxes else {}
    record = {"key": sample.key, "captions": sample.captions, "labels": sample.labels,
              "split": sample.split, **boxes, **sample.meta}
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")


def sample_members(sample: Sample, jpeg_quality: int) -> tuple[list[tuple[str, bytes]], str]:
    """Returns ([(member name, bytes)] of one sample: jpg, json, txt; sha256 of its source image).
    Raises ValueError naming the sample and the problem (unreadable image, empty or non-UTF-8 caption)."""
    if not sample.captions or not all(isinstance(c, str) and c.strip() for c in sample.captions):
        raise ValueError(f"sample {sample.key}: empty caption")
    try:
        text, first = sample_json(sample), sample.captions[0].encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"sample {sample.key}: caption is not valid UTF-8 ({err.reason})") from err
    jpg, sha = image_jpeg_bytes(sample, jpeg_quality)
    return [(f"{sample.key}.jpg", jpg), (f"{sample.key}.json", text), (f"{sample.key}.txt", first)], sha


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(plan: ShardPlan, out_dir: storage.Location, jpeg_quality: int = 95) -> dict:
    """Writes one tar atomically under `out_dir` with every sample of `plan` that can be written; returns
    {"row": its manifest row (shard, split, num_samples, num_captions, bytes, sha256, first_key, last_key)
    or None when no sample could be written, "samples": [{key, image_sha}] written, "rejected": [{item,
    reason}] for the samples left out}."""
    written, rejected, members = [], [], []
    for s in plan.samples:
        try:
            sample_files, sha = sample_members(s, jpeg_quality)
        except ValueError as err:
            rejected.append({"item": s.key, "reason": str(err).removeprefix(f"sample {s.key}: ")})
            continue
        members += sample_files
        written.append({"key": s.key, "image_sha": sha, "num_captions": len(s.captions)})
    if not written:
        return {"row": None, "samples": [], "rejected": rejected}
    buffer = io.BytesIO()  # a shard is built in memory (bounded by shard_size), hashed, then written once
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    data = buffer.getvalue()
    storage.write_bytes(storage.join(out_dir, plan.name), data)
    row = {"shard": plan.name, "split": plan.split, "num_samples": len(written),
           "num_captions": sum(w["num_captions"] for w in written), "bytes": len(data),
           "sha256": hashlib.sha256(data).hexdigest(), "first_key": written[0]["key"], "last_key": written[-1]["key"]}
    return {"row": row, "samples": [{"key": w["key"], "image_sha": w["image_sha"]} for w in written],
            "rejected": rejected}


def read_shard(path: storage.Location) -> list[dict]:
    """Returns the samples of one tar in member order: [{"key", "jpg": bytes, "json": dict, "txt": str}]."""
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path))) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            value = json.loads(data) if ext == "json" else data.decode("utf-8") if ext == "txt" else data
            samples.setdefault(key, {"key": key})[ext] = value
    return list(samples.values())


def _read_table(location: storage.Location, columns: list[str]) -> pd.DataFrame:
    return storage.read_parquet(location) if storage.exists(location) else pd.DataFrame(columns=columns)


def read_committed(out_dir: storage.Location) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Returns (manifest, sample index restricted to committed shards, quarantine) of a shard folder; empty
    frames with the right columns for a new folder."""
    manifest = _read_table(storage.join(out_dir, MANIFEST), MANIFEST_COLUMNS)
    index = _read_table(storage.join(out_dir, INDEX), INDEX_COLUMNS)
    index = index[index["shard"].isin(set(manifest["shard"]))].reset_index(drop=True)
    return manifest, index, _read_table(storage.join(out_dir, QUARANTINE), QUARANTINE_COLUMNS)


def remove_uncommitted(out_dir: storage.Location, manifest: pd.DataFrame) -> list[str]:
    """Deletes the tars and temporary files under `out_dir` that `manifest` does not list (left by a killed
    or failed run); returns their relative names."""
    listed = set(manifest["shard"])
    removed = []
    for name in storage.list_files(out_dir, "*/*") if storage.is_dir(out_dir) else []:
        base = name.rsplit("/", 1)[-1]
        if base.startswith(".") or (base.endswith(".tar") and name not in listed):
            storage.remove(storage.join(out_dir, name))
            removed.append(name)
    return removed


def quarantine_table(rejected: list[Rejected], inputs: pd.DataFrame) -> pd.DataFrame:
    """Returns the quarantine rows: item, reason, and for sample items their image_stat and text_sha (so an
    unchanged item is not retried), sorted by item and reason."""
    digests = inputs.set_index("key")[["image_stat", "text_sha"]] if len(inputs) else None
    rows = []
    for r in sorted(rejected, key=lambda r: (r.item, r.reason)):
        known = digests is not None and r.item in digests.index
        rows.append({"item": r.item, "reason": r.reason,
                     "image_stat": str(digests.at[r.item, "image_stat"]) if known else "",
                     "text_sha": str(digests.at[r.item, "text_sha"]) if known else ""})
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def write_quarantine(out_dir: storage.Location, rejected: list[Rejected], inputs: pd.DataFrame,
                     committed: pd.DataFrame | None = None) -> pd.DataFrame:
    """Writes `quarantine.parquet` atomically and returns its table; with `committed` (the folder's current
    quarantine rows), writes nothing when the rows are the same and the file exists: a run with nothing new
    leaves the append-only folder exactly as it was (a reader on another node sees no change without new data)."""
    table = quarantine_table(rejected, inputs)
    location = storage.join(out_dir, QUARANTINE)
    if committed is not None and storage.exists(location) and len(table) == len(committed) and (
            table.astype(str).reset_index(drop=True).equals(
                committed[list(table.columns)].astype(str).reset_index(drop=True))):
        return table
    storage.write_parquet(location, pa.Table.from_pandas(table, preserve_index=False))
    return table


def write_sizes(out_dir: storage.Location, manifest: pd.DataFrame) -> list:
    """Writes `<split>/sizes.json` ({tar file name: samples}, open_clip_train's convention) for every split of a
    shard manifest (columns shard, split, num_samples); returns the files written."""
    written = []
    for split, rows in manifest.groupby("split"):
        sizes = {str(s).rsplit("/", 1)[-1]: int(n) for s, n in zip(rows["shard"], rows["num_samples"])}
        location = storage.join(out_dir, split, SIZES)
        storage.write_bytes(location, json.dumps(dict(sorted(sizes.items())), indent=1).encode())
        written.append(location)
    return written


def commit(out_dir: storage.Location, manifest: pd.DataFrame, index: pd.DataFrame, results: list[dict],
           inputs: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Adds the written tars of `results` (from `write_shard`) to the sample index, then to the manifest
    (the commit record, written last, atomically); returns the new manifest, sorted by split and shard."""
    digests = inputs.set_index("key")
    new_rows, new_index = [], []
    for result in results:
        if result["row"] is None:
            continue
        new_rows.append({**result["row"], "run_id": run_id})
        for s in result["samples"]:
            d = digests.loc[s["key"]]
            new_index.append({"key": s["key"], "split": d["split"], "shard": result["row"]["shard"],
                              "image_stat": d["image_stat"], "image_sha": s["image_sha"], "text_sha": d["text_sha"]})
    frames = [f for f in (index, pd.DataFrame(new_index, columns=INDEX_COLUMNS)) if len(f)]
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=INDEX_COLUMNS)
    storage.write_parquet(storage.join(out_dir, INDEX),
                          pa.Table.from_pandas(index.sort_values("key"), preserve_index=False))
    frames = [f for f in (manifest, pd.DataFrame(new_rows, columns=MANIFEST_COLUMNS)) if len(f)]
    manifest = pd.concat(frames, ignore_index=True).sort_values(["split", "shard"]).reset_index(drop=True)
    storage.write_parquet(storage.join(out_dir, MANIFEST), pa.Table.from_pandas(manifest, preserve_index=False))
    return manifest


def read_manifest(out_dir: storage.Location) -> pd.DataFrame:
    """Returns the shard manifest of a shard folder; raises FileNotFoundError naming it when absent."""
    path = storage.join(out_dir, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"no shard manifest at {path}: run the shard stage first")
    return storage.read_parquet(path)
