"""Shard core without Ray: plans, deterministic tars, members, the append-only folder, quarantine, bad input."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pandas as pd
import pytest
from PIL import Image

from pipeline.data.sample import Rejected, Sample, check_key
from pipeline.data.shard import (
    ShardPlan,
    commit,
    image_jpeg_bytes,
    plan_increment,
    plan_shards,
    read_committed,
    read_shard,
    remove_uncommitted,
    source_manifest,
    write_quarantine,
    write_shard,
)
from pipeline.data.sources import load_samples


def jpeg(colour=(200, 10, 10), fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format=fmt)
    return out.getvalue()


def samples(n=5, split="train", start=0):
    return [Sample(key=f"k-{i:03d}", image=jpeg((i * 40 % 256, 0, 0)), captions=[f"caption {i} a", f"caption {i} b"],
                   split=split, labels=["red"]) for i in reversed(range(start, start + n))]


def shard_once(items: list[Sample], out, run_id: str, size: int = 2):
    """The shard stage's steps without Ray: plan against the committed folder, write, quarantine, commit."""
    manifest, index, quarantine = read_committed(out)
    remove_uncommitted(out, manifest)
    inputs, missing = source_manifest(items)
    inc = plan_increment(items, inputs, index, manifest, quarantine, size)
    results = [write_shard(p, out) for p in inc.plans]
    rejected = missing + inc.rejected + [Rejected(**r) for res in results for r in res["rejected"]]
    write_quarantine(out, rejected, inputs)
    return commit(out, manifest, index, results, inputs, run_id), inc, rejected


def tar_bytes(out) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


def test_plan_sorts_by_key_per_split_and_cuts_fixed_sizes():
    plans = plan_shards(samples(5) + [Sample("t-1", jpeg(), ["x"], "test")], 2)
    assert [p.name for p in plans] == ["test/shard-000000.tar", "train/shard-000000.tar",
                                       "train/shard-000001.tar", "train/shard-000002.tar"]
    assert [s.key for s in plans[1].samples] == ["k-000", "k-001"] and len(plans[3].samples) == 1


def test_duplicate_and_unsafe_keys_are_rejected():
    with pytest.raises(ValueError, match="sample k-000: duplicate key"):
        plan_shards(samples(2) + samples(1), 10)
    for bad in ("../x", "a/b", "a.b", ""):
        with pytest.raises(ValueError, match="not allowed"):
            check_key(bad)
    items = samples(2) + [Sample("k-000", jpeg((1, 2, 3)), ["other"], "train"), Sample("../up", jpeg(), ["x"], "train")]
    inputs, _ = source_manifest(items)
    empty = read_committed("/nonexistent")
    inc = plan_increment(items, inputs, empty[1], empty[0], empty[2], 10)
    assert [s.key for s in inc.plans[0].samples] == ["k-000", "k-001"]
    assert inc.plans[0].samples[0].captions == ["caption 0 a", "caption 0 b"]  # the first occurrence is kept
    assert [(r.item, r.reason.split(" (")[0].split(":")[0]) for r in inc.rejected] == [
        ("k-000", "duplicate key"), ("../up", "sample key '../up' is not allowed")]


def test_tars_are_byte_identical_across_runs_with_fixed_metadata(tmp_path):
    (plan,) = plan_shards(samples(3), 10)
    res_a = write_shard(plan, tmp_path / "a")
    res_b = write_shard(plan, tmp_path / "b")
    data = (tmp_path / "a" / plan.name).read_bytes()
    assert data == (tmp_path / "b" / plan.name).read_bytes() and res_a == res_b
    row = res_a["row"]
    assert row["num_samples"] == 3 and row["num_captions"] == 6 and row["bytes"] == len(data) and not res_a["rejected"]
    with tarfile.open(tmp_path / "a" / plan.name) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:3] == ["k-000.jpg", "k-000.json", "k-000.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    assert not list((tmp_path / "a" / "train").glob(".*"))  # no temp file left


def test_members_roundtrip_and_png_is_reencoded_as_jpeg(tmp_path):
    s = Sample("p-1", jpeg(fmt="PNG"), ["first caption", "second"], "val", ["blue"], {"imgid": 4})
    write_shard(plan_shards([s], 1)[0], tmp_path)
    (got,) = read_shard(tmp_path / "val" / "shard-000000.tar")
    assert got["txt"] == "first caption"
    assert got["json"] == {"key": "p-1", "captions": ["first caption", "second"], "labels": ["blue"],
                           "split": "val", "imgid": 4}
    assert Image.open(io.BytesIO(got["jpg"])).format == "JPEG"


def test_bad_samples_are_left_out_with_their_reason_and_the_rest_is_written(tmp_path):
    bad = [Sample("bad-1", jpeg()[:40], ["x"], "train"), Sample("bad-2", jpeg(), ["ok", " "], "train"),
           Sample("bad-3", jpeg(), ["caf\udce9"], "train"), Sample("bad-4", str(tmp_path / "gone.jpg"), ["x"], "train")]
    result = write_shard(ShardPlan("train/shard-000000.tar", "train", sorted(samples(2), key=lambda s: s.key) + bad),
                         tmp_path)
    assert [s["key"] for s in result["samples"]] == ["k-000", "k-001"] and result["row"]["num_samples"] == 2
    reasons = {r["item"]: r["reason"] for r in result["rejected"]}
    assert reasons["bad-1"].startswith("image is not decodable")
    assert reasons["bad-2"] == "empty caption"
    assert reasons["bad-3"].startswith("caption is not valid UTF-8")
    assert reasons["bad-4"].startswith("cannot read image")
    assert [m["key"] for m in read_shard(tmp_path / "train" / "shard-000000.tar")] == ["k-000", "k-001"]
    # a shard whose every sample is bad writes no file at all
    (plan,) = plan_shards([Sample("bad-1", jpeg()[:40], ["x"], "val")], 10)
    assert write_shard(plan, tmp_path)["row"] is None and not (tmp_path / "val").exists()
    with pytest.raises(ValueError, match="sample m-1: cannot read image"):
        image_jpeg_bytes(Sample("m-1", str(tmp_path / "missing.jpg"), ["x"], "train"), 95)


def test_append_only_folder_adds_new_samples_in_new_shards_and_keeps_old_ones_byte_identical(tmp_path):
    out = tmp_path / "shards"
    manifest, inc, rejected = shard_once(samples(5), out, "run-1")
    assert list(manifest["shard"]) == [f"train/shard-{n:06d}.tar" for n in range(3)] and not rejected
    first = tar_bytes(out)
    # nothing new: no plan, every sample confirmed
    _, inc, _ = shard_once(samples(5), out, "run-2")
    assert inc.plans == [] and inc.unchanged == 5
    # three new samples: new shards after the last one, old tars untouched, every sample exactly once
    manifest, inc, _ = shard_once(samples(8), out, "run-3")
    assert [p.name for p in inc.plans] == ["train/shard-000003.tar", "train/shard-000004.tar"] and inc.unchanged == 5
    after = tar_bytes(out)
    assert {k: after[k] for k in first} == first
    keys = [m["key"] for name in manifest["shard"] for m in read_shard(out / name)]
    assert sorted(keys) == [f"k-{i:03d}" for i in range(8)]
    assert list(manifest["run_id"]) == ["run-1"] * 3 + ["run-3"] * 2
    # the same eight samples sharded at once into a fresh folder give the same keys (another layout)
    fresh, _, _ = shard_once(samples(8), tmp_path / "fresh", "run-x")
    assert int(fresh["num_samples"].sum()) == 8


def test_changed_sample_is_quarantined_touched_file_is_not(tmp_path):
    out = tmp_path / "shards"
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg())
    items = [Sample("a", str(path), ["a red thing"], "train")]
    shard_once(items, out, "run-1")
    os.utime(path, ns=(10**18, 10**18))  # same bytes, new mtime: re-hashed, still the same sample
    _, inc, rejected = shard_once(items, out, "run-2")
    assert inc.unchanged == 1 and not rejected
    items[0].captions = ["a blue thing"]
    _, inc, rejected = shard_once(items, out, "run-3")
    assert inc.unchanged == 0 and [r.item for r in rejected] == ["a"]
    assert rejected[0].reason.startswith("changed since it was sharded into train/shard-000000.tar")
    _, inc, _ = shard_once([], out, "run-4")
    assert inc.gone == ["a"]


def test_quarantined_item_is_not_retried_until_it_changes(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    items = samples(2) + [Sample("bad-1", jpeg()[:40], ["x"], "train")]
    _, _, rejected = shard_once(items, out, "run-1")
    assert [r.item for r in rejected] == ["bad-1"]
    table = pd.read_parquet(out / "quarantine.parquet")
    assert list(table["item"]) == ["bad-1"] and table["reason"][0].startswith("image is not decodable")
    _, inc, rejected = shard_once(items, out, "run-2")
    assert inc.plans == [] and [r.item for r in rejected] == ["bad-1"]  # known bad, unchanged: not rewritten
    items[-1] = Sample("bad-1", jpeg(), ["x"], "train")  # fixed
    manifest, inc, rejected = shard_once(items, out, "run-3")
    assert [s.key for p in inc.plans for s in p.samples] == ["bad-1"] and not rejected
    assert pd.read_parquet(out / "quarantine.parquet").empty


def test_uncommitted_tars_and_index_rows_are_ignored_and_removed(tmp_path):
    out = tmp_path / "shards"
    manifest, _, _ = shard_once(samples(2), out, "run-1")
    # a killed run: a tar written but not committed, a temp file, index rows for the uncommitted tar
    (out / "train" / "shard-000001.tar").write_bytes(b"partial")
    (out / "train" / ".shard-000002.tar.tmp-123").write_bytes(b"partial")
    index = pd.read_parquet(out / "samples.parquet")
    extra = index.assign(key="k-009", shard="train/shard-000001.tar")
    pd.concat([index, extra]).to_parquet(out / "samples.parquet")
    manifest, index, _ = read_committed(out)
    assert list(index["shard"]) == ["train/shard-000000.tar"] * 2
    assert remove_uncommitted(out, manifest) == ["train/.shard-000002.tar.tmp-123", "train/shard-000001.tar"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar"]


def test_synthetic_source_gives_samples_with_labels(synth_root):
    got, rejected = load_samples("synthetic", synth_root, "synthetic")
    assert len(got) == 340 and {s.split for s in got} == {"train", "val", "test"} and not rejected
    assert all(len(s.captions) == 5 and s.labels for s in got)
    table, missing = source_manifest(got)
    assert list(table["key"]) == sorted(s.key for s in got) and not missing
    with pytest.raises(ValueError, match="unknown data source 'coco2'"):
        load_samples("coco2", synth_root, "x")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_samples("synthetic", synth_root / "nope", "x")
    assert json.loads((synth_root / "synth.json").read_text())["counts"]["test"] == 60
