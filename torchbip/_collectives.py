"""Private: the collectives of distributed BiP (one flat all-reduce per step, a start broadcast)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchbip._tensors import split_like

__all__ = ["agree", "all_reduce_mean", "broadcast_state", "default_group"]


def broadcast_state(model: nn.Module, group: Any) -> None:
    """Start every rank from rank 0's parameters and buffers (as DDP does when wrapping).

    The ranks first compare the names, shapes and dtypes of what is broadcast (one
    ``all_gather_object``): a broadcast between tensors that differ would abort the process or
    silently give ranks different weights.

    Raises:
        ValueError: on every rank, when some rank's parameters or buffers differ from rank 0's.
    """
    params = dict(model.named_parameters())
    tensors = {**params, **{n: b for n, b in model.named_buffers() if b is not None}}
    mine = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors.items()]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    differences = [
        f"rank {rank}: {_difference(gathered[0], theirs)}"
        for rank, theirs in enumerate(gathered)
        if theirs != gathered[0]
    ]
    if differences:
        raise ValueError(
            "the ranks of the process group hold different models, whose parameters and buffers "
            f"cannot all start from rank 0's ({'; '.join(differences)}); build the same model, with "
            "the same dtypes, on every rank"
        )
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    with torch.no_grad():
        for tensor in tensors.values():
            dist.broadcast(tensor.data, src=src, group=group)


def _difference(first: list[Any], other: list[Any]) -> str:
    """How ``other`` (a rank's ``(name, shape, dtype)`` entries) differs from rank 0's ``first``."""
    ours = {name: (shape, dtype.removeprefix("torch.")) for name, shape, dtype in first}
    theirs = {name: (shape, dtype.removeprefix("torch.")) for name, shape, dtype in other}
    parts = [f"no {name!r}" for name in ours if name not in theirs]
    parts += [f"an extra {name!r}" for name in theirs if name not in ours]
    parts += [
        f"{name!r} {theirs[name][1]} {theirs[name][0]} where rank 0 has {ours[name][1]} {ours[name][0]}"
        for name in ours
        if name in theirs and theirs[name] != ours[name]
    ]
    if not parts:
        return "the same tensors in another order"
    return ", ".join(parts[:3]) + (f" and {len(parts) - 3} more" if len(parts) > 3 else "")


def all_reduce_mean(
    tensors: list[Tensor], group: Any, failed: bool = False, counts: list[int] | None = None
) -> int:
    """Average tensors over the ranks of ``group`` in place, in one flat all-reduce.

    The flat buffer also carries one status entry per call, so that a rank that failed before the
    collective (``failed=True``, contributing zeros) does not leave the others waiting: every rank
    learns how many ranks failed. The buffer's dtype depends only on the non-scalar tensors (the
    same on every rank), never on the loss's.

    Args:
        tensors: the tensors to average (each rank's the same shapes).
        group: the process group.
        failed: this rank failed before the collective.
        counts: small counts summed over the ranks in the same collective (in place), e.g. how
            many ranks saw a gradient of each tensor.

    Returns:
        The number of ranks that reported a failure.
    """
    wide = any(t.dtype == torch.float64 and t.dim() > 0 for t in tensors)
    dtype = torch.float64 if wide else torch.float32
    extra = list(counts or [])
    status = torch.tensor(
        [1.0 if failed else 0.0, *map(float, extra)],
        dtype=dtype,
        device=tensors[0].device if tensors else None,
    )
    flat = torch.cat([status, *(t.detach().reshape(-1).to(dtype) for t in tensors)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    head = flat[: 1 + len(extra)].tolist()
    n_failed = round(head[0])
    if counts is not None:
        counts[:] = [round(c) for c in head[1:]]
    if failed or n_failed:
        return n_failed
    flat.div_(dist.get_world_size(group))
    with torch.no_grad():
        for t, mean in zip(tensors, split_like(flat[1 + len(extra) :], tensors), strict=True):
            t.copy_(mean)
    return 0


def default_group(process_group: Any) -> Any:
    """The process group to average over (``None``: no communication)."""
    if process_group is False:
        return None
    if process_group is not None:
        non_member = dist.is_available() and type(process_group) is type(dist.GroupMember.NON_GROUP_MEMBER)
        if non_member and process_group == dist.GroupMember.NON_GROUP_MEMBER:
            raise TypeError(
                "process_group is a group this rank is not a member of (dist.new_group() returns "
                "GroupMember.NON_GROUP_MEMBER on the other ranks): use it only on the group's ranks, "
                "and pass process_group=False (or leave torchbip out) on the others"
            )
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup, None or False, "
                f"got {process_group!r}"
            )
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def agree(
    mine: Mapping[str, Any] | None,
    error: BaseException | None,
    group: Any,
    caller: str,
    labels: Mapping[str, str],
    hints: Mapping[str, str] | None = None,
) -> None:
    """Make every rank of ``group`` agree on a plan, or raise on every rank.

    One ``all_gather_object``: each rank sends either the error its own checks raised or its
    plan (``mine``). A rank that failed raises its own error and every other rank a
    ``RuntimeError`` naming it; ranks whose plans differ all raise ``ValueError`` listing each
    rank's value, so that no rank is left waiting in the next collective.

    Args:
        mine: this rank's plan (``None`` when ``error`` is given).
        error: the error this rank's own checks raised, if any.
        group: the process group.
        caller: what was refused, for the message (``"global_prune"``, ``"BiP"``).
        labels: the plan's keys to compare, in order, with their names for the messages; the
            key ``"settings"`` holds a dict compared entry by entry.
        hints: advice appended to the message of a key that differs.
    """
    sent: dict[str, Any] = (
        {"error": f"{type(error).__name__}: {error}"} if error is not None else dict(mine or {})
    )
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, sent, group=group)
    if error is not None:
        raise error
    failed = [(rank, g["error"]) for rank, g in enumerate(gathered) if "error" in g]
    if failed:
        details = "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)
        raise RuntimeError(f"{caller} was refused on other ranks of the process group ({details})")
    for key, what in labels.items():
        values = [g[key] for g in gathered]
        if key == "settings":
            differ = sorted(k for k in values[0] if any(v.get(k) != values[0][k] for v in values[1:]))
            if differ:
                per_rank = "; ".join(
                    f"{k}: " + ", ".join(f"rank {r}: {v.get(k)!r}" for r, v in enumerate(values))
                    for k in differ
                )
                raise ValueError(
                    f"the ranks of the process group disagree on the {what} {differ} ({per_rank}); every "
                    "rank must run the same BiP, or their weights would drift apart"
                )
        elif any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(values))
            hint = (hints or {}).get(key, "")
            raise ValueError(f"the ranks of the process group disagree on the {what} ({per_rank}){hint}")
