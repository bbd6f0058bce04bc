"""Momentum encoders and cross-worker-synchronised momentum queues (MoCo, He et al. 2020; ALBEF, Li et al. 2021).

`MomentumQueue.enqueue` all-gathers the keys and ids of every worker (no grad) before writing, so every
rank writes the same global batch at the same position and the queues stay identical on all ranks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.train.distributed import all_gather_no_grad


def momentum_copy(model: nn.Module) -> nn.Module:
    """Returns a frozen deep copy of `model` to be updated by `ema_update`."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(momentum_model: nn.Module, model: nn.Module, m: float, buffers: bool = False) -> None:
    """Sets theta_k <- m * theta_k + (1 - m) * theta_q for every parameter (and float buffer, if asked)."""
    for pk, pq in zip(momentum_model.parameters(), model.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)
    if buffers:
        for bk, bq in zip(momentum_model.buffers(), model.buffers()):
            if bk.dtype.is_floating_point:
                bk.mul_(m).add_(bq, alpha=1.0 - m)


class MomentumQueue(nn.Module):
    """A FIFO of `size` key vectors (dim) with the sample id of each (-1 = empty slot) and a write pointer."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Gathers (B, dim) keys and (B,) ids from every rank and writes the global batch at the pointer.

        Raises ValueError when the global batch does not divide the queue size."""
        self.write(all_gather_no_grad(keys), all_gather_no_grad(ids))

    @torch.no_grad()
    def write(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Writes an already gathered global batch (n, dim) keys and (n,) ids at the pointer."""
        n = len(keys)
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not a multiple of the global batch {n}")
        p = int(self.ptr)
        self.features[p:p + n] = keys.to(self.features.dtype)
        self.ids[p:p + n] = ids.to(self.ids.dtype)
        self.ptr.fill_((p + n) % self.size)

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features (K, dim), ids (K,)) of the filled slots."""
        mask = self.ids >= 0
        return self.features[mask], self.ids[mask]

    def checksum(self) -> float:
        """Returns a scalar fingerprint of the queue contents (equal on ranks that hold equal queues)."""
        return float(self.features.double().sum() + (self.ids.double() * 1e-3).sum() + self.ptr.double())


MAX_PACKED_ID = 1 << 24  # ids travel as float32 in `enqueue_together`: exact below 2**24


@torch.no_grad()
def enqueue_together(queues: list[MomentumQueue], keys: list[torch.Tensor], ids: torch.Tensor) -> None:
    """Enqueues each (B, dim_q) key tensor into its queue, all sharing the (B,) ids, with ONE all-gather
    (keys and ids packed side by side) instead of two per queue. Same result as `enqueue` on each queue."""
    if len(ids) and int(ids.max()) >= MAX_PACKED_ID:
        for queue, k in zip(queues, keys):
            queue.enqueue(k, ids)
        return
    packed = all_gather_no_grad(torch.cat([k.float() for k in keys] + [ids[:, None].float()], 1))
    widths = [k.shape[1] for k in keys]
    parts = torch.split(packed, widths + [1], dim=1)
    for queue, part in zip(queues, parts[:-1]):
        queue.write(part, parts[-1][:, 0].round().long())


@dataclass
class MomentumState:
    """The momentum twin of a method and its queues (None when queues are off)."""

    model: nn.Module
    image_queue: MomentumQueue | None = None
    text_queue: MomentumQueue | None = None
