"""SCL: the three-stage recipe of "Rethinking Semantic Contrastive Learning and Content Fusion in Multimodal
Retrieval" (Shi & Li; seed 003; analysis in METHODS.md section 4), as three trainings of the engine:

1. `scl_text`: text intra-modal contrastive learning. Positives are captions of the same semantics: the captions
   of one image (`groups: instance`), or of images of the same class on a labelled set (`groups: labels`).
2. `scl_image`: image intra-modal contrastive learning. Positives are two augmentations of an image (in feature
   space: dropout plus Gaussian noise of the standardised global embedding, drawn independently per view), or
   images of the same class (`groups: labels`).
3. `scl`: a linear shared-space map between the two frozen encoders of stages 1-2, which it `requires`: each is a
   train stage of its own (own fingerprint, own MLflow run, reused from the cache), so changing only the map
   retrains only the map ("retrain the mapping at any time", paper section 3.3).

Stages 1-2 train an MLP head on frozen stored features (`image_embed`, `text_embed`), not the paper's
Transformer backbones: a stated deviation (METHODS.md 4.2).

Intra-modal losses (`loss`):
- `literal`: the paper's eq. 2/4 exactly, L = sum_i |d_E(F_i, F_{i+1}) + F_i . F_{i+1}| over consecutive items of
  each same-group set (batch order), on unnormalised features. It has no negatives (F = 0 gives L = 0), and for
  unit vectors it rewards antipodal pairs (METHODS.md 4.1): for reproduction and ablation only, with a warning.
- `signfix`: mean over positive pairs of (||z_i - z_j|| - z_i . z_j) on unit vectors (monotone in the cosine, one
  optimum at cos = 1) plus mean over negative pairs of [margin - ||z_i - z_k||]_+.
- `supcon` (default): Supervised Contrastive (Khosla et al. 2020, L_out), temperature 0.07.

Shared-space map (`map_loss`):
- `literal`: W minimising sum ||W z_I + b - z_T||^2 over (image, caption) pairs: the ridge closed form over the
  streamed train rows (`closed_form`, in `prepare`), or gradient descent on the same objective.
- `infonce` (default): a linear head per modality, symmetric InfoNCE with a learnable temperature.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import register_method
from pipeline.methods.base import Column, Method, Phase, args_dict
from pipeline.methods.heads import STATS_CHUNK_ROWS, mlp, streamed_mean_std
from pipeline.nn.losses import queue_infonce
from pipeline.nn.momentum import MomentumState

log = logging.getLogger(__name__)

LOSSES = ("literal", "signfix", "supcon")
GROUPS = ("instance", "labels")
MAP_LOSSES = ("literal", "infonce")
EPS = 1e-12  # under square roots: a zero distance keeps a finite gradient
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learnable inverse temperature
INPUTS = {"image": "image_embed", "text": "text_embed"}  # the stored global embedding each stage reads


# ---------------------------------------------------------------- losses
def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero that keeps `x` in the graph (a batch without any pair still backpropagates)."""
    return 0.0 * x.sum()


def literal_chain_loss(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 2/4: L = sum_i |d_E(F_i, F_{i+1}) + F_i . F_{i+1}|, i and i+1 consecutive items (in batch
    order) of the same group; d_E the Euclidean distance. features (B, D), unnormalised; groups (B,) int.
    Ill-posed as a contrastive loss (no negatives; METHODS.md 4.1): reproduction and ablation only."""
    order = torch.argsort(groups, stable=True)
    f, g = features[order], groups[order]
    same = g[1:] == g[:-1]
    a, b = f[:-1][same], f[1:][same]
    distance = (a - b).pow(2).sum(-1).clamp_min(EPS).sqrt()
    return (distance + (a * b).sum(-1)).abs().sum() + _zero(features)


def signfix_loss(z: torch.Tensor, groups: torch.Tensor, margin: float) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_pos", "loss_neg"}: the sign-fixed eq. 2/4 on unit vectors z (B, D),
    loss_pos = mean over positive pairs i < j of (||z_i - z_j|| - z_i . z_j) = sqrt(2 - 2c) - c (decreasing in the
    cosine c, one optimum at c = 1), loss_neg = mean over negative pairs of [margin - ||z_i - z_k||]_+."""
    cos = z @ z.T
    distance = (2.0 - 2.0 * cos).clamp_min(EPS).sqrt()
    same = groups[:, None] == groups[None, :]
    upper = torch.ones_like(same).triu(1)
    pos, neg = same & upper, ~same & upper
    loss_pos = (distance - cos)[pos].mean() if pos.any() else _zero(z)
    loss_neg = (margin - distance).clamp_min(0.0)[neg].mean() if neg.any() else _zero(z)
    return {"loss": loss_pos + loss_neg, "loss_pos": loss_pos, "loss_neg": loss_neg}


def supcon_loss(z: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised Contrastive loss (Khosla et al. 2020, eq. 2, L_out) on unit vectors z (B, D) with groups (B,):
    the mean over anchors i with at least one positive of
        -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / T) / sum_{a != i} exp(z_i . z_a / T) ),
    P(i) = the other items of i's group. Anchors without a positive in the batch are left out."""
    n = len(z)
    itself = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(itself, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (groups[:, None] == groups[None, :]) & ~itself
    count = pos.sum(1)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1) / count.clamp_min(1)
    anchors = count > 0
    return per_anchor[anchors].mean() if anchors.any() else _zero(z)


def ridge_map(xtx: torch.Tensor, ytx: torch.Tensor, ridge: float) -> torch.Tensor:
    """Returns W (D_y, D_x + 1) minimising sum_n ||W [x_n; 1] - y_n||^2 + ridge ||W[:, :D_x]||^2 (the bias is not
    penalised), from the sums xtx = sum [x;1][x;1]^T ((D_x+1, D_x+1)) and ytx = sum y [x;1]^T ((D_y, D_x+1)):
    W = ytx (xtx + ridge I')^-1, solved in float64."""
    penalty = torch.full((len(xtx),), float(ridge), dtype=torch.float64)
    penalty[-1] = 0.0
    a = xtx.double() + torch.diag(penalty)
    return torch.linalg.solve(a, ytx.double().T).T  # a is symmetric: (ytx a^-1)^T = a^-1 ytx^T


VAL_KS = (1, 5, 10)
VAL_CHUNK_ROWS = 1024  # queries scored at a time by `intra_recall`
VAL_SEED = 0  # the validation views of `scl_image` (the same every epoch)


@torch.no_grad()
def intra_recall(queries: torch.Tensor, gallery: torch.Tensor, query_groups: torch.Tensor,
                 gallery_groups: torch.Tensor, exclude_self: bool) -> dict[str, float]:
    """Returns {"intra_R@K" for K in VAL_KS, "rsum" (their sum)} of intra-modal retrieval: queries (Q, E) against
    gallery (G, E), unit vectors; a gallery item is a positive when its group equals the query's (with
    `exclude_self`, item q is query q itself and is left out). A query's rank = the number of negatives scoring
    >= its best positive (ties count against it); R@K = 100 * mean(rank < K) over the queries with a positive."""
    ranks = []
    for start in range(0, len(queries), VAL_CHUNK_ROWS):
        rows = torch.arange(start, min(start + VAL_CHUNK_ROWS, len(queries)))
        scores = queries[rows] @ gallery.T
        positive = query_groups[rows, None] == gallery_groups[None, :]
        if exclude_self:
            scores[torch.arange(len(rows)), rows] = float("-inf")
            positive[torch.arange(len(rows)), rows] = False
        best = scores.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        has = positive.any(1)
        ranks.append(((scores >= best) & ~positive).sum(1)[has])
    rank = torch.cat(ranks) if ranks else torch.zeros(0)
    recalls = {f"intra_R@{k}": 100.0 * float((rank < k).float().mean()) if len(rank) else 0.0 for k in VAL_KS}
    return {**recalls, "rsum": sum(recalls.values())}


# ---------------------------------------------------------------- stages 1-2: intra-modal encoders
@dataclass
class SCLEncoderArgs:
    loss: str = "supcon"  # literal | signfix | supcon
    groups: str = "instance"  # instance: captions of one image / views of one image; labels: same label set
    embed_dim: int = 256
    hidden_dim: int = 1024
    temperature: float = 0.07  # supcon
    margin: float = 1.0  # signfix: negatives pushed at least this far apart (unit vectors: 1.0 = cos <= 0.5)


@dataclass
class SCLImageArgs(SCLEncoderArgs):
    feature_dropout: float = 0.1  # per view: dropout of the standardised global embedding
    noise_std: float = 0.1  # per view: Gaussian noise, in units of each dimension's train-split std


def check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    """Raises ValueError naming `key` when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"train.method_args.{key}: expected one of {', '.join(choices)}, got {value!r}")


class IntraModal(Method):
    """An MLP head over one modality's stored global embedding, standardised per dimension by train-split
    statistics, trained by an intra-modal loss on that modality alone. Subclasses set `modality`.

    For the engine's per-epoch validation (cross-modal R@K, which picks the kept epoch), the other modality's
    embedding is read through the same head when both share a space (an open_clip / HF extractor's joint
    embeddings): a proxy of how much of the joint space the head keeps. Without a shared width the other side is
    zeros and validation scores 0. `val_metrics` is the intra-modal validation these stages need instead (used by
    the engine once its validation asks a method for its own metrics)."""

    modality: ClassVar[str] = ""

    @classmethod
    def columns(cls, args) -> list[Column]:
        return [Column(INPUTS["image"], "images"), Column(INPUTS["text"], "captions")]

    def __init__(self, args: SCLEncoderArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        check_choice(args.loss, LOSSES, "loss")
        check_choice(args.groups, GROUPS, "groups")
        self.embed_dim = args.embed_dim
        for name, column in INPUTS.items():
            self.register_buffer(f"{name}_mean", torch.zeros(dims.get(column, 1)))
            self.register_buffer(f"{name}_std", torch.ones(dims.get(column, 1)))
        self.head = mlp(dims.get(INPUTS[self.modality], 1), args.hidden_dim, args.embed_dim)
        self.image_group = torch.zeros(0, dtype=torch.long)  # train image row -> label group (groups: labels)

    # ---- state
    def get_extra_state(self) -> dict:
        return {"image_group": self.image_group}

    def set_extra_state(self, state: dict) -> None:
        self.image_group = state["image_group"]

    def prepare(self, inputs) -> None:
        """Sets the per-dimension mean/std of both stored embeddings over the train split (read in chunks) and,
        with `groups: labels`, the label group of every train image."""
        for name, count, read in (("image", inputs.num_images, inputs.images),
                                  ("text", inputs.num_captions, inputs.captions)):
            chunks = (read(np.arange(s, min(s + STATS_CHUNK_ROWS, count)))[INPUTS[name]].float().numpy()
                      for s in range(0, count, STATS_CHUNK_ROWS))
            mean, std = streamed_mean_std(chunks)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std.clamp_min(1e-6))
        if self.args.groups == "labels":
            self.image_group = label_groups(inputs.labels)
        if self.args.loss == "literal":
            log.warning("%s: loss literal is the paper's eq. 2/4 as written: it has no negatives, so the features "
                        "can collapse (F = 0 gives L = 0), and on unit vectors it rewards antipodal pairs "
                        "(docs/methods.md, SCL); for reproduction and ablation only", self.name)

    # ---- encoders
    def standardised(self, batch: dict, name: str) -> torch.Tensor:
        """Returns the (B, D) stored embedding of modality `name`, standardised per dimension."""
        x = batch[INPUTS[name]].float()
        return (x - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")

    def embed(self, batch: dict, name: str) -> torch.Tensor:
        """Returns the L2-normalised (B, embed_dim) head output of modality `name`'s embedding (the other
        modality's only as the validation proxy: zeros when its width differs)."""
        x = self.standardised(batch, name)
        if x.shape[1] != self.head[0].in_features:
            return x.new_zeros(len(x), self.embed_dim)
        return F.normalize(self.head(x), dim=-1)

    def encode_image(self, batch: dict) -> torch.Tensor:
        return self.embed(batch, "image")

    def encode_text(self, batch: dict) -> torch.Tensor:
        return self.embed(batch, "text")

    # ---- step
    def groups_of(self, image_rows: torch.Tensor) -> torch.Tensor:
        """Returns the (B,) positive groups of items of train image rows `image_rows`: the rows themselves, or
        their label groups."""
        if self.args.groups == "instance":
            return image_rows
        return self.image_group.to(image_rows.device)[image_rows]

    def split_groups(self, inputs) -> torch.Tensor:
        """Returns the (N,) positive groups of a split's images: their rows, or their label groups."""
        if self.args.groups == "instance":
            return torch.arange(inputs.num_images)
        return label_groups(inputs.labels)

    def embed_rows(self, inputs, name: str, device: torch.device, transform=None) -> torch.Tensor:
        """Returns the (N, E) unit head outputs of every image (`name` image) or caption (text) of a split, the
        standardised embeddings passed through `transform` first when given; on the CPU."""
        count, read = (inputs.num_images, inputs.images) if name == "image" else (inputs.num_captions,
                                                                                  inputs.captions)
        out = []
        for start in range(0, count, VAL_CHUNK_ROWS):
            batch = read(np.arange(start, min(start + VAL_CHUNK_ROWS, count)))
            x = self.standardised({k: v.to(device) for k, v in batch.items()}, name)
            out.append(F.normalize(self.head(transform(x) if transform else x), dim=-1).float().cpu())
        return torch.cat(out)

    def intra_loss(self, features: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns {"loss", ...} of `args.loss` on (B, E) unnormalised head outputs with (B,) groups."""
        a = self.args
        if a.loss == "literal":
            return {"loss": literal_chain_loss(features, groups)}
        z = F.normalize(features, dim=-1)
        if a.loss == "signfix":
            return signfix_loss(z, groups, a.margin)
        return {"loss": supcon_loss(z, groups, a.temperature)}


def label_groups(labels: list[list[str]]) -> torch.Tensor:
    """Returns (N,) int64 groups of images: one per distinct label set; an image without labels is a group of its
    own. Raises ValueError when no image has a label."""
    if not any(labels):
        raise ValueError("train.method_args.groups: labels needs a labelled set (e.g. nuswide10k); this one has "
                         "no image labels (use groups: instance)")
    ids: dict[tuple, int] = {}
    groups = [ids.setdefault(tuple(sorted(x)), len(ids)) if x else -1 for x in labels]
    return torch.tensor([g if g >= 0 else len(ids) + i for i, g in enumerate(groups)], dtype=torch.long)


@register_method("scl_text")
class SCLText(IntraModal):
    """SCL stage 1: text intra-modal contrastive learning; positives are the captions of one image (or of one
    label set)."""

    Args = SCLEncoderArgs
    modality = "text"

    def default_phases(self, epochs: int, lr: float) -> list[Phase]:
        return [Phase("text", epochs, lr, ["head"])]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns {"text": (B, E) unnormalised head outputs of the batch's captions}."""
        return {"text": self.head(self.standardised(batch, "text"))}

    def loss(self, out: dict, batch: dict, state: MomentumState) -> dict[str, torch.Tensor]:
        return self.intra_loss(out["text"], self.groups_of(batch["ids"]))

    @torch.no_grad()
    def val_metrics(self, inputs, device: torch.device) -> dict[str, float]:
        """Intra-modal validation: each caption of the split retrieves the other captions of its group (its
        image's, or its label set's) among all the others."""
        was_training = self.training
        self.eval()
        z = self.embed_rows(inputs, "text", device)
        groups = self.split_groups(inputs)[torch.as_tensor(inputs.caption_image)]
        self.train(was_training)
        return intra_recall(z, z, groups, groups, exclude_self=True)


def unique_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the distinct values of `ids` (U,), sorted, and the batch position of the first item of each
    (U,)): a batch of captions holds an image once per caption."""
    values, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(values),), len(ids), dtype=torch.long, device=ids.device)
    return values, first.scatter_reduce(0, inverse, positions, "amin")


@register_method("scl_image")
class SCLImage(IntraModal):
    """SCL stage 2: image intra-modal contrastive learning; positives are two feature-space augmentations of an
    image (dropout `feature_dropout` then Gaussian noise `noise_std` of the standardised global embedding, drawn
    independently per view) and, with `groups: labels`, images of the same label set. Each image of a batch
    counts once."""

    Args = SCLImageArgs
    modality = "image"

    def default_phases(self, epochs: int, lr: float) -> list[Phase]:
        return [Phase("image", epochs, lr, ["head"])]

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Returns one view of standardised embeddings x (U, D): dropout, then N(0, noise_std^2) noise."""
        a = self.args
        return F.dropout(x, a.feature_dropout, training=True) + a.noise_std * torch.randn_like(x)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns {"image": (2U, E)}: the unnormalised head outputs of two views of each of the U distinct images
        of the batch (first views, then second views)."""
        _, first = unique_rows(batch["ids"])
        x = self.standardised(batch, "image")[first]
        return {"image": self.head(torch.cat([self.augment(x), self.augment(x)]))}

    @torch.no_grad()
    def val_metrics(self, inputs, device: torch.device) -> dict[str, float]:
        """Intra-modal validation: a view of each image of the split retrieves another view of it (or of its label
        set's images) among the other views of all images; the views are drawn from a fixed seed (the same every
        epoch)."""
        was_training = self.training
        self.eval()
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(VAL_SEED)
            first = self.embed_rows(inputs, "image", device, self.augment)
            second = self.embed_rows(inputs, "image", device, self.augment)
        groups = self.split_groups(inputs)
        self.train(was_training)
        return intra_recall(first, second, groups, groups, exclude_self=False)

    def loss(self, out: dict, batch: dict, state: MomentumState) -> dict[str, torch.Tensor]:
        rows, _ = unique_rows(batch["ids"])
        groups = self.groups_of(rows)
        return self.intra_loss(out["image"], torch.cat([groups, groups]))


# ---------------------------------------------------------------- stage 3: the shared space
@dataclass
class SCLStageTrain:
    """The training of a stage that `scl` requires (train config overrides; the rest is `train`'s)."""

    epochs: int = 5
    lr: float = 1.0e-3


@dataclass
class SCLArgs:
    text: SCLEncoderArgs = field(default_factory=SCLEncoderArgs)  # stage 1's method_args
    image: SCLImageArgs = field(default_factory=SCLImageArgs)  # stage 2's method_args
    text_train: SCLStageTrain = field(default_factory=SCLStageTrain)  # stage 1's epochs and lr
    image_train: SCLStageTrain = field(default_factory=SCLStageTrain)  # stage 2's epochs and lr
    map_loss: str = "infonce"  # literal: least squares image -> text space | infonce: a linear head per side
    map_dim: int = 256  # infonce: width of the shared space
    temperature: float = 0.07  # infonce: initial value of the learnable temperature
    closed_form: bool = True  # literal: the ridge solution over the train split (one measuring epoch at lr 0)
    ridge: float = 1.0e-3  # literal: the ridge penalty on W


class LogitScale(nn.Module):
    """A learnable inverse temperature 1/T, stored as log(1/T) (CLIP), clamped at MAX_LOGIT_SCALE."""

    def __init__(self, temperature: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)


@register_method("scl")
class SCL(Method):
    """SCL stage 3: a linear map between the frozen encoders of `scl_text` and `scl_image` (each trained, or
    reused from the cache, as a train stage of its own through `requires`, copied in by `attach`).

    Modules: `text_encoder`, `image_encoder` (frozen unless a phase names them), `image_map` and, for `infonce`,
    `text_map` and `scale` (the learnable temperature)."""

    Args = SCLArgs

    @classmethod
    def columns(cls, args: SCLArgs) -> list[Column]:
        return IntraModal.columns(args)

    @classmethod
    def requires(cls, args: SCLArgs) -> dict[str, tuple[str, dict, dict]]:
        """Stages 1 and 2, each with its own method_args and epochs / lr."""
        return {"text": ("scl_text", args_dict(args.text), args_dict(args.text_train)),
                "image": ("scl_image", args_dict(args.image), args_dict(args.image_train))}

    def __init__(self, args: SCLArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        check_choice(args.map_loss, MAP_LOSSES, "map_loss")
        self.text_encoder = SCLText(args.text, dims)
        self.image_encoder = SCLImage(args.image, dims)
        for encoder in (self.text_encoder, self.image_encoder):
            encoder.requires_grad_(False)
        text_dim, image_dim = args.text.embed_dim, args.image.embed_dim
        if args.map_loss == "literal":
            self.embed_dim = text_dim
            self.image_map = nn.Linear(image_dim, text_dim)  # onto the text space
        else:
            self.embed_dim = args.map_dim
            self.image_map = nn.Linear(image_dim, args.map_dim)
            self.text_map = nn.Linear(text_dim, args.map_dim)
            self.scale = LogitScale(args.temperature)

    def attach(self, parts: dict[str, Method]) -> None:
        """Copies the trained stage-1 and stage-2 encoders (weights, standardisation, label groups)."""
        self.text_encoder.load_state_dict(parts["text"].state_dict())
        self.image_encoder.load_state_dict(parts["image"].state_dict())

    def default_phases(self, epochs: int, lr: float) -> list[Phase]:
        """The maps only. Literal with the closed form: one epoch at lr 0, which only measures the solution (its
        loss and validation) so that the run is tracked like any other."""
        if self.args.map_loss == "infonce":
            return [Phase("map", epochs, lr, ["image_map", "text_map", "scale"])]
        if self.args.closed_form:
            return [Phase("map", 1, 0.0, ["image_map"])]
        return [Phase("map", epochs, lr, ["image_map"])]

    # ---- the closed form
    @torch.no_grad()
    def prepare(self, inputs) -> None:
        """Literal with `closed_form`: sets image_map to the ridge least-squares map from the image encoder's
        outputs onto the text encoder's, over every (image, caption) pair of the train split, streamed in
        chunks."""
        if self.args.map_loss != "literal" or not self.args.closed_form:
            return
        xtx = ytx = 0.0
        for start in range(0, inputs.num_captions, STATS_CHUNK_ROWS):
            rows = np.arange(start, min(start + STATS_CHUNK_ROWS, inputs.num_captions))
            x = self.image_encoder.encode_image(inputs.images(inputs.caption_image[rows])).double()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            y = self.text_encoder.encode_text(inputs.captions(rows)).double()
            xtx, ytx = xtx + x.T @ x, ytx + y.T @ x
        w = ridge_map(xtx, ytx, self.args.ridge)
        self.image_map.weight.copy_(w[:, :-1])
        self.image_map.bias.copy_(w[:, -1])

    # ---- encoders and loss
    def encode_image(self, batch: dict) -> torch.Tensor:
        return F.normalize(self.image_map(self.image_encoder.encode_image(batch)), dim=-1)

    def encode_text(self, batch: dict) -> torch.Tensor:
        z = self.text_encoder.encode_text(batch)
        return z if self.args.map_loss == "literal" else F.normalize(self.text_map(z), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Literal: {"mapped": W z_I + b (B, E_T), "target": z_T (B, E_T)}; infonce: {"image", "text"} (B, M)
        unit vectors and "scale" (the inverse temperature, returned so that DDP sees it used)."""
        if self.args.map_loss == "literal":
            return {"mapped": self.image_map(self.image_encoder.encode_image(batch)),
                    "target": self.text_encoder.encode_text(batch)}
        return {"image": self.encode_image(batch), "text": self.encode_text(batch), "scale": self.scale()}

    def loss(self, out: dict, batch: dict, state: MomentumState) -> dict[str, torch.Tensor]:
        """Literal: {"loss" = mean_n ||W z_I + b - z_T||^2}; infonce: queue-less symmetric InfoNCE at the learned
        temperature, with "temperature" logged."""
        if self.args.map_loss == "literal":
            return {"loss": (out["mapped"] - out["target"]).pow(2).sum(-1).mean()}
        parts = queue_infonce(out["image"], out["text"], batch["ids"], 1.0 / out["scale"])
        return {**parts, "temperature": (1.0 / out["scale"]).detach()}
