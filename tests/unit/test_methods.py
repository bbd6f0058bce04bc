"""Method registry and the InfoNCE head: standardisation, shapes, loss, and a short fit on separable data."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.eval.metrics import evaluate_embeddings
from pipeline.methods import METHODS, create_method
from pipeline.train.inputs import embed_inputs
from pipeline.train.loop import epoch_batches, new_training_state, train_step, warmup_cosine
from tests.method_fixtures import ArraySplit, feature_inputs

DIMS = {"image_embed": 4, "image_pooled": 6, "text_embed": 5, "text_pooled": 7}


def head_split(image: np.ndarray, text: np.ndarray, caption_image: np.ndarray) -> ArraySplit:
    """Puts (N, 10) image and (M, 12) text features in the heads' four columns."""
    return ArraySplit({"image_embed": image[:, :4], "image_pooled": image[:, 4:]},
                      {"text_embed": text[:, :5], "text_pooled": text[:, 5:]}, caption_image)


def test_registry_and_unknown_name():
    assert "infonce" in METHODS and {"infonce", "vse", "clip_finetune"} <= set(METHODS.names())
    with pytest.raises(ValueError, match="unknown method 'vsepp'"):
        create_method("vsepp")


def test_unknown_or_mistyped_method_argument_is_named():
    with pytest.raises(ValueError, match="unknown config key train.method_args.temprature"):
        create_method("infonce", {"temprature": 0.1}, DIMS)
    with pytest.raises(ValueError, match="train.method_args.margin: expected a number"):
        create_method("vse", {"margin": "wide"}, DIMS)
    with pytest.raises(ValueError, match="unknown config key train.method_args.margin"):
        create_method("infonce", {"margin": 0.2}, DIMS)  # another method's argument


def test_standardisation_removes_a_shared_offset():
    head = create_method("infonce", {"embed_dim": 8, "hidden_dim": 16}, DIMS)
    img = np.random.randn(100, 10) * 0.01 + 50.0  # a large common component, as random-init features have
    txt = np.random.randn(100, 12) + 5.0
    inputs = feature_inputs(type(head), head.args, head_split(img, txt, np.arange(100)))
    head.prepare(inputs)
    x = (torch.from_numpy(img).float() - head.image_mean) / head.image_std
    assert x.mean(0).abs().max() < 1e-3 and (x.std(0) - 1).abs().max() < 1e-3
    out = head(inputs.batch(np.arange(5)))
    assert out["image"].shape == (5, 8) and torch.allclose(out["image"].norm(dim=1), torch.ones(5))
    assert head.score(out["image"], out["text"]).shape == (5, 5)


@pytest.mark.parametrize("name, extra", [("infonce", {"temperature": 0.1}), ("vse", {"margin": 0.2}),
                                         ("infonce", {"temperature": 0.1, "distill_alpha": 0.4})])
def test_head_learns_a_noisy_pairing_with_queue(name, extra):
    torch.manual_seed(0)
    n, per = 64, 2
    latent = torch.randn(n, 6)
    split = {"image": (latent @ torch.randn(6, 10)).numpy().astype(np.float16),
             "text": (latent.repeat_interleave(per, 0) @ torch.randn(6, 12)
                      + 0.1 * torch.randn(n * per, 12)).numpy().astype(np.float16),
             "caption_image": np.repeat(np.arange(n), per)}
    args = {"embed_dim": 16, "hidden_dim": 32, **extra} | ({"queue_size": 64} if name == "infonce" else {})
    head = create_method(name, args, DIMS)
    inputs = feature_inputs(type(head), head.args, head_split(split["image"], split["text"], split["caption_image"]))
    head.prepare(inputs)
    tc = dataclasses.asdict(TrainConfig(epochs=40, batch_size=32, lr=3e-3, warmup_steps=4))
    cpu = torch.device("cpu")
    state, opt, scheduler = new_training_state(head, tc, (n * per) // 32, cpu)

    def metrics():
        return evaluate_embeddings(*embed_inputs(head, inputs, cpu), split["caption_image"])

    before = metrics()["rsum"]
    for epoch in range(40):
        for rows in epoch_batches(n * per, 32, 0, epoch, 0, 1):
            parts = train_step(head, head, state, opt, scheduler, inputs.batch(rows), tc, "fp32", cpu)
    after = metrics()
    if name == "infonce":
        assert set(parts) == {"loss", "loss_i2t", "loss_t2i", "queue_gather_seconds"}
        queue = state.queues["image"]
        assert int(queue.ptr) == 0 and (queue.ids >= 0).all()  # filled, wrapped around
    else:
        assert set(parts) == {"loss", "loss_i2t", "loss_t2i"} and not state.queues  # VSE++ owns no momentum state
    assert after["rsum"] > before + 150 and after["t2i_R@1"] > 60


def test_epoch_batches_do_not_depend_on_the_worker_count():
    one = epoch_batches(10, 4, seed=1, epoch=0, rank=0, world=1)
    two = [epoch_batches(10, 4, 1, 0, rank, 2) for rank in (0, 1)]
    assert len(one) == 2 and all(len(b) == 4 for b in one)  # the last partial batch is dropped
    assert [np.concatenate([two[0][i], two[1][i]]).tolist() for i in range(2)] == [b.tolist() for b in one]
    assert [b.tolist() for b in one] != [b.tolist() for b in epoch_batches(10, 4, 1, 1, 0, 1)]


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)


def test_a_listed_method_that_is_not_implemented_says_so():
    from pipeline.methods import METHODS, implemented, method_class

    assert {"user", "tgdt", "coder", "scl"} <= set(METHODS.names())  # every seed method is listed by name
    assert {"infonce", "vse", "pool", "clip_finetune"} <= set(implemented())
    for name in set(METHODS.names()) - set(implemented()):
        with pytest.raises(ValueError, match=f"train.method: '{name}' is not implemented yet"):
            method_class(name)


def test_step_decay_schedule():
    from pipeline.train.loop import warmup_step_decay

    f = warmup_step_decay(2, [10, 20], 0.1)
    assert f(0) == pytest.approx(0.5) and f(5) == 1.0 and f(10) == pytest.approx(0.1) and f(25) == pytest.approx(0.01)
