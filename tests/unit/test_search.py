"""Search without a store: exact top-k, the faiss index against it, query rows appended to a split (what a method's
rerank sees), a method's embeddings of in-memory rows, and how a config is matched to the runs it trained."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.search import (
    ExtendedSplit,
    RowsSplit,
    _same,
    build_index,
    encode_rows,
    exact_top_k,
    index_top_k,
    needs_tokens,
    normalise,
)
from tests.method_fixtures import ArraySplit, feature_inputs


def clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    """Returns `n` L2-normalised rows drawn around `centres` random directions (embeddings cluster)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    return normalise(x)


def test_exact_top_k_is_the_best_k_in_order_whatever_the_chunk():
    rng = np.random.default_rng(0)
    gallery, queries = normalise(rng.standard_normal((500, 16))), normalise(rng.standard_normal((37, 16)))
    scores, rows = exact_top_k(gallery, queries, 7, chunk=5)
    full = queries @ gallery.T
    expected = np.argsort(-full, axis=1)[:, :7]
    assert (rows == expected).all()
    assert np.allclose(scores, np.take_along_axis(full, expected, 1), atol=1e-5)
    assert exact_top_k(gallery[:3], queries, 10)[1].shape == (37, 3)  # k capped by the gallery


def test_faiss_index_finds_the_exact_top_10():
    gallery = clustered(4000, 32, 40, seed=1)
    queries = clustered(200, 32, 40, seed=1)[:200] + 0.01
    index = build_index(gallery)
    assert index.nlist == min(int(4 * np.sqrt(4000)), 4000 // 39) and index.nprobe == 8  # >= 39 training rows a list
    _, approx = index_top_k(index, normalise(queries), 10)
    _, exact = exact_top_k(gallery, normalise(queries), 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95


def test_a_tiny_gallery_gets_one_list_and_exact_results():
    gallery = clustered(30, 8, 3, seed=2)
    index = build_index(gallery)
    assert index.nlist == 1
    assert (index_top_k(index, gallery[:4], 5)[1] == exact_top_k(gallery, gallery[:4], 5)[1]).all()


def base_split() -> ArraySplit:
    """3 images with ragged regions (2, 0, 1 of width 4) and 4 captions."""
    regions = [np.ones((2, 4)), np.zeros((0, 4)), np.full((1, 4), 3.0)]
    return ArraySplit({"image_embed": np.arange(6.0).reshape(3, 2), "roi_feats": regions},
                      {"text_embed": np.arange(8.0).reshape(4, 2)}, np.array([0, 0, 1, 2]),
                      texts=["a", "b", "c", "d"])


def test_extended_split_appends_query_captions_after_the_split():
    query = RowsSplit(captions={"text_embed": np.array([[9.0, 9.0]])}, texts=["the query"])
    split = ExtendedSplit(base_split(), query, "captions")
    assert split.num_captions == 5 and split.num_images == 3
    assert split.take("captions", "text_embed", [4, 1]).tolist() == [[9.0, 9.0], [2.0, 3.0]]
    assert split.caption_text([4, 0]) == ["the query", "a"]
    assert split.caption_image.tolist() == [0, 0, 1, 2, -1]  # free text belongs to no image
    assert split.take("images", "image_embed", [2]).tolist() == [[4.0, 5.0]]


def test_extended_split_appends_a_query_image_with_ragged_regions_and_joins_by_key():
    query = RowsSplit(images={"image_embed": np.array([[7.0, 7.0]]), "roi_feats": [np.full((3, 4), 5.0)]},
                      keys=["query-0"])
    split = ExtendedSplit(base_split(), query, "images")
    assert split.num_images == 4 and split.keys[-1] == "query-0"
    flat, lengths = split.take("images", "roi_feats", [3, 0, 1])  # mixed: the query first, then split rows
    assert lengths.tolist() == [3, 2, 0] and flat[:3].max() == 5.0 and flat[3:].max() == 1.0
    assert split.row_index(["img00001", "query-0"]).tolist() == [1, 3]


def test_query_rows_embed_as_the_same_rows_of_the_store_would():
    """A method embeds query rows held in memory exactly as the same values read from a split."""
    from pipeline.methods import create_method

    rng = np.random.default_rng(3)
    caps = {"text_embed": rng.standard_normal((4, 6)).astype(np.float16),
            "text_pooled": rng.standard_normal((4, 5)).astype(np.float16)}
    imgs = {"image_embed": rng.standard_normal((2, 6)).astype(np.float16),
            "image_pooled": rng.standard_normal((2, 5)).astype(np.float16)}
    torch.manual_seed(0)
    method = create_method("infonce", {"embed_dim": 8, "hidden_dim": 16, "queue_size": 0},
                           {"image_embed": 6, "image_pooled": 5, "text_embed": 6, "text_pooled": 5}).eval()
    split = ArraySplit(imgs, caps, np.array([0, 0, 1, 1]))
    with torch.no_grad():
        stored = method.encode_text(feature_inputs(type(method), method.args, split).captions(np.arange(4)))
    rows = RowsSplit(captions={k: v[2:] for k, v in caps.items()}, texts=["x", "y"])
    assert np.allclose(encode_rows(method, "captions", rows), stored[2:].numpy(), atol=1e-6)


def test_needs_tokens_only_for_ragged_or_grid_columns():
    from pipeline.methods.base import Column

    assert not needs_tokens([Column("image_embed"), Column("text_embed", "captions")])
    assert needs_tokens([Column("patch_tokens")])
    assert needs_tokens([Column("text_tokens", "captions", kind="ragged", mask="m")])


@pytest.mark.parametrize("logged, wanted, same", [
    ("{'a': 1, 'b': 2}", "{'b': 2, 'a': 1}", True),  # a dict logged in another key order
    ("0.001", "0.001", True), ("[1, 2]", "[1, 2]", True), ("infonce", "vse", False), ("null", "null", True),
])
def test_logged_params_compare_as_values(logged, wanted, same):
    assert _same(logged, wanted) is same
