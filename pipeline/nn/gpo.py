"""GPO, the Generalized Pooling Operator of VSE infinity (Chen et al., "Learning the Best Pooling Strategy for
Visual Semantic Embedding", CVPR 2021; METHODS.md 1.1), for any number of items per sample given by a mask.

For a set of n items x_1..x_n in R^D:
- every dimension d is sorted in descending order over the n items: x_(1),d >= x_(2),d >= ... >= x_(n),d;
- the weight of sorted position k depends on n and k only: a sin/cos positional code p_k (width `pe_dim` = 32)
  goes through a bidirectional GRU (hidden `hidden_dim` = 32) over the n positions, the two directions averaged,
  then a linear score s_k = w^T h_k and theta_k = softmax_k(s_k / T), T = 0.1;
- GPO(x) = sum_k theta_k x_(k): max pooling and mean pooling are the special cases of a one-hot and a uniform theta.

The linear score has no bias (as in VSE infinity): a constant shift cancels in the softmax. Padded items (mask
False) take no part: they sort after every real item and get weight 0, so padding a set changes nothing.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """Returns the (length, dim) sinusoidal code of positions 0..length-1 (Vaswani et al. 2017):
    pe[k, 2j] = sin(k / 10000^(2j/dim)), pe[k, 2j+1] = cos(k / 10000^(2j/dim)); `dim` even."""
    if dim % 2:
        raise ValueError(f"the positional code needs an even width, got {dim}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)
    return pe


class GPO(nn.Module):
    """Generalized pooling: (B, N, D) features with a (B, N) bool mask -> (B, D) (module docstring)."""

    def __init__(self, pe_dim: int = 32, hidden_dim: int = 32, temperature: float = 0.1):
        super().__init__()
        self.pe_dim, self.temperature = pe_dim, temperature
        self.gru = nn.GRU(pe_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden_dim, 1, bias=False)

    def position_weights(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Returns theta (B, width): the weights of sorted positions 0..width-1 for sets of `lengths` (B,) items
        (0 past each length; a set of 0 items is weighted as a set of 1). The GRU runs once per distinct length."""
        lengths = lengths.clamp(1, max(1, width))
        counts, which = torch.unique(lengths, return_inverse=True)  # (U,), (B,)
        longest = int(counts.max())
        device = self.linear.weight.device
        valid = torch.arange(longest, device=device)[None, :] < counts.to(device)[:, None]  # (U, longest)
        codes = positional_encoding(longest, self.pe_dim).to(device)[None].expand(len(counts), -1, -1)
        codes = codes * valid[..., None]
        packed = pack_padded_sequence(codes, counts.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=longest)
        half = hidden.shape[-1] // 2
        hidden = (hidden[..., :half] + hidden[..., half:]) / 2  # the two directions averaged
        scores = self.linear(hidden).squeeze(-1).masked_fill(~valid, float("-inf"))  # (U, longest)
        theta = torch.softmax(scores / self.temperature, dim=1)
        theta = nn.functional.pad(theta, (0, width - longest))
        return theta[which.to(device)]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the (B, D) pooled features of (B, N, D) `features` over the items where `mask` (B, N) is True
        (None: all); a sample with no item pools to zeros."""
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        lengths = mask.sum(1)
        theta = self.position_weights(lengths, features.shape[1]).to(features.dtype)  # (B, N)
        ranked = features.masked_fill(~mask[..., None], float("-inf")).sort(dim=1, descending=True).values
        filled = torch.arange(features.shape[1], device=features.device)[None, :] < lengths[:, None]  # (B, N)
        ranked = ranked.masked_fill(~filled[..., None], 0.0)
        return (ranked * theta[..., None]).sum(1)
