r"""Private: mask layouts other than one score per entry, for ``global_prune(structured=...)``.

A layout owns how scores map to masks in the bi-level loop:

- :class:`GroupLayout` (``structured="filter"`` or ``"channel"``): one score per group (a filter,
  ``dim=0``, or an input channel, ``dim=1``); the mask is the broadcast of the group keep; the
  score gradient is the sum of the element-wise :math:`d\ell/dm` over the group. Budgets:
  ``"layer"`` (the same fraction of groups in every tensor, the paper) or ``"global"`` (one
  ranking, with the per-tensor floor ``min_keep``).
- :class:`NMLayout` (``structured="2:4"`` and other ``"N:M"``): one score per entry, the mask keeps
  the top ``n`` of every block of ``m`` along the input dimension.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchbip._func import PRUNABLE_TYPES, Target
from torchbip.masks import GlobalTopK, nm_mask, topk_mask
from torchbip.scores import init_scores
from torchbip.semistructured import BiPSemiStructured
from torchbip.structured import (
    BUDGETS,
    BiPStructured,
    allowed_groups,
    expand_groups,
    group_keep_counts,
    group_reduce,
)

__all__ = ["GroupLayout", "MaskLayout", "NMLayout", "default_structured_targets", "make_layout", "parse"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_GROUP_DIMS = {"filter": 0, "channel": 1}


def parse(structured: object) -> tuple[str, int, int]:
    """``("group", dim, 0)`` for "filter"/"channel", ``("nm", n, m)`` for "N:M"; else raise."""
    if isinstance(structured, str):
        if structured in _GROUP_DIMS:
            return "group", _GROUP_DIMS[structured], 0
        match = _NM.match(structured)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if m >= 1 and 0 <= n <= m:
                return "nm", n, m
    raise ValueError(
        f"structured must be None, 'filter' (output filters), 'channel' (input channels) or an "
        f"'N:M' pattern such as '2:4', got {structured!r}"
    )


def _input_dim(weight: Tensor) -> int:
    """The input dimension of a Linear (``-1``) or Conv (``1``) weight."""
    return -1 if weight.dim() <= 2 else 1


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def default_structured_targets(model: nn.Module, structured: str) -> list[tuple[nn.Module, str]]:
    """Default tensors of a structured run.

    ``"filter"``: every ``Linear``/``Conv`` weight but the last layer's (its filters are the
    model's outputs); ``"channel"``: all but the first layer's (its channels are the model's
    inputs); ``"N:M"``: every weight whose input dimension is a multiple of ``m``.
    """
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    kind, a, b = parse(structured)
    if kind == "group":
        layers = layers[:-1] if a == 0 else layers[1:]
    else:
        layers = [m for m in layers if _weight(m).shape[_input_dim(_weight(m))] % b == 0]
    return [(m, "weight") for m in layers]


class MaskLayout(ABC):
    """How a structured run maps scores to masks (see the module docstring)."""

    n_keep: int

    @abstractmethod
    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        """Initial scores, one tensor per target."""

    @abstractmethod
    def select(self, scores: Sequence[Tensor]) -> list[Tensor]:
        """Boolean keeps in the scores' shapes."""

    @abstractmethod
    def mask(self, index: int, keep: Tensor) -> Tensor:
        """The element mask of target ``index`` for its keep."""

    @abstractmethod
    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        """Write the score gradient of target ``index`` into ``out``."""

    @abstractmethod
    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        """Put torch pruning state (with this layout's method) on the target."""


class GroupLayout(MaskLayout):
    """One score per filter or input channel; see :func:`torchbip.structured.select_groups`."""

    def __init__(
        self,
        targets: Sequence[Target],
        dim: int,
        amount: int | float,
        budget: str,
        min_keep: int | float | None,
        allowed: Sequence[Tensor | None],
    ) -> None:
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        self.shapes = [tuple(t.weight().shape) for t in targets]
        for target, shape in zip(targets, self.shapes, strict=True):
            if len(shape) <= dim:
                raise ValueError(f"{target.fqn!r} has shape {shape}: no dim={dim} to group along")
        self.dim, self.budget, self.allowed = dim, budget, list(allowed)
        self.group_allowed = [None if a is None else allowed_groups(a, dim) for a in self.allowed]
        self.n_groups = [
            s[dim] if g is None else int(g.sum())
            for s, g in zip(self.shapes, self.group_allowed, strict=True)
        ]
        self.n_keep, self.counts = group_keep_counts(self.n_groups, amount, budget, min_keep)
        self._global = (
            GlobalTopK(self.n_keep, self.counts if min_keep is not None else None)
            if budget == "global"
            else None
        )

    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        out = []
        for w in weights:
            size = w.numel() // w.shape[self.dim] if w.shape[self.dim] else 1
            out.append(group_reduce(init_scores(w, method), self.dim) / max(size, 1))
        return out

    def select(self, scores: Sequence[Tensor]) -> list[Tensor]:
        if self._global is not None:
            return self._global(list(scores), self.group_allowed)
        return [topk_mask(s, k, a) for s, k, a in zip(scores, self.counts, self.group_allowed, strict=True)]

    def mask(self, index: int, keep: Tensor) -> Tensor:
        full = expand_groups(keep, self.shapes[index], self.dim)
        allowed = self.allowed[index]
        return full if allowed is None else full & allowed

    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        out.copy_(group_reduce(element_grad, self.dim))

    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        n_prune = self.n_groups[index] - int(keep.sum())
        BiPStructured.apply(module, name, amount=n_prune, dim=self.dim, importance_scores=scores)
        getattr(module, name + "_mask").copy_(self.mask(index, keep))


class NMLayout(MaskLayout):
    """The top ``n`` scores of every block of ``m`` along the input dimension."""

    def __init__(
        self, targets: Sequence[Target], n: int, m: int, amount: int | float, allowed: Sequence[Tensor | None]
    ) -> None:
        if isinstance(amount, int) or abs(float(amount) - (1 - n / m)) > 1e-9:
            raise ValueError(
                f"amount={amount!r} but structured='{n}:{m}' prunes exactly a fraction 1 - n/m = "
                f"{1 - n / m:g} of every tensor; pass amount={1 - n / m:g}"
            )
        self.n, self.m, self.allowed = n, m, list(allowed)
        self.dims = [_input_dim(t.weight()) for t in targets]
        for target, dim in zip(targets, self.dims, strict=True):
            size = target.weight().shape[dim]
            if size % m:
                raise ValueError(
                    f"{target.fqn!r} has {size} inputs along dim={dim}, not a multiple of m={m}; leave "
                    "it out of parameters"
                )
        self.n_keep = sum(
            int(nm_mask(torch.zeros(t.weight().shape), n, m, d, allowed=a).sum())
            for t, d, a in zip(targets, self.dims, self.allowed, strict=True)
        )

    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        return [init_scores(w, method) for w in weights]

    def select(self, scores: Sequence[Tensor]) -> list[Tensor]:
        return [
            nm_mask(s, self.n, self.m, d, allowed=a)
            for s, d, a in zip(scores, self.dims, self.allowed, strict=True)
        ]

    def mask(self, index: int, keep: Tensor) -> Tensor:
        return keep

    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        out.copy_(element_grad)

    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        BiPSemiStructured.apply(
            module, name, n=self.n, m=self.m, dim=self.dims[index], importance_scores=scores
        )
        getattr(module, name + "_mask").copy_(keep)


def make_layout(
    structured: str,
    targets: Sequence[Target],
    amount: int | float,
    budget: str,
    min_keep: int | float | None,
    allowed: Sequence[Tensor | None],
) -> MaskLayout:
    """The layout for ``global_prune(structured=...)``; raises ``ValueError`` for bad settings."""
    kind, a, b = parse(structured)
    if kind == "group":
        return GroupLayout(targets, a, amount, budget, min_keep, allowed)
    return NMLayout(targets, a, b, amount, allowed)
