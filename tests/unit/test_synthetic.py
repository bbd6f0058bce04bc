"""Synthetic dataset: determinism, captions, Karpathy/NUS-WIDE files, ceiling, validation, atomicity."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.sources import synthetic
from pipeline.data.sources.synthetic import (
    CaptionMeaning,
    ObjectMention,
    Relation,
    Scene,
    SceneObject,
    is_consistent,
    retrieval_ceiling,
)

SMALL = {"num_train": 20, "num_val": 5, "num_test": 20, "image_size": 32, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    return root, synthetic.generate(root, seed=3, **SMALL)


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path, dataset):
    root, _ = dataset
    again = tmp_path / "again"
    synthetic.generate(again, seed=3, **SMALL)
    assert _files(again) == _files(root)
    other = tmp_path / "other"
    synthetic.generate(other, seed=4, **SMALL)
    assert _files(other)["images/synth_000000.jpg"] != _files(root)["images/synth_000000.jpg"]
    assert _files(other)["dataset_synthetic.json"] != _files(root)["dataset_synthetic.json"]


def test_scene_and_captions_do_not_depend_on_image_size():
    scene_32, captions_32, image_32 = synthetic.make_image(0, 7, 32, 3)
    scene_64, captions_64, image_64 = synthetic.make_image(0, 7, 64, 3)
    assert (scene_32, captions_32) == (scene_64, captions_64)
    assert image_32.size == (32, 32) and image_64.size == (64, 64)


@pytest.mark.parametrize("max_objects", [1, 3, 6])
def test_five_distinct_captions_consistent_with_their_scene(max_objects):
    for index in range(60):
        scene, captions, _ = synthetic.make_image(1, index, 32, max_objects)
        assert 1 <= len(scene.objects) <= max_objects
        assert len({c.text for c in captions}) == 5
        for caption in captions:
            assert len(caption.meaning.objects) == len(scene.objects)
            assert is_consistent(caption.meaning, scene), caption.text
        if len(scene.objects) > 1:
            assert sum(c.meaning.relation is not None for c in captions) == 1


def test_karpathy_json_structure(dataset):
    root, summary = dataset
    data = json.loads((root / "dataset_synthetic.json").read_text())
    assert data["dataset"] == "synthetic"
    images = data["images"]
    assert [e["imgid"] for e in images] == list(range(45))
    assert [e["split"] for e in images] == ["train"] * 20 + ["val"] * 5 + ["test"] * 20
    sentids = [s for e in images for s in e["sentids"]]
    assert sentids == list(range(len(sentids))) and len(sentids) == summary["num_captions"] == 45 * 5
    for entry in images:
        assert entry["filepath"] == "images" and entry["filename"] == f"synth_{entry['imgid']:06d}.jpg"
        assert (root / entry["filepath"] / entry["filename"]).is_file()
        assert [s["sentid"] for s in entry["sentences"]] == entry["sentids"]
        for sentence in entry["sentences"]:
            assert sentence["imgid"] == entry["imgid"]
            assert sentence["tokens"] == sentence["raw"].replace(",", " ").replace(":", " ").split()
    assert summary == json.loads((root / "synth.json").read_text())
    assert summary["counts"] == {"train": 20, "val": 5, "test": 20}
    assert summary["config"] == {"seed": 3, "num_train": 20, "num_val": 5, "num_test": 20,
                                 "image_size": 32, "max_objects": 3}


def test_label_files_aligned_and_match_captions(dataset):
    root, summary = dataset
    images = json.loads((root / "dataset_synthetic.json").read_text())["images"]
    concepts = (root / "Concepts81.txt").read_text().split("\n")[:-1]
    assert concepts == summary["concepts"]
    assert (root / "ImageList" / "Imagelist.txt").read_text().splitlines() == [
        f"images\\{e['filename']}" for e in images
    ]
    flags = {c: (root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt").read_text().splitlines() for c in concepts}
    tags = (root / "NUS_WID_Tags" / "All_Tags.txt").read_text().splitlines()
    assert all(len(f) == len(images) for f in flags.values()) and len(tags) == len(images)
    for n, entry in enumerate(images):
        labelled = {c for c in concepts if flags[c][n] == "1"}
        assert all(flags[c][n] in ("0", "1") for c in concepts)
        words = {t for s in entry["sentences"] for t in s["tokens"]}
        assert labelled == words & set(concepts)
        stem, *tagged = tags[n].split()
        assert stem == Path(entry["filename"]).stem and set(tagged) == labelled


def test_load_samples_reads_captions_and_labels(dataset):
    root, _ = dataset
    samples, rejected = synthetic.load_samples(root, "synthetic")
    assert len(samples) == 45 and not rejected and samples[0].key == "synthetic-0"
    assert all(len(s.captions) == 5 and s.labels and Path(s.image).is_file() for s in samples)


def _obj(shape, colour, position, size="small") -> SceneObject:
    return SceneObject(shape=shape, colour=colour, size=size, position=position)


def _said(*objects: ObjectMention, relation: Relation | None = None) -> CaptionMeaning:
    return CaptionMeaning(tuple(objects), relation)


def test_ceiling_of_two_indistinguishable_scenes_is_50():
    scenes = [Scene((_obj("circle", "red", "left"),)), Scene((_obj("circle", "red", "left"),))]
    meanings = [[_said(ObjectMention(shape="circle", colour="red"))] * 5] * 2
    assert retrieval_ceiling(scenes, meanings) == {"t2i_R@1": 50.0, "i2t_R@1": 50.0}


def test_ceiling_hand_computed():
    scenes = [Scene((_obj("circle", "red", "left"),)), Scene((_obj("circle", "red", "right"),))]
    meanings = [
        [_said(ObjectMention(colour="red", position=p)), _said(ObjectMention(shape="circle", colour="red"))]
        for p in ("left", "right")
    ]
    ceiling = retrieval_ceiling(scenes, meanings)
    assert ceiling["t2i_R@1"] == pytest.approx(75.0)  # (1 + 1/2 + 1 + 1/2) / 4
    assert ceiling["i2t_R@1"] == pytest.approx(200 / 3)  # each image: 2 own of 3 consistent captions


def test_consistency_needs_count_attributes_and_relation():
    circle_left = Scene((_obj("circle", "red", "left"), _obj("square", "blue", "right", "large")))
    circle_right = Scene((_obj("circle", "red", "right"), _obj("square", "blue", "left", "large")))
    circle, square = ObjectMention(shape="circle", colour="red"), ObjectMention(shape="square")
    left_of = _said(circle, square, relation=Relation(0, "left of", 1))
    assert is_consistent(left_of, circle_left) and not is_consistent(left_of, circle_right)
    assert is_consistent(_said(square, circle, relation=Relation(1, "right of", 0)), circle_right)
    assert not is_consistent(_said(circle), circle_left)  # object count differs
    assert not is_consistent(_said(circle, ObjectMention(shape="square", size="small")), circle_left)
    assert retrieval_ceiling([circle_left, circle_right], [[left_of], [_said(circle, square)]]) == {
        "t2i_R@1": 75.0, "i2t_R@1": 75.0,
    }


def test_ceiling_of_generated_splits(dataset):
    root, _ = dataset
    ceiling = synthetic.read_ceiling(root)
    assert set(ceiling) == {"test", "val"}
    for split in ceiling.values():
        assert 0 < split["t2i_R@1"] <= 100 and 0 < split["i2t_R@1"] <= 100


@pytest.mark.parametrize("argument, value", [
    ("num_train", -1), ("num_val", -1), ("num_test", 0), ("image_size", 31),
    ("max_objects", 0), ("max_objects", 10), ("seed", -1),
])
def test_bad_argument_raises_value_error_naming_it(tmp_path, argument, value):
    with pytest.raises(ValueError, match=argument):
        synthetic.generate(tmp_path / "out", **{**SMALL, argument: value})
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_way_leaves_no_output(tmp_path, monkeypatch):
    calls = []

    def save_then_fail(image, path):
        calls.append(path)
        if len(calls) == 10:
            raise RuntimeError("disk full")
        image.save(path, format="JPEG")

    monkeypatch.setattr(synthetic, "save_image", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.generate(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_generate_replaces_existing_root_and_keeps_it_on_failure(tmp_path, monkeypatch):
    root = tmp_path / "out"
    synthetic.generate(root, seed=1, **SMALL)
    synthetic.generate(root, seed=2, **SMALL)
    assert json.loads((root / "synth.json").read_text())["config"]["seed"] == 2
    before = _files(root)

    def fail(image, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "save_image", fail)
    with pytest.raises(RuntimeError):
        synthetic.generate(root, seed=3, **SMALL)
    assert _files(root) == before and [p.name for p in tmp_path.iterdir()] == ["out"]
