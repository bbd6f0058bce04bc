"""SCL (seed 003): the paper's literal loss against its formula and its degenerate minima, SupCon and the sign-fixed
loss on hand cases, the ridge map recovering a known linear map, and one step of each of the three stages on an
in-memory split (no Ray)."""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.methods import create_method, method_class
from pipeline.methods.scl import (
    SCL,
    intra_recall,
    label_groups,
    literal_chain_loss,
    ridge_map,
    signfix_loss,
    supcon_loss,
    unique_rows,
)
from pipeline.train.loop import new_training_state, phases_of, train_step
from tests.method_fixtures import ArraySplit, feature_inputs

CPU = torch.device("cpu")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- the literal loss (eq. 2/4)
def test_literal_loss_is_the_formula_over_consecutive_items_of_each_group():
    # groups in batch order 1, 0, 1, 0: chains (0 -> 2) for group 1 and (1 -> 3) for group 0
    f = t([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    g = torch.tensor([1, 0, 1, 0])
    group0 = abs(math.sqrt(2.0) + 0.0)  # |d([1,0],[0,1]) + [1,0].[0,1]|
    group1 = abs(math.sqrt(2.0) + 2.0)  # |d([2,0],[1,1]) + [2,0].[1,1]|
    assert float(literal_chain_loss(f, g)) == pytest.approx(group0 + group1)
    # a three-item chain sums two consecutive terms, not the three pairs
    f3 = t([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    chain = math.sqrt(2.0) + (1.0 + 2.0)
    assert float(literal_chain_loss(f3, torch.tensor([5, 5, 5]))) == pytest.approx(chain)


def test_literal_loss_minima_are_degenerate():
    # (a) no negatives: collapsed features give 0; (b) b = -a with |a| = 2 also gives 0
    assert float(literal_chain_loss(torch.zeros(3, 4), torch.tensor([0, 0, 1]))) == pytest.approx(0.0, abs=1e-5)
    assert float(literal_chain_loss(t([[2.0, 0.0], [-2.0, 0.0]]), torch.tensor([0, 0]))) == pytest.approx(0.0)
    # (c) unit vectors: f(c) = sqrt(2 - 2c) + c has minima 1 at c = +1 and c = -1 and a maximum 1.5 at c = 0.5
    for c, expected in ((1.0, 1.0), (-1.0, 1.0), (0.5, 1.5)):
        pair = t([[1.0, 0.0], [c, math.sqrt(max(0.0, 1 - c * c))]])
        assert float(literal_chain_loss(pair, torch.tensor([0, 0]))) == pytest.approx(expected, abs=1e-5)


def test_literal_loss_without_pairs_is_zero_and_backpropagates():
    f = torch.randn(3, 4, requires_grad=True)
    loss = literal_chain_loss(f, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(f.grad, torch.zeros(3, 4))


# ---------------------------------------------------------------- SupCon and the sign-fixed loss
def test_supcon_on_a_hand_case():
    # anchors 0 and 2 are positives of each other; anchor 1 has no positive and is left out (T = 1)
    z = t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    expected = -math.log(math.e / (1.0 + math.e))
    assert float(supcon_loss(z, torch.tensor([0, 1, 0]), 1.0)) == pytest.approx(expected)


def test_supcon_averages_the_log_probabilities_over_each_anchors_positives():
    z = F.normalize(t([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    groups, temp = torch.tensor([0, 0, 0, 1]), 0.5
    total, anchors = 0.0, 0
    for i in range(4):  # Khosla et al. 2020 eq. 2, written out
        positives = [p for p in range(4) if p != i and groups[p] == groups[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / temp) for a in range(4) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / temp) / denominator) for p in positives) / len(positives)
        anchors += 1
    assert float(supcon_loss(z, groups, temp)) == pytest.approx(total / anchors)


def test_signfix_is_monotone_in_the_cosine_and_hinges_negatives():
    pair = lambda c: t([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])  # noqa: E731
    values = [float(signfix_loss(pair(c), torch.tensor([0, 0]), 1.0)["loss"]) for c in (-1.0, 0.0, 0.5, 0.9, 1.0)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(-1.0, abs=1e-5)
    parts = signfix_loss(t([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), 1.5)
    assert float(parts["loss_neg"]) == pytest.approx(1.5 - math.sqrt(2.0)) and float(parts["loss_pos"]) == 0.0


# ---------------------------------------------------------------- the least-squares map
def test_ridge_map_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((300, 6)))
    w, b = torch.from_numpy(rng.standard_normal((4, 6))), torch.from_numpy(rng.standard_normal(4))
    y = x @ w.T + b
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solved = ridge_map(x1.T @ x1, y.T @ x1, 0.0)
    assert torch.allclose(solved[:, :-1], w, atol=1e-8) and torch.allclose(solved[:, -1], b, atol=1e-8)
    shrunk = ridge_map(x1.T @ x1, y.T @ x1, 1e3)  # the penalty shrinks W, not the bias
    assert shrunk[:, :-1].norm() < w.norm()


# ---------------------------------------------------------------- the stages on an in-memory split
def split(labels: bool = False) -> ArraySplit:
    rng = np.random.default_rng(1)
    images, captions = 12, 36
    s = ArraySplit({"image_embed": rng.standard_normal((images, 8)).astype(np.float16)},
                   {"text_embed": rng.standard_normal((captions, 8)).astype(np.float16)},
                   caption_image=np.repeat(np.arange(images), 3))
    if labels:
        s.labels = [["cat"] if i % 3 else ["dog", "car"] for i in range(images)]
    return s


DIMS = {"image_embed": 8, "text_embed": 8}
SMALL = {"embed_dim": 6, "hidden_dim": 16}


def one_step(method, data: ArraySplit, rows=np.arange(12)) -> dict:
    inputs = feature_inputs(type(method), method.args, data)
    method.prepare(inputs)
    tc = dataclasses.asdict(TrainConfig(batch_size=len(rows), warmup_steps=1))
    state, optimizer, scheduler = new_training_state(method, tc, 4, CPU)
    return train_step(method, method, state, optimizer, scheduler, inputs.batch(rows), tc, "fp32", CPU)


@pytest.mark.parametrize("loss", ["literal", "signfix", "supcon"])
def test_text_stage_steps_with_every_loss(loss, caplog):
    method = create_method("scl_text", {**SMALL, "loss": loss}, DIMS)
    with caplog.at_level(logging.WARNING, logger="pipeline.methods.scl"):
        parts = one_step(method, split())
    assert math.isfinite(parts["loss"])
    assert ("no negatives" in caplog.text) == (loss == "literal")
    assert [p.train for p in phases_of(method, {"epochs": 2, "lr": 1e-3})] == [["head"]]


def test_image_stage_sees_each_image_once_in_two_views():
    method = create_method("scl_image", SMALL, DIMS)
    inputs = feature_inputs(type(method), method.args, split())
    method.prepare(inputs)
    batch = inputs.batch(np.arange(9))  # captions of images 0, 1, 2
    out = method(batch)
    assert out["image"].shape == (6, 6)
    rows, first = unique_rows(batch["ids"])
    assert rows.tolist() == [0, 1, 2] and first.tolist() == [0, 3, 6]
    assert not torch.allclose(out["image"][:3], out["image"][3:])  # two different augmentations
    assert math.isfinite(one_step(method, split(), np.arange(9))["loss"])
    method.eval()
    assert torch.equal(method.encode_image(batch), method.encode_image(batch))  # no augmentation at eval


def test_label_groups_and_the_labels_mode():
    assert label_groups([["a"], ["b", "a"], [], ["a"], ["a", "b"]]).tolist() == [0, 1, 2 + 2, 0, 1]
    with pytest.raises(ValueError, match="needs a labelled set"):
        label_groups([[], []])
    method = create_method("scl_text", {**SMALL, "groups": "labels"}, DIMS)
    assert math.isfinite(one_step(method, split(labels=True))["loss"])
    assert method.groups_of(torch.tensor([0, 1, 2, 3])).tolist() == [0, 1, 1, 0]
    rebuilt = method_class("scl_text").from_checkpoint({"name": "scl_text", "args": dataclasses.asdict(method.args),
                                                        "dims": DIMS}, method.state_dict())
    assert torch.equal(rebuilt.image_group, method.image_group)  # kept in the checkpoint


def test_intra_recall_on_a_hand_case():
    z = F.normalize(t([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]]), dim=-1).float()
    groups = torch.tensor([0, 0, 1, 1, 0])
    # items 0-3 find a positive first; item 4's best positive (1) ties with negative 3 (mirror images): rank 1
    metrics = intra_recall(z, z, groups, groups, exclude_self=True)
    assert metrics["intra_R@1"] == pytest.approx(80.0) and metrics["intra_R@5"] == 100.0
    assert metrics["rsum"] == pytest.approx(280.0)


def test_intra_modal_validation_of_both_stages():
    data = split()
    text = create_method("scl_text", SMALL, DIMS)
    inputs = feature_inputs(type(text), text.args, data)
    text.prepare(inputs)
    assert set(text.val_metrics(inputs, CPU)) == {"intra_R@1", "intra_R@5", "intra_R@10", "rsum"}
    assert text.training  # mode restored
    image = create_method("scl_image", {**SMALL, "feature_dropout": 0.0, "noise_std": 0.0}, DIMS)
    image.prepare(inputs)
    assert image.val_metrics(inputs, CPU)["intra_R@1"] == 100.0  # identical views find themselves
    noisy = create_method("scl_image", {**SMALL, "noise_std": 1.0}, DIMS)
    noisy.prepare(inputs)
    rng = torch.get_rng_state()
    assert noisy.val_metrics(inputs, CPU) == noisy.val_metrics(inputs, CPU)  # the same views every time
    assert torch.equal(torch.get_rng_state(), rng)  # and the training RNG untouched


def trained_parts(data: ArraySplit) -> dict:
    parts = {}
    for key, name in (("text", "scl_text"), ("image", "scl_image")):
        parts[key] = create_method(name, SMALL, DIMS)
        parts[key].prepare(feature_inputs(type(parts[key]), parts[key].args, data))
    return parts


def test_requires_names_both_stages_with_their_own_training():
    args = create_method("scl", {"text": {"loss": "signfix"}, "image_train": {"epochs": 2}}, DIMS).args
    needs = SCL.requires(args)
    assert needs["text"][0] == "scl_text" and needs["text"][1]["loss"] == "signfix"
    assert needs["image"][0] == "scl_image" and needs["image"][2] == {"epochs": 2, "lr": 1e-3}


def test_literal_map_is_the_least_squares_solution_of_the_attached_encoders():
    data = split()
    method = create_method("scl", {"text": SMALL, "image": SMALL, "map_loss": "literal", "ridge": 0.0}, DIMS)
    parts = trained_parts(data)
    method.attach(parts)
    inputs = feature_inputs(SCL, method.args, data)
    method.prepare(inputs)
    with torch.no_grad():
        x = parts["image"].encode_image(inputs.images(data.caption_image)).double().numpy()
        y = parts["text"].encode_text(inputs.captions(np.arange(data.num_captions))).double().numpy()
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0].T
    assert np.allclose(method.image_map.weight.detach().numpy(), solution[:, :-1], atol=1e-4)
    assert np.allclose(method.image_map.bias.detach().numpy(), solution[:, -1], atol=1e-4)
    assert [(p.epochs, p.lr, p.train) for p in phases_of(method, {"epochs": 5, "lr": 1e-3})] == [
        (1, 0.0, ["image_map"])]  # one measuring epoch: the solution is not moved
    before = method.image_map.weight.detach().clone()
    parts_ = one_step(method, data)
    assert torch.equal(method.image_map.weight, before) and math.isfinite(parts_["loss"])


def test_infonce_map_trains_the_maps_and_the_temperature_only():
    data = split()
    method = create_method("scl", {"text": SMALL, "image": SMALL, "map_dim": 4}, DIMS)
    method.attach(trained_parts(data))
    frozen = {k: v.clone() for k, v in method.state_dict().items()
              if k.split(".")[0].endswith("_encoder") and torch.is_tensor(v)}
    parts = one_step(method, data)
    assert {"loss", "loss_i2t", "loss_t2i", "temperature"} <= set(parts)
    assert parts["temperature"] == pytest.approx(0.07, rel=0.05)
    assert all(torch.equal(method.state_dict()[k], v) for k, v in frozen.items())
    assert method.encode_image(feature_inputs(SCL, method.args, data).images(np.arange(3))).shape == (3, 4)


def test_bad_choices_name_the_argument():
    with pytest.raises(ValueError, match="train.method_args.loss: expected one of literal, signfix, supcon"):
        create_method("scl_text", {"loss": "triplet"}, DIMS)
    with pytest.raises(ValueError, match="map_loss"):
        create_method("scl", {"map_loss": "cca"}, DIMS)
