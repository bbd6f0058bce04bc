"""The text towers run on each batch's longest caption, not the full context: the embeddings, the pooled features
and the per-token features of the real tokens equal the full-context ones (fp32, float tolerance), for open_clip
(built-in CLIP and CustomTextCLIP towers, tiny random configs) and the hf extractor (tiny random checkpoints
written by the tests)."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from pipeline.config import FeaturesConfig
from pipeline.features.extractors import hf, openclip
from tests.hf_checkpoints import MAX_LEN

TEXTS = ["a red circle", "a big blue square on the left of a small green circle", "xyz, 42!", "circle"]
LONG = " ".join(["red"] * 60)  # fills (and is truncated to) the whole context


def _assert_same(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for key in ("text_embed", "text_pooled"):
        assert got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=1e-4, err_msg=key)
    if "text_tokens" in want:
        assert [t.shape for t in got["text_tokens"]] == [t.shape for t in want["text_tokens"]]
        for a, b in zip(got["text_tokens"], want["text_tokens"]):
            np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4)


def _full_context(ext: openclip.OpenClipExtractor, texts: list[str]) -> dict:
    """What the extractor computed before trimming: open_clip's own forward over the full context."""
    ids = ext.tokenizer(texts)
    mask = ids != 0
    with torch.inference_mode():
        out = ext.model.forward_intermediates(text=ids, text_indices=1, normalize=False, normalize_intermediates=True)
        assert torch.allclose(out["text_features"], ext.model.encode_text(ids), atol=1e-6)
    tokens = out["text_intermediates"][-1].float()
    m = mask.unsqueeze(-1).float()
    return {"text_embed": out["text_features"].numpy(), "text_pooled": ((tokens * m).sum(1) / m.sum(1)).numpy(),
            "text_tokens": [tokens[i, :n].numpy() for i, n in enumerate(mask.sum(1).tolist())]}


@pytest.fixture(scope="module")
def micro() -> openclip.OpenClipExtractor:
    return openclip.load(FeaturesConfig(model="itr-vit-micro-32", precision="fp32"), torch.device("cpu"))


def _custom_text(**text_cfg) -> openclip.OpenClipExtractor:
    """A CustomTextCLIP (text tower = a `TextTransformer` on `model.text`) with a tiny random config."""
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(
        embed_dim=32, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **text_cfg},
    ).eval()
    return openclip.OpenClipExtractor(model=model, preprocess=None, tokenizer=open_clip.get_tokenizer("ViT-B-32",
                                      context_length=24), device=torch.device("cpu"), precision="fp32")


def test_open_clip_trimmed_equals_full_context(micro):
    assert openclip.text_tower(micro.model) is not None
    ids = micro.tokenizer(TEXTS)
    assert openclip.trimmed_length(ids) == int((ids != 0).sum(1).max()) < ids.shape[1]  # something is trimmed
    _assert_same(openclip.encode_texts(micro, TEXTS, with_tokens=True), _full_context(micro, TEXTS))
    without = openclip.encode_texts(micro, TEXTS, with_tokens=False)
    assert set(without) == {"text_embed", "text_pooled"}
    # a caption alone (trimmed to its own length) and one filling the context (nothing to trim) agree too
    _assert_same(openclip.encode_texts(micro, TEXTS[:1], True), _full_context(micro, TEXTS[:1]))
    _assert_same(openclip.encode_texts(micro, TEXTS + [LONG], True), _full_context(micro, TEXTS + [LONG]))


def test_trimmed_forward_runs_the_batch_s_longest_caption(micro, monkeypatch):
    seen = []
    forward = openclip.text_forward
    monkeypatch.setattr(openclip, "text_forward", lambda tower, ids: seen.append(ids.shape) or forward(tower, ids))
    openclip.encode_texts(micro, TEXTS, False)
    longest = max(len(micro.tokenizer([t])[0].nonzero()) for t in TEXTS)
    assert seen == [(len(TEXTS), longest)]


@pytest.mark.parametrize("pool_type", ["argmax", "eos", "first"])
def test_custom_text_tower_trimmed_equals_full_context(pool_type):
    ext = _custom_text(pool_type=pool_type, eos_id=49407)
    tower = openclip.text_tower(ext.model)
    assert tower is not None and tower.pool_type == pool_type
    _assert_same(openclip.encode_texts(ext, TEXTS, True), _full_context(ext, TEXTS))


@pytest.mark.parametrize("text_cfg", [{"no_causal_mask": True}, {"pool_type": "last"}, {"embed_cls": True}])
def test_towers_where_trimming_is_not_exact_run_the_full_context(text_cfg, monkeypatch):
    ext = _custom_text(**text_cfg)
    assert openclip.text_tower(ext.model) is None
    monkeypatch.setattr(openclip, "text_forward", None)  # never called
    got = openclip.encode_texts(ext, TEXTS, True)
    assert got["text_embed"].shape == (len(TEXTS), 32)


def test_trimmed_length():
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 0, 9, 0, 0, 0]])
    assert openclip.trimmed_length(ids) == 3
    assert openclip.trimmed_length(torch.zeros(2, 4, dtype=torch.long)) == 1


@pytest.fixture(scope="module")
def hf_loaded(hf_checkpoints) -> dict[str, hf.HFExtractor]:
    return {t: hf.load(FeaturesConfig(extractor="hf", model=p, precision="fp32"), torch.device("cpu"))
            for t, p in hf_checkpoints.items()}


@pytest.mark.parametrize("model_type", ["clip", "align", "altclip", "groupvit"])
def test_hf_longest_padding_equals_full_context(hf_loaded, model_type):
    """The hf extractor pads each batch to its longest caption (`padding=True`): the same features as padding to
    the model's whole context (`max_length`), the padded keys being masked out (and CLIP's text tower causal)."""
    ext = hf_loaded[model_type]
    short = ["a red circle", "big", "a blue square"]  # the tiny tokenizers spell most words letter by letter
    texts = short + [" ".join(["red"] * 40)]
    full = ext.tokenizer(texts, padding="max_length", truncation=True, max_length=ext.max_length,
                         return_tensors="pt")
    longest = ext.tokenizer(texts, padding=True, truncation=True, max_length=ext.max_length, return_tensors="pt")
    assert full["input_ids"].shape[1] == ext.max_length == MAX_LEN
    got = hf.encode_texts(ext, short, with_tokens=True)  # no caption fills the context: trimmed
    assert max(t.shape[0] for t in got["text_tokens"]) < MAX_LEN
    assert longest["input_ids"].shape[1] == MAX_LEN  # the truncated one fills it

    inputs = {k: full[k][:len(short)] for k in ("input_ids", "attention_mask", "token_type_ids") if k in full}
    with torch.inference_mode():
        embed, hidden = hf._split_output(ext.model.get_text_features(**inputs))
        if hidden is None:
            hidden = ext.model.text_model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    m = mask.unsqueeze(-1).float()
    want = {"text_embed": embed.numpy(), "text_pooled": ((hidden * m).sum(1) / m.sum(1)).numpy(),
            "text_tokens": [hidden[i][mask[i]].numpy() for i in range(len(short))]}
    _assert_same(got, want)
