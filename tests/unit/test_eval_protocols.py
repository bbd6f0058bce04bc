"""Protocols (COCO 5-fold 1K / 5K, Flickr30K 1K), bounded-memory scoring, mAP@k against torchmetrics,
and two-stage retrieval where a missed candidate set stays a miss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_average_precision, retrieval_precision

from pipeline.eval.metrics import (
    map_at_k,
    multi_hot,
    positive_index,
    recall_metrics,
    retrieval_ranks,
    two_stage_ranks,
)
from pipeline.eval.protocols import evaluate_protocol, folds


def embeddings(n_images: int, per_image: int, dim: int = 16, noise: float = 1.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_images, dim, generator=g)
    owner = np.repeat(np.arange(n_images), per_image)
    txt = img[torch.from_numpy(owner)] + noise * torch.randn(len(owner), dim, generator=g)
    norm = torch.nn.functional.normalize
    return norm(img, dim=-1), norm(txt, dim=-1), owner


def test_gallery_chunking_gives_the_same_ranks():
    img, txt, owner = embeddings(60, 5)
    full = retrieval_ranks(img, txt, owner, chunk_size=16)
    tiny_budget = retrieval_ranks(img, txt, owner, chunk_size=16, max_elements=16 * 7)  # 7 gallery items a chunk
    assert all(np.array_equal(a, b) for a, b in zip(full, tiny_budget))


def test_coco_1k_averages_every_metric_over_five_folds():
    img, txt, owner = embeddings(5000, 5, dim=8, noise=0.8)
    metrics, (i2t, t2i) = evaluate_protocol("coco-1k", img, txt, owner)
    per_fold = []
    for f in range(5):
        sl = slice(f * 1000, (f + 1) * 1000)
        per_fold.append(recall_metrics(*retrieval_ranks(img[sl], txt[f * 5000:(f + 1) * 5000], owner[:5000])))
    for key in ("i2t_R@1", "t2i_R@10", "rsum", "i2t_medr", "t2i_meanr"):
        assert metrics[key] == pytest.approx(np.mean([m[key] for m in per_fold]))
    assert len(i2t) == 5000 and len(t2i) == 25000
    five_k, _ = evaluate_protocol("coco-5k", img, txt, owner)
    assert five_k["t2i_R@1"] < metrics["t2i_R@1"]  # 5x the gallery: harder


def test_protocol_sizes_are_checked():
    assert [len(f) for f in folds(1000, "f30k-1k")] == [1000]
    with pytest.raises(ValueError, match="coco-1k needs 5000 test images, the split has 4999"):
        folds(4999, "coco-1k")
    with pytest.raises(ValueError, match="unknown protocol 'coco-2k'"):
        folds(10, "coco-2k")


def test_map_at_k_hand_case_and_ties_by_index():
    queries = torch.tensor([[1.0, 0.0]])
    database = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])
    q_labels = np.array([[True, False]])
    d_labels = np.array([[True, False], [False, True], [True, True], [True, False]])
    # ranking: 0 (rel), 1 (tie with 2, lower index first: not rel), 2 (rel), 3 (rel)
    m = map_at_k(queries, database, q_labels, d_labels, k=3)
    assert m["mAP@3"] == pytest.approx(100 * (1 / 1 + 2 / 3) / 2)
    assert m["P@3"] == pytest.approx(100 * 2 / 3)


@pytest.mark.parametrize("k", [5, 20, 200])
def test_map_at_k_matches_torchmetrics(k):
    g = torch.Generator().manual_seed(k)
    queries, database = torch.randn(30, 8, generator=g), torch.randn(150, 8, generator=g)
    q_labels = torch.rand(30, 6, generator=g) < 0.25
    d_labels = torch.rand(150, 6, generator=g) < 0.25
    ours = map_at_k(queries, database, q_labels.numpy(), d_labels.numpy(), k=k, chunk_size=7)
    scores = queries @ database.T + 100.0  # torchmetrics counts items with score <= 0 as not relevant
    relevant = (q_labels.float() @ d_labels.float().T) > 0
    ap = torch.stack([retrieval_average_precision(scores[i], relevant[i], top_k=k) for i in range(30)])
    precision = torch.stack([retrieval_precision(scores[i], relevant[i], top_k=k) for i in range(30)])
    assert ours[f"mAP@{k}"] == pytest.approx(100 * float(ap.mean()), abs=1e-4)
    assert ours[f"P@{k}"] == pytest.approx(100 * float(precision.mean()), abs=1e-4)


def test_positive_index_pads_uneven_caption_counts_and_names_an_image_without_captions():
    i2t, t2i = positive_index(np.array([1, 0, 1, 2, 1]), 3)
    assert i2t.tolist() == [[1, -1, -1], [0, 2, 4], [3, -1, -1]] and t2i[:, 0].tolist() == [1, 0, 1, 2, 1]
    with pytest.raises(ValueError, match="query 1 has no positive"):
        positive_index(np.array([0, 2]), 3)


def test_multi_hot():
    matrix, vocab = multi_hot([["red", "circle"], [], ["blue"]])
    assert vocab == ["blue", "circle", "red"]
    assert matrix.tolist() == [[False, True, True], [False, False, False], [True, False, False]]


def test_two_stage_with_global_rerank_equals_one_stage_within_k_and_misses_stay_misses():
    img, txt, owner = embeddings(40, 5, noise=2.0)
    o = torch.from_numpy(owner)
    one_stage_i2t, one_stage_t2i = retrieval_ranks(img, txt, owner)
    i2t_pos, t2i_pos = positive_index(owner, 40)
    k = 10
    t2i = two_stage_ranks(txt, img, t2i_pos, k, lambda rows, cand: (txt[rows][:, None, :] * img[cand]).sum(-1))
    within = one_stage_t2i < k
    assert np.array_equal(t2i[within], one_stage_t2i[within])
    assert (t2i[~within] == len(img)).all() and (~within).any()  # outside the candidates: a miss, never a hit
    # a reranker that puts the true image first fixes every query whose image is a candidate, no more
    oracle = two_stage_ranks(txt, img, t2i_pos, k, lambda rows, cand: (cand == o[rows][:, None]).float())
    assert np.array_equal(oracle == 0, within)
    i2t = two_stage_ranks(img, txt, i2t_pos, k, lambda rows, cand: (img[rows][:, None, :] * txt[cand]).sum(-1))
    assert np.array_equal(i2t[one_stage_i2t < k], one_stage_i2t[one_stage_i2t < k])
