"""The trainable text encoder: offline loading from a tiny BERT folder, token features and masks, padding
invariance, USER's word augmentation rates, gradients, deepcopy/pickle, and the folder checks."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from pipeline.nn.text_encoder import TrainableTextEncoder, load_text_encoder
from tests.text_fixtures import CAPTION_WORDS, write_tiny_bert

SHORT = "a red circle"
LONG = "the big blue square on the left of a small green circle with a dog"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture()
def encoder(bert_dir) -> TrainableTextEncoder:
    return load_text_encoder(bert_dir, max_tokens=32).eval()


def test_features_shape_and_mask(encoder):
    batch = encoder.tokenize([SHORT, LONG], augment=False, generator=None)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask.sum(1).tolist() == [5, 17]  # [CLS] + words + [SEP]
    tokens, out_mask = encoder(ids, mask)
    assert tokens.shape == (2, ids.shape[1], encoder.hidden_size) == (2, 17, 32)
    assert tokens.dtype == torch.float32 and torch.equal(out_mask, mask)
    assert ids[0, 0] == encoder.tokenizer.cls_token_id and ids[0, 4] == encoder.tokenizer.sep_token_id
    assert (ids[0, 5:] == encoder.tokenizer.pad_token_id).all()


def test_truncation_to_max_tokens(bert_dir):
    enc = load_text_encoder(bert_dir, max_tokens=6)
    for augment in (False, True):
        batch = enc.tokenize([LONG, SHORT], augment=augment, generator=torch.Generator().manual_seed(0))
        assert batch["input_ids"].shape[1] <= 6
        assert batch["input_ids"][0, -1] == enc.tokenizer.sep_token_id  # special tokens survive truncation


def test_padding_does_not_change_features(encoder):
    alone = encoder.tokenize([SHORT], augment=False, generator=None)
    batch = encoder.tokenize([SHORT, LONG], augment=False, generator=None)
    n = int(alone["attention_mask"].sum())
    assert batch["input_ids"].shape[1] > n
    assert not batch["attention_mask"][0, n:].any() and batch["attention_mask"][0, :n].all()
    with torch.no_grad():
        a, _ = encoder(**alone)
        b, _ = encoder(**batch)
    torch.testing.assert_close(b[0, :n], a[0, :n], atol=1e-5, rtol=0)


def test_no_augment_is_identity_tokenisation(encoder):
    captions = [SHORT, LONG, "dog"]
    ref = encoder.tokenizer(captions, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    g = torch.Generator().manual_seed(3)
    out = encoder.tokenize(captions, augment=False, generator=g)
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"].bool())
    zero = encoder.tokenize(captions, augment=True, generator=g, hit_prob=0.0)  # the augmenting path, no hits
    assert torch.equal(zero["input_ids"], out["input_ids"])
    assert torch.equal(zero["attention_mask"], out["attention_mask"])


def test_augmentation_rates(encoder):
    """USER's reference: hit 20% of the words; of the hits 50% [MASK], 10% random, 40% deleted, so 10% / 2% / 8% of
    the words. 30 one-piece words a caption, 2000 captions: 60,000 draws, standard errors 0.12% (10%), 0.11% (8%)
    and 0.06% (2%); the tolerances are about 9 of them."""
    word, n_words, n_caps = "red", 30, 2000
    red_id = encoder.tokenizer.convert_tokens_to_ids(word)
    out = encoder.tokenize([" ".join([word] * n_words)] * n_caps, augment=True,
                           generator=torch.Generator().manual_seed(0))
    ids, mask = out["input_ids"], out["attention_mask"]
    body = ids[:, 1:][mask[:, 1:]]
    body = body[body != encoder.tokenizer.sep_token_id]
    total = n_words * n_caps
    masked = (body == encoder.tokenizer.mask_token_id).sum().item() / total
    random = ((body != encoder.tokenizer.mask_token_id) & (body != red_id)).sum().item() / total
    deleted = 1 - body.numel() / total
    assert abs(masked - 0.10) < 0.01
    assert abs(random - 0.02) < 0.005
    assert abs(deleted - 0.08) < 0.01
    special = set(encoder.tokenizer.all_special_ids) - {encoder.tokenizer.mask_token_id}
    assert not any(int(i) in special for i in body)  # random ids are never special tokens
    assert (ids[:, 0] == encoder.tokenizer.cls_token_id).all()


def test_augmentation_probabilities_are_arguments(encoder):
    caps = [" ".join(CAPTION_WORDS)] * 20
    all_masked = encoder.tokenize(caps, augment=True, generator=torch.Generator().manual_seed(0), hit_prob=1.0,
                                  mask_prob=1.0, random_prob=0.0, delete_prob=0.0)
    inner = all_masked["input_ids"][:, 1:-1]
    assert (inner == encoder.tokenizer.mask_token_id).all()
    all_deleted = encoder.tokenize(caps, augment=True, generator=None, hit_prob=1.0, mask_prob=0.0,
                                   random_prob=0.0, delete_prob=1.0)
    assert all_deleted["input_ids"].tolist() == [[encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id]] * 20
    with pytest.raises(ValueError, match="sum"):
        encoder.tokenize(caps, augment=True, generator=None, mask_prob=0.6, random_prob=0.2, delete_prob=0.4)


def test_augmentation_hits_whole_words(encoder):
    """"xyz" is three word pieces (x ##y ##z): a word is masked, deleted or kept as a whole."""
    out = encoder.tokenize(["xyz " * 10] * 300, augment=True, generator=torch.Generator().manual_seed(1),
                           random_prob=0.0, mask_prob=0.5, delete_prob=0.5)
    for ids, mask in zip(out["input_ids"], out["attention_mask"]):
        inner = ids[mask][1:-1]
        assert inner.numel() % 3 == 0
        for word in inner.view(-1, 3):
            assert (word == encoder.tokenizer.mask_token_id).all() or \
                encoder.tokenizer.convert_ids_to_tokens(word.tolist()) == ["x", "##y", "##z"]


def test_augmentation_is_deterministic_per_generator(encoder):
    caps = [LONG] * 50
    a = encoder.tokenize(caps, augment=True, generator=torch.Generator().manual_seed(7))
    b = encoder.tokenize(caps, augment=True, generator=torch.Generator().manual_seed(7))
    c = encoder.tokenize(caps, augment=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert not torch.equal(a["input_ids"], c["input_ids"]) or not torch.equal(a["attention_mask"], c["attention_mask"])


def test_gradients_reach_bert(encoder):
    encoder.train()
    batch = encoder.tokenize([SHORT, LONG], augment=True, generator=torch.Generator().manual_seed(0))
    tokens, mask = encoder(**batch)
    (tokens[mask] ** 2).mean().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any("pooler" in k for k in encoder.state_dict())  # the unused pooler is dropped


def test_num_layers(bert_dir):
    enc = load_text_encoder(bert_dir, num_layers=1)
    assert enc.num_layers == 1 and len(enc.model.encoder.layer) == 1
    assert not any("layer.1." in k for k in enc.state_dict())
    with pytest.raises(ValueError, match="num_layers"):
        load_text_encoder(bert_dir, num_layers=3)


def test_deepcopy_and_pickle(encoder):
    clone = copy.deepcopy(encoder)
    assert clone.tokenizer is encoder.tokenizer  # shared, not a module
    assert clone.model is not encoder.model
    sd, csd = encoder.state_dict(), clone.state_dict()
    assert sd.keys() == csd.keys() and all(k.startswith("model.") for k in sd)
    assert all(torch.equal(sd[k], csd[k]) and sd[k].data_ptr() != csd[k].data_ptr() for k in sd)
    batch = encoder.tokenize([SHORT, LONG], augment=False, generator=None)
    restored = pickle.loads(pickle.dumps(encoder))
    assert torch.equal(restored.tokenize([SHORT, LONG], augment=False, generator=None)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(**batch)[0], encoder(**batch)[0])


def test_missing_folder_and_files(tmp_path, bert_dir):
    missing = tmp_path / "no_such_bert"
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        load_text_encoder(str(missing))
    no_vocab = write_tiny_bert(tmp_path / "no_vocab")
    (no_vocab / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_vocab.*vocabulary"):
        load_text_encoder(str(no_vocab))
    no_config = write_tiny_bert(tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_config.*config\.json"):
        load_text_encoder(str(no_config))
    with pytest.raises(ValueError, match="max_tokens"):
        load_text_encoder(bert_dir, max_tokens=1000)
