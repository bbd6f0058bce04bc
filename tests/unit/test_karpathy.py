"""Karpathy split reader on fixture files in the upstream format."""
from __future__ import annotations

import json

import pytest

from pipeline.data.karpathy import read_karpathy


def karpathy_file(tmp_path, images):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def entry(cocoid, split, captions, filepath="val2014"):
    return {"filepath": filepath, "filename": f"COCO_{filepath}_{cocoid:012d}.jpg", "imgid": cocoid % 100,
            "cocoid": cocoid, "split": split, "sentids": list(range(len(captions))),
            "sentences": [{"raw": c, "tokens": c.split(), "imgid": 0, "sentid": i} for i, c in enumerate(captions)]}


def test_reads_entries_restval_is_train_and_keys_use_cocoid(tmp_path):
    path = karpathy_file(tmp_path, [entry(391895, "restval", ["a man on a bike ", "a cyclist"]),
                                    entry(522418, "test", ["a woman cutting a cake"] * 5, "train2014")])
    samples, rejected = read_karpathy(path, tmp_path / "images", "coco")
    assert not rejected
    assert [s.key for s in samples] == ["coco-391895", "coco-522418"]
    assert [s.split for s in samples] == ["train", "test"]
    assert samples[0].captions == ["a man on a bike", "a cyclist"]
    assert samples[1].image == str(tmp_path / "images" / "train2014" / "COCO_train2014_000000522418.jpg")
    assert samples[0].meta["source_id"] == 391895


def test_flickr_style_entries_without_cocoid_use_imgid(tmp_path):
    e = entry(0, "val", ["two dogs play"], filepath="")
    del e["cocoid"]
    e["imgid"] = 17
    assert read_karpathy(karpathy_file(tmp_path, [e]), tmp_path, "f30k")[0][0].key == "f30k-17"


@pytest.mark.parametrize("mutate, item, reason", [
    (lambda e: e.pop("filename"), "dataset_coco.json#1", "malformed image entry (missing or wrong 'filename')"),
    (lambda e: e.update(sentences=[]), "coco-2", "has no caption or an empty caption"),
    (lambda e: e.update(sentences=[{"raw": "  "}]), "coco-2", "has no caption or an empty caption"),
    (lambda e: e.update(cocoid="../2"), "dataset_coco.json#1", "is not allowed"),
    (lambda e: e.update(sentences="oops"), "dataset_coco.json#1", "malformed image entry"),
])
def test_malformed_entry_is_rejected_by_name_and_the_rest_loads(tmp_path, mutate, item, reason):
    bad = entry(2, "train", ["x"])
    mutate(bad)
    samples, rejected = read_karpathy(karpathy_file(tmp_path, [entry(1, "train", ["a"]), bad, entry(3, "val", ["b"])]),
                                      tmp_path, "coco")
    assert [s.key for s in samples] == ["coco-1", "coco-3"]
    assert len(rejected) == 1 and rejected[0].item == item and reason in rejected[0].reason


def test_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Karpathy split file not found"):
        read_karpathy(tmp_path / "nope.json", tmp_path, "coco")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a Karpathy split file"):
        read_karpathy(tmp_path / "x.json", tmp_path, "coco")
