"""hf extractor on tiny random CLIP, ALIGN, AltCLIP and GroupViT checkpoints built and saved offline here
(models, image processors and tokenizers made from in-test vocabularies: nothing comes from the hub)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import FeaturesConfig
from pipeline.data.sample import Sample
from pipeline.data.shard import plan_shards, write_shard
from pipeline.features import store
from pipeline.features.extract import extract_shard
from pipeline.features.extractors import get_extractor, hf
from tests.hf_checkpoints import MAX_LEN, WORDS

# per model type: embedding width E, image tokens (L, W), text width W
SHAPES = {"clip": (24, (16, 32), 32), "align": (32, (64, 32), 32), "altclip": (24, (16, 32), 20),
          "groupvit": (24, (4, 32), 32)}
TEXTS = ["a red circle", "a big blue square", "xyz, 42!",
         " ".join(["red"] * 40)]  # the last one is truncated


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoints) -> dict[str, str]:
    return hf_checkpoints


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[str, hf.HFExtractor]:
    return {t: hf.load(_cfg(p), torch.device("cpu")) for t, p in checkpoints.items()}


def _cfg(path: str, **kw) -> FeaturesConfig:
    return FeaturesConfig(extractor="hf", model=path, precision="fp32", batch_size=4, **kw)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("model_type", list(SHAPES))
def test_shapes_masks_and_pooling(loaded, model_type):
    ext = loaded[model_type]
    embed, (num_tokens, width), text_width = SHAPES[model_type]
    assert ext.model_type == model_type and not ext.model.training and ext.max_length == MAX_LEN
    out = hf.encode_images(ext, _images(3), with_tokens=True)
    assert out["image_embed"].shape == (3, embed) and out["image_pooled"].shape == (3, width)
    assert out["patch_tokens"].shape == (3, num_tokens, width)
    assert all(v.dtype == np.float32 for v in out.values())
    assert np.allclose(out["image_pooled"], out["patch_tokens"].mean(1), atol=1e-5)
    assert set(hf.encode_images(ext, _images(2), with_tokens=False)) == {"image_embed", "image_pooled"}
    if model_type == "align":  # no visual projection: the embedding is the mean of the feature map
        assert np.allclose(out["image_embed"], out["image_pooled"], atol=1e-5)

    texts = hf.encode_texts(ext, TEXTS, with_tokens=True)
    assert texts["text_embed"].shape == (4, embed) and texts["text_pooled"].shape == (4, text_width)
    mask = ext.tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_LEN)["attention_mask"]
    lengths = [int(sum(m)) for m in mask]
    assert [t.shape for t in texts["text_tokens"]] == [(n, text_width) for n in lengths]
    assert lengths[3] == MAX_LEN and lengths[0] < lengths[1] < MAX_LEN  # truncated; padding removed
    for pooled, tokens in zip(texts["text_pooled"], texts["text_tokens"]):
        assert tokens.dtype == np.float32 and np.allclose(pooled, tokens.mean(0), atol=1e-5)
    # a caption's features do not depend on the batch it is padded in
    alone = hf.encode_texts(ext, TEXTS[:1], with_tokens=True)
    assert np.allclose(alone["text_embed"][0], texts["text_embed"][0], atol=1e-5)
    assert np.allclose(alone["text_tokens"][0], texts["text_tokens"][0], atol=1e-5)


@pytest.mark.parametrize("model_type", list(SHAPES))
def test_two_loads_give_identical_outputs(checkpoints, loaded, model_type):
    again = hf.load(_cfg(checkpoints[model_type]), torch.device("cpu"))
    images = _images(2)
    a, b = hf.encode_images(loaded[model_type], images, True), hf.encode_images(again, images, True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    a, b = hf.encode_texts(loaded[model_type], TEXTS, True), hf.encode_texts(again, TEXTS, True)
    assert np.array_equal(a["text_embed"], b["text_embed"]) and np.array_equal(a["text_pooled"], b["text_pooled"])
    assert all(np.array_equal(x, y) for x, y in zip(a["text_tokens"], b["text_tokens"]))


@pytest.mark.parametrize("model_type", ["clip", "align"])
def test_features_returned_as_plain_tensors(monkeypatch, loaded, model_type):
    """transformers 4.x returns the projected tensor from get_*_features: the towers are then run for the tokens."""
    ext = loaded[model_type]
    images = _images(2)
    want_images, want_texts = hf.encode_images(ext, images, True), hf.encode_texts(ext, TEXTS, True)
    get_image, get_text = ext.model.get_image_features, ext.model.get_text_features
    monkeypatch.setattr(ext.model, "get_image_features", lambda **kw: get_image(**kw).pooler_output)
    monkeypatch.setattr(ext.model, "get_text_features", lambda **kw: get_text(**kw).pooler_output)
    got_images, got_texts = hf.encode_images(ext, images, True), hf.encode_texts(ext, TEXTS, True)
    assert all(np.allclose(got_images[k], want_images[k], atol=1e-6) for k in want_images)
    assert np.allclose(got_texts["text_pooled"], want_texts["text_pooled"], atol=1e-6)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(got_texts["text_tokens"], want_texts["text_tokens"]))


def test_bf16_autocast_stays_close_to_fp32(checkpoints, loaded):
    ext = hf.load(FeaturesConfig(extractor="hf", model=checkpoints["clip"], precision="bf16"), torch.device("cpu"))
    assert ext.precision == "bf16"
    a = hf.encode_texts(loaded["clip"], TEXTS, False)["text_embed"]
    b = hf.encode_texts(ext, TEXTS, False)["text_embed"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_describe_identifies_the_checkpoint(checkpoints):
    assert get_extractor("hf") is hf
    d = hf.describe(_cfg(checkpoints["align"]))
    assert d["extractor"] == "hf" and d["code_version"] == hf.CODE_VERSION and d["model_type"] == "align"
    assert d["model"] == checkpoints["align"] and d["store_tokens"] is True
    assert "model.safetensors" in d["files"] and "config.json" in d["files"]
    assert hf.describe(_cfg(checkpoints["align"], store_tokens=False)) != d
    assert json.dumps(d)  # goes into the fingerprint digest


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch, checkpoints, loaded):
    """A hub id is looked up in the HF cache layout (refs/main -> snapshots/<commit>/ -> blobs)."""
    import huggingface_hub

    repo = tmp_path / "hub" / "models--tiny--clip"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in sorted(Path(checkpoints["clip"]).iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    d = hf.describe(_cfg("tiny/clip"))
    assert d["model"] == str((repo / "snapshots" / commit).resolve()) and d["model_type"] == "clip"
    size = (repo / "blobs" / "blob-model.safetensors").stat().st_size
    assert d["files"]["model.safetensors"].startswith(f"{size}:")
    ext = hf.load(_cfg("tiny/clip"), torch.device("cpu"))
    a = hf.encode_texts(ext, TEXTS[:2], False)["text_embed"]
    assert np.array_equal(a, hf.encode_texts(loaded["clip"], TEXTS[:2], False)["text_embed"])


def test_clear_errors(tmp_path, checkpoints):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"features\.model: '/no/such/model' is neither a local model directory"):
        hf.load(_cfg("/no/such/model"), cpu)
    with pytest.raises(ValueError, match=r"features\.model: 'nobody/not-cached' is neither"):
        hf.describe(_cfg("nobody/not-cached"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=rf"features\.model: '{bert}' has model_type 'bert', not supported"):
        hf.load(_cfg(str(bert)), cpu)
    with pytest.raises(ValueError, match="has no readable config.json"):
        hf.describe(_cfg(str(tmp_path)))


@pytest.mark.parametrize("model_type", ["clip", "align"])
def test_extract_shard_with_hf_extractor(tmp_path, loaded, model_type):
    rng = np.random.default_rng(1)
    samples = []
    for i in range(6):
        buf = io.BytesIO()
        # JPEG: kept byte for byte in the shard, so the direct encoding below sees the same pixels
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        captions = [f"a {WORDS[i]} circle", "a red square", f"{WORDS[i]} on the left of {WORDS[-i]}"]
        samples.append(Sample(key=f"img{i:03d}", image=buf.getvalue(), captions=captions, split="test"))
    [plan] = plan_shards(samples, 10)
    write_shard(plan, tmp_path / "shards")
    row = extract_shard(hf, loaded[model_type], tmp_path / "shards" / plan.name, tmp_path / "store" / "test",
                        "shard-000000", batch_size=4, with_tokens=True)
    assert row["num_images"] == 6 and row["num_captions"] == 18
    manifest = pd.DataFrame([{
        "shard": plan.name, "split": "test", "images_file": f"test/{row['images_file']}",
        "captions_file": f"test/{row['captions_file']}"}])
    split = store.read_split(tmp_path / "store", manifest, "test", ("image_embed", "image_pooled", "patch_tokens"),
                             ("text_embed", "text_pooled"))
    embed, (num_tokens, width), _ = SHAPES[model_type]
    assert split.images["image_embed"].shape == (6, embed)
    assert split.images["patch_tokens"].shape == (6, num_tokens, width)
    assert split.captions["text_embed"].shape == (18, embed)
    captions = pq.read_table(tmp_path / "store" / "test" / row["captions_file"])
    tokenizer = loaded[model_type].tokenizer
    mask = tokenizer(captions.column("caption").to_pylist(), truncation=True)["attention_mask"]
    assert captions.column("text_len").to_pylist() == [len(m) for m in mask]  # per-token features, unpadded
    image = Image.open(io.BytesIO(samples[0].image)).convert("RGB")
    direct = hf.encode_images(loaded[model_type], [image], False)["image_embed"][0]
    assert np.allclose(split.images["image_embed"][0], direct, atol=2e-2)  # the store holds float16
