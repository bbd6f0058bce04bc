"""Object boxes: the COCO instances reader, the COCO and synthetic sources' boxes, boxes in the shard json."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_karpathy import entry, karpathy_file  # tests/unit is on sys.path (pytest rootdir imports)

from pipeline.data.instances import read_coco_instances
from pipeline.data.sample import Sample
from pipeline.data.shard import ShardPlan, read_shard, sample_json, text_sha, write_shard
from pipeline.data.sources import coco, synthetic


def image(image_id, file_name, width=640, height=480):
    return {"license": 3, "file_name": file_name, "coco_url": f"http://images.cocodataset.org/{file_name}",
            "height": height, "width": width, "date_captured": "2013-11-14 11:18:45", "id": image_id}


def annotation(ann_id, image_id, bbox, category_id=18, iscrowd=0):
    return {"segmentation": [[0.0, 0.0, 1.0, 1.0, 2.0, 0.0]], "area": 1.0, "iscrowd": iscrowd, "image_id": image_id,
            "bbox": bbox, "category_id": category_id, "id": ann_id}


CATEGORIES = [{"supercategory": "animal", "id": 18, "name": "dog"},
              {"supercategory": "vehicle", "id": 2, "name": "bicycle"}]


def instances_file(path, images, annotations, categories=CATEGORIES):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"year": 2014}, "licenses": [], "images": images,
                                "annotations": annotations, "categories": categories}))
    return path


def test_reads_boxes_as_xyxy_pixels_with_category_names_skipping_crowds(tmp_path):
    path = instances_file(tmp_path / "instances_val2014.json", [image(42, "a.jpg"), image(73, "b.jpg", 100, 50)], [
        annotation(1, 42, [10.5, 20, 100, 50.25]),
        annotation(2, 42, [0, 0, 5, 5], iscrowd=1),
        annotation(3, 42, [600, 400, 40, 80], category_id=2),
        annotation(4, 42, [-0.5, 479, 10, 1.5]),  # within the 1 px tolerance: clipped
        annotation(5, 42, [1, 2, 0, 4]), annotation(6, 42, [1, 2, 3, -4]),  # empty: skipped
        annotation(7, 42, [640, 2, 0.5, 4]),  # empty once clipped to the image: skipped
    ])
    boxes, problems = read_coco_instances(path)
    assert not problems
    assert boxes == {
        "a.jpg": ([[10.5, 20.0, 110.5, 70.25], [600.0, 400.0, 640.0, 480.0], [0.0, 479.0, 9.5, 480.0]],
                  ["dog", "bicycle", "dog"]),
        "b.jpg": ([], []),
    }


@pytest.mark.parametrize("bad, problem", [
    (annotation(7, 42, [1, 2, 3]), "bbox [1, 2, 3] is not 4 finite numbers"),
    (annotation(7, 42, [1, 2, "3", 4]), "is not 4 finite numbers"),
    (annotation(7, 42, [1, 2, float("nan"), 4]), "is not 4 finite numbers"),
    (annotation(7, 42, [630, 2, 12, 4]), "extends more than 1 px beyond the 640x480 image"),
    (annotation(7, 42, [1, -1.5, 3, 4]), "extends more than 1 px beyond the 640x480 image"),
    (annotation(7, 42, [1, 2, 3, 4], category_id=99), "category_id 99 is not in categories"),
])
def test_malformed_annotation_rejects_its_image_naming_the_annotation(tmp_path, bad, problem):
    path = instances_file(tmp_path / "instances_val2014.json", [image(42, "a.jpg"), image(73, "b.jpg")],
                          [annotation(1, 42, [1, 2, 3, 4]), bad, annotation(8, 73, [1, 2, 3, 4])])
    boxes, problems = read_coco_instances(path)
    assert boxes == {"b.jpg": ([[1.0, 2.0, 4.0, 6.0]], ["dog"])}
    assert list(problems) == ["a.jpg"]
    assert problems["a.jpg"].startswith("instances_val2014.json: annotation 7: ") and problem in problems["a.jpg"]


def test_annotation_of_an_unlisted_image_is_a_problem_of_its_own(tmp_path):
    path = instances_file(tmp_path / "instances_val2014.json", [image(42, "a.jpg")],
                          [annotation(1, 42, [1, 2, 3, 4]), annotation(9, 555, [1, 2, 3, 4])])
    boxes, problems = read_coco_instances(path)
    assert boxes == {"a.jpg": ([[1.0, 2.0, 4.0, 6.0]], ["dog"])}
    assert problems == {"instances_val2014.json#annotation 9":
                        "instances_val2014.json: annotation 9: image_id 555 is not in images"}


def test_missing_or_broken_file_raises_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO instances file not found: .*nope.json"):
        read_coco_instances(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json: not a COCO instances file"):
        read_coco_instances(broken)
    broken.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="broken.json: not a COCO instances file .*categories"):
        read_coco_instances(broken)


# ----------------------------------------------------------------------------- COCO source


def coco_root(tmp_path):
    karpathy_file(tmp_path, [entry(42, "test", ["a dog"]), entry(73, "train", ["a bike"]),
                             entry(9, "restval", ["a cat"], filepath="train2014")])
    return tmp_path


def test_coco_without_annotations_folder_has_no_boxes(tmp_path):
    samples, rejected = coco.load_samples(coco_root(tmp_path), "coco")
    assert [s.key for s in samples] == ["coco-42", "coco-73", "coco-9"] and not rejected
    assert all(s.boxes == [] and s.box_labels == [] for s in samples)


def test_coco_attaches_boxes_from_the_instances_files_and_rejects_bad_images(tmp_path):
    root = coco_root(tmp_path)
    instances_file(root / "annotations" / "instances_val2014.json",
                   [image(42, "COCO_val2014_000000000042.jpg"), image(73, "COCO_val2014_000000000073.jpg")],
                   [annotation(1, 42, [10, 20, 30, 40]), annotation(2, 73, [10, 20, 30, "40"]),
                    annotation(3, 1000, [10, 20, 30, 40])])
    samples, rejected = coco.load_samples(root, "coco")
    assert [s.key for s in samples] == ["coco-42", "coco-9"]
    assert (samples[0].boxes, samples[0].box_labels) == ([[10.0, 20.0, 40.0, 60.0]], ["dog"])
    assert samples[1].boxes == []  # train2014 image, no instances_train2014.json: no boxes
    assert [(r.item, r.reason) for r in rejected] == [
        ("coco-73", "instances_val2014.json: annotation 2: bbox [10, 20, 30, '40'] is not 4 finite numbers"),
        ("instances_val2014.json#annotation 3", "instances_val2014.json: annotation 3: image_id 1000 is not in images"),
    ]
    instances_file(root / "annotations" / "instances_train2014.json", [image(9, "COCO_train2014_000000000009.jpg")],
                   [annotation(5, 9, [1, 1, 2, 2], category_id=2)])
    samples, _ = coco.load_samples(root, "coco")
    assert samples[1].key == "coco-9" and (samples[1].boxes, samples[1].box_labels) == ([[1.0, 1.0, 3.0, 3.0]],
                                                                                         ["bicycle"])


# ----------------------------------------------------------------------------- synthetic source

SYNTH = {"seed": 11, "num_train": 3, "num_val": 0, "num_test": 3, "image_size": 128, "max_objects": 3}


@pytest.fixture(scope="module")
def synth_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    synthetic.generate(root, progress=False, **SYNTH)
    samples, rejected = synthetic.load_samples(root, "synthetic")
    assert not rejected
    return samples


def test_synthetic_boxes_contain_the_drawn_objects(synth_samples):
    for sample in synth_samples:
        scene, _, _ = synthetic.make_image(SYNTH["seed"], sample.meta["imgid"], SYNTH["image_size"],
                                           SYNTH["max_objects"])
        assert sample.box_labels == [o.shape for o in scene.objects]
        pixels = np.asarray(Image.open(sample.image).convert("RGB"), dtype=int)  # the JPEG the shard stage reads
        for (x0, y0, x1, y1), obj in zip(sample.boxes, scene.objects):
            assert 0 <= x0 < x1 <= SYNTH["image_size"] and 0 <= y0 < y1 <= SYNTH["image_size"]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            centre = np.median(pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3), axis=0)
            assert np.abs(centre - synthetic.COLOUR_RGB[obj.colour]).max() < 40, (sample.key, obj)


def test_synthetic_boxes_are_tight(synth_samples):
    """On the rendered image (before JPEG), the object's colour within 2 px around its box fills exactly the box."""
    size = SYNTH["image_size"]
    for sample in synth_samples:
        scene, _, rendered = synthetic.make_image(SYNTH["seed"], sample.meta["imgid"], size, SYNTH["max_objects"])
        pixels = np.asarray(rendered)
        for box, obj in zip(sample.boxes, scene.objects):
            x0, y0, x1, y1 = (int(v) for v in box)
            ex0, ey0, ex1, ey1 = max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 2, size), min(y1 + 2, size)
            coloured = (pixels[ey0:ey1, ex0:ex1] == synthetic.COLOUR_RGB[obj.colour]).all(axis=2)
            rows, cols = np.nonzero(coloured)
            assert [cols.min() + ex0, rows.min() + ey0, cols.max() + ex0 + 1, rows.max() + ey0 + 1] == [x0, y0, x1, y1]


def test_synthetic_instances_file_is_in_the_coco_format(synth_samples):
    root = Path(synth_samples[0].image).parent.parent
    data = json.loads((root / synthetic.INSTANCES_FILE).read_text())
    assert [c["name"] for c in data["categories"]] == list(synthetic.SHAPES)
    assert [im["file_name"] for im in data["images"]] == [s.meta["filename"] for s in synth_samples]
    first = data["annotations"][0]
    x0, y0, x1, y1 = synth_samples[0].boxes[0]
    assert first["image_id"] == data["images"][0]["id"] and first["bbox"] == [x0, y0, x1 - x0, y1 - y0]


# ----------------------------------------------------------------------------- shard json and digest


def boxless(key: str = "k-1") -> Sample:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, format="JPEG")
    return Sample(key, out.getvalue(), ["a red circle", "a circle"], "train", labels=["red", "circle"],
                  meta={"imgid": 1, "filename": "a.jpg"})


def test_boxless_sample_keeps_its_json_and_digest():
    s = boxless()
    record = {"key": s.key, "captions": s.captions, "labels": s.labels, "split": s.split, **s.meta}
    assert sample_json(s) == json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    assert text_sha(s) == "a1cbfb86c94f89bf"  # the digest before samples carried boxes


def test_boxes_go_into_the_json_the_digest_and_the_tar(tmp_path):
    s = boxless()
    s.boxes, s.box_labels = [[1.0, 2.5, 10.0, 12.0], [0.0, 0.0, 3.0, 4.0]], ["circle", "square"]
    record = json.loads(sample_json(s))
    assert record["boxes"] == s.boxes and record["box_labels"] == s.box_labels
    moved, relabelled = boxless(), boxless()
    moved.boxes, moved.box_labels = [[1.0, 2.5, 10.0, 13.0], [0.0, 0.0, 3.0, 4.0]], s.box_labels
    relabelled.boxes, relabelled.box_labels = s.boxes, ["circle", "cross"]
    assert len({text_sha(boxless()), text_sha(s), text_sha(moved), text_sha(relabelled)}) == 4
    write_shard(ShardPlan("train/shard-000000.tar", "train", [s, boxless("k-2")]), tmp_path)
    members = {m["key"]: m["json"] for m in read_shard(tmp_path / "train" / "shard-000000.tar")}
    assert members["k-1"]["boxes"] == s.boxes and members["k-1"]["box_labels"] == s.box_labels
    assert "boxes" not in members["k-2"] and "box_labels" not in members["k-2"]
