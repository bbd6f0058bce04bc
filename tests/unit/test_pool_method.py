"""The `pool` method on the contract: ragged regions and tokens from the store, or a fine-tuned tiny BERT in its
own parameter group, trained a few steps through the engine's `train_step` (no Ray)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.methods import create_method
from pipeline.nn.momentum import WHOLE
from pipeline.train.loop import epoch_batches, new_training_state, train_step
from tests.method_fixtures import ArraySplit, feature_inputs
from tests.text_fixtures import CAPTION_WORDS, write_tiny_bert

CPU = torch.device("cpu")


def region_split(n: int = 16, per: int = 2, seed: int = 0) -> ArraySplit:
    """n images with 1-4 regions of width 6 (a latent per image plus noise) and `per` captions each."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    regions = [(latent[i] + 0.3 * rng.normal(size=(int(rng.integers(1, 5)), 6))).astype(np.float16)
               for i in range(n)]
    tokens = [(latent[i // per] @ np.eye(6, 5) + 0.3 * rng.normal(size=(int(rng.integers(2, 6)), 5)))
              .astype(np.float16) for i in range(n * per)]
    texts = [" ".join(rng.choice(CAPTION_WORDS, size=5)) for _ in range(n * per)]
    return ArraySplit({"roi_feats": regions}, {"text_tokens": tokens}, np.repeat(np.arange(n), per), texts=texts)


def steps(method, inputs, epochs: int = 3, batch: int = 8) -> list[float]:
    tc = dataclasses.asdict(TrainConfig(epochs=epochs, batch_size=batch, lr=3e-3, warmup_steps=1))
    state, opt, sched = new_training_state(method, tc, inputs.num_captions // batch, CPU)
    losses = []
    for epoch in range(epochs):
        method.on_epoch_start(epoch, inputs, state)
        for rows in epoch_batches(inputs.num_captions, batch, 0, epoch, 0, 1):
            losses.append(train_step(method, method, state, opt, sched, inputs.batch(rows), tc, "fp32", CPU)["loss"])
    return losses, state, opt


def test_pool_on_stored_regions_and_tokens_learns_and_fills_its_queues():
    torch.manual_seed(0)
    split = region_split()
    method = create_method("pool", {"embed_dim": 8, "queue_size": 16, "max_regions": 3},
                           {"regions": 6, "tokens": 5})
    inputs = feature_inputs(type(method), method.args, split)
    batch = inputs.batch(np.arange(8))
    assert batch["regions"].shape[1] <= 3 and batch["regions"].dtype == torch.float16  # capped, store dtype
    losses, state, _ = steps(method, inputs, epochs=6)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert (state.queues["image"].ids >= 0).all() and set(state.queues) == {"image", "text"}


def test_pool_fine_tunes_a_local_bert_in_its_own_parameter_group(tmp_path):
    torch.manual_seed(0)
    folder = write_tiny_bert(tmp_path / "bert")
    method = create_method("pool", {"embed_dim": 8, "queue_size": 16, "text_encoder": str(folder),
                                    "text_lr_scale": 0.5}, {"regions": 6})
    assert [c.name for c in type(method).columns(method.args)] == ["roi_feats", "caption"]
    assert method.augment  # on by default with a trainable encoder
    inputs = feature_inputs(type(method), method.args, region_split())
    before = {k: v.clone() for k, v in method.text_encoder.state_dict().items()}
    losses, state, opt = steps(method, inputs, epochs=2)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"heads", "text_encoder"}
    assert groups["text_encoder"]["initial_lr"] == 0.5 * groups["heads"]["initial_lr"]
    assert any(not torch.equal(before[k], v) for k, v in method.text_encoder.state_dict().items())  # fine-tuned
    assert all(np.isfinite(losses))
    twin = state.ema[WHOLE].text_encoder  # the EMA key encoder holds its own copy of BERT
    assert twin is not method.text_encoder and not twin.model.embeddings.word_embeddings.weight.requires_grad
    method.eval()
    one = method.encode_text({"captions": ["red circle"]})
    two = method.encode_text({"captions": ["red circle", "a big blue square on the left"]})
    assert torch.allclose(one[0], two[0], atol=1e-5)  # padding does not change a caption's embedding
