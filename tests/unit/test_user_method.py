"""USER (`pipeline/methods/user.py`) and its building blocks: GPO and SGE against hand-computed cases, UTO's value
and gradient on a hand case (queue term included), the guide modes, masking (any region count), exact resume of
the dropout / EMA / queue state, the fine-tuned text encoder's parameter group. No Ray."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig, load_config
from pipeline.methods import create_method
from pipeline.methods.base import parse_args
from pipeline.nn.encoders import MaskedBatchNorm1d, RegionEncoder, SelfGuide
from pipeline.nn.gpo import GPO, positional_encoding
from pipeline.nn.uto import uto_loss
from pipeline.train.loop import epoch_batches, new_training_state, train_step
from tests.method_fixtures import ArraySplit, feature_inputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these ops are too small to split, and two threads on a shared 2-core machine spin
    against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- GPO
def test_positional_code_is_the_sinusoid():
    pe = positional_encoding(3, 4)
    assert pe[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert pe[2, 0].item() == pytest.approx(math.sin(2)) and pe[2, 1].item() == pytest.approx(math.cos(2))
    assert pe[2, 2].item() == pytest.approx(math.sin(2 / 100)) and pe[2, 3].item() == pytest.approx(math.cos(2 / 100))


def constant_gru_gpo(c: float) -> GPO:
    """A GPO whose GRU has zero weights and input bias c on the candidate gate only, and whose score averages
    the hidden units: then r = z = 1/2, n = tanh(c), h_t = tanh(c) / 2 + h_{t-1} / 2, whatever the positional code."""
    gpo = GPO(pe_dim=4, hidden_dim=2)
    with torch.no_grad():
        for p in gpo.gru.parameters():
            p.zero_()
        gpo.gru.bias_ih_l0[4:] = c  # [b_ir | b_iz | b_in], hidden 2
        gpo.gru.bias_ih_l0_reverse[4:] = c
        gpo.linear.weight.fill_(0.5)
    return gpo


def test_gpo_sorts_each_dimension_and_weights_positions_by_the_gru_hand_case():
    c = 0.5
    k = math.tanh(c)
    n = 3  # forward h_t = k (1 - 2^-t), backward h_t = k (1 - 2^-(n-t+1)), t = 1..n; averaged
    scores = [k * (1 - (0.5 ** t + 0.5 ** (n - t + 1)) / 2) for t in range(1, n + 1)]
    e = [math.exp(s / 0.1) for s in scores]
    theta = [x / sum(e) for x in e]
    x = torch.tensor([[[1.0, -2.0], [3.0, 5.0], [2.0, 0.0], [99.0, 99.0]]])  # the 4th row is padding
    mask = torch.tensor([[True, True, True, False]])
    ranked = [[3.0, 2.0, 1.0], [5.0, 0.0, -2.0]]  # each dimension sorted, descending, over the real rows
    want = [sum(t * v for t, v in zip(theta, col)) for col in ranked]
    gpo = constant_gru_gpo(c)
    assert gpo.position_weights(torch.tensor([3]), 4)[0].tolist() == pytest.approx(theta + [0.0], abs=1e-6)
    assert gpo(x, mask)[0].tolist() == pytest.approx(want, abs=1e-5)


def test_gpo_with_equal_scores_is_the_masked_mean_and_ignores_padding():
    gpo = constant_gru_gpo(0.0)  # every score 0: uniform weights
    x = torch.tensor([[[1.0, 4.0], [3.0, 0.0], [7.0, 7.0]], [[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.allclose(gpo(x, mask), torch.full((2, 2), 2.0))
    torch.manual_seed(0)
    gpo = GPO()
    items = torch.randn(1, 5, 3)
    padded = torch.cat([items, torch.randn(1, 7, 3)], 1)
    mask = torch.arange(12)[None] < 5
    assert torch.allclose(gpo(items), gpo(padded, mask), atol=1e-6)
    assert gpo(padded, torch.zeros(1, 12, dtype=torch.bool)).abs().max() == 0  # no item: zeros


# ---------------------------------------------------------------- SGE
def test_sge_hand_case():
    enc = RegionEncoder(2, 4, guide="self", dropout=0.0).eval()
    sge = enc.self_guide
    with torch.no_grad():
        for layer in (sge.local_proj, sge.global_proj):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        sge.score.weight.fill_(1.0)
        sge.score.bias.zero_()
    sge.local_norm.eps = sge.global_norm.eps = 0.0  # eval statistics 0 / 1: the norms are the identity
    v = [(1.0, 0.0), (0.0, 2.0)]
    # by hand: g0 = mean v; l_i = tanh(v_i); h = tanh(g0); alpha = softmax(sum(l_i * h)); g = L2norm(sum alpha v)
    g0 = (0.5, 1.0)
    h = [math.tanh(a) for a in g0]
    logits = [sum(math.tanh(a) * b for a, b in zip(vi, h)) for vi in v]
    alpha = [math.exp(s) / sum(math.exp(t) for t in logits) for s in logits]
    g = [sum(a * vi[d] for a, vi in zip(alpha, v)) for d in range(2)]
    g = [x / math.hypot(*g) for x in g]
    # region attention: p = softmax(g . v_i), beta = p / ||p||, v'_i = v_i + beta_i g
    p = [math.exp(sum(a * b for a, b in zip(g, vi))) for vi in v]
    p = [x / sum(p) for x in p]
    beta = [x / math.hypot(*p) for x in p]
    want = [[vi[d] + b * g[d] for d in range(2)] for vi, b in zip(v, beta)] + [[0.0, 0.0]]
    regions = torch.tensor([[v[0], v[1], (5.0, 5.0)]])  # a padded third row
    mask = torch.tensor([[True, True, False]])
    assert isinstance(sge, SelfGuide)
    assert sge(regions, mask)[0].tolist() == pytest.approx(g, abs=1e-6)
    assert enc.enhance(regions, mask)[0].tolist() == [pytest.approx(row, abs=1e-6) for row in want]


def test_masked_batch_norm_takes_its_statistics_over_the_real_rows_only():
    torch.manual_seed(0)
    real = torch.randn(7, 3)
    x = torch.zeros(2, 5, 3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    x[0, :4], x[1, :3], mask[0, :4], mask[1, :3] = real[:4], real[4:], True, True
    x[~mask] = 1e3  # padding must not count
    norm, ref = MaskedBatchNorm1d(3), torch.nn.BatchNorm1d(3)
    out, want = norm(x, mask), ref(real)
    assert torch.allclose(out[mask], want, atol=1e-5) and (out[~mask] == 0).all()
    assert torch.allclose(norm.running_mean, ref.running_mean) and torch.allclose(norm.running_var, ref.running_var)


@pytest.mark.parametrize("guide", ["self", "clip", "both"])
def test_any_region_count_works_with_masking(guide):
    """The same images padded to more regions (rows of garbage behind the mask) give the same embeddings, in train
    mode (batch statistics over the real rows) and in eval; counts 1, 3 and 40 in one batch."""
    torch.manual_seed(0)
    enc = RegionEncoder(6, 8, guide=guide, clip_dim=4, dropout=0.0)
    counts = [1, 3, 40]
    regions = [torch.randn(n, 6) for n in counts]
    clip = torch.randn(3, 4)

    def embed(width: int) -> torch.Tensor:
        x = torch.randn(3, width, 6) * 100
        mask = torch.zeros(3, width, dtype=torch.bool)
        for i, r in enumerate(regions):
            x[i, :len(r)], mask[i, :len(r)] = r, True
        return enc(x, mask, clip)

    for mode in (True, False):
        enc.train(mode)
        state = {k: v.clone() for k, v in enc.state_dict().items()}
        a = embed(40)
        enc.load_state_dict(state)  # the same running statistics for the second call
        b = embed(64)
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.norm(dim=1), torch.ones(3))


# ---------------------------------------------------------------- UTO
def hinge(scores: list[float], mu: float, gamma: float) -> tuple[float, list[float]]:
    """(1/mu) log(1 + sum exp(mu (s - gamma))) and its derivative by each s."""
    e = [math.exp(mu * (s - gamma)) for s in scores]
    return math.log1p(sum(e)) / mu, [x / (1 + sum(e)) for x in e]


def test_uto_value_and_gradient_hand_case_with_the_queue_term():
    mu, gamma, lam = 90.0, 0.5, 20.0
    V = np.array([[1.0, 0.0], [0.8, 0.6]])
    T = np.array([[0.6, 0.8], [0.0, 1.0]])
    ids = [0, 1]
    Kt = np.array([[0.8, 0.6], [0.6, 0.8]])  # momentum keys of the pairs
    Kv = np.array([[1.0, 0.0], [0.6, 0.8]])
    Qt, qt_ids = np.array([[0.8, 0.6], [1.0, 0.0]]), [1, 0]  # the text queue: entry 2 is image 0's
    Qv, qv_ids = np.array([[0.6, 0.8], [0.0, 1.0]]), [0, 2]

    # by hand, over B = 2 pairs (every score below is > 0, so each gain's derivative is 1 / (1 + s))
    B, gV, gT = 2, np.zeros_like(V), np.zeros_like(T)
    batch = 0.0
    for i in range(B):
        neg = [j for j in range(B) if ids[j] != ids[i]]
        h, w = hinge([V[i] @ T[j] for j in neg], mu, gamma)  # image i against other images' captions
        batch += h
        for j, wj in zip(neg, w):
            gV[i] += lam * wj * T[j] / B
            gT[j] += lam * wj * V[i] / B
        h, w = hinge([V[j] @ T[i] for j in neg], mu, gamma)  # caption i against other images
        batch += h
        for j, wj in zip(neg, w):
            gT[i] += lam * wj * V[j] / B
            gV[j] += lam * wj * T[i] / B
        s = V[i] @ T[i]
        batch -= math.log1p(s)
        gV[i] -= lam * T[i] / (1 + s) / B
        gT[i] -= lam * V[i] / (1 + s) / B
    batch /= B
    queue = 0.0
    for q, g, keys, Q, q_ids in ((V, gV, Kt, Qt, qt_ids), (T, gT, Kv, Qv, qv_ids)):
        for i in range(B):
            neg = [k for k in range(len(Q)) if q_ids[k] != ids[i]]
            h, w = hinge([q[i] @ Q[k] for k in neg], mu, gamma)
            s = q[i] @ keys[i]
            queue += (h - math.log1p(s)) / B
            g[i] += (sum(wk * Q[k] for k, wk in zip(neg, w)) - keys[i] / (1 + s)) / B

    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(V=V, T=T, Kt=Kt, Kv=Kv, Qt=Qt, Qv=Qv).items()}
    img, txt = t["V"].clone().requires_grad_(), t["T"].clone().requires_grad_()
    out = uto_loss(img, txt, torch.tensor(ids), lam, mu, gamma, keys=(t["Kv"], t["Kt"]),
                   img_queue=(t["Qv"], torch.tensor(qv_ids)), txt_queue=(t["Qt"], torch.tensor(qt_ids)))
    assert out["loss_batch"].item() == pytest.approx(batch, rel=1e-9)
    assert out["loss_queue"].item() == pytest.approx(queue, rel=1e-9)
    assert out["loss"].item() == pytest.approx(lam * batch + queue, rel=1e-9)
    out["loss"].backward()
    assert np.allclose(img.grad.numpy(), gV, atol=1e-9) and np.allclose(txt.grad.numpy(), gT, atol=1e-9)


def test_uto_never_takes_an_item_of_the_querys_own_image_as_a_negative():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two captions of one image in the batch
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = uto_loss(img, txt, torch.tensor([3, 3]), keys=(img, txt), img_queue=(img, torch.tensor([3, 3])),
                   txt_queue=(txt, torch.tensor([3, 3])))
    assert out["loss_batch"].item() == pytest.approx(-math.log(2.0))  # no negative at all: only the gains
    assert out["loss_queue"].item() == pytest.approx(-2 * math.log(2.0))
    empty = (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert uto_loss(img, txt, torch.tensor([3, 3]), keys=(img, txt), img_queue=empty,
                    txt_queue=None)["loss_queue"].item() == pytest.approx(-2 * math.log(2.0))


# ---------------------------------------------------------------- the method
def user_split(n: int = 16, per: int = 2, seed: int = 0) -> tuple[ArraySplit, ArraySplit]:
    """n images with 1-4 regions of width 6 (a latent per image plus noise), `per` captions each with 2-5 tokens
    of width 5, and a guide store with a 4-wide global embedding per image (its rows in reverse key order)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    regions = [(latent[i] + 0.3 * rng.normal(size=(int(rng.integers(1, 5)), 6))).astype(np.float16) for i in range(n)]
    tokens = [(latent[i // per] @ np.eye(6, 5) + 0.3 * rng.normal(size=(int(rng.integers(2, 6)), 5)))
              .astype(np.float16) for i in range(n * per)]
    main = ArraySplit({"roi_feats": regions}, {"text_tokens": tokens}, np.repeat(np.arange(n), per))
    clip = (latent @ rng.normal(size=(6, 4))).astype(np.float16)[::-1]
    guide = ArraySplit({"image_embed": clip}, {}, np.arange(n), keys=main.keys[::-1])
    return main, guide


ARGS = {"embed_dim": 8, "queue_size": 16, "region_column": "roi_feats", "max_regions": 3}
DIMS = {"regions": 6, "tokens": 5, "guide": 4}


def user(**args):
    return create_method("user", {**ARGS, **args}, DIMS)


def train_epochs(method, inputs, epochs, state=None, opt=None, sched=None, start: int = 0, batch: int = 8,
                 total: int | None = None):
    """Trains epochs start..start+epochs-1 of a run of `total` epochs (default: those) through the engine's step."""
    tc = dataclasses.asdict(TrainConfig(epochs=total or start + epochs, batch_size=batch, lr=3e-3, warmup_steps=1))
    if state is None:
        state, opt, sched = new_training_state(method, tc, inputs.num_captions // batch, CPU)
    losses = []
    for epoch in range(start, start + epochs):
        method.on_epoch_start(epoch, inputs, state)
        for rows in epoch_batches(inputs.num_captions, batch, 0, epoch, 0, 1):
            losses.append(train_step(method, method, state, opt, sched, inputs.batch(rows), tc, "fp32", CPU))
    return losses, state, opt, sched


def test_guide_modes_declare_and_change_only_what_they_should():
    reads_guide = {g: [c for c in type(user()).columns(parse_args(type(user()), {**ARGS, "guide": g}))
                       if c.store == "guide"] for g in ("self", "clip", "both")}
    assert reads_guide["self"] == [] and all(len(reads_guide[g]) == 1 for g in ("clip", "both"))
    assert reads_guide["both"][0].name == "image_embed" and reads_guide["both"][0].table == "images"

    torch.manual_seed(0)
    both = user(guide="both").eval()
    modes = {}
    for g in ("self", "clip"):
        m = create_method("user", {**ARGS, "guide": g}, DIMS if g == "clip" else {"regions": 6, "tokens": 5})
        own = set(m.state_dict())
        m.load_state_dict({k: v for k, v in both.state_dict().items() if k in own})  # strict: every key present
        modes[g] = m.eval()
    assert modes["self"].image_encoder.clip_guide is None and modes["clip"].image_encoder.self_guide is None

    main, guide = user_split()
    batch = feature_inputs(type(both), both.args, main, guide).batch(np.arange(12))
    regions, mask = batch["regions"].float(), batch["region_mask"]
    with torch.no_grad():
        added = {g: m.image_encoder.enhance(regions, mask, batch["guide"]) - regions * mask[..., None]
                 for g, m in {**modes, "both": both}.items()}
        assert torch.allclose(added["both"], added["self"] + added["clip"], atol=1e-6)  # the two terms, summed
        texts = {g: m.encode_text(batch) for g, m in {**modes, "both": both}.items()}
        assert all(torch.equal(texts["both"], t) for t in texts.values())  # the text side is untouched
        other = {**batch, "guide": batch["guide"] * -1}
        assert torch.equal(modes["self"].encode_image(batch), modes["self"].encode_image(other))
        for g in ("clip", "both"):
            m = modes.get(g, both)
            assert not torch.allclose(m.encode_image(batch), m.encode_image(other))


def test_guide_self_runs_without_a_guide_store_and_the_others_ask_for_one():
    from pipeline.stages import plan

    def stages(*overrides):
        return plan(load_config(None, ["train.method=user", "train.batch_size=64", *overrides]))

    assert "guide" not in stages("train.method_args.guide=self")
    with pytest.raises(ValueError, match="train.guide"):
        stages()  # the default, both
    assert "guide" in stages("train.method_args.guide=clip", "train.guide={model: itr-vit-micro-32, seed: 1}")
    with pytest.raises(ValueError, match=r"\(user\)\.guide: expected one of self, clip, both"):
        stages("train.method_args.guide=text")


def test_user_learns_fills_both_queues_and_logs_both_loss_terms():
    torch.manual_seed(0)
    main, guide = user_split()
    method = user(gamma=0.2)
    inputs = feature_inputs(type(method), method.args, main, guide)
    losses, state, _, _ = train_epochs(method, inputs, 8)
    assert {"loss", "loss_batch", "loss_queue"} <= set(losses[0])
    assert np.mean([s["loss"] for s in losses[-4:]]) < np.mean([s["loss"] for s in losses[:4]])
    assert set(state.queues) == {"image", "text"} and all((q.ids >= 0).all() for q in state.queues.values())
    assert state.ema["*"]._stream == 1 and state.ema["*"].training  # the key encoders run in train mode
    twin = state.ema["*"].state_dict()
    assert any(not torch.equal(twin[k], v) for k, v in method.state_dict().items())  # an EMA, not a copy


def test_resume_from_saved_state_equals_an_uninterrupted_run_whatever_the_global_rng():
    """Dropout is seeded by (batch ids, epoch, encoder): stop after epoch 1, rebuild everything from the saved
    state dicts, scramble torch's global RNG, train epoch 2: the method, the EMA copy and both queues equal those
    of two uninterrupted epochs."""
    main, guide = user_split()
    torch.manual_seed(0)
    clean = user()
    inputs = feature_inputs(type(clean), clean.args, main, guide)
    init = {k: v.clone() for k, v in clean.state_dict().items()}
    _, clean_state, _, _ = train_epochs(clean, inputs, 2)

    first = user()
    first.load_state_dict(init)
    _, state, opt, sched = train_epochs(first, inputs, 1, total=2)
    saved = {"model": first.state_dict(), "momentum": state.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict()}
    torch.manual_seed(12345)
    resumed = user()
    resumed.load_state_dict(saved["model"])
    tc = dataclasses.asdict(TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_steps=1))
    state2, opt2, sched2 = new_training_state(resumed, tc, inputs.num_captions // 8, CPU)
    state2.load_state_dict(saved["momentum"])
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    train_epochs(resumed, inputs, 1, state2, opt2, sched2, start=1)
    for name, value in clean.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name].float(), value.float(), atol=1e-6), name
    for name, value in clean_state.state_dict().items():
        assert torch.allclose(state2.state_dict()[name].float(), value.float(), atol=1e-6), name


def test_fine_tuned_text_encoder_in_its_own_group_with_augmentation_by_default(tmp_path):
    from tests.text_fixtures import CAPTION_WORDS, write_tiny_bert

    folder = write_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    method = create_method("user", {**ARGS, "guide": "self", "text_encoder": str(folder), "text_lr_scale": 0.1},
                           {"regions": 6})
    assert method.augment and create_method("user", {**ARGS, "guide": "self"}, {"regions": 6, "tokens": 5}).augment \
        is False
    assert [c.kind for c in type(method).columns(method.args)] == ["ragged", "text"]
    main, _ = user_split()
    rng = np.random.default_rng(0)
    main.texts = [" ".join(rng.choice(CAPTION_WORDS, size=6)) for _ in range(main.num_captions)]
    inputs = feature_inputs(type(method), method.args, main)
    losses, state, opt, _ = train_epochs(method, inputs, 1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["text_encoder"]["lr"] == pytest.approx(0.1 * groups["train"]["lr"])
    assert {id(p) for p in groups["text_encoder"]["params"]} == {id(p) for p in method.text_encoder.parameters()}
    assert "text_encoder.model.embeddings.word_embeddings.weight" in state.ema["*"].state_dict()
    assert all(math.isfinite(s["loss"]) for s in losses)


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match=r"region_column: expected one of region_feats, patch_tokens, roi_feats"):
        user(region_column="grid")
    with pytest.raises(ValueError, match="gpo_dim: expected an even number"):
        user(gpo_dim=3)
