"""Fine-grained (token-level) image-text matching scores: TERAN's "MrSw" local similarity (Messina et al., TOMM 2021),
which TGDT (Liu et al., TIP 2023) uses for its local loss and its second retrieval stage.

For an image with L2-normalised region tokens r_1..r_R and a caption with L2-normalised word tokens w_1..w_L,

    S_loc(I, T) = sum_{w real} max_{r real} cos(r, w)        (pool "sum", TERAN and TGDT)
                  or that sum / #real words                   (pool "mean")

Padded regions never win a max, padded words add nothing, and a word of an image without any real region scores 0.
The functions score every (image, caption) pair of a group in one batched matrix product: no Python loop over
pairs or tokens.
"""
from __future__ import annotations

import torch

POOLS = ("sum", "mean")


def grouped_local_scores(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                         word_mask: torch.Tensor, pool: str = "sum") -> torch.Tensor:
    """Returns (G, Ni, Nt) S_loc of every image against every caption of the same group g: regions (G, Ni, R, E),
    region_mask (G, Ni, R) bool, words (G, Nt, L, E), word_mask (G, Nt, L) bool (True = a real token). Tokens are
    used as given (pass L2-normalised ones for cosines). One (Nt*L, E) x (E, Ni*R) product per group."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    g, ni, r, e = regions.shape
    nt, n_words = words.shape[1], words.shape[2]
    sim = torch.bmm(words.reshape(g, nt * n_words, e), regions.reshape(g, ni * r, e).transpose(1, 2))
    sim = sim.view(g, nt, n_words, ni, r).masked_fill(~region_mask[:, None, None], float("-inf"))
    best = sim.amax(-1)  # (G, Nt, L, Ni): each word's best region
    best = torch.where(region_mask.any(-1)[:, None, None, :], best, best.new_zeros(()))
    real = word_mask.to(best.dtype)
    total = (best * real[..., None]).sum(2)  # (G, Nt, Ni)
    if pool == "mean":
        total = total / real.sum(2, keepdim=True).clamp_min(1.0)
    return total.transpose(1, 2)


def local_score_matrix(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                       word_mask: torch.Tensor, pool: str = "sum") -> torch.Tensor:
    """Returns the (Ni, Nt) S_loc of every image against every caption: regions (Ni, R, E), region_mask (Ni, R),
    words (Nt, L, E), word_mask (Nt, L)."""
    return grouped_local_scores(regions[None], region_mask[None], words[None], word_mask[None], pool)[0]
