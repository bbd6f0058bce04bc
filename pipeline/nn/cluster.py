"""Online pseudo clustering labels for CODER's instance branch (METHODS.md 3.3): prototypes on the unit sphere,
codes by Sinkhorn-Knopp with SwAV's equipartition constraint (Caron et al. 2020), or by a seeded spherical k-means
on the momentum queues, and SwAV's swapped prediction between the two modalities of a pair.

Sinkhorn-Knopp over N embeddings z_n and P prototypes c_p (unit rows), scores s_np = z_n . c_p:

    Q = exp(S^T / eps)  (P, N), divided by its sum;  then `iterations` times:
        rows    Q_p. <- Q_p. / (P sum_n Q_pn)     (each prototype holds 1/P of the mass)
        columns Q_.n <- Q_.n / (N sum_p Q_pn)     (each embedding holds 1/N of the mass)
    codes = N Q^T  (N, P): each row sums to 1, each prototype receives about N / P.

Everything here is a deterministic function of its inputs (k-means draws its first centroids from a given
`torch.Generator`), so every rank computes the same codes from the same gathered inputs, and so does a resumed run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.distributed import all_gather_no_grad, world


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Returns the (N, P) codes of (N, P) scores by Sinkhorn-Knopp (module docstring), computed in float64."""
    q = scores.double() / epsilon
    q = torch.exp(q - q.max()).T  # a global shift cancels in the normalisations
    q /= q.sum()
    count_p, count_n = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True) * count_p
        q /= q.sum(0, keepdim=True) * count_n
    return (q * count_n).T.to(scores.dtype)


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Returns k unit centroids (k, D) of the rows of `x` (N >= k, D) by cosine k-means: k-means++ seeding (each next
    first centroid a row drawn by `generator` (CPU) with probability proportional to its cosine distance to the
    nearest centroid so far), then `iterations` rounds of assignment to the nearest centroid and re-centring; a
    centroid left without members keeps its place."""
    x = F.normalize(x.float(), dim=-1)
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest_sim = x @ x[chosen[0]]
    for _ in range(1, k):
        distance = (1.0 - nearest_sim).clamp_min(0.0).double().cpu()
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest_sim = torch.maximum(nearest_sim, x @ x[chosen[-1]])
    centroids = x[chosen]
    for _ in range(iterations):
        nearest = (x @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        counts = torch.bincount(nearest, minlength=k)[:, None]
        centroids = torch.where(counts > 0, F.normalize(sums, dim=-1), centroids)
    return centroids


class Prototypes(nn.Module):
    """P prototypes of width D, drawn at random on the unit sphere. `learnable`: a parameter (trained by the swapped
    prediction), else a buffer (fixed, or set by k-means: `ready` 0 until then). `forward(z)` returns the (B, P)
    cosine scores of unit rows z."""

    def __init__(self, count: int, dim: int, learnable: bool = True, ready: bool = True):
        super().__init__()
        self.learnable = learnable
        weight = F.normalize(torch.randn(count, dim), dim=-1)  # torch's RNG: the method's seeded construction
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("ready", torch.tensor(int(ready), dtype=torch.uint8))  # uint8: gloo broadcasts it

    def unit(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.unit().T

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iterations: int, generator: torch.Generator) -> bool:
        """Sets the prototypes to the k-means centroids of the rows of `x` when there are at least P of them;
        returns whether they are ready."""
        if len(x) >= len(self.weight):
            self.weight.copy_(spherical_kmeans(x, len(self.weight), iterations, generator))
            self.ready.fill_(1)
        return bool(self.ready)


@torch.no_grad()
def pair_codes(img: torch.Tensor, txt: torch.Tensor, prototypes: torch.Tensor,
               queues: list[torch.Tensor | None] = (), epsilon: float = 0.05,
               iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the Sinkhorn codes (B, P) of this rank's image and text embeddings (B, D), computed jointly over every
    rank's batch of both modalities and the given queue features (K_i, D), against unit `prototypes` (P, D): the
    same on every rank, whatever the number of ranks."""
    rank, _ = world()
    every_img, every_txt = all_gather_no_grad(img.float()), all_gather_no_grad(txt.float())
    rows = [every_img, every_txt] + [q.float() for q in queues if q is not None and len(q)]
    codes = sinkhorn(torch.cat(rows) @ prototypes.detach().float().T, epsilon, iterations)
    b, n = len(img), len(every_img)
    return codes[rank * b:(rank + 1) * b], codes[n + rank * b:n + (rank + 1) * b]


@torch.no_grad()
def nearest_codes(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Returns one-hot codes (B, P) of the nearest unit prototype of each row of z (B, D)."""
    return F.one_hot((z @ prototypes.T).argmax(1), len(prototypes)).to(z.dtype)


def soft_cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Returns the mean over rows of -sum_p targets[b, p] log softmax(logits)[b, p]."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def swapped_prediction(img_scores: torch.Tensor, txt_scores: torch.Tensor, img_codes: torch.Tensor,
                       txt_codes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Returns SwAV's swapped prediction across modalities: (CE(q_t, softmax(s_v / T)) + CE(q_v, softmax(s_t / T)))
    / 2, scores (B, P) of each side against the prototypes, codes (B, P) without gradient."""
    return (soft_cross_entropy(txt_codes.detach(), img_scores / temperature)
            + soft_cross_entropy(img_codes.detach(), txt_scores / temperature)) / 2
