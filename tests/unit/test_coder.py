"""CODER (`pipeline/methods/coder.py`) and its building blocks: DCL against InfoNCE and on a hand case, Sinkhorn's
equipartition on a hand case, seeded k-means, the concept graph of a five-caption corpus (vocabulary, edges,
ConceptNet merge, adjacency, fingerprint), word vectors, the pseudo-label loss's gradient (concept branch only), the
blended score, and a state round trip (checkpoint) that gives the identical next loss. No Ray."""
from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.methods import create_method
from pipeline.nn.cluster import pair_codes, sinkhorn, spherical_kmeans, swapped_prediction
from pipeline.nn.concepts import (
    EDGE_CONCEPTNET,
    EDGE_COOCCURRENCE,
    build_concept_graph,
    caption_words,
    gcn_adjacency,
    read_word_vectors,
)
from pipeline.nn.dcl import dcl, dcl_loss, negative_weights
from pipeline.nn.losses import queue_infonce
from pipeline.train.loop import new_training_state, train_step
from tests.method_fixtures import feature_inputs
from tests.unit.test_user_method import train_epochs, user_split

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- DCL
def test_dcl_at_weight_exponent_zero_is_infonce_with_queues():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    ids = torch.arange(6)
    img_queue, txt_queue = (unit(10, 8, seed=3), torch.arange(100, 110)), (unit(10, 8, seed=4), torch.arange(200, 210))
    got = dcl_loss(img, txt, ids, 0.1, hardness=0.0, img_queue=img_queue, txt_queue=txt_queue)
    want = queue_infonce(img, txt, ids, 0.1, img_queue=img_queue, txt_queue=txt_queue)
    for key in ("loss", "loss_i2t", "loss_t2i"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5), key
    hard = dcl_loss(img, txt, ids, 0.1, hardness=2.0, img_queue=img_queue, txt_queue=txt_queue)
    assert abs(hard["loss"].item() - want["loss"].item()) > 1e-3  # the weights do change the loss


def test_dcl_hand_case_weights_and_masking():
    """One query, positive score 0.5, negatives 0.2 and -0.4, a third key of the query's own image (masked):
    w = 2 softmax(beta s), L = -log(e^{0.5/T} / (e^{0.5/T} + sum_j w_j e^{s_j/T}))."""
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[0.5, math.sqrt(0.75)], [0.2, math.sqrt(0.96)], [-0.4, math.sqrt(0.84)],
                         [0.9, math.sqrt(0.19)]])
    negative = torch.tensor([[False, True, True, False]])
    t, beta = 0.1, 1.5
    e1, e2 = math.exp(beta * 0.2), math.exp(beta * -0.4)
    w = [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]
    want = -math.log(math.exp(5) / (math.exp(5) + w[0] * math.exp(2) + w[1] * math.exp(-4)))
    assert dcl(q, keys, torch.tensor([0]), negative, t, beta).item() == pytest.approx(want, rel=1e-5)
    weights = negative_weights(q @ keys.T, negative, beta)
    assert weights[0].tolist() == pytest.approx([0.0, w[0], w[1], 0.0], rel=1e-5)
    assert weights.sum().item() == pytest.approx(2.0)
    diverse = negative_weights(q @ keys.T, negative, 0.0, 1.0, keys)  # the weights still sum to N
    assert diverse.sum().item() == pytest.approx(2.0) and diverse[0, 0] == 0 and diverse[0, 3] == 0


def test_dcl_never_counts_the_query_own_image_in_the_queue():
    img = unit(1, 8, seed=5)
    txt = F.normalize(img + 0.1 * unit(1, 8, seed=6), dim=-1)  # a close pair: a copy of its text is a hard negative
    ids = torch.tensor([7])
    queue = (unit(6, 8, seed=7), torch.arange(10, 16))
    base = dcl_loss(img, txt, ids, 0.05, 1.0, txt_queue=queue)["loss_i2t"]
    own = (torch.cat([queue[0], txt]), torch.cat([queue[1], ids]))  # the query's own text again, in the queue
    assert dcl_loss(img, txt, ids, 0.05, 1.0, txt_queue=own)["loss_i2t"].item() == pytest.approx(base.item())
    other = (own[0], torch.cat([queue[1], torch.tensor([99])]))  # the same vector under another image: a negative
    assert dcl_loss(img, txt, ids, 0.05, 1.0, txt_queue=other)["loss_i2t"].item() > base.item() + 0.5
    lonely = dcl(img, torch.cat([txt, txt]), torch.tensor([0]), torch.tensor([[False, False]]), 0.05)
    assert lonely.item() == 0.0  # no negatives at all: no loss


# ---------------------------------------------------------------- clustering
def test_sinkhorn_balances_a_hand_case():
    """Every point prefers prototype 0; the equipartition gives each prototype two of the four points: the two
    with the strongest preference keep prototype 0."""
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.3], [0.3, 0.25]])
    codes = sinkhorn(scores, epsilon=0.05, iterations=1000)  # converged
    assert codes.sum(1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    assert codes.sum(0).tolist() == pytest.approx([2.0, 2.0], abs=1e-3)
    assert codes.argmax(1).tolist() == [0, 0, 1, 1]
    assert torch.softmax(scores / 0.05, 1).argmax(1).tolist() == [0, 0, 0, 0]  # without the constraint: all to 0
    assert torch.equal(sinkhorn(scores, 0.05, 3), sinkhorn(scores, 0.05, 3))  # deterministic
    three = sinkhorn(scores, 0.05, 3)
    assert three.argmax(1).tolist() == [0, 0, 1, 1]  # SwAV's 3 iterations: balanced assignments already
    assert three.sum(0).tolist() == pytest.approx([2.0, 2.0], abs=0.3)


def test_pair_codes_are_joint_over_both_modalities_and_the_queues():
    img, txt, prototypes = unit(4, 8, seed=8), unit(4, 8, seed=9), unit(3, 8, seed=10)
    queue = unit(8, 8, seed=11)
    ci, ct = pair_codes(img, txt, prototypes, [queue, None], 0.05, 3)
    every = sinkhorn(torch.cat([img, txt, queue]) @ prototypes.T, 0.05, 3)
    assert torch.allclose(ci, every[:4]) and torch.allclose(ct, every[4:8])
    loss = swapped_prediction(img @ prototypes.T, txt @ prototypes.T, ci, ct, 0.1)
    want = -(ct * F.log_softmax(img @ prototypes.T / 0.1, 1)).sum(1).mean() / 2 \
        - (ci * F.log_softmax(txt @ prototypes.T / 0.1, 1)).sum(1).mean() / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_kmeans_is_seeded_and_finds_separated_clusters():
    centres = torch.eye(3, 8)
    x = torch.cat([c + 0.05 * unit(20, 8, seed=i) for i, c in enumerate(centres)])
    a = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(4))
    b = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert sorted((a @ centres.T).argmax(1).tolist()) == [0, 1, 2]  # one centroid per cluster
    assert (a @ centres.T).max(1).values.min() > 0.99


# ---------------------------------------------------------------- concept graph
FIVE = ["a dog runs on the grass", "the dog plays with a ball", "a cat sleeps on the grass",
        "a dog and a cat on the grass", "a red ball"]


def graph_of(captions, **args):
    return build_concept_graph(lambda: iter([captions[:2], captions[2:]]), **args)


def test_graph_of_five_captions_exact_vocabulary_and_edges(tmp_path):
    assert caption_words("The dog's ball, on a RED mat!") == {"dog", "ball", "red", "mat"}
    g = graph_of(FIVE, num_concepts=6, min_count=2, threshold=0.5)
    assert g.vocabulary == ["dog", "grass", "ball", "cat"]  # 3, 3, 2, 2 captions; ties by word; the rest < 2
    assert g.counts.tolist() == [3, 3, 2, 2, 0, 0] and g.mask.tolist() == [True] * 4 + [False] * 2
    # P(j | i): dog -> grass 2/3, ball 1/3, cat 1/3; grass -> dog 2/3, cat 2/3; ball -> dog 1/2; cat -> dog 1/2, grass 1
    want = np.zeros((6, 6))
    want[0, 1], want[0, 2], want[0, 3] = 2 / 3, 1 / 3, 1 / 3
    want[1, 0], want[1, 3] = 2 / 3, 2 / 3
    want[2, 0] = 1 / 2
    want[3, 0], want[3, 1] = 1 / 2, 1.0
    assert np.allclose(g.conditional, want)
    edges = {(int(i), int(j)) for i, j in zip(*np.nonzero(g.edges))}
    assert edges == {(0, 1), (1, 0), (1, 3), (2, 0), (3, 0), (3, 1)}
    # A = 0.25 B / colsum(B) + I, A_hat = D A^T D with D = rowsum(A)^-1/2
    b = (g.edges > 0).astype(float)
    a = 0.25 * b / (b.sum(0, keepdims=True) + 1e-6) + np.eye(6)
    d = a.sum(1) ** -0.5
    assert np.allclose(g.adjacency, np.diag(d) @ a.T @ np.diag(d), atol=1e-6)
    assert np.allclose(gcn_adjacency(np.array([[1.0, 1.0], [0.0, 1.0]])),
                       [[0.5, 0.0], [1 / math.sqrt(2), 1.0]])

    # ConceptNet edges between two concepts are OR-ed in, both ways; other languages, weak and negative ones are not
    csv = tmp_path / "conceptnet.csv"
    csv.write_text("\n".join([
        "/a/[/r/IsA/,/c/en/cat/n/,/c/en/ball/]\t/r/IsA\t/c/en/cat/n\t/c/en/ball\t{\"weight\": 2.0}",
        "/a/x\t/r/RelatedTo\t/c/en/dog\t/c/en/grass\t{\"weight\": 1.0}",  # also a co-occurrence edge
        "/a/y\t/r/RelatedTo\t/c/en/ball\t/c/en/grass\t{\"weight\": 0.5}",  # too weak
        "/a/z\t/r/Antonym\t/c/en/ball\t/c/en/grass\t{\"weight\": 3.0}",  # negative relation
        "/a/w\t/r/RelatedTo\t/c/fr/chat\t/c/en/dog\t{\"weight\": 3.0}",  # not English
        "/a/v\t/r/RelatedTo\t/c/en/dog\t/c/en/wolf\t{\"weight\": 3.0}"]) + "\n")  # not a concept
    merged = graph_of(FIVE, num_concepts=6, min_count=2, threshold=0.5, conceptnet=str(csv))
    assert merged.edges[3, 2] == merged.edges[2, 3] == EDGE_CONCEPTNET
    assert merged.edges[0, 1] == merged.edges[1, 0] == EDGE_COOCCURRENCE | EDGE_CONCEPTNET
    assert int(np.count_nonzero(merged.edges)) == 8 and merged.edges[1, 2] == 0

    assert graph_of(FIVE, num_concepts=6, min_count=2, threshold=0.5).fingerprint == g.fingerprint
    assert graph_of(FIVE[:4] + ["a blue ball"], num_concepts=6, min_count=2, threshold=0.5).fingerprint != g.fingerprint
    assert graph_of(FIVE, num_concepts=6, min_count=2, threshold=0.4).fingerprint != g.fingerprint
    assert merged.fingerprint != g.fingerprint
    assert graph_of(FIVE, num_concepts=2).vocabulary == ["dog", "grass"]


def test_word_vectors_from_a_glove_or_numberbatch_file(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("3 2\n/c/en/dog 1.0 0.0\ngrass 0.0 2.0\nother 5.0 5.0\n")
    vectors, found = read_word_vectors(path, ["dog", "grass", "cat"], 2)
    assert found.tolist() == [True, True, False]
    assert vectors[:2].tolist() == [[1.0, 0.0], [0.0, 2.0]]
    assert np.linalg.norm(vectors[2]) == pytest.approx(1.5)  # the mean norm of the found vectors
    assert np.array_equal(read_word_vectors(path, ["dog", "grass", "cat"], 2)[0], vectors)  # seeded by the word
    with pytest.raises(ValueError, match="word_dim = 3"):
        read_word_vectors(path, ["dog"], 3)


# ---------------------------------------------------------------- the method
ARGS = {"embed_dim": 8, "queue_size": 16, "region_column": "roi_feats", "max_regions": 3, "num_prototypes": 5,
        "num_concepts": 12, "word_dim": 6, "gcn_hidden": 8, "dropout": 0.2}
DIMS = {"regions": 6, "tokens": 5}
COLOURS, THINGS = ["red", "blue", "green", "white"], ["dog", "cat", "ball", "kite"]


def coder_split(n: int = 16):
    """USER's test split (16 images, 2 captions each) with captions naming each image's colour and thing."""
    main, _ = user_split(n)
    main.texts = [f"a {COLOURS[i % 4]} {THINGS[(i // 4) % 4]}" if j == 0 else f"the {THINGS[(i // 4) % 4]} is "
                  f"{COLOURS[i % 4]} on grass" for i in range(n) for j in range(2)]
    return main


def coder(split, **args):
    method = create_method("coder", {**ARGS, **args}, DIMS)
    inputs = feature_inputs(type(method), method.args, split)
    method.prepare(inputs)
    return method, inputs


def test_prepare_builds_the_graph_into_the_state_dict_and_it_survives_a_rebuild(tmp_path):
    split = coder_split()
    torch.manual_seed(0)
    method, _ = coder(split)
    graph = method.concept_graph
    assert graph.vocabulary == ["grass", "ball", "blue", "cat", "dog", "green", "kite", "red", "white"]  # 16, 8 each
    assert graph.counts.tolist() == [16] + [8] * 8 + [0] * 3
    assert graph.mask.tolist() == [1] * 9 + [0] * 3
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # extra state: plain containers only
    rebuilt = create_method("coder", ARGS, DIMS)
    assert not rebuilt.concept_graph.built
    rebuilt.load_state_dict(state)
    assert rebuilt.concept_graph.vocabulary == graph.vocabulary
    assert rebuilt.concept_graph.info["fingerprint"] == graph.info["fingerprint"]
    assert torch.equal(rebuilt.concept_graph.adjacency, graph.adjacency)
    files = rebuilt.write_artifacts(tmp_path / "graph")
    assert [f.name for f in files] == ["vocabulary.json", "edges.csv", "graph.png"]
    vocab = json.loads(files[0].read_text())
    assert vocab["fingerprint"] == graph.info["fingerprint"]
    assert vocab["concepts"][0] == {"word": "grass", "captions": 16}
    assert files[1].read_text().count("\n") == 1 + int(torch.count_nonzero(graph.edges))
    assert files[2].read_bytes()[:4] == b"\x89PNG"


def test_pseudo_label_loss_gradient_reaches_the_concept_branch_only():
    split = coder_split()
    torch.manual_seed(0)
    method, inputs = coder(split)
    state = method.new_state()
    batch = inputs.batch(np.arange(8))
    parts = method.loss(method(batch), batch, state)
    assert {"loss", "loss_instance", "loss_swap", "loss_concept", "loss_pl"} == set(parts)
    parts["loss_pl"].backward()
    by_module = {name: [p.grad for p in module.parameters()] for name, module in method.named_children()}
    for name in ("image_encoder", "text_head", "clusters"):
        assert all(g is None or not g.any() for g in by_module[name]), name
    for name in ("concept_graph", "concept_head"):
        assert all(g is not None and g.abs().sum() > 0 for g in by_module[name]), name

    method.zero_grad(set_to_none=True)  # the concept DCL does reach the instance encoders (concept_grad)
    method.loss(method(batch), batch, state)["loss_concept"].backward()
    assert any(p.grad is not None and p.grad.any() for p in method.image_encoder.parameters())
    method.zero_grad(set_to_none=True)
    off, _ = coder(split, concept_grad=False)
    off.loss(off(batch), batch, off.new_state())["loss_concept"].backward()
    assert all(p.grad is None or not p.grad.any() for p in off.image_encoder.parameters())


def test_the_score_blends_instance_and_concept_similarity():
    split = coder_split()
    torch.manual_seed(0)
    method, inputs = coder(split, alpha=0.5)
    method.eval()
    images, captions = inputs.images(np.arange(4)), inputs.captions(np.arange(6))
    with torch.no_grad():
        v, t = method.image_encoder(images["regions"], images["region_mask"]), method.text_head(
            captions["tokens"], captions["token_mask"])
        yv, yt = method.concepts(v), method.concepts(t)
        got = method.encode_image(images) @ method.encode_text(captions).T
    assert torch.allclose(got, (v @ t.T + 0.5 * yv @ yt.T) / 1.5, atol=1e-5)
    assert torch.allclose(method.encode_image(images).norm(dim=1), torch.ones(4), atol=1e-5)
    plain = create_method("coder", {**ARGS, "concept": False}, DIMS)
    assert plain.concept_graph is None and plain.encode_image(images).shape == (4, 8)


@pytest.mark.parametrize("assign", ["sinkhorn", "kmeans"])
def test_state_round_trip_gives_the_identical_next_loss(assign):
    """Two epochs, then the method and its momentum state saved and loaded into freshly built ones (torch's global
    RNG scrambled): the next batch's loss parts are identical, prototypes and concept state included."""
    split = coder_split()
    torch.manual_seed(0)
    method, inputs = coder(split, assign=assign, queue_size=16)
    losses, state, _, _ = train_epochs(method, inputs, 2)
    assert all(math.isfinite(step["loss"]) for step in losses)
    if assign == "kmeans":
        assert int(method.clusters.ready) == 1  # fitted on the queues at epoch 1's start
    buffer = io.BytesIO()
    torch.save({"model": method.state_dict(), "momentum": state.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(999)
    restored = create_method("coder", {**ARGS, "assign": assign, "queue_size": 16}, DIMS)
    restored.load_state_dict(saved["model"])
    restored_state = restored.new_state()
    restored_state.load_state_dict(saved["momentum"])
    assert torch.equal(restored.clusters.weight, method.clusters.weight)
    assert restored.concept_graph.vocabulary == method.concept_graph.vocabulary
    for m, s in ((method, state), (restored, restored_state)):
        m.on_epoch_start(2, inputs, s)
    batch = inputs.batch(np.arange(8, 16))
    a = method.loss(method(batch), batch, state)
    b = restored.loss(restored(batch), batch, restored_state)
    assert set(a) == set(b)
    for key in a:
        assert a[key].item() == b[key].item(), key


def test_kmeans_waits_for_a_queue_and_keeps_every_parameter_in_the_graph():
    split = coder_split()
    torch.manual_seed(0)
    method, inputs = coder(split, assign="kmeans", queue_size=16)
    tc = dataclasses.asdict(TrainConfig(batch_size=8, warmup_steps=1))
    state, opt, sched = new_training_state(method, tc, 4, CPU)
    method.on_epoch_start(0, inputs, state)
    assert int(method.clusters.ready) == 0 and not list(method.clusters.parameters())
    batch = inputs.batch(np.arange(8))
    parts = method.loss(method(batch), batch, state)
    assert parts["loss_pl"].item() == 0.0 and "loss_swap" not in parts
    parts["loss"].backward()
    assert all(p.grad is not None for p in method.concept_head.parameters())  # DDP needs them in the graph
    train_step(method, method, state, opt, sched, batch, tc, "fp32", CPU)
    assert {"image", "text", "concept_image", "concept_text"} == set(state.queues)
    assert int((state.queues["concept_text"].ids >= 0).sum()) == 8


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="assign"):
        create_method("coder", {**ARGS, "assign": "spectral"}, DIMS)
    with pytest.raises(ValueError, match="temperature"):
        create_method("coder", {**ARGS, "temperature": 0.0}, DIMS)
