"""Shard core without Ray: plans, deterministic tars, members, manifest and bad input."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from pipeline.data.sample import Sample, check_key
from pipeline.data.shard import image_jpeg_bytes, plan_shards, read_shard, source_manifest, write_shard
from pipeline.data.sources import load_samples


def jpeg(colour=(200, 10, 10), fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format=fmt)
    return out.getvalue()


def samples(n=5, split="train"):
    return [Sample(key=f"k-{i:03d}", image=jpeg((i * 40, 0, 0)), captions=[f"caption {i} a", f"caption {i} b"],
                   split=split, labels=["red"]) for i in reversed(range(n))]


def test_plan_sorts_by_key_per_split_and_cuts_fixed_sizes():
    plans = plan_shards(samples(5) + [Sample("t-1", jpeg(), ["x"], "test")], 2)
    assert [p.name for p in plans] == ["test/shard-000000.tar", "train/shard-000000.tar",
                                       "train/shard-000001.tar", "train/shard-000002.tar"]
    assert [s.key for s in plans[1].samples] == ["k-000", "k-001"] and len(plans[3].samples) == 1


def test_duplicate_and_unsafe_keys_are_rejected():
    with pytest.raises(ValueError, match="duplicate sample key 'k-000'"):
        plan_shards(samples(2) + samples(1), 10)
    for bad in ("../x", "a/b", "a.b", ""):
        with pytest.raises(ValueError, match="not allowed"):
            check_key(bad)


def test_tars_are_byte_identical_across_runs_with_fixed_metadata(tmp_path):
    (plan,) = plan_shards(samples(3), 10)
    row_a = write_shard(plan, tmp_path / "a")
    row_b = write_shard(plan, tmp_path / "b")
    data = (tmp_path / "a" / plan.name).read_bytes()
    assert data == (tmp_path / "b" / plan.name).read_bytes() and row_a == row_b
    assert row_a["num_samples"] == 3 and row_a["num_captions"] == 6 and row_a["bytes"] == len(data)
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


def test_bad_image_names_the_sample_and_leaves_no_partial_tar(tmp_path):
    broken = Sample("bad-1", jpeg()[:40], ["x"], "train")
    with pytest.raises(ValueError, match="sample bad-1: image is not decodable"):
        write_shard(plan_shards(samples(2) + [broken], 10)[0], tmp_path)
    with pytest.raises(ValueError, match="sample m-1: cannot read image"):
        image_jpeg_bytes(Sample("m-1", str(tmp_path / "missing.jpg"), ["x"], "train"), 95)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_synthetic_source_gives_samples_with_labels(synth_root):
    got = load_samples("synthetic", synth_root, "synthetic")
    assert len(got) == 340 and {s.split for s in got} == {"train", "val", "test"}
    assert all(len(s.captions) == 5 and s.labels for s in got)
    table = source_manifest(got)
    assert list(table["key"]) == sorted(s.key for s in got)
    with pytest.raises(ValueError, match="unknown data source 'coco2'"):
        load_samples("coco2", synth_root, "x")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        load_samples("synthetic", synth_root / "nope", "x")
    assert json.loads((synth_root / "synth.json").read_text())["counts"]["test"] == 60
