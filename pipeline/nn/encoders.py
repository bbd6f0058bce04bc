"""Set encoders over region and token features, with masks (any number of items per sample), for the methods
built on VSE infinity (USER, CODER): a region encoder with USER's semantic enhancement (SGE: self-guided, CGE:
guided by a CLIP image embedding; METHODS.md 1.1 and 1.3), a projection plus MLP residual and GPO pooling, and a
token encoder (projection plus GPO) for the text side.

Notation (METHODS.md 1.1): regions v_1..v_n in R^D of one image (n real rows of a padded (N, D) array), the
mask m_i (1 = a real region). Every sum, mean, softmax and normalisation over i runs over the real regions only,
so padding a set with more rows changes no output.

SGE:
    g_0 = mean_i v_i
    l_i = Drop(tanh(BN_mask(W_l v_i)))          BN_mask: per-channel statistics over the batch's real regions
    h   = Drop(tanh(BN(W_g g_0)))
    alpha_i = softmax_i(w_c^T (l_i * h) + b_c)
    g_self = L2norm(sum_i alpha_i v_i)
CGE (a reconstruction, METHODS.md 1.3): g_clip = L2norm(MLP(c)), c the CLIP global image embedding,
    MLP = BN(C) -> Linear(C, D) -> BN(D) -> ReLU -> Linear(D, D).
Region attention of a guide g (unit norm, D-wide):
    beta_i = p_i / ||p||_2,  p = softmax_i(lambda_att g^T v_i)
    v'_i   = v_i + beta_i g
With both guides the two terms are added: v'_i = v_i + beta^self_i g_self + beta^clip_i g_clip.
Then x_i = W_fc v'_i + MLP(v'_i) (MLP = Linear(D, E/2) -> BN_mask -> ReLU -> Linear(E/2, E)) and the image
embedding is L2norm(GPO({x_i})).

Dropout can draw its masks from a given `torch.Generator` (a method seeds it from the batch and the epoch, so a
resumed run drops the same units as an uninterrupted one); without one it uses torch's global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.gpo import GPO

GUIDES = ("self", "clip", "both")


def dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns inverted dropout of `x` (units zeroed with probability p, the rest scaled by 1/(1-p)) when
    `training`; masks from `generator` (on x's device) when given, else torch's global RNG."""
    if not training or p <= 0:
        return x
    if generator is None:
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns the (B, D) mean of (B, N, D) `x` over the rows where `mask` (B, N) is True (zeros for none)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns softmax over dim 1 of (B, N) `scores` restricted to `mask` (B, N) (0 elsewhere; all 0 for a sample
    with no real item)."""
    any_item = mask.any(1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~any_item, 0.0)  # no NaN for an empty sample
    return torch.softmax(scores, dim=1) * mask.to(scores.dtype)


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm over the channel axis of (B, N, C) sets, its statistics taken over the real rows only
    (`mask` (B, N) True): y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c. In training, mean_c and var_c
    (biased) are those of the batch's real rows and the running estimates move by `momentum` (running variance
    unbiased, as torch's BatchNorm); in eval the running estimates are used. Padded rows come out as zeros. The
    count of rows per sample is free: this replaces USER's BatchNorm1d(36) over the region index (METHODS.md 1.1)."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, C) float, (B, N) bool -> (B, N, C) float32."""
        x = x.float()
        m = mask.to(x.dtype).unsqueeze(-1)
        if self.training:
            count = m.sum()
            mean = (x * m).sum((0, 1)) / count.clamp_min(1.0)
            var = (((x - mean) ** 2) * m).sum((0, 1)) / count.clamp_min(1.0)
            if count > 0:
                with torch.no_grad():
                    unbiased = var * count / (count - 1).clamp_min(1.0)
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y * m


def xavier_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    """Returns a Linear layer with Xavier-uniform weights and zero bias (USER's and VSE infinity's init)."""
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def region_attention(regions: torch.Tensor, mask: torch.Tensor, guide: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
    """Returns beta (B, N): p = softmax_i(scale * g^T v_i) over the real regions, then L2-normalised over i.
    regions (B, N, D), mask (B, N) bool, guide g (B, D)."""
    p = masked_softmax(scale * torch.einsum("bnd,bd->bn", regions, guide), mask)
    return F.normalize(p, dim=1)


class SelfGuide(nn.Module):
    """SGE's guide vector g_self (B, D) of (B, N, D) regions: attention weights from local x global projections,
    then the L2-normalised weighted sum of the raw regions (module docstring)."""

    def __init__(self, dim: int, dropout: float = 0.4):
        super().__init__()
        self.dropout = dropout
        self.local_proj = xavier_linear(dim, dim)
        self.local_norm = MaskedBatchNorm1d(dim)
        self.global_proj = xavier_linear(dim, dim)
        self.global_norm = nn.BatchNorm1d(dim)
        self.score = xavier_linear(dim, 1)

    def attention(self, regions: torch.Tensor, mask: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns alpha (B, N): softmax_i(w_c^T (l_i * h) + b_c) over the real regions."""
        local = torch.tanh(self.local_norm(self.local_proj(regions), mask))
        local = dropout(local, self.dropout, self.training, generator)
        glob = torch.tanh(self.global_norm(self.global_proj(masked_mean(regions, mask))))
        glob = dropout(glob, self.dropout, self.training, generator)
        return masked_softmax(self.score(local * glob[:, None, :]).squeeze(-1), mask)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        alpha = self.attention(regions, mask, generator)
        return F.normalize(torch.einsum("bn,bnd->bd", alpha, regions), dim=-1)


class ClipGuide(nn.Module):
    """CGE's guide vector g_clip (B, D) = L2norm(MLP(c)) of a (B, C) CLIP image embedding c, with the MLP the
    USER authors describe (BN(C) -> Linear(C, D) -> BN(D) -> ReLU -> Linear(D, D); METHODS.md 1.3)."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.BatchNorm1d(clip_dim), xavier_linear(clip_dim, dim), nn.BatchNorm1d(dim),
                                 nn.ReLU(), xavier_linear(dim, dim))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(clip.float()), dim=-1)


class ResidualMLP(nn.Module):
    """x_i = W_fc v_i + MLP(v_i) per real row, MLP = Linear(D, H) -> BN_mask -> ReLU -> Linear(H, E) (VSE
    infinity's projection of precomputed regions, H = E / 2)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or max(1, out_dim // 2)
        self.fc = xavier_linear(in_dim, out_dim)
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.norm = MaskedBatchNorm1d(hidden_dim)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D), (B, N) bool -> (B, N, E)."""
        return self.fc(x) + self.out(torch.relu(self.norm(self.hidden(x), mask)))


class RegionEncoder(nn.Module):
    """Regions (B, N, D) with a mask -> L2-normalised (B, E) image embeddings: semantic enhancement by the self
    guide, the CLIP guide or both (`guide`), the projection plus MLP residual, GPO (module docstring)."""

    def __init__(self, in_dim: int, embed_dim: int, guide: str = "self", clip_dim: int = 0, dropout: float = 0.4,
                 attention_scale: float = 1.0, gpo_dim: int = 32):
        super().__init__()
        if guide not in GUIDES:
            raise ValueError(f"guide: expected one of {', '.join(GUIDES)}, got {guide!r}")
        if guide != "self" and clip_dim <= 0:
            raise ValueError(f"guide={guide} needs the width of the CLIP image embedding (clip_dim)")
        self.guide, self.attention_scale = guide, attention_scale
        self.self_guide = SelfGuide(in_dim, dropout) if guide in ("self", "both") else None
        self.clip_guide = ClipGuide(clip_dim, in_dim) if guide in ("clip", "both") else None
        self.project = ResidualMLP(in_dim, embed_dim)
        self.pool = GPO(gpo_dim, gpo_dim)

    def guides(self, regions: torch.Tensor, mask: torch.Tensor, clip: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Returns the unit guide vectors (B, D) of the enabled guides: [g_self][, g_clip]."""
        out = []
        if self.self_guide is not None:
            out.append(self.self_guide(regions, mask, generator))
        if self.clip_guide is not None:
            if clip is None:
                raise ValueError(f"guide={self.guide} needs the CLIP image embedding of every image")
            out.append(self.clip_guide(clip))
        return out

    def enhance(self, regions: torch.Tensor, mask: torch.Tensor, clip: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns v'_i = v_i + sum over the guides g of beta^g_i g, (B, N, D), zero on padded rows."""
        out = regions
        for g in self.guides(regions, mask, clip, generator):
            out = out + region_attention(regions, mask, g, self.attention_scale)[..., None] * g[:, None, :]
        return out * mask[..., None].to(out.dtype)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor | None = None, clip: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """regions (B, N, D) float, mask (B, N) bool (None: all real), clip (B, C) -> (B, E) unit vectors."""
        regions = regions.float()
        if mask is None:
            mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        x = self.project(self.enhance(regions, mask, clip, generator), mask)
        return F.normalize(self.pool(x, mask), dim=-1)


class TokenEncoder(nn.Module):
    """Token features (B, L, H) with a mask -> L2-normalised (B, E) text embeddings: Linear(H, E) per token, GPO
    (VSE infinity's and USER's text side on BERT's last hidden states, or on stored per-token features)."""

    def __init__(self, in_dim: int, embed_dim: int, gpo_dim: int = 32):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)
        self.pool = GPO(gpo_dim, gpo_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.pool(self.proj(tokens.float()), mask), dim=-1)
