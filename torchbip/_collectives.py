"""Private: the collectives of distributed BiP (one flat all-reduce per step, a start broadcast)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchbip._tensors import split_like

__all__ = ["all_reduce_mean", "broadcast_state", "default_group"]


def broadcast_state(model: nn.Module, group: Any) -> None:
    """Start every rank from rank 0's parameters and buffers (as DDP does when wrapping)."""
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=src, group=group)


def all_reduce_mean(tensors: list[Tensor], group: Any, failed: bool = False) -> int:
    """Average tensors over the ranks of ``group`` in place, in one flat all-reduce.

    The flat buffer also carries one status entry per call, so that a rank that failed before the
    collective (``failed=True``, contributing zeros) does not leave the others waiting: every rank
    learns how many ranks failed. The buffer's dtype depends only on the non-scalar tensors (the
    same on every rank), never on the loss's.

    Returns:
        The number of ranks that reported a failure.
    """
    wide = any(t.dtype == torch.float64 and t.dim() > 0 for t in tensors)
    dtype = torch.float64 if wide else torch.float32
    status = torch.full(
        (1,), 1.0 if failed else 0.0, dtype=dtype, device=tensors[0].device if tensors else None
    )
    flat = torch.cat([status, *(t.detach().reshape(-1).to(dtype) for t in tensors)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    n_failed = round(float(flat[0]))
    if failed or n_failed:
        return n_failed
    flat.div_(dist.get_world_size(group))
    with torch.no_grad():
        for t, mean in zip(tensors, split_like(flat[1:], tensors), strict=True):
            t.copy_(mean)
    return 0


def default_group(process_group: Any) -> Any:
    """The process group to average over (``None``: no communication)."""
    if process_group is False:
        return None
    if process_group is not None:
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup, None or False, "
                f"got {process_group!r}"
            )
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None
