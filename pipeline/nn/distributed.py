"""The distributed gathers, in one place. Without an initialised process group (one worker, tests)
every function is the identity."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """Returns (rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Returns the concatenation over ranks (rank order) of `x` (B, ...) -> (world*B, ...), detached.
    Every rank must pass the same shape."""
    _, size = world()
    if size == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Returns the concatenation over ranks of `x` (B, ...) -> (world*B, ...) keeping the autograd graph:
    gradients flow back to each rank's own slice (open_clip's `gather_with_grad`)."""
    _, size = world()
    if size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()))
