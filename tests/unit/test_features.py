"""open_clip extractor (micro random config), store round trip, zero-copy reads, and extract_shard."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.config import FeaturesConfig
from pipeline.data.shard import plan_shards, write_shard
from pipeline.data.sources import load_samples
from pipeline.features import store
from pipeline.features.extract import ShardFeatureWriter, extract_shard
from pipeline.features.extractors import get_extractor, openclip

MICRO = FeaturesConfig(model="itr-vit-micro-32", precision="fp32", batch_size=16)


@pytest.fixture(scope="module")
def extractor():
    return openclip.load(MICRO, torch.device("cpu"))


def test_same_seed_same_weights_and_output_shapes(extractor):
    again = openclip.load(MICRO, torch.device("cpu"))
    for a, b in zip(extractor.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    images = [Image.new("RGB", (32, 32), (i * 50, 0, 0)) for i in range(3)]
    out = openclip.encode_images(extractor, images, with_tokens=True)
    assert out["image_embed"].shape == (3, 64) and out["patch_tokens"].shape == (3, 16, 64)
    assert np.allclose(out["image_pooled"], out["patch_tokens"].mean(1), atol=1e-5)
    texts = openclip.encode_texts(extractor, ["a red circle", "a big blue square on the left"], with_tokens=True)
    assert texts["text_embed"].shape == (2, 64)
    # tokens: start + words + end, padding removed
    assert [t.shape[0] for t in texts["text_tokens"]] == [5, 9]
    assert np.allclose(texts["text_pooled"][0], texts["text_tokens"][0].mean(0), atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(extractor):
    bf16 = openclip.load(FeaturesConfig(model="itr-vit-micro-32", precision="bf16"), torch.device("cpu"))
    texts = ["a small green triangle above a white cross", "two shapes"]
    a = openclip.encode_texts(extractor, texts, False)["text_embed"]
    b = openclip.encode_texts(bf16, texts, False)["text_embed"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99  # stated tolerance: cosine >= 0.99 to the fp32 embedding


def test_unknown_model_and_extractor_names():
    with pytest.raises(ValueError, match="unknown open_clip model 'nope'"):
        openclip.load(FeaturesConfig(model="nope"), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown extractor 'clipx'"):
        get_extractor("clipx")


def test_extract_shard_writes_store_and_reader_returns_views(tmp_path, synth_root, extractor):
    samples = [s for s in load_samples("synthetic", synth_root, "synthetic")[0] if s.split == "test"]
    plans = plan_shards(samples, 40)
    rows = []
    for plan in plans:
        write_shard(plan, tmp_path / "shards")
        row = extract_shard(openclip, extractor, tmp_path / "shards" / plan.name, tmp_path / "store" / "test",
                            plan.name[5:-4], batch_size=16, with_tokens=True)
        rows.append({"shard": plan.name, "split": "test", "shard_sha256": "x", "run_id": "r", **row,
                     "images_file": f"test/{row['images_file']}", "captions_file": f"test/{row['captions_file']}"})
    manifest = pd.DataFrame(rows)
    split = store.read_split(tmp_path / "store", manifest, "test", ("image_embed", "patch_tokens"), ("text_embed",))
    assert len(split.keys) == 60 and split.images["patch_tokens"].shape == (60, 16, 64)
    assert split.images["image_embed"].dtype == np.float16 and split.captions["text_embed"].shape == (300, 64)
    assert np.bincount(split.caption_image).tolist() == [5] * 60
    assert split.keys == sorted(split.keys) and all(split.labels)
    # the stored embedding is the extractor's output (float16)
    first = next(s for s in samples if s.key == split.keys[0])
    direct = openclip.encode_images(extractor, [Image.open(first.image).convert("RGB")], False)["image_embed"][0]
    assert np.allclose(split.images["image_embed"][0], direct, atol=2e-2)
    text = openclip.encode_texts(extractor, [split.caption_text[1]], False)["text_embed"][0]
    assert np.allclose(split.captions["text_embed"][1], text, atol=2e-2)
    with pytest.raises(ValueError, match="no shard of split 'train'"):
        store.read_split(tmp_path / "store", manifest, "train")
    with pytest.raises(ValueError, match="no features for shard test/shard-000009.tar"):
        store.select(manifest, pd.DataFrame({"shard": ["test/shard-000009.tar"], "sha256": ["x"]}))
    assert len(store.select(manifest, pd.DataFrame({"shard": [rows[0]["shard"]], "sha256": ["x"]}))) == 1


def test_single_shard_read_is_zero_copy(tmp_path):
    arrays = {"image_embed": np.arange(12, dtype=np.float16).reshape(3, 4),
              "image_pooled": np.ones((3, 2), np.float16)}
    text = {"text_embed": np.zeros((3, 4), np.float16), "text_pooled": np.zeros((3, 2), np.float16)}
    files = store.write_shard(tmp_path / "s" / "val", "shard-000000",
                              store.image_table(["a", "b", "c"], [[], [], []], arrays),
                              store.caption_table(["a", "b", "c"], [0, 0, 0], ["x", "y", "z"], text))
    manifest = pd.DataFrame([{"shard": "val/shard-000000.tar", "split": "val",
                              "images_file": f"val/{files[0]}", "captions_file": f"val/{files[1]}"}])
    split = store.read_split(tmp_path / "s", manifest, "val")
    assert not split.images["image_embed"].flags.owndata  # a view over the mapped file
    assert split.images["image_embed"].tolist() == arrays["image_embed"].tolist()


def test_prepare_then_encode_equals_encode(extractor):
    images = [Image.new("RGB", (40, 32), (0, i * 60, 0)) for i in range(3)]
    batch = openclip.preprocess_images(extractor, images)
    assert batch.pixels.shape == (3, 3, 32, 32) and batch.pixels.dtype == torch.float32
    assert [b.shape for b in batch.boxes] == [(0, 4)] * 3 and batch.affines[0].image_size == (40, 32)
    for k, v in openclip.encode_images(extractor, images, True).items():
        want = openclip.encode_pixels(extractor, batch, True)[k]
        assert all(np.array_equal(a, b) for a, b in zip(v, want)) if isinstance(v, list) else np.array_equal(v, want)
    texts = ["a red circle", "two shapes"]
    ids = openclip.tokenize(extractor, texts)
    assert ids.dtype == torch.int64 and ids.shape[0] == 2
    direct, split = openclip.encode_texts(extractor, texts, True), openclip.encode_tokens(extractor, ids, True)
    assert np.array_equal(direct["text_embed"], split["text_embed"])
    assert all(np.array_equal(a, b) for a, b in zip(direct["text_tokens"], split["text_tokens"]))


def test_extract_shard_batching_does_not_change_features(tmp_path, synth_root, extractor):
    """Batches prepared in the background thread, many small ones or one big one: the same tables."""
    import pyarrow.parquet as pq

    samples = [s for s in load_samples("synthetic", synth_root, "synthetic")[0] if s.split == "val"]
    plan = plan_shards(samples, 40)[0]
    write_shard(plan, tmp_path / "shards")
    files = {}
    for batch_size in (3, 512):
        row = extract_shard(openclip, extractor, tmp_path / "shards" / plan.name, tmp_path / f"b{batch_size}", "s",
                            batch_size=batch_size, with_tokens=True)
        files[batch_size] = [tmp_path / f"b{batch_size}" / row[k] for k in ("images_file", "captions_file")]
    for small, big in zip(files[3], files[512]):
        a, b = pq.read_table(small), pq.read_table(big)
        assert a.column_names == b.column_names and a.num_rows == b.num_rows
        for name in a.column_names:
            kind = a.schema.field(name).type
            if pa.types.is_nested(kind) and pa.types.is_floating(kind.value_type):
                x = a.column(name).combine_chunks().flatten().to_numpy().astype(np.float32)
                y = b.column(name).combine_chunks().flatten().to_numpy().astype(np.float32)
                assert np.allclose(x, y, atol=2e-3), name  # float16 storage of float32 results
            else:
                assert a.column(name).equals(b.column(name)), name


def test_extract_shard_names_the_shard_when_an_image_cannot_be_decoded(tmp_path):
    import io
    import json
    import tarfile

    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for key, jpg in (("a", _jpeg()), ("b", b"not a jpeg")):
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", json.dumps({"captions": ["x"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"bad.tar: an image of a..b cannot be decoded"):
        extract_shard(openclip, None, path, tmp_path / "out", "s", batch_size=8, with_tokens=False)
    assert not (tmp_path / "out").exists()


def test_writer_actor_rows_carry_worker_and_peak_memory(tmp_path, synth_root):
    """The Ray Data actor class, called directly: one store row per shard, with the actor's id and peak RSS."""
    samples = [s for s in load_samples("synthetic", synth_root, "synthetic")[0] if s.split == "val"]
    plans = plan_shards(samples, 20)
    rows = [write_shard(plan, tmp_path / "shards")["row"] for plan in plans]
    writer = ShardFeatureWriter({"model": "itr-vit-micro-32", "precision": "fp32", "batch_size": 16,
                                 "store_tokens": False}, str(tmp_path / "store"), "run-1", threads=1)
    out = writer({"shard_path": np.array([str(tmp_path / "shards" / r["shard"]) for r in rows]),
                  "shard": np.array([r["shard"] for r in rows]), "split": np.array([r["split"] for r in rows]),
                  "sha256": np.array([r["sha256"] for r in rows])})
    assert out["shard"].tolist() == [r["shard"] for r in rows] and set(out["run_id"]) == {"run-1"}
    assert out["num_images"].tolist() == [20, 20] and out["num_captions"].tolist() == [100, 100]
    assert len(set(out["worker"])) == 1 and out["worker"][0].endswith(f":{os.getpid()}")
    assert (out["peak_rss_mb"] > 0).all() and out["peak_rss_mb"][1] >= out["peak_rss_mb"][0]
    assert all((tmp_path / "store" / f).is_file() for f in list(out["images_file"]) + list(out["captions_file"]))


def _jpeg() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("cpus, node_cpus, gpus, shards, num_gpus, per_actor, pool", [
    (2, 2, 0, 20, 0, 0, (2, 1)),  # a small machine: one actor per CPU
    (64, 16, 0, 40, 0, 0, (16, 4)),  # 4 nodes of 16: 4 actors of 4 threads per node
    (16, 16, 0, 2, 0, 0, (2, 8)),  # fewer shards than actors: the CPUs go to the ones there are
    (16, 16, 0, 20, 0, 1, (16, 1)),
    (16, 16, 0, 20, 0, 64, (1, 16)),
    (16, 16, 4, 20, 0.5, 0, (8, 2)),  # GPUs decide the count
    (16, 16, 4, 3, 1, 0, (3, 5)),
])
def test_actor_pool_shares_the_cluster(cpus, node_cpus, gpus, shards, num_gpus, per_actor, pool):
    from pipeline.features.extract import actor_pool

    assert actor_pool(cpus, node_cpus, gpus, shards, num_gpus, per_actor) == pool
