"""Momentum encoders and cross-worker-synchronised momentum queues (MoCo, He et al. 2020; ALBEF, Li et al. 2021).

`MomentumQueue.enqueue` all-gathers the keys and ids of every worker (no grad) before writing, so every
rank writes the same global batch at the same position and the queues stay identical on all ranks.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.nn.distributed import all_gather_no_grad


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
def enqueue_together(queues: list[MomentumQueue], keys: list[torch.Tensor],
                     ids: torch.Tensor | list[torch.Tensor]) -> None:
    """Enqueues each (B, dim_q) key tensor into its queue with its (B,) ids (one tensor shared by all queues, or
    one per queue) with ONE all-gather (keys and ids packed side by side) instead of two per queue. Same result
    as `enqueue` on each queue."""
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] * len(queues)
    if any(len(i) and int(i.max()) >= MAX_PACKED_ID for i in ids):
        for queue, k, i in zip(queues, keys, ids):
            queue.enqueue(k, i)
        return
    packed = all_gather_no_grad(torch.cat([k.float() for k in keys] + [i[:, None].float() for i in ids], 1))
    widths = [k.shape[1] for k in keys]
    parts = torch.split(packed, widths + [1] * len(ids), dim=1)
    for queue, part, part_ids in zip(queues, parts[:len(keys)], parts[len(keys):]):
        queue.write(part, part_ids[:, 0].round().long())


class MomentumState(nn.Module):
    """What a method owns besides its parameters: EMA copies of some of its modules (`ema[name]`, updated by
    `update`) and named queues of (key, id) pairs (`queues[name]`), all saved in `state_dict` so a checkpoint
    restores them exactly. Every queue is written through `enqueue`: one packed all-gather per step, so all
    ranks write the same global batch at the same position and the queues stay identical."""

    def __init__(self, method: nn.Module, ema: tuple[str, ...] = (), queues: dict[str, int] | None = None,
                 queue_size: int = 0, momentum: float = 0.995):
        super().__init__()
        self.momentum = momentum
        self.ema = nn.ModuleDict({name: momentum_copy(submodule(method, name)) for name in ema})
        self.queues = nn.ModuleDict({name: MomentumQueue(queue_size, dim) for name, dim in (queues or {}).items()}
                                    if queue_size else {})

    @torch.no_grad()
    def update(self, method: nn.Module) -> None:
        """Moves every EMA copy towards its module of `method`: theta_k <- m theta_k + (1 - m) theta_q."""
        for name, twin in self.ema.items():
            ema_update(twin, submodule(method, name), self.momentum)

    def enqueue(self, keys: dict[str, torch.Tensor], ids: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Writes keys[name] (B, dim) with ids (B,) (one tensor for all, or per queue name) into the named queues,
        every rank's batch gathered in one call."""
        names = list(keys)
        enqueue_together([self.queues[n] for n in names], [keys[n] for n in names],
                         [ids[n] for n in names] if isinstance(ids, dict) else ids)

    def queue(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Returns (features (K, dim), ids (K,)) of the filled slots of queue `name`, None when queues are off."""
        return self.queues[name].valid() if name in self.queues else None

    def checksum(self) -> float:
        """Returns a scalar fingerprint of every queue (0 without queues): equal on ranks with equal queues."""
        return sum(q.checksum() for q in self.queues.values())


WHOLE = "*"  # the EMA name of a whole method


def submodule(module: nn.Module, name: str) -> nn.Module:
    """Returns `module` itself for name "*" (`WHOLE`), else its submodule `name` (a direct child)."""
    return module if name == WHOLE else module.get_submodule(name)
