"""The Flickr8K source (Karpathy `dataset_flickr8k.json`) on a tiny fixture in the exact upstream format."""
from __future__ import annotations

import json

import pytest

from pipeline.data.sources import load_samples


def upstream_entry(imgid: int, filename: str, split: str, captions: list[str]) -> dict:
    """An image entry as in Karpathy's dataset_flickr8k.json: no filepath, no cocoid; sentences with tokens."""
    sentids = list(range(imgid * 5, imgid * 5 + len(captions)))
    return {"sentids": sentids, "imgid": imgid, "split": split, "filename": filename,
            "sentences": [{"tokens": c.lower().rstrip(" .").split(), "raw": c, "imgid": imgid, "sentid": s}
                          for c, s in zip(captions, sentids)]}


@pytest.fixture
def flickr8k(tmp_path):
    root = tmp_path / "flickr8k"
    entries = [upstream_entry(0, "2513260012_03d33305cf.jpg", "train", ["A black dog is running after a white dog .",
                                                                         "Two dogs play in the snow ."]),
               upstream_entry(1, "3226254560_2f8ac147ea.jpg", "test", ["A man rides a bike ."] * 5),
               upstream_entry(2, "1000268201_693b08cb0e.jpg", "val", ["A child climbs stairs ."]),
               upstream_entry(3, "1001773457_577c3a7d70.jpg", "test", [" "])]
    root.mkdir()
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return root


@pytest.mark.parametrize("folder", ["Flicker8k_Dataset", "Flickr8k_Dataset", "Images"])
def test_reads_the_split_file_and_finds_the_image_folder(flickr8k, folder):
    (flickr8k / folder).mkdir()
    samples, rejected = load_samples("flickr8k", flickr8k, "f8k")
    assert [(s.key, s.split) for s in samples] == [("f8k-0", "train"), ("f8k-1", "test"), ("f8k-2", "val")]
    assert samples[0].captions == ["A black dog is running after a white dog .", "Two dogs play in the snow ."]
    assert samples[1].image == str(flickr8k / folder / "3226254560_2f8ac147ea.jpg") and len(samples[1].captions) == 5
    assert len(rejected) == 1 and "f8k-3" in rejected[0].item and "empty caption" in rejected[0].reason


def test_official_folder_name_when_no_image_folder_exists(flickr8k):
    samples, _ = load_samples("flickr8k", flickr8k, "f8k")
    assert samples[0].image == str(flickr8k / "Flicker8k_Dataset" / "2513260012_03d33305cf.jpg")


def test_missing_split_file_names_it(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="dataset_flickr8k.json"):
        load_samples("flickr8k", tmp_path / "f", "f8k")
