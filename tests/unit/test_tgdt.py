"""TGDT (`pipeline/methods/tgdt.py`): the local score and the three CMC loss terms on hand cases, padding masks that
make an embedding independent of its batch, the phases (what each trains, which loss terms it gets), the batched
rerank against a per-pair loop, and the engine's two-stage eval through it: a query whose positive is outside its
candidates is a miss, never a hit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import EvalConfig, RerankConfig, TrainConfig
from pipeline.methods import create_method, method_class
from pipeline.methods.base import parse_args
from pipeline.nn.losses import hardest_negative_hinge, intra_modal_consistency
from pipeline.nn.matching import grouped_local_scores, local_score_matrix
from pipeline.train.inputs import embed_inputs
from pipeline.train.loop import apply_phase, new_optimizer, phases_of, train_step
from tests.method_fixtures import ArraySplit, feature_inputs

SMALL = {"embed_dim": 16, "ffn_dim": 32, "region_layers": 1, "lower_layers": 1, "top_layers": 1, "max_regions": 4,
         "max_tokens": 8, "dropout": 0.0}
DIMS = {"regions": 8, "boxes": 4, "tokens": 6}


def synthetic_split(num_images: int = 12, seed: int = 0) -> ArraySplit:
    """Ragged regions (0..3 per image, with boxes) and stored tokens (2..8 per caption), 2 captions per image."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, num_images)
    counts[0] = 3
    boxes = [np.sort(rng.random((n, 2, 2)), 1).transpose(0, 2, 1).reshape(n, 4).astype(np.float32) for n in counts]
    return ArraySplit({"roi_feats": [rng.standard_normal((n, 8)).astype(np.float16) for n in counts],
                       "roi_boxes": boxes},
                      {"text_tokens": [rng.standard_normal((n, 6)).astype(np.float16)
                                       for n in rng.integers(2, 9, 2 * num_images)]},
                      caption_image=np.repeat(np.arange(num_images), 2))


def small_method(**extra):
    torch.manual_seed(0)
    return create_method("tgdt", {**SMALL, **extra}, DIMS)


# ---------------------------------------------------------------- the local score and the loss terms
def test_local_score_hand_case_masks_and_pools():
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    regions = torch.tensor([[e0, e1], [e0, [9.0, 9.0]]])  # image 1's second region is padding
    region_mask = torch.tensor([[True, True], [True, False]])
    words = torch.tensor([[e0, e1, [5.0, 5.0]], [e1, [-1.0, 0.0], [7.0, 7.0]]])
    word_mask = torch.tensor([[True, True, False], [True, True, False]])
    s = local_score_matrix(regions, region_mask, words, word_mask)
    # caption 0 = (e0, e1): both words find a perfect region in image 0 (2), only e0 in image 1 (1 + 0);
    # caption 1 = (e1, -e0): image 0 gives 1 + 0 (the best region of -e0 is e1, cosine 0), image 1 gives 0 - 1
    assert torch.allclose(s, torch.tensor([[2.0, 1.0], [1.0, -1.0]]))
    mean = local_score_matrix(regions, region_mask, words, word_mask, pool="mean")
    assert torch.allclose(mean, s / 2)
    empty = local_score_matrix(regions, torch.zeros(2, 2, dtype=torch.bool), words, word_mask)
    assert torch.equal(empty, torch.zeros(2, 2))  # an image without regions scores 0, not -inf
    # grouped: each group scores its own pairs, the same numbers as the full matrix
    grouped = grouped_local_scores(regions[:, None], region_mask[:, None], words[:, None], word_mask[:, None])
    assert torch.allclose(grouped[:, 0, 0], s.diagonal())


def test_hinge_and_intra_modal_consistency_hand_cases():
    s = torch.tensor([[0.5, 0.6], [0.2, 0.9]])
    parts = hardest_negative_hinge(s, torch.tensor([0, 1]), margin=0.2)
    # i2t: row 0: .2 + .6 - .5 = .3, row 1: .2 + .2 - .9 < 0; t2i: columns .2 + .2 - .5 < 0 and .2 + .6 - .9 < 0
    assert parts["loss_i2t"].item() == pytest.approx(0.15) and parts["loss_t2i"].item() == pytest.approx(0.0)
    assert hardest_negative_hinge(s, torch.tensor([3, 3]), margin=0.2)["loss"].item() == 0.0  # same image
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # A = I
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # C = [[1, .6], [.6, 1]]
    assert intra_modal_consistency(img, txt, 0.3).item() == pytest.approx(0.3)  # [.6 - .3]_+ per column
    assert intra_modal_consistency(img, txt, 0.7).item() == 0.0


def hand_outputs() -> dict:
    """A batch of 2 pairs whose every term is known: local S = 10 x [[2, 1], [1, 1]], global and intra as in
    `test_hinge_and_intra_modal_consistency_hand_cases`."""
    e0, e1, z = [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]
    regions = torch.tensor([[e0, e1], [e0, z]])
    words = torch.tensor([[e0, e1], [e0, z]])
    masks = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return {"image_lower": regions, "image_top": regions, "text_lower": words, "text_top": words,
            "image_mask": masks, "text_mask": masks, "image": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            "text": torch.tensor([[1.0, 0.0], [0.6, 0.8]])}


def test_loss_terms_follow_the_phase():
    method = small_method()
    cpu_tc = dataclasses.asdict(TrainConfig(epochs=4))
    local, cmc = phases_of(method, cpu_tc)
    assert (local.name, local.epochs, local.train) == ("local", 2, ["image_lower", "text_lower"])
    assert (cmc.name, cmc.epochs, cmc.train) == ("cmc", 2, ["image_top", "text_top"])
    batch = {"ids": torch.tensor([0, 1])}
    # local S = 10 x [[2, 1], [1, 1]]: i2t row 1 violates by .2 + 10 - 10, t2i column 1 by .2 + 10 - 10
    apply_phase(method, local)
    parts = method.loss(hand_outputs(), batch, None)
    assert set(parts) == {"loss", "loss_local_lower"}
    assert parts["loss"].item() == pytest.approx(0.2)
    apply_phase(method, cmc)
    parts = method.loss(hand_outputs(), batch, None)
    assert set(parts) == {"loss", "loss_global", "loss_intra", "loss_local"}
    # global: cosines [[1, .6], [0, .8]]: i2t row 0 .2 + .6 - 1 < 0, row 1 .2 + 0 - .8 < 0; t2i column 0
    # .2 + 0 - 1 < 0, column 1 .2 + .6 - .8 = 0 -> 0; intra .3; local .2
    assert parts["loss_global"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["loss_intra"].item() == pytest.approx(0.3) and parts["loss_local"].item() == pytest.approx(0.2)
    weighted = create_method("tgdt", {**SMALL, "intra_weight": 2.0, "local_weight": 0.5}, DIMS)
    apply_phase(weighted, cmc)
    assert weighted.loss(hand_outputs(), batch, None)["loss"].item() == pytest.approx(2 * 0.3 + 0.5 * 0.2)
    joint = small_method(schedule="joint")
    assert [(p.name, p.train) for p in phases_of(joint, cpu_tc)] == [("joint", ["*"])]
    assert set(joint.loss(hand_outputs(), batch, None)) == {"loss", "loss_local_lower", "loss_global", "loss_intra",
                                                            "loss_local"}


def test_the_hinges_sum_over_the_negatives_in_each_parts_first_epochs():
    """The warm-up: the first `mean_negative_epochs` epochs that train a part (counted in checkpointed buffers) sum
    its hinges over all negatives, later ones take the hardest."""
    from pipeline.nn.losses import hardest_negative_triplet

    method = small_method(mean_negative_epochs=1)
    local, cmc = phases_of(method, dataclasses.asdict(TrainConfig(epochs=4)))
    torch.manual_seed(1)
    unit = [torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1) for _ in range(2)]
    glob = [torch.nn.functional.normalize(torch.randn(3, 4), dim=-1) * 0.3 + 0.7 for _ in range(2)]
    glob = [torch.nn.functional.normalize(g, dim=-1) for g in glob]  # close together: several violations a row
    out = {"image_lower": unit[0], "image_top": unit[0], "text_lower": unit[1], "text_top": unit[1],
           "image_mask": torch.ones(3, 2), "text_mask": torch.ones(3, 2), "image": glob[0], "text": glob[1]}
    batch = {"ids": torch.tensor([0, 1, 2])}
    apply_phase(method, local)
    method.on_epoch_start(0, None, None)
    assert (int(method.lower_epochs), int(method.top_epochs)) == (1, 0)
    local_sum = method.loss(out, batch, None)["loss_local_lower"]
    method.on_epoch_start(1, None, None)
    assert method.loss(out, batch, None)["loss_local_lower"] < local_sum  # the hardest negative only
    apply_phase(method, cmc)
    method.on_epoch_start(2, None, None)
    summed = hardest_negative_triplet(glob[0], glob[1], batch["ids"], 0.2, hardest=False)["loss"]
    hardest = hardest_negative_triplet(glob[0], glob[1], batch["ids"], 0.2)["loss"]
    assert summed > hardest > 0
    assert method.loss(out, batch, None)["loss_global"].item() == pytest.approx(summed.item())
    method.on_epoch_start(3, None, None)
    assert method.loss(out, batch, None)["loss_global"].item() == pytest.approx(hardest.item())
    assert int(method.state_dict()["top_epochs"]) == 2  # in every checkpoint: a resumed run warms up alike
    with pytest.raises(ValueError, match="mean_negative_epochs: must be >= 0"):
        parse_args(method_class("tgdt"), {"mean_negative_epochs": -1})


def test_arguments_and_phase_split_are_checked():
    cls = method_class("tgdt")
    with pytest.raises(ValueError, match="rerank_tokens: expected one of lower, top"):
        parse_args(cls, {"rerank_tokens": "middle"})
    with pytest.raises(ValueError, match="embed_dim: 30 is not a multiple of heads"):
        parse_args(cls, {"embed_dim": 30})
    with pytest.raises(ValueError, match="cannot be split"):
        small_method().default_phases(1, 1e-3)
    assert [p.epochs for p in small_method(local_epochs=3).default_phases(5, 1e-3)] == [3, 2]


# ---------------------------------------------------------------- masks
def test_an_embedding_does_not_depend_on_its_batch():
    split = synthetic_split()
    method = small_method().eval()
    inputs = feature_inputs(type(method), method.args, split)
    lengths = [len(t) for t in split.tables["captions"]["text_tokens"]]
    short = int(np.argmin(lengths))
    alone = method.encode_text(inputs.captions(np.array([short])))
    padded = inputs.captions(np.array([short, int(np.argmax(lengths))]))
    assert padded["token_mask"][0].sum() < padded["token_mask"].shape[1]  # the short caption is padded
    assert torch.allclose(method.encode_text(padded)[0], alone[0], atol=1e-5)
    few = int(np.argmin([len(r) for r in split.tables["images"]["roi_feats"]]))
    alone = method.encode_image(inputs.images(np.array([few])))
    assert torch.allclose(method.encode_image(inputs.images(np.array([few, 0])))[0], alone[0], atol=1e-5)
    tokens = method.text_tokens(padded)
    assert tokens["mask"][0].sum() == lengths[short] - 2  # words only: first and last real tokens excluded


# ---------------------------------------------------------------- training steps
def test_each_phase_trains_only_its_modules():
    split = synthetic_split()
    method = small_method()
    inputs = feature_inputs(type(method), method.args, split)
    tc = dataclasses.asdict(TrainConfig(batch_size=8, warmup_steps=0, epochs=2, lr=1e-2))
    cpu = torch.device("cpu")
    state = method.new_state()
    for phase, changed, kept in zip(phases_of(method, tc), (("image_lower", "text_lower"), ("image_top", "text_top")),
                                    (("image_top", "text_top"), ("image_lower", "text_lower"))):
        apply_phase(method, phase)
        optimizer, scheduler = new_optimizer(method, phase, tc, 1)
        before = {k: v.clone() for k, v in method.state_dict().items()}
        parts = train_step(method, method, state, optimizer, scheduler, inputs.batch(np.arange(8)), tc, "fp32", cpu)
        assert np.isfinite(parts["loss"])
        after = method.state_dict()
        for name in changed:
            assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(name + ".")), name
        for name in kept:
            assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(name + ".")), name


def test_a_local_bert_text_branch_in_its_own_parameter_group(tmp_path):
    from tests.text_fixtures import write_tiny_bert

    bert = write_tiny_bert(tmp_path / "bert", layers=2)
    method = small_method(text_encoder=str(bert), text_layers=1, text_lr_scale=0.5)
    assert method.text_lower.encoder.num_layers == 1
    assert [c.kind for c in type(method).columns(method.args)] == ["ragged", "ragged", "text"]
    phase = phases_of(method, dataclasses.asdict(TrainConfig(epochs=2, lr=1e-3)))[0]
    apply_phase(method, phase)
    groups = {g["name"]: g["lr"] for g in method.param_groups(phase)}
    assert groups == {"local": 1e-3, "text_encoder": 5e-4}
    method.eval()
    captions = {"captions": ["a dog", "a cat sits with a man in the grass"]}
    both = method.text_tokens(captions)
    alone = method.text_tokens({"captions": ["a dog"]})
    assert torch.allclose(both["glob"][0], alone["glob"][0], atol=1e-5)
    assert both["mask"][0].sum() == 2  # "a dog": [CLS] and [SEP] are no words


# ---------------------------------------------------------------- two-stage inference
def reference_scores(method, inputs, direction: str, query_rows, candidates) -> torch.Tensor:
    """The rerank score pair by pair, from the method's own encoders (no cache, no batching)."""
    method.eval()
    out = torch.empty(candidates.shape)
    key = method.args.rerank_tokens
    with torch.no_grad():
        images = [method.image_tokens(inputs.images(np.array([r]))) for r in range(inputs.num_images)]
        captions = [method.text_tokens(inputs.captions(np.array([r]))) for r in range(inputs.num_captions)]
        for i, q in enumerate(query_rows.tolist()):
            for j, c in enumerate(candidates[i].tolist()):
                img, cap = (images[q], captions[c]) if direction == "i2t" else (images[c], captions[q])
                local = local_score_matrix(img[key], img["mask"], cap[key], cap["mask"], method.args.local_pool)
                out[i, j] = (method.args.local_scale * local[0, 0]
                             + method.args.rerank_global_weight * (img["glob"] @ cap["glob"].T)[0, 0])
    return out


@pytest.mark.parametrize("tokens", ["lower", "top"])
def test_rerank_matches_a_pair_by_pair_loop_in_any_blocking(monkeypatch, tokens):
    import pipeline.methods.tgdt as tgdt

    split = synthetic_split()
    method = small_method(rerank_tokens=tokens, rerank_global_weight=0.5)
    inputs = feature_inputs(type(method), method.args, split)
    g = torch.Generator().manual_seed(0)
    for direction, gallery in (("i2t", split.num_captions), ("t2i", split.num_images)):
        rows = torch.arange(5)
        candidates = torch.stack([torch.randperm(gallery, generator=g)[:6] for _ in rows])
        want = reference_scores(method, inputs, direction, rows, candidates)
        assert torch.allclose(method.rerank(inputs, direction, rows, candidates), want, atol=2e-2)
        for budget in (1, 200):  # one candidate per block; a few candidates of one query per block
            monkeypatch.setattr(tgdt, "RERANK_BLOCK_ELEMENTS", budget)
            assert torch.allclose(method.rerank(inputs, direction, rows, candidates), want, atol=2e-2)
        monkeypatch.undo()
    method.train()
    assert method._rerank_cache is None  # training again drops the encoded tokens


def test_a_positive_outside_the_candidates_is_a_miss_never_a_hit():
    from pipeline.stages.eval import two_stage_eval

    split = synthetic_split(num_images=20)
    method = small_method()
    inputs = feature_inputs(type(method), method.args, split)
    img, txt = embed_inputs(method, inputs, torch.device("cpu"))
    ec = EvalConfig(rerank_k=RerankConfig(i2t=2, t2i=2))
    metrics, (i2t, t2i) = two_stage_eval(method, inputs, img, txt, ec)
    order_i2t = torch.sort(img @ txt.T, dim=1, descending=True, stable=True).indices[:, :2]
    order_t2i = torch.sort(txt @ img.T, dim=1, descending=True, stable=True).indices[:, :2]
    owner = torch.as_tensor(split.caption_image)
    found_i2t = (owner[order_i2t] == torch.arange(len(img))[:, None]).any(1).numpy()
    found_t2i = (order_t2i == owner[:, None]).any(1).numpy()
    assert (~found_i2t).any() and (~found_t2i).any()  # the case under test happens
    assert (i2t[~found_i2t] == split.num_captions).all() and (t2i[~found_t2i] == split.num_images).all()
    assert (i2t[found_i2t] < 2).all() and (t2i[found_t2i] < 2).all()
    for direction, found in (("i2t", found_i2t), ("t2i", found_t2i)):
        recall = 100.0 * found.mean()
        assert metrics[f"{direction}_candidate_recall"] == pytest.approx(recall)
        assert all(metrics[f"{direction}_R@{k}"] <= recall + 1e-9 for k in (1, 5, 10))
        assert metrics[f"{direction}_R@10"] == pytest.approx(recall)  # every found one ranks < 2 <= 10


def test_the_full_local_row_ranks_every_pair_by_the_rerank_score():
    """`eval.full_rerank`: two-stage eval with every gallery item a candidate is the ranking by S_final itself: a
    query's rank = the negatives scoring at least its best positive."""
    from pipeline.eval.metrics import recall_metrics
    from pipeline.stages.eval import two_stage_eval

    split = synthetic_split(num_images=8)
    method = small_method()
    inputs = feature_inputs(type(method), method.args, split)
    img, txt = embed_inputs(method, inputs, torch.device("cpu"))
    n, m = split.num_images, split.num_captions
    metrics, (i2t, t2i) = two_stage_eval(method, inputs, img, txt, EvalConfig(rerank_k=RerankConfig(i2t=m, t2i=n)))
    is_pos = torch.as_tensor(split.caption_image)[None, :] == torch.arange(n)[:, None]  # (images, captions)
    for direction, ranks, pos in (("i2t", i2t, is_pos), ("t2i", t2i, is_pos.T)):
        queries, gallery = pos.shape
        s = method.rerank(inputs, direction, torch.arange(queries), torch.arange(gallery).expand(queries, -1))
        best = s.masked_fill(~pos, float("-inf")).max(1, keepdim=True).values
        assert np.array_equal(ranks, ((s >= best) & ~pos).sum(1).numpy()), direction
        assert metrics[f"{direction}_candidate_recall"] == 100.0
    assert metrics["rsum"] == pytest.approx(recall_metrics(i2t, t2i)["rsum"])


@pytest.mark.parametrize("name", ["tgdt-synth", "tgdt-coco", "tgdt-f30k"])
def test_the_configs_load_and_name_real_modules(name):
    from pathlib import Path

    from pipeline.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "jobs" / "configs" / f"{name}.yaml")
    args = parse_args(method_class("tgdt"), cfg.train.method_args)
    assert cfg.train.method == "tgdt" and args.margin == 0.2 and args.intra_margin == 0.3
    assert [set(p.train) for p in cfg.train.phases] == [{"image_lower", "text_lower"}, {"image_top", "text_top"}]
    if name != "tgdt-synth":  # the reference's optimisation (METHODS.md 2.4)
        assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-5, 0.0, 2.0)
        assert cfg.train.lr_schedule == "step" and cfg.train.lr_milestones == [20, 40]
        assert cfg.train.batch_size == (40 if name == "tgdt-coco" else 30) and args.embed_dim == 1024
