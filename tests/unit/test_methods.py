"""Method registry and the InfoNCE head: standardisation, shapes, loss, and a short fit on separable data."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.eval.metrics import evaluate_embeddings
from pipeline.methods import METHODS, create_method
from pipeline.train.loop import epoch_batches, make_batch, new_training_state, train_step, warmup_cosine


def test_registry_and_unknown_name():
    assert "infonce" in METHODS
    with pytest.raises(ValueError, match="unknown method 'vsepp'"):
        create_method("vsepp")


def test_standardisation_removes_a_shared_offset():
    head = create_method("infonce", image_dim=4, text_dim=3, embed_dim=8, hidden_dim=16)
    img = torch.randn(100, 4) * 0.01 + 50.0  # a large common component, as random-init features have
    txt = torch.randn(100, 3) + 5.0
    head.set_standardization(img, txt)
    x = (img - head.image_mean) / head.image_std
    assert x.mean(0).abs().max() < 1e-3 and (x.std(0) - 1).abs().max() < 1e-3
    out = head({"image": img[:5], "text": txt[:5]})
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
    head = create_method(name, image_dim=10, text_dim=12, embed_dim=16, hidden_dim=32, **extra)
    head.set_standardization(torch.from_numpy(split["image"]).float(), torch.from_numpy(split["text"]).float())
    tc = dataclasses.asdict(TrainConfig(epochs=40, batch_size=32, lr=3e-3, warmup_steps=4, queue_size=64, embed_dim=16))
    cpu = torch.device("cpu")
    state, opt, scheduler = new_training_state(head, tc, (n * per) // 32, cpu)

    def metrics():
        with torch.no_grad():
            return evaluate_embeddings(head.encode_image({"image": torch.from_numpy(split["image"])}),
                                       head.encode_text({"text": torch.from_numpy(split["text"])}),
                                       split["caption_image"])

    before = metrics()["rsum"]
    for epoch in range(40):
        for rows in epoch_batches(n * per, 32, 0, epoch, 0, 1):
            parts = train_step(head, head, state, opt, scheduler, make_batch(split, rows, cpu), tc, "fp32", cpu)
    after = metrics()
    assert set(parts) == {"loss", "loss_i2t", "loss_t2i", "queue_gather_seconds"}
    assert int(state.image_queue.ptr) == 0 and (state.image_queue.ids >= 0).all()  # filled, wrapped around
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
