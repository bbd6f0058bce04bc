"""End-to-end mode without Ray: the open_clip method (shapes, frozen logit scale, the infonce queue loss), the
pair rows and collate on real tars, a few train steps that lower the loss on a fixed batch, and the
embedding of a split straight from its tars (what validation and eval use)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data import shard
from pipeline.data.sources import synthetic
from pipeline.methods.clip_finetune import ClipFineTuneArgs
from pipeline.nn.losses import queue_infonce
from pipeline.nn.momentum import WHOLE, MomentumState
from pipeline.train.end_to_end import (
    PairCollate,
    embed_shards,
    exactly,
    fit_end_to_end,
    load_clip,
    open_clip_state,
    shard_pairs,
)
from pipeline.train.loop import new_training_state, train_step

MODEL = "itr-vit-micro-32"  # embed_dim 64, 32 px, context length 32
CPU = torch.device("cpu")


def write_tiny_shards(root: Path) -> tuple[Path, pd.DataFrame]:
    """Returns (shard folder, manifest frame) of the synthetic 40/8/8 set at 32 px in tars of 16 images."""
    synthetic.generate(root / "synthetic", seed=0, num_train=40, num_val=8, num_test=8, image_size=32,
                       max_objects=2, progress=False)
    samples, rejected = synthetic.load_samples(root / "synthetic", "synthetic")
    assert not rejected
    rows = [shard.write_shard(plan, root / "shards")["row"] for plan in shard.plan_shards(samples, 16)]
    return root / "shards", pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the micro model's ops are too small to split, and two threads on a shared 2-core
    machine spin against each other (about 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    return write_tiny_shards(tmp_path_factory.mktemp("e2e"))


def numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """The numpy batch Ray Data hands a collate: object arrays for bytes and strings."""
    return {"jpg": np.array([r["jpg"] for r in rows], dtype=object),
            "caption": np.array([r["caption"] for r in rows], dtype=object),
            "image_id": np.array([r["image_id"] for r in rows], dtype=np.int64)}


def split_paths(tiny_shards, split: str) -> list[str]:
    shard_dir, manifest = tiny_shards
    return [str(shard_dir / name) for name in manifest[manifest["split"] == split]["shard"]]


def test_forward_gives_normalised_embeddings_and_the_loss_is_the_queue_infonce():
    method, _, tokenizer = load_clip(MODEL, None, CPU)
    assert method.embed_dim == 64 and method.training
    assert not method.clip.logit_scale.requires_grad  # unused by the fixed-temperature loss: a buffer, for DDP
    assert "logit_scale" not in dict(method.clip.named_parameters()) and "clip.logit_scale" in method.state_dict()
    batch = {"pixels": torch.randn(4, 3, 32, 32), "ids": torch.tensor([0, 0, 1, 2]),
             "tokens": tokenizer(["a red circle", "a circle in red", "a blue square", "two green crosses"])}
    assert batch["tokens"].shape == (4, 32)
    out = method(batch)
    for name in ("image", "text"):
        assert out[name].shape == (4, 64)
        assert torch.allclose(out[name].norm(dim=1), torch.ones(4), atol=1e-5)
    state = MomentumState(method, ema=(WHOLE,), queues={"image": 64, "text": 64}, queue_size=8)
    with torch.no_grad():
        keys = state.ema[WHOLE](batch)
    state.queues["image"].write(keys["image"], batch["ids"] + 10)
    state.queues["text"].write(keys["text"], batch["ids"] + 10)
    parts = method.loss(out, batch, state)
    want = queue_infonce(out["image"], out["text"], batch["ids"], 0.05, img_queue=state.queue("image"),
                         txt_queue=state.queue("text"))
    assert set(parts) == {"loss", "loss_i2t", "loss_t2i"}
    assert torch.allclose(parts["loss"], want["loss"])
    assert not torch.allclose(parts["loss"], method.loss(out, batch, None)["loss"])  # the queue counts


def test_pair_rows_and_collate_on_real_tars(tiny_shards):
    shard_dir, manifest = tiny_shards
    second = manifest[manifest["split"] == "train"].iloc[1]
    path = str(shard_dir / second["shard"])
    rows = shard_pairs({"path": path, "first_id": 16, "num_samples": int(second["num_samples"])})
    samples = shard.read_shard(path)
    assert len(rows) == second["num_captions"] == sum(len(s["json"]["captions"]) for s in samples)
    assert [r["caption"] for r in rows if r["image_id"] == 16] == samples[0]["json"]["captions"]
    assert {r["image_id"] for r in rows} == set(range(16, 16 + len(samples)))
    with pytest.raises(ValueError, match="manifest row says 99"):
        shard_pairs({"path": path, "first_id": 0, "num_samples": 99})

    _, preprocess, tokenizer = load_clip(MODEL, None, CPU)
    batch = PairCollate(preprocess, tokenizer)(numpy_batch(rows[:6]))
    assert batch["pixels"].shape == (6, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["tokens"].shape == (6, 32) and batch["tokens"].dtype == torch.long
    assert batch["ids"].tolist() == [r["image_id"] for r in rows[:6]]
    assert torch.equal(batch["tokens"][0], tokenizer([rows[0]["caption"]])[0])


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_shards):
    torch.manual_seed(0)
    method, preprocess, tokenizer = load_clip(MODEL, None, CPU, args=ClipFineTuneArgs(queue_size=32))
    rows = shard_pairs({"path": split_paths(tiny_shards, "train")[0], "first_id": 0, "num_samples": 16})
    batch = PairCollate(preprocess, tokenizer)(numpy_batch(rows[::2][:16]))  # 7 images, 2-3 captions each
    tc = dataclasses.asdict(TrainConfig(batch_size=16, lr=1e-3, warmup_steps=1, epochs=1))
    momentum, optimizer, scheduler = new_training_state(method, tc, 100, CPU)  # LR near its peak throughout

    def loss() -> float:
        with torch.no_grad():
            return method.loss(method(batch), batch, None)["loss"].item()

    before = loss()
    for _ in range(12):
        parts = train_step(method, method, momentum, optimizer, scheduler, batch, tc, "fp32", CPU)
        assert np.isfinite(parts["loss"])
    assert loss() < 0.5 * before  # 2.5 -> about 0.5 (chance level is about 1.9)
    assert bool((momentum.queues["image"].ids >= 0).all())  # 12 steps x 16 keys filled the queue of 32
    assert not torch.equal(momentum.ema[WHOLE].clip.visual.proj, method.clip.visual.proj)  # the EMA twin lags


def test_embed_shards_encodes_each_image_once_and_the_checkpoint_is_an_open_clip_one(tiny_shards, tmp_path):
    method, preprocess, tokenizer = load_clip(MODEL, None, CPU, seed=0)
    paths = split_paths(tiny_shards, "test")
    img, txt, caption_image, labels = embed_shards(method, preprocess, tokenizer, paths, CPU, batch_size=3)
    assert method.training  # mode restored
    assert img.shape == (8, 64) and txt.shape == (40, 64) and len(labels) == 8 and all(labels)
    assert caption_image.tolist() == np.repeat(np.arange(8), 5).tolist()
    samples = shard.read_shard(paths[0])
    method.eval()
    with torch.no_grad():
        one = method.encode_text({"tokens": tokenizer([samples[2]["json"]["captions"][4]])})
    assert torch.allclose(txt[2 * 5 + 4], one[0], atol=1e-5)

    torch.save(open_clip_state(method.state_dict()), tmp_path / "model.pt")
    reloaded, _, _ = load_clip(MODEL, str(tmp_path / "model.pt"), CPU, seed=1)  # seed 1 alone would differ
    again = embed_shards(reloaded, preprocess, tokenizer, paths, CPU)
    assert torch.allclose(again[0], img, atol=1e-5) and torch.allclose(again[1], txt, atol=1e-5)


def test_exactly_takes_the_steps_and_refuses_a_short_split():
    assert list(exactly(iter(range(5)), 3)) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="gave 2 batches, not the 3"):
        list(exactly(iter(range(2)), 3))


@pytest.mark.parametrize("change, match", [({"batch_size": 300}, "fewer than one global batch"),
                                           ({"batch_size": 45}, "multiple of train.num_workers")])
def test_fit_refuses_batches_that_cannot_run_before_starting_anything(tiny_shards, change, match):
    shard_dir, manifest = tiny_shards
    tc = dataclasses.asdict(TrainConfig(batch_size=40)) | change
    with pytest.raises(ValueError, match=match):
        fit_end_to_end(shard_dir, manifest, MODEL, None, tc, {}, {}, "unused", None, None, 2, False)
