r"""Structured BiP: one learned score per filter (``dim=0``) or input channel (``dim=1``).

:class:`BiPStructured` is the structured sibling of :class:`torchbip.BiPPruningMethod`: a
:class:`torch.nn.utils.prune.BasePruningMethod` with ``PRUNING_TYPE = "structured"`` and a
``dim``, whose mask zeroes whole groups (all entries that share an index along ``dim``). Here
``amount`` counts *groups* (filters or channels), never entries: ``amount=0.5`` on a
``Conv2d(3, 8, 3)`` weight with ``dim=0`` prunes 4 of its 8 filters.

The pure helpers below are what the bi-level loop needs for a group mask: the score of a group
(:func:`group_reduce`), the broadcast of a group keep to the tensor (:func:`expand_groups`) and
the group's upper gradient, the sum of the element-wise :math:`d\ell/dm` over the group
(:func:`group_reduce` again: the chain rule through the broadcast).

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(2, 4, kernel_size=1, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(torch.tensor([1.0, 4.0, 2.0, 3.0]).view(4, 1, 1, 1).expand(4, 2, 1, 1))
    >>> _ = bip_structured(conv, "weight", amount=0.5, dim=0)
    >>> conv.weight_mask[:, 0, 0, 0].tolist()  # the two filters of lowest L1 norm are pruned
    [0.0, 1.0, 0.0, 1.0]
    >>> signed = torch.tensor([[-4.0, -4.0], [1.0, 1.0], [-0.5, 3.0]])
    >>> BiPStructured(amount=1, dim=0).compute_mask(signed, torch.ones(3, 2))[:, 0].tolist()
    [1.0, 0.0, 1.0]
    >>> conv.weight_scores.tolist()  # one score per filter
    [2.0, 8.0, 4.0, 6.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip.masks import GlobalTopK, count_from_amount, floor_counts, topk_mask, validate_amount
from torchbip.method import (
    BiPMethod,
    attach_scores,
    check_finite,
    check_mask_shape,
    check_scores_device,
    check_scores_slot,
    check_scores_type,
    integer_argument,
    magnitudes,
    named_tensor,
    outside_inference_mode,
    scores_source,
    unchanged_on_failure,
)

__all__ = [
    "BUDGETS",
    "BiPStructured",
    "Budget",
    "bip_structured",
    "expand_groups",
    "group_keep_counts",
    "group_reduce",
    "group_unit",
    "normalize_dim",
    "select_groups",
    "validate_budget",
]

Budget = Literal["layer", "global"]
BUDGETS: tuple[str, ...] = ("layer", "global")


def normalize_dim(dim: object, ndim: int) -> int:
    """Return ``dim`` as a non-negative axis of a tensor with ``ndim`` dimensions.

    Args:
        dim: an int (or a NumPy integer) in ``[-ndim, ndim)``.
        ndim: the number of dimensions of the tensor.

    Returns:
        ``dim`` if it is non-negative, else ``dim + ndim``, a Python ``int``.

    Raises:
        TypeError: if ``dim`` is not an integer (a ``bool`` is rejected).
        ValueError: if it is out of range.

    Example:
        >>> normalize_dim(-1, 4), normalize_dim(1, 2)
        (3, 1)
        >>> normalize_dim(2, 2)
        Traceback (most recent call last):
        ...
        ValueError: dim=2 is out of range for a tensor with 2 dimensions (use -2 ... 1)
    """
    dim = integer_argument("dim", dim)
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"dim={dim} is out of range for a tensor with {ndim} dimensions (use {-ndim} ... {ndim - 1})"
        )
    return dim % ndim


def group_reduce(t: Tensor, dim: int) -> Tensor:
    r"""Sum ``t`` over every dimension but ``dim``: one value per group.

    This is both the score of a group (the sum of its entries' importance; with
    :math:`|\theta|` it is the group's L1 norm) and the upper gradient of a group mask bit: the
    sum of the element-wise :math:`d\ell/dm` over the group (the chain rule through
    :func:`expand_groups`).

    Args:
        t: a tensor with at least one dimension.
        dim: the group axis (``0``: output filters, ``1``: input channels).

    Returns:
        A 1-D tensor of length ``t.shape[dim]``.

    Example:
        >>> import torch
        >>> group_reduce(torch.arange(6.0).view(2, 3), dim=0).tolist()
        [3.0, 12.0]
        >>> group_reduce(torch.arange(6.0).view(2, 3), dim=1).tolist()
        [3.0, 5.0, 7.0]
    """
    dim = normalize_dim(dim, t.dim())
    others = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=others) if others else t.clone()


def expand_groups(values: Tensor, shape: Sequence[int], dim: int) -> Tensor:
    """Broadcast one value per group to a tensor of ``shape`` (a view, no copy).

    Args:
        values: a 1-D tensor of length ``shape[dim]``.
        shape: the shape of the grouped tensor.
        dim: the group axis.

    Returns:
        An expanded view of ``values`` with ``shape``.

    Raises:
        ValueError: if ``values`` does not hold one value per group.

    Example:
        >>> import torch
        >>> expand_groups(torch.tensor([1, 0]), (2, 3), dim=0).tolist()
        [[1, 1, 1], [0, 0, 0]]
    """
    shape = tuple(shape)
    dim = normalize_dim(dim, len(shape))
    if values.dim() != 1 or values.numel() != shape[dim]:
        raise ValueError(
            f"values has shape {tuple(values.shape)} but a tensor of shape {shape} has "
            f"{shape[dim]} groups along dim={dim}"
        )
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return values.view(view).expand(shape)


def allowed_groups(default_mask: Tensor, dim: int) -> Tensor:
    """Groups that still hold an unpruned entry (torch's container uses the same rule)."""
    return group_reduce((default_mask != 0).to(torch.int64), dim) > 0


class BiPStructured(BiPMethod):
    r"""Prune whole groups (filters or channels) of lowest L1 norm of the scores.

    A group is every entry that shares an index along ``dim``: with a conv weight
    ``(out, in, kh, kw)``, ``dim=0`` groups output filters and ``dim=1`` input channels. The score
    of a group is the sum of ``|t|`` over it, its L1 norm, where ``t`` is what torch hands
    :meth:`compute_mask`: the weight or the ``importance_scores`` (the criterion of
    :func:`torch.nn.utils.prune.ln_structured` with ``n=1``). The mask zeroes the groups of
    lowest norm among those that ``default_mask`` still uses (a group with any unpruned entry);
    an entry pruned earlier is never revived. Ties keep the lower index. The group scores that
    ``global_prune(structured="filter"/"channel")`` learns are ranked by value by its own
    selection, not through this method.

    State on the module after :meth:`apply`: ``<name>_orig`` (the parameter), ``<name>_mask``
    (buffer, ``<name>``'s shape), a forward pre-hook that sets
    ``<name> = <name>_orig * <name>_mask`` (deep-copyable after a training step, see
    :class:`~torchbip.method.BiPMethod`), plus the non-persistent ``<name>_scores`` buffer
    holding *one score per group* (shape ``(t.shape[dim],)``). :func:`torch.nn.utils.prune.remove`
    makes the pruning permanent and drops the score buffer, also through a
    :class:`~torch.nn.utils.prune.PruningContainer`. Composes with torch's methods in a container
    like :class:`~torch.nn.utils.prune.LnStructured` does.

    Args:
        amount: a float in ``[0, 1]``, the fraction of the *remaining groups* to prune, or an
            int, the number of groups to prune (torch's convention, counted in groups).
        dim: the group axis: ``0`` output filters, ``1`` input channels (negative counts from the
            end).

    Example:
        >>> import torch
        >>> method = BiPStructured(amount=1, dim=0)
        >>> scores = torch.tensor([[0.9, 0.1], [0.5, 0.7], [0.2, 0.1]])
        >>> method.compute_mask(scores, default_mask=torch.ones(3, 2)).tolist()
        [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
        >>> BiPStructured(amount=0.5, dim=1).compute_mask(scores, torch.ones(3, 2)).tolist()
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    """

    PRUNING_TYPE = "structured"

    def __init__(self, amount: int | float, dim: int = 0) -> None:
        self.amount = validate_amount(amount)
        self.dim = integer_argument("dim", dim)  # (a NumPy integer becomes a Python int)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """Return ``default_mask`` with the remaining groups of lowest L1 norm of ``t`` set to zero.

        Args:
            t: the tensor to prune or its importance scores; the group sums of ``|t|`` are ranked.
            default_mask: the mask from earlier pruning (ones where nothing was pruned).

        Returns:
            A mask of ``default_mask``'s dtype in which exactly ``count`` more groups are zero,
            where ``count`` is ``round(amount * remaining_groups)`` for a float amount or
            ``amount`` for an int. For a ``meta`` tensor (no values), a ``meta`` mask of that
            shape, as torch's methods give.

        Raises:
            ValueError: for mismatched shapes, non-finite scores, a bad ``dim`` or an int
                ``amount`` above the number of remaining groups.
        """
        check_mask_shape(t, default_mask)
        if t.dim() == 0:
            raise ValueError("structured pruning needs a tensor with at least one dimension, got a scalar")
        check_finite(t)
        dim = normalize_dim(self.dim, t.dim())
        if t.is_meta or default_mask.is_meta:
            # no values to rank: a mask of the right shape, as torch's own methods give
            count_from_amount(self.amount, t.shape[dim], unit=group_unit(dim))
            return torch.empty_like(default_mask, device="meta")
        allowed = allowed_groups(default_mask, dim)
        n_allowed = int(allowed.sum())
        n_prune = count_from_amount(self.amount, n_allowed, unit=group_unit(dim))
        scores = group_reduce(magnitudes(t).to(torch.float64), dim)
        keep = topk_mask(scores, n_allowed - n_prune, allowed)
        return default_mask * expand_groups(keep, t.shape, dim).to(dtype=default_mask.dtype)

    @classmethod
    @outside_inference_mode
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: int | float,
        dim: int = 0,
        importance_scores: Tensor | None = None,
    ) -> prune.BasePruningMethod:
        """Prune groups of ``module.<name>`` by the L1 norms of scores; register the group-score buffer.

        Args:
            module: the module holding the tensor.
            name: the parameter name, e.g. ``"weight"``.
            amount: see :class:`BiPStructured` (counts groups).
            dim: the group axis.
            importance_scores: scores of the tensor's shape (a group's score is its L1 norm), or
                one score per group (shape ``(t.shape[dim],)``, ranked by magnitude, kept as
                given); by default the magnitudes of the current (masked) weights.

        Returns:
            The hook now attached to the module (a :class:`BiPStructured`, or a
            :class:`torch.nn.utils.prune.PruningContainer` when the tensor was pruned before).

        Raises:
            ValueError: for a bad ``amount``, ``dim`` or ``importance_scores``, or a module that
                already holds an attribute ``<name>_scores`` of its own
                (:func:`~torchbip.method.check_scores_slot`); the module is unchanged.
        """
        validate_amount(amount)
        current = named_tensor(module, name)
        check_scores_slot(module, name)
        if current.dim() == 0:
            raise ValueError(f"{name} is a scalar; structured pruning needs at least one dimension")
        axis = normalize_dim(dim, current.dim())
        dim = integer_argument("dim", dim)  # (a NumPy integer becomes a Python int)
        check_scores_type(importance_scores)
        check_scores_device(importance_scores, current, name)
        scores = current.detach().abs() if importance_scores is None else importance_scores.detach()
        group_scores: Tensor | None = None
        if scores.dim() == 1 and scores.numel() == current.shape[axis] and scores.shape != current.shape:
            group_scores = scores.clone()
            scores = expand_groups(scores, current.shape, axis)
        if scores.shape != current.shape:
            raise ValueError(
                f"importance_scores has shape {tuple(scores.shape)} but {name} has shape "
                f"{tuple(current.shape)} (pass that shape or ({current.shape[axis]},), one per group)"
            )
        check_finite(scores, scores_source(importance_scores, name))
        mask = getattr(module, name + "_mask", None)
        base = mask if isinstance(mask, Tensor) else torch.ones_like(current)
        unit = group_unit(axis)
        # raise before torch acts (a meta mask holds no values: every group counts)
        n_groups = current.shape[axis] if base.is_meta else int(allowed_groups(base, axis).sum())
        count_from_amount(amount, n_groups, unit=unit)
        if group_scores is None:
            group_scores = group_reduce(magnitudes(scores).to(torch.float64), axis).to(scores.dtype)
        scores = scores.contiguous()
        with unchanged_on_failure(module, name):
            method = super().apply(module, name, amount=amount, dim=dim, importance_scores=scores)
        attach_scores(method, module, name, group_scores)
        return method


def bip_structured(
    module: nn.Module,
    name: str,
    amount: int | float,
    dim: int = 0,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """Prune whole filters (``dim=0``) or input channels (``dim=1``) of ``module.<name>``.

    The functional twin of :class:`BiPStructured`, in the style of
    :func:`torch.nn.utils.prune.ln_structured` with ``n=1``. ``amount`` counts groups: a float is
    the fraction of the remaining filters/channels, an int their number. A group's score is the L1
    norm of its ``importance_scores``, by default of its weights (magnitude pruning); learned
    scores come from
    :func:`torchbip.global_prune` with ``structured="filter"`` or ``"channel"``.

    Args:
        module: module containing the tensor to prune.
        name: parameter name within ``module``.
        amount: a float in ``[0, 1]`` (fraction of the remaining groups) or an int (a count of
            groups).
        dim: the group axis (``0`` output filters, ``1`` input channels).
        importance_scores: optional scores of the parameter's shape or one per group.

    Returns:
        ``module``, modified in place.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> conv = nn.Conv2d(3, 8, kernel_size=3)
        >>> _ = bip_structured(conv, "weight", amount=0.25, dim=0)
        >>> int((conv.weight_mask.sum(dim=(1, 2, 3)) == 0).sum())  # 2 of 8 filters
        2
        >>> channel_scores = torch.tensor([3.0, 1.0, 2.0])
        >>> _ = bip_structured(conv, "weight", amount=1, dim=1, importance_scores=channel_scores)
        >>> conv.weight_mask.sum(dim=(0, 2, 3)).tolist()  # channel 1 of the 6 remaining filters
        [54.0, 0.0, 54.0]
        >>> sorted(conv.state_dict())
        ['bias', 'weight_mask', 'weight_orig']
    """
    BiPStructured.apply(module, name, amount=amount, dim=dim, importance_scores=importance_scores)
    return module


def validate_budget(budget: str) -> None:
    """Refuse a ``budget`` that is not one of :data:`BUDGETS` (``ValueError`` naming the value).

    Example:
        >>> validate_budget("global")
        >>> validate_budget("per-layer")
        Traceback (most recent call last):
        ...
        ValueError: budget must be one of ('layer', 'global'), got 'per-layer'
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")


def group_unit(dim: int) -> str:
    """What a group along ``dim`` is called in messages: ``"filters"`` (0), ``"channels"`` (1).

    Example:
        >>> group_unit(0), group_unit(1), group_unit(2)
        ('filters', 'channels', 'groups')
    """
    return {0: "filters", 1: "channels"}.get(dim, "groups")


def group_keep_counts(
    n_groups: Sequence[int],
    amount: int | float,
    budget: str = "layer",
    min_keep: int | float | None = None,
    unit: str = "groups",
    names: Sequence[str] | None = None,
) -> tuple[int, list[int]]:
    """How many groups a structured budget keeps: in all, and at least per tensor.

    Args:
        n_groups: the number of (allowed) groups of each tensor.
        amount: a float in ``[0, 1]`` (fraction of the groups to prune) or an int (a count of
            groups to prune; with ``budget="layer"`` a count per tensor).
        budget: ``"layer"``, the same fraction pruned in every tensor (the paper), or
            ``"global"``, one ranking over all tensors' groups.
        min_keep: the per-tensor floor of the global ranking (see
            :func:`torchbip.masks.floor_counts`); ignored by ``"layer"``.
        unit: what a group is, for the messages (``"filters"``, ``"channels"``).
        names: the tensors' names, for the messages (an int amount too large for one tensor
            under ``"layer"`` names it).

    Returns:
        ``(total kept, per-tensor counts)``: with ``"layer"`` the exact count each tensor keeps,
        with ``"global"`` each tensor's floor.

    Raises:
        ValueError: for an unknown ``budget`` or an ``amount`` that no tensor can meet.

    Example:
        >>> group_keep_counts([8, 4], 0.5)
        (6, [4, 2])
        >>> group_keep_counts([8, 4], 0.75, budget="global", min_keep=1)
        (3, [1, 1])
    """
    validate_budget(budget)
    if budget == "layer":
        labels = [
            "amount" if names is None else f"amount (a count per tensor with budget='layer', for {name!r})"
            for name in (names if names is not None else [""] * len(n_groups))
        ]
        keeps = [
            n - count_from_amount(amount, n, label, unit) for n, label in zip(n_groups, labels, strict=True)
        ]
        return sum(keeps), keeps
    total = sum(n_groups)
    return total - count_from_amount(amount, total, unit=unit), floor_counts(n_groups, min_keep)


def select_groups(
    scores: Sequence[Tensor],
    amount: int | float,
    budget: str = "layer",
    min_keep: int | float | None = None,
    allowed: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """Group keep masks under a structured budget (exact counts, ties keep the lower index).

    Args:
        scores: one 1-D tensor of group scores per pruned tensor.
        amount: the fraction (float) or count (int) of groups to prune, see
            :func:`group_keep_counts`.
        budget: ``"layer"`` (the same fraction in every tensor) or ``"global"`` (one ranking,
            with the per-tensor floor ``min_keep``).
        min_keep: per-tensor floor of the global ranking: an int (a count of groups) or a
            float (a fraction of each tensor's groups, those ``allowed`` leaves out included,
            as the layouts' ``min_keep``); a floor above what ``allowed`` leaves keeps all of it.
        allowed: optional boolean tensors of the scores' shapes; ``False`` groups (already
            pruned) are never kept and are not counted by ``amount``.

    Returns:
        One boolean tensor per score tensor.

    Example:
        >>> import torch
        >>> s = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0.2, 0.8])]
        >>> [k.tolist() for k in select_groups(s, 0.5)]
        [[False, True, True, False], [False, True]]
        >>> [k.tolist() for k in select_groups(s, 0.5, budget="global")]
        [[False, True, True, False], [False, True]]
        >>> [k.tolist() for k in select_groups(s, 4, budget="global", min_keep=0)]
        [[False, True, False, False], [False, True]]
    """
    allows = list(allowed) if allowed is not None else [None] * len(scores)
    if len(allows) != len(scores):
        raise ValueError(f"allowed has {len(allows)} entries but scores has {len(scores)}")
    n_groups = [s.numel() if a is None else int(a.sum()) for s, a in zip(scores, allows, strict=True)]
    n_keep, counts = group_keep_counts(n_groups, amount, budget)
    if budget == "layer":
        return [topk_mask(s, k, a) for s, k, a in zip(scores, counts, allows, strict=True)]
    # A float floor is a fraction of the whole tensor (as in the layouts), capped by what remains.
    whole = floor_counts([s.numel() for s in scores], min_keep)
    floors = [min(f, n) for f, n in zip(whole, n_groups, strict=True)] if min_keep is not None else None
    return GlobalTopK(n_keep, floors)(list(scores), allows)
