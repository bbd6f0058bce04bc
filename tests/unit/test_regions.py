"""Region geometry against the real eval transforms, RoIAlign features, and regions through extract_shard and the
store."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from pipeline.config import FeaturesConfig
from pipeline.features import regions, store
from pipeline.features.extract import extract_shard
from pipeline.features.extractors import openclip

BOX = (30.0, 10.0, 70.0, 34.0)  # a white rectangle on black, in image pixels


def _image(width: int, height: int, box=BOX) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = map(int, box)
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [(96, 48), (48, 96), (64, 64)])
def test_input_affine_follows_the_open_clip_eval_transform(mode, size):
    """The mapped box bounds the white rectangle in the transformed input: white inside, black just outside."""
    transform = image_transform(32, is_train=False, mean=(0, 0, 0), std=(1, 1, 1), resize_mode=mode,
                                interpolation="bilinear")
    width, height = size
    box = (round(0.3 * width), round(0.2 * height), round(0.7 * width), round(0.7 * height))
    pixels = transform(_image(width, height, box))[0].numpy()  # (32, 32), 0..1
    affine = regions.input_affine(transform, width, height)
    assert affine.input_size == (32, 32) and affine.image_size == size
    x0, y0, x1, y1 = regions.to_input(np.array([box], float), affine)[0]
    inside = pixels[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
    assert inside.size and inside.min() > 0.9
    outside = np.ones_like(pixels, bool)
    outside[max(0, int(y0) - 1):int(np.ceil(y1)) + 1, max(0, int(x0) - 1):int(np.ceil(x1)) + 1] = False
    assert outside.any() and pixels[outside].max() < 0.1


def test_input_affine_refuses_a_geometric_step_it_cannot_follow():
    from torchvision.transforms import Compose, RandomRotation

    with pytest.raises(ValueError, match="RandomRotation"):
        regions.input_affine(Compose([RandomRotation(10)]), 10, 10)


def test_patch_boxes_tile_what_the_model_sees():
    transform = image_transform(32, is_train=False)
    square = regions.patch_boxes(regions.input_affine(transform, 64, 64), (4, 4))
    assert square.shape == (16, 4)
    assert np.allclose(square[0], [0, 0, 0.25, 0.25]) and np.allclose(square[-1], [0.75, 0.75, 1, 1])
    assert np.allclose(square[1], [0.25, 0, 0.5, 0.25])  # row-major: the second cell is to the right
    wide = regions.patch_boxes(regions.input_affine(transform, 128, 64), (4, 4))  # centre crop: middle half
    assert np.allclose(wide[:, [0, 2]].min(), 0.25) and np.allclose(wide[:, [0, 2]].max(), 0.75)
    assert np.allclose(wide[:, [1, 3]].min(), 0) and np.allclose(wide[:, [1, 3]].max(), 1)


def test_roi_features_follow_roialign_with_aligned_token_centres():
    """Token (i, j) sits at (j + 0.5, i + 0.5) in grid units: over a ramp equal to that x coordinate, a box's feature
    is the ramp at its centre; over a constant patch, the constant; boxes the crop removes are dropped."""
    transform = image_transform(32, is_train=False)  # 4 x 4 grid of 8 px cells over the 32 px input
    fmap = torch.zeros(2, 2, 4, 4)
    fmap[:, 0] = torch.arange(4.0) + 0.5  # channel 0: x of each token's centre, in grid units
    fmap[0, 1, 0:2, 2:4] = 5.0  # channel 1 of image 0: the top-right quarter
    affines = [regions.input_affine(transform, 64, 64), regions.input_affine(transform, 128, 64)]  # 1 cell = 16 px
    boxes = [np.array([[40.0, 8.0, 56.0, 24.0], [8.0, 40.0, 40.0, 56.0]]),  # inside the quarter / below it
             np.array([[0.0, 0.0, 20.0, 64.0], [40.0, 16.0, 72.0, 48.0]])]  # cropped away / seen (crop from x=32)
    feats, kept = regions.roi_features(fmap, affines, boxes)
    assert [f.shape for f in feats] == [(2, 2), (1, 2)] and [k.shape for k in kept] == [(2, 4), (1, 4)]
    assert np.allclose(feats[0], [[3.0, 5.0], [1.5, 0.0]], atol=1e-5)
    assert np.allclose(feats[1], [[(56 - 32) / 16, 0.0]], atol=1e-5)  # box centre x 56 px, crop from 32 px
    assert np.allclose(kept[0], [[40 / 64, 8 / 64, 56 / 64, 24 / 64], [8 / 64, 40 / 64, 40 / 64, 56 / 64]])
    assert np.allclose(kept[1][0], [40 / 128, 16 / 64, 72 / 128, 48 / 64], atol=1e-6)
    none, kept_none = regions.roi_features(fmap, affines, [np.zeros((0, 4)), np.zeros((0, 4))])
    assert [f.shape for f in none] == [(0, 2), (0, 2)] and [k.shape for k in kept_none] == [(0, 4), (0, 4)]


def _shard(path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, record in samples:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_extract_shard_stores_patch_boxes_and_regions_that_the_reader_returns(tmp_path):
    ext = openclip.load(FeaturesConfig(model="itr-vit-micro-32", precision="fp32"), torch.device("cpu"))
    records = [("a", _image(96, 48), {"captions": ["one"], "boxes": [list(BOX), [0, 0, 8, 8]],
                                      "box_labels": ["square", "corner"]}),
               ("b", _image(64, 64), {"captions": ["two"]}),
               ("c", _image(48, 48), {"captions": ["three"], "boxes": [[4, 4, 20, 40]], "box_labels": ["x"]})]
    _shard(tmp_path / "s.tar", records)
    row = extract_shard(openclip, ext, tmp_path / "s.tar", tmp_path / "store" / "train", "s", batch_size=2,
                        with_tokens=True)
    manifest = __import__("pandas").DataFrame([{"split": "train", "images_file": f"train/{row['images_file']}",
                                                "captions_file": f"train/{row['captions_file']}"}])
    split = store.read_split(tmp_path / "store", manifest, "train",
                             image_columns=("patch_tokens", "patch_boxes", "roi_feats", "roi_boxes"))
    tokens, boxes = split.images["patch_tokens"], split.images["patch_boxes"]
    assert tokens.shape == (3, 16, 64) and boxes.shape == (3, 16, 4) and boxes.dtype == np.float32
    offsets = split.offsets["roi_feats"]
    assert offsets.tolist() == [0, 1, 1, 2]  # image a: the corner box lies in the cropped-away left quarter
    assert split.images["roi_feats"].shape == (2, 64) and split.images["roi_boxes"].shape == (2, 4)
    assert np.allclose(split.images["roi_boxes"][0], [30 / 96, 10 / 48, 70 / 96, 34 / 48], atol=1e-6)
    direct = openclip.encode_images(ext, [records[0][1]], True, [records[0][2]["boxes"]])
    assert np.allclose(split.images["roi_feats"][0], direct["roi_feats"][0][0], atol=2e-2)  # float16 storage


def test_a_resnet_tower_gives_its_cells_as_tokens_with_boxes():
    ext = openclip.load(FeaturesConfig(model="itr-rn-micro-64", precision="fp32"), torch.device("cpu"))
    out = openclip.encode_images(ext, [_image(96, 64)], True, [[list(BOX)]])
    assert out["patch_tokens"].shape == (1, 4, 256) and out["patch_boxes"].shape == (1, 4, 4)  # 64 px / 32: 2 x 2
    assert np.allclose(out["patch_boxes"][0, 0], [16 / 96, 0, 48 / 96, 0.5])  # centre crop of the 96 x 64 image
    assert [f.shape for f in out["roi_feats"]] == [(1, 256)]
