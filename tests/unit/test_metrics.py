"""R@K with a positives relation: hand-computed cases, ties, and an independent argsort reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import (
    evaluate_embeddings,
    plot_recall_curves,
    recall_curve,
    recall_metrics,
    retrieval_ranks,
)


def reference_ranks(sims: np.ndarray, caption_image: np.ndarray):
    """Per-query loops in the style of the VSE++ evaluation code, with pessimistic ties made explicit:
    rank = position of the best positive when negatives tied with it are sorted first."""
    n, m = sims.shape
    i2t = []
    for i in range(n):
        pos = np.where(caption_image == i)[0]
        best = sims[i, pos].max()
        order = sorted(range(m), key=lambda j: (-sims[i, j], j in pos))
        i2t.append(min(order.index(j) for j in pos if sims[i, j] == best))
    t2i = []
    for j in range(m):
        best = sims[caption_image[j], j]
        order = sorted(range(n), key=lambda i: (-sims[i, j], i == caption_image[j]))
        t2i.append(order.index(caption_image[j]))
    return np.array(i2t), np.array(t2i)


def test_hand_computed_two_images_three_captions():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    owner = np.array([0, 1, 1])  # image 1 has two captions
    i2t, t2i = retrieval_ranks(img, txt, owner)
    # image 0: scores .9,.2,.6 -> its caption 0 first: rank 0; image 1: .1,.8,.4 -> caption 1 first: rank 0
    assert i2t.tolist() == [0, 0]
    # caption 2 scores image0 .6 > image1 .4 -> its image is second: rank 1
    assert t2i.tolist() == [0, 0, 1]
    m = recall_metrics(i2t, t2i)
    assert m["i2t_R@1"] == 100.0 and m["t2i_R@1"] == pytest.approx(200 / 3) and m["t2i_R@5"] == 100.0
    assert m["t2i_medr"] == 1.0 and m["t2i_meanr"] == pytest.approx(4 / 3)
    assert m["rsum"] == pytest.approx(100 * 3 + 200 / 3 + 100 + 100)


def test_ties_count_against_the_model():
    img = torch.ones(3, 4)
    txt = torch.ones(6, 4)
    i2t, t2i = retrieval_ranks(img, txt, np.repeat(np.arange(3), 2))
    assert i2t.tolist() == [4, 4, 4] and t2i.tolist() == [2] * 6  # every negative is tied: ranked ahead
    assert recall_metrics(i2t, t2i)["i2t_R@1"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_with_uneven_caption_counts_and_ties(seed):
    rng = np.random.default_rng(seed)
    n = 12
    owner = np.concatenate([np.full(rng.integers(1, 7), i) for i in range(n)])
    img = torch.from_numpy(rng.integers(-2, 3, (n, 3)).astype(np.float32))  # small integers: many ties
    txt = torch.from_numpy(rng.integers(-2, 3, (len(owner), 3)).astype(np.float32))
    got = retrieval_ranks(img, txt, owner, chunk_size=5)
    want = reference_ranks((img @ txt.T).numpy(), owner)
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_chunk_size_does_not_change_results_and_cosine_wrapper():
    torch.manual_seed(3)
    img, txt = torch.randn(50, 8), torch.randn(250, 8)
    owner = np.repeat(np.arange(50), 5)
    a = evaluate_embeddings(img, txt, owner, chunk_size=7)
    b = evaluate_embeddings(img * 3, txt * 0.5, owner, chunk_size=1000)
    assert a == pytest.approx(b)
    perfect = evaluate_embeddings(torch.eye(50), torch.eye(50)[owner], owner)
    assert perfect["i2t_R@1"] == perfect["t2i_R@1"] == 100.0 and perfect["rsum"] == 600.0


def test_recall_curve_and_plot(tmp_path):
    ranks = np.array([0, 1, 1, 3, 60])
    curve = recall_curve(ranks, 5)
    assert curve.tolist() == [20.0, 60.0, 60.0, 80.0, 80.0]
    path = plot_recall_curves({"a": (ranks, ranks)}, tmp_path / "r.png", max_k=10)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_query_without_positive_is_an_error():
    with pytest.raises(ValueError, match="query 1 has no positive"):
        retrieval_ranks(torch.randn(2, 3), torch.randn(2, 3), np.array([0, 0]))
