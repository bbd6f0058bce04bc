"""CODER: Coupled Diversity-Sensitive Momentum Contrastive Learning (Wang et al., ECCV 2022, arXiv 2208.09843;
METHODS.md section 3; docs/methods.md, `coder`). Only the abstract is at hand: every choice beyond it is a
reconstruction, listed in docs/methods.md.

- Instance branch: USER's encoders (this class extends `pipeline.methods.user.User`: regions + semantic enhancement
  + GPO, tokens + GPO, seeded dropout), an EMA copy of the whole method (key encoders) and momentum queues of both
  modalities; DCL (`pipeline.nn.dcl`) over the batch and the queues, both directions.
- Online pseudo-labels (`pipeline.nn.cluster`): prototypes on the instance embeddings; codes by Sinkhorn-Knopp over
  every rank's batch of both modalities plus both queues (SwAV's equipartition), the prototypes trained by SwAV's
  swapped prediction across the two modalities of a pair; or (`assign: kmeans`) seeded k-means on the queues at
  each epoch start.
- Concept branch (`pipeline.nn.concepts`): a vocabulary and graph built once from the training captions by
  `prepare` (optionally merged with ConceptNet edges; concept inputs from a word-vector file or learned), a 2-layer
  GCN, and an attention query of the graph by each image and caption embedding: the concept descriptors y. DCL on
  (y_img, y_txt) with two more queues, and the pseudo-label loss: y (of the instance embedding without gradient)
  predicts the instance branch's code of the pair through its own prototypes; its gradient reaches only the concept
  branch.
- Score: s = v . t + alpha y_v . y_t. `encode_image` / `encode_text` return [z, sqrt(alpha) y] / sqrt(1 + alpha),
  whose dot product is s / (1 + alpha): the same ranking, unit vectors.

The graph (vocabulary, counts, P(j|i), edges, normalised adjacency, fingerprint) and the prototypes are buffers,
parameters or extra state: in every checkpoint and in model.pt. Rank 0 logs the graph's files (vocabulary.json,
edges.csv, graph.png) to the train stage's MLflow run under `concept_graph/` at its first epoch start;
`write_artifacts(folder)` writes the same files anywhere.
"""
from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.methods import register_method
from pipeline.methods.user import REGION_COLUMNS, User
from pipeline.nn.cluster import Prototypes, nearest_codes, pair_codes, soft_cross_entropy, swapped_prediction
from pipeline.nn.concepts import (
    ConceptGCN,
    build_concept_graph,
    concept_descriptor,
    file_digest,
    read_word_vectors,
    write_graph_artifacts,
)
from pipeline.nn.dcl import dcl_loss
from pipeline.nn.distributed import world
from pipeline.nn.encoders import GUIDES
from pipeline.nn.momentum import MomentumQueue, MomentumState

ASSIGNMENTS = ("sinkhorn", "kmeans")
CAPTION_CHUNK = 16384  # captions read at a time while building the graph


@dataclass
class CoderArgs:
    # instance branch: USER's encoders (docs/methods.md, `user`)
    embed_dim: int = 1024
    region_column: str = "region_feats"  # region_feats (imported BUTD) | roi_feats (RoIAlign, ragged) | patch_tokens
    max_regions: int = 36
    max_tokens: int = 32
    guide: str = "self"  # self (SGE) | clip | both (those two read train.guide's store)
    guide_column: str = "image_embed"
    attention_scale: float = 1.0
    dropout: float = 0.4
    gpo_dim: int = 32
    text_encoder: Optional[str] = None  # a local BERT-family folder, fine-tuned (else stored text_tokens)
    text_lr_scale: float = 0.1
    augment: Optional[bool] = None
    # DCL
    temperature: float = 0.05  # tau
    hardness: float = 1.0  # beta: negatives weighted by N softmax(beta s_j); 0 (with diversity 0): InfoNCE
    diversity: float = 0.0  # gamma: extra weight of negatives far from the other negatives
    queue_size: int = 4096  # per queue (4096 COCO, 2048 Flickr30K); 0: no key encoders, no queues
    momentum: float = 0.999
    gather_with_grad: bool = True  # in-batch keys from every worker's batch
    # online pseudo-labels
    num_prototypes: int = 300  # P
    assign: str = "sinkhorn"  # sinkhorn (over batch + queues, every step) | kmeans (on the queues, every epoch)
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    proto_temperature: float = 0.1  # of the swapped prediction and of the pseudo-label prediction
    swap_weight: float = 1.0  # SwAV's swapped prediction, trains the prototypes; 0: fixed random prototypes
    hard_labels: bool = False  # pseudo-labels: the soft code of the pair (False) or its argmax
    kmeans_iters: int = 10
    kmeans_seed: int = 0
    # concept branch
    concept: bool = True  # False: the instance branch alone (the ablation)
    num_concepts: int = 300
    min_count: int = 1  # a concept is in at least this many training captions
    cooccur_threshold: float = 0.4  # t: edge i -> j when P(j | i) >= t
    reweight: float = 0.25  # p of ML-GCN's re-weighting
    conceptnet: Optional[str] = None  # a ConceptNet assertions CSV, its edges between concepts OR-ed in
    conceptnet_min_weight: float = 1.0
    word_vectors: Optional[str] = None  # GloVe / Numberbatch text file: the GCN's inputs (else learned)
    word_dim: int = 300
    gcn_hidden: int = 1024
    concept_scale: float = 10.0  # lambda of the graph query
    concept_weight: float = 1.0  # weight of DCL on the concept descriptors
    concept_grad: bool = True  # that DCL also trains the instance encoders (the pseudo-label loss never does)
    pl_weight: float = 1.0  # eta
    alpha: float = 0.5  # score = instance + alpha x concept similarity
    graph_plot_top: int = 30  # concepts drawn in graph.png

    def __post_init__(self):
        where = "train.method_args (coder)"
        for name, allowed in (("guide", GUIDES), ("region_column", tuple(REGION_COLUMNS)), ("assign", ASSIGNMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{where}.{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("embed_dim", "max_regions", "max_tokens", "gpo_dim", "num_concepts", "word_dim", "gcn_hidden",
                     "sinkhorn_iters", "kmeans_iters", "min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}: expected a positive number, got {getattr(self, name)}")
        if self.num_prototypes < 2 or self.gpo_dim % 2:
            raise ValueError(f"{where}: num_prototypes must be >= 2 and gpo_dim even")
        for name in ("temperature", "sinkhorn_epsilon", "proto_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name}: expected a positive number, got {getattr(self, name)}")
        if self.alpha < 0 or not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"{where}: alpha must be >= 0, dropout in [0, 1) and momentum in [0, 1]")


@register_method("coder")
class Coder(User):
    """CODER (module docstring). Child modules (what `train.phases` can name): `image_encoder`, `text_head`,
    `text_encoder` (with a BERT folder), `clusters` (the instance prototypes), and with the concept branch
    `concept_graph` (graph + GCN) and `concept_head` (the pseudo-label classifier)."""

    Args = CoderArgs

    def __init__(self, args: CoderArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        e = args.embed_dim
        self.clusters = Prototypes(args.num_prototypes, e, learnable=args.assign == "sinkhorn" and args.swap_weight > 0,
                                   ready=args.assign == "sinkhorn")
        self.concept_graph = self.concept_head = None
        if args.concept:
            self.concept_graph = ConceptGCN(args.num_concepts, args.word_dim, args.gcn_hidden, e,
                                            learned_inputs=not args.word_vectors)
            self.concept_head = Prototypes(args.num_prototypes, e)
        self._graph_logged = False

    # ------------------------------------------------------------ hooks
    def prepare(self, inputs) -> None:
        """Builds the concept graph from the train split's captions (read in chunks), and the GCN's inputs from the
        word-vector file when given."""
        if self.concept_graph is None:
            return
        a = self.args
        split, total = inputs.main, inputs.num_captions

        def chunks():
            for start in range(0, total, CAPTION_CHUNK):
                yield split.caption_text(np.arange(start, min(start + CAPTION_CHUNK, total)))

        graph = build_concept_graph(chunks, a.num_concepts, a.min_count, a.cooccur_threshold, a.reweight, a.conceptnet,
                                    a.conceptnet_min_weight)
        vectors = found = None
        if a.word_vectors:
            vectors, found = read_word_vectors(a.word_vectors, graph.vocabulary, a.word_dim)
        self.concept_graph.set_graph(graph, vectors)
        if a.word_vectors:
            self.concept_graph.info.update(word_vectors=file_digest(a.word_vectors), words_found=int(found.sum()))
        print(f"[itr] coder: concept graph {graph.fingerprint}: {len(graph.vocabulary)} concepts from "
              f"{graph.num_captions} captions, {int(np.count_nonzero(graph.edges))} edges", file=sys.stderr,
              flush=True)

    def on_epoch_start(self, epoch: int, inputs, state: MomentumState) -> None:
        """USER's (the epoch of the seeded dropout); k-means on the queues (`assign: kmeans`, seeded by the epoch:
        the same on every rank and on resume); the graph's files to MLflow, once (rank 0)."""
        super().on_epoch_start(epoch, inputs, state)
        a = self.args
        if a.assign == "kmeans" and state is not None:
            rows = [q[0] for q in (state.queue("image"), state.queue("text")) if q is not None and len(q[0])]
            if rows:
                generator = torch.Generator().manual_seed(a.kmeans_seed * 1_000_003 + epoch)
                self.clusters.fit(torch.cat(rows), a.kmeans_iters, generator)
        if self.concept_graph is not None and not self._graph_logged:
            self._graph_logged = True
            self.log_graph()

    def write_artifacts(self, folder) -> list:
        """Writes the concept graph's files (vocabulary.json, edges.csv, graph.png) into `folder`; none without the
        concept branch."""
        if self.concept_graph is None or not self.concept_graph.built:
            return []
        return write_graph_artifacts(folder, self.concept_graph, self.args.graph_plot_top)

    def log_graph(self) -> None:
        """Logs the graph's files under `concept_graph/` and its fingerprint as tag `coder.concept_graph` to the
        active MLflow run of rank 0 (the train stage's run on a Ray Train worker), unless already there (a resumed
        run). A failure is a warning: it never stops training."""
        import mlflow

        run = mlflow.active_run()
        if world()[0] != 0 or run is None or not self.concept_graph.built:
            return
        try:
            client = mlflow.MlflowClient()
            if client.list_artifacts(run.info.run_id, "concept_graph"):
                return
            with tempfile.TemporaryDirectory() as tmp:
                self.write_artifacts(tmp)
                mlflow.log_artifacts(tmp, artifact_path="concept_graph")
            mlflow.set_tag("coder.concept_graph", self.concept_graph.info.get("fingerprint", ""))
        except Exception as err:  # noqa: BLE001  the artifact is a by-product: training goes on
            print(f"[itr] coder: could not log the concept graph to MLflow: {err}", file=sys.stderr, flush=True)

    def new_state(self) -> MomentumState:
        """USER's (an EMA copy of the whole method, queues "image" and "text") plus queues "concept_image" and
        "concept_text" of the concept descriptors, with the concept branch."""
        state = super().new_state()
        if state.queues and self.concept_graph is not None:
            for name in ("concept_image", "concept_text"):
                state.queues[name] = MomentumQueue(self.args.queue_size, self.args.embed_dim)
        return state

    # ------------------------------------------------------------ encoders
    def concepts(self, z: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the concept descriptors (B, E) of unit embeddings z (B, E) (GCN run unless `vectors` given)."""
        vectors = self.concept_graph() if vectors is None else vectors
        return concept_descriptor(z, vectors, self.concept_graph.mask, self.args.concept_scale)

    def blend(self, z: torch.Tensor) -> torch.Tensor:
        """Returns [z, sqrt(alpha) y(z)] / sqrt(1 + alpha): unit vectors whose dot products rank by s_inst + alpha
        s_concept; z itself without the concept branch or with alpha 0."""
        if self.concept_graph is None or self.args.alpha == 0:
            return z
        alpha = self.args.alpha
        return torch.cat([z, math.sqrt(alpha) * self.concepts(z)], 1) / math.sqrt(1.0 + alpha)

    def encode_image(self, batch: dict) -> torch.Tensor:
        return self.blend(super().encode_image(batch))

    def encode_text(self, batch: dict) -> torch.Tensor:
        return self.blend(super().encode_text(batch))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"image", "text"}: instance embeddings (B, E); with the concept branch also "concept_image",
        "concept_text" (B, E) and "concept_vectors" (K, E), the GCN's output."""
        img, txt = super().encode_image(batch), super().encode_text(batch)
        out = {"image": img, "text": txt}
        if self.concept_graph is not None:
            vectors = self.concept_graph()
            if not self.args.concept_grad:
                img, txt = img.detach(), txt.detach()
            out.update(concept_image=self.concepts(img, vectors), concept_text=self.concepts(txt, vectors),
                       concept_vectors=vectors)
        return out

    # ------------------------------------------------------------ loss
    def pseudo_labels(self, out: dict, state: MomentumState | None) -> tuple[torch.Tensor | None, tuple | None]:
        """Returns (the pairs' pseudo-labels (B, P) or None while k-means has no centroids, the (image, text) codes
        of the swapped prediction or None). No gradient."""
        a = self.args
        img, txt = out["image"].detach(), out["text"].detach()
        if a.assign == "kmeans":
            if not int(self.clusters.ready):
                return None, None
            return nearest_codes(F.normalize(img + txt, dim=-1), self.clusters.unit().detach()), None
        queues = [q[0] for q in ((state.queue("image"), state.queue("text")) if state is not None else ())
                  if q is not None]
        codes = pair_codes(img, txt, self.clusters.unit(), queues, a.sinkhorn_epsilon, a.sinkhorn_iters)
        labels = (codes[0] + codes[1]) / 2
        if a.hard_labels:
            labels = F.one_hot(labels.argmax(1), labels.shape[1]).to(labels.dtype)
        return labels, codes

    def loss(self, out: dict, batch: dict, state: MomentumState | None) -> dict[str, torch.Tensor]:
        """Returns {"loss", "loss_instance" (DCL), "loss_swap" (learnable prototypes), "loss_concept" (DCL on the
        descriptors), "loss_pl" (pseudo-label prediction)}; loss = instance + swap_weight swap + concept_weight
        concept + pl_weight pl."""
        a = self.args
        ids = batch["ids"]

        def queue(name):
            return state.queue(name) if state is not None else None

        def contrast(img, txt, prefix):
            return dcl_loss(img, txt, ids, a.temperature, a.hardness, a.diversity, queue(f"{prefix}image"),
                            queue(f"{prefix}text"), a.gather_with_grad)["loss"]

        parts = {"loss_instance": contrast(out["image"], out["text"], "")}
        loss = parts["loss_instance"]
        labels, codes = self.pseudo_labels(out, state)
        if self.clusters.learnable:
            parts["loss_swap"] = swapped_prediction(self.clusters(out["image"]), self.clusters(out["text"]), *codes,
                                                    a.proto_temperature)
            loss = loss + a.swap_weight * parts["loss_swap"]
        if self.concept_graph is not None:
            parts["loss_concept"] = contrast(out["concept_image"], out["concept_text"], "concept_")
            vectors = out["concept_vectors"]
            logits = [self.concept_head(self.concepts(out[side].detach(), vectors)) / a.proto_temperature
                      for side in ("image", "text")]
            if labels is None:  # k-means not ready: a zero term keeps the concept head in the graph (DDP)
                parts["loss_pl"] = sum(x.sum() for x in logits) * 0.0
            else:
                parts["loss_pl"] = sum(soft_cross_entropy(labels, x) for x in logits) / 2
            loss = loss + a.concept_weight * parts["loss_concept"] + a.pl_weight * parts["loss_pl"]
        return {"loss": loss, **parts}


__all__ = ["Coder", "CoderArgs"]
