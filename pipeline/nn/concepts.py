"""CODER's concept branch (METHODS.md 3.4, after CVSE, Wang et al. ECCV 2020, and ML-GCN, Chen et al. CVPR 2019):
a concept vocabulary and graph built once per dataset from the training captions, optionally merged with
ConceptNet edges, concept vectors from word vectors (or learned), a 2-layer GCN, and the attention query that turns
an image or caption embedding into a concept descriptor.

Graph, for captions c_1..c_M (every step a reconstruction: the paper's text is not at hand):
- words: lower-cased runs of letters [a-z]+, at least 2 letters, not in STOPWORDS (no stemming, no tagger);
- vocabulary: the `num_concepts` words in the most captions (count N_i = number of captions holding word i, at
  least `min_count`), ties by word; fewer words leave padding slots (masked everywhere);
- co-occurrence M_ij = number of captions holding both i and j (i != j); P_ij = M_ij / N_i, the probability of j
  in a caption that has i;
- binarised: B_ij = [P_ij >= threshold], OR-ed with the ConceptNet edges between two concepts (both directions);
- re-weighted as ML-GCN's released code: A = reweight * B / colsum(B) + I, normalised A_hat = D A^T D with
  D = diag(rowsum(A))^(-1/2).
GCN: H_1 = LeakyReLU_0.2(A_hat X W_1), C = A_hat H_1 W_2 (no biases), X the K concept inputs.
Query: a = softmax_k(lambda z . c_k / |c_k|) over the real concepts, y = L2norm(sum_k a_k c_k), z a unit embedding.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.encoders import masked_softmax

STOPWORDS = frozenset("""
a an the and or but nor so yet of in on at to from by for with without within into onto upon over under above below
about around through across along among between behind beside besides near off out up down there here this that
these those it its it's is are was were be been being am has have had having do does did doing will would shall
should can could may might must i me my we our us you your he him his she her they them their who whom whose which
what where when why how as than then too very just also not no some any each every other another such own same
all both few more most much many several s t
""".split())
EXCLUDED_RELATIONS = frozenset({"/r/ExternalURL", "/r/Antonym", "/r/DistinctFrom", "/r/NotDesires",
                                "/r/NotCapableOf", "/r/NotHasProperty", "/r/NotUsedFor", "/r/dbpedia/genre"})
EDGE_COOCCURRENCE, EDGE_CONCEPTNET = 1, 2  # bits of `ConceptGraph.edges`


def caption_words(text: str) -> set[str]:
    """Returns the content words of a caption (module docstring)."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 2 and w not in STOPWORDS}


@dataclass
class ConceptGraph:
    """A built graph: vocabulary (K' <= K real words), counts (K,) captions per concept, conditional (K, K) P_ij,
    edges (K, K) uint8 bits (1 co-occurrence, 2 ConceptNet), adjacency (K, K) A_hat, mask (K,) real slots."""

    vocabulary: list[str]
    counts: np.ndarray
    conditional: np.ndarray
    edges: np.ndarray
    adjacency: np.ndarray
    mask: np.ndarray
    num_captions: int
    captions_digest: str
    fingerprint: str


def read_conceptnet_edges(path: str | Path, vocabulary: list[str], min_weight: float = 1.0) -> set[tuple[int, int]]:
    """Returns the pairs (i, j), i != j, of vocabulary words joined by an English ConceptNet assertion of weight >=
    `min_weight` (negative relations and ExternalURL left out). The file is ConceptNet 5's assertions CSV: one
    assertion a line, tab-separated (a comma-separated line is read the same way): URI, relation, start, end,
    JSON info with "weight" (1.0 when absent). Terms read as /c/en/<word>[/...]."""
    index = {w: i for i, w in enumerate(vocabulary)}
    pairs: set[tuple[int, int]] = set()

    def term(uri: str) -> int | None:
        parts = uri.split("/")
        return index.get(parts[3]) if len(parts) > 3 and parts[1] == "c" and parts[2] == "en" else None

    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 4:
                fields = line.rstrip("\n").split(",", 4)
            if len(fields) < 4 or fields[1] in EXCLUDED_RELATIONS:
                continue
            i, j = term(fields[2]), term(fields[3])
            if i is None or j is None or i == j:
                continue
            weight = 1.0
            if len(fields) > 4 and fields[4].strip().startswith("{"):
                weight = float(json.loads(fields[4]).get("weight", 1.0))
            if weight >= min_weight:
                pairs.add((i, j))
    return pairs


def file_digest(path: str | Path | None) -> str | None:
    """Returns the sha256 of a file's bytes (None for no file)."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gcn_adjacency(a: np.ndarray) -> np.ndarray:
    """Returns ML-GCN's normalised adjacency D A^T D, D = diag(rowsum(A))^(-1/2), of a (K, K) matrix with a
    positive diagonal."""
    d = a.sum(1) ** -0.5
    return (a * d[None, :]).T * d[None, :]


def build_concept_graph(captions: Callable[[], Iterable[list[str]]], num_concepts: int = 300, min_count: int = 1,
                        threshold: float = 0.4, reweight: float = 0.25, conceptnet: str | None = None,
                        conceptnet_min_weight: float = 1.0) -> ConceptGraph:
    """Returns the concept graph of a caption corpus (module docstring). `captions()` yields the corpus in chunks
    (lists of strings), the same each call: it is read twice (counts, then co-occurrences). `conceptnet`: a
    ConceptNet assertions file whose edges of weight >= `conceptnet_min_weight` are OR-ed in. The fingerprint covers
    the captions (their digest), these arguments and the ConceptNet file's digest."""
    from pipeline.fingerprint import digest

    args = {"num_concepts": num_concepts, "min_count": min_count, "threshold": threshold, "reweight": reweight,
            "conceptnet": conceptnet, "conceptnet_min_weight": conceptnet_min_weight}
    k = num_concepts
    counts: dict[str, int] = {}
    text_hash, total = hashlib.sha256(), 0
    for chunk in captions():
        for text in chunk:
            text_hash.update(text.encode() + b"\n")
            total += 1
            for w in caption_words(text):
                counts[w] = counts.get(w, 0) + 1
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocabulary = ranked[:k]
    index = {w: i for i, w in enumerate(vocabulary)}
    co = np.zeros((k, k), dtype=np.int64)
    for chunk in captions():
        rows = [[index[w] for w in caption_words(t) if w in index] for t in chunk]
        hot = np.zeros((len(rows), k), dtype=np.float32)
        for r, cols in enumerate(rows):
            hot[r, cols] = 1.0
        co += np.rint(hot.T @ hot).astype(np.int64)
    n = np.diag(co).copy()
    np.fill_diagonal(co, 0)
    conditional = co / np.maximum(n, 1)[:, None]
    edges = (conditional >= threshold).astype(np.uint8) * EDGE_COOCCURRENCE
    if conceptnet:
        for i, j in read_conceptnet_edges(conceptnet, vocabulary, conceptnet_min_weight):
            edges[i, j] |= EDGE_CONCEPTNET
            edges[j, i] |= EDGE_CONCEPTNET
    binary = (edges > 0).astype(np.float64)
    a = binary * reweight / (binary.sum(0, keepdims=True) + 1e-6) + np.eye(k)
    captions_digest = text_hash.hexdigest()[:16]
    fingerprint = digest({"captions": captions_digest, "graph": args, "conceptnet": file_digest(conceptnet)})
    mask = np.arange(k) < len(vocabulary)
    return ConceptGraph(vocabulary, n, conditional.astype(np.float32), edges, gcn_adjacency(a).astype(np.float32),
                        mask, total, captions_digest, fingerprint)


def read_word_vectors(path: str | Path, vocabulary: list[str], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (vectors (len(vocabulary), dim) float32, found (len,) bool) from a text file of word vectors (GloVe:
    `word v_1 .. v_dim` a line; word2vec / Numberbatch: the same after a `count dim` header; a `/c/en/` prefix is
    stripped). Raises ValueError for a vector of another width. A word not in the file gets a vector drawn from a
    generator seeded by the word, scaled to the mean norm of the found ones."""
    index = {w: i for i, w in enumerate(vocabulary)}
    vectors = np.zeros((len(vocabulary), dim), dtype=np.float32)
    found = np.zeros(len(vocabulary), dtype=bool)
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f):
            word, _, rest = line.rstrip().partition(" ")
            word = word.removeprefix("/c/en/")
            if word not in index or found[index[word]]:
                continue
            values = np.array(rest.split(), dtype=np.float32)
            if len(values) != dim:
                raise ValueError(f"{path}, line {number + 1}: a vector of {len(values)} values for {word!r}, "
                                 f"expected word_dim = {dim}")
            vectors[index[word]], found[index[word]] = values, True
    scale = float(np.linalg.norm(vectors[found], axis=1).mean()) if found.any() else 1.0
    for w, i in index.items():
        if not found[i]:
            v = np.random.default_rng(zlib.crc32(w.encode())).standard_normal(dim)
            vectors[i] = (v / np.linalg.norm(v) * scale).astype(np.float32)
    return vectors, found


class ConceptGCN(nn.Module):
    """The concept graph (buffers and extra state: in every checkpoint) and its 2-layer GCN: `forward()` returns the
    (K, out_dim) concept vectors C = A_hat LeakyReLU(A_hat X W_1) W_2. X: learned (`learned_inputs`) or a buffer set
    from word vectors by `set_graph`."""

    def __init__(self, num_concepts: int, word_dim: int, hidden_dim: int, out_dim: int, learned_inputs: bool = True):
        super().__init__()
        k = num_concepts
        if learned_inputs:
            self.inputs = nn.Parameter(torch.randn(k, word_dim) * word_dim ** -0.5)
        else:
            self.register_buffer("inputs", torch.zeros(k, word_dim))
        self.layer1 = nn.Linear(word_dim, hidden_dim, bias=False)
        self.layer2 = nn.Linear(hidden_dim, out_dim, bias=False)
        self.register_buffer("adjacency", torch.eye(k))
        self.register_buffer("mask", torch.zeros(k, dtype=torch.uint8))  # 1: a real concept (uint8: gloo broadcasts it)
        self.register_buffer("counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("conditional", torch.zeros(k, k))
        self.register_buffer("edges", torch.zeros(k, k, dtype=torch.uint8))
        self.vocabulary: list[str] = []
        self.info: dict = {}

    @property
    def built(self) -> bool:
        return bool(self.vocabulary)

    def set_graph(self, graph: ConceptGraph, vectors: np.ndarray | None = None) -> None:
        """Writes a built graph (and the word vectors of its vocabulary, when the inputs are not learned)."""
        with torch.no_grad():
            for name in ("adjacency", "mask", "counts", "conditional", "edges"):
                target = getattr(self, name)
                target.copy_(torch.from_numpy(np.asarray(getattr(graph, name))).to(target.dtype))
            if vectors is not None:
                self.inputs.zero_()
                self.inputs[:len(vectors)] = torch.from_numpy(vectors)
        self.vocabulary = list(graph.vocabulary)
        self.info = {"fingerprint": graph.fingerprint, "captions_digest": graph.captions_digest,
                     "num_captions": graph.num_captions}

    def get_extra_state(self) -> torch.Tensor:
        """The vocabulary and the graph's info as UTF-8 JSON in a uint8 tensor: a state dict of tensors only, which
        every consumer of a checkpoint (comparisons, exports) handles."""
        blob = json.dumps({"vocabulary": list(self.vocabulary), **self.info}, sort_keys=True).encode()
        return torch.tensor(list(blob), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        if torch.is_tensor(state):
            state = json.loads(bytes(state.cpu().tolist()).decode()) if state.numel() else {}
        state = dict(state)
        self.vocabulary = list(state.pop("vocabulary", []))
        self.info = state

    def forward(self) -> torch.Tensor:
        a = self.adjacency
        hidden = F.leaky_relu(a @ self.layer1(self.inputs), 0.2)
        return a @ self.layer2(hidden)


def concept_descriptor(z: torch.Tensor, concepts: torch.Tensor, mask: torch.Tensor,
                       scale: float = 10.0) -> torch.Tensor:
    """Returns y (B, D) = L2norm(sum_k a_k c_k), a = softmax_k(scale * z . c_k / |c_k|) over the concepts where
    `mask` (K,) is non-zero; z (B, D) unit rows, concepts (K, D)."""
    scores = scale * z @ F.normalize(concepts, dim=-1).T
    attention = masked_softmax(scores, mask.bool()[None, :].expand_as(scores))
    return F.normalize(attention @ concepts, dim=-1)


def write_graph_artifacts(folder: str | Path, gcn: ConceptGCN, top: int = 30) -> list[Path]:
    """Writes the graph held by `gcn` into `folder`: vocabulary.json (fingerprint, corpus, each concept with its
    caption count), edges.csv (every edge: the two concepts, P_ij, its source, its weight in A_hat) and graph.png
    (the `top` most frequent concepts, circle layout, node size by count). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, counts = gcn.vocabulary, gcn.counts.cpu().numpy()
    edges, cond, adj = gcn.edges.cpu().numpy(), gcn.conditional.cpu().numpy(), gcn.adjacency.cpu().numpy()
    (folder / "vocabulary.json").write_text(json.dumps(
        {**gcn.info, "concepts": [{"word": w, "captions": int(counts[i])} for i, w in enumerate(vocab)]}, indent=1))
    source = {EDGE_COOCCURRENCE: "cooccurrence", EDGE_CONCEPTNET: "conceptnet",
              EDGE_COOCCURRENCE | EDGE_CONCEPTNET: "both"}
    lines = ["i,j,concept_i,concept_j,p_j_given_i,source,weight"]
    for i, j in zip(*np.nonzero(edges)):
        lines.append(f"{i},{j},{vocab[i]},{vocab[j]},{cond[i, j]:.6f},{source[int(edges[i, j])]},{adj[i, j]:.6f}")
    (folder / "edges.csv").write_text("\n".join(lines) + "\n")

    n = min(top, len(vocab))
    angle = 2 * np.pi * np.arange(n) / max(n, 1)
    xy = np.stack([np.cos(angle), np.sin(angle)], 1)
    fig, ax = plt.subplots(figsize=(8, 8))
    for i, j in zip(*np.nonzero(edges[:n, :n])):
        colour = {"cooccurrence": "tab:blue", "conceptnet": "tab:green", "both": "tab:purple"}[source[int(edges[i, j])]]
        ax.annotate("", xy=xy[j], xytext=xy[i],
                    arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.5, "shrinkA": 10, "shrinkB": 10})
    size = 100 + 900 * counts[:n] / max(1, counts[:n].max()) if n else []
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c="tab:orange", zorder=3)
    for i in range(n):
        ax.text(*(xy[i] * 1.12), vocab[i], ha="center", va="center", fontsize=9)
    ax.set_title(f"top {n} of {len(vocab)} concepts ({int(np.count_nonzero(edges))} edges; blue: P(j|i) >= "
                 f"threshold, green: ConceptNet, purple: both)", fontsize=9)
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.axis("off")
    fig.savefig(folder / "graph.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [folder / "vocabulary.json", folder / "edges.csv", folder / "graph.png"]
