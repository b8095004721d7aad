r"""Mask layouts: how BiP's learned scores become masks, one class per layout.

A layout is chosen with ``layout=`` (:class:`torchbip.BiP`) or ``structured=``
(:func:`torchbip.global_prune`), as an object or by its shorthand string:

=========================  =======================  ===============================================
object                     shorthand                one score per ...
=========================  =======================  ===============================================
:class:`Unstructured`      ``"unstructured"``       entry; the kept entries ranked globally
:class:`Groups` ``(0)``    ``"filter"``             output filter (``dim=0``), whole filters pruned
:class:`Groups` ``(1)``    ``"channel"``            input channel (``dim=1``)
:class:`NM` ``(n, m)``     ``"2:4"`` (any ``N:M``)  entry; the top ``n`` of every block of ``m``
:class:`torchbip.Coupled`  (needs example inputs)   coupled channel of a dependency group
=========================  =======================  ===============================================

Each layout object knows its default tensors (:meth:`Layout.default_parameters`) and, given the
tensors and the budget, returns its bound form (:meth:`Layout.bind`, a :class:`MaskLayout`): the
object that owns everything that differs between layouts in a BiP run, namely the scores'
shapes and initial values, the selection of the kept entries, the element mask of a selection,
the reduction of the element-wise upper gradient :math:`d\ell/dm` to the score gradient (the sum
over a group for :class:`Groups`), and the torch pruning method that holds the mask. The BiP
state (:class:`torchbip.BiP`) calls these and never branches on the layout.

A new layout is a :class:`Layout` subclass with a :class:`MaskLayout` subclass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> as_layout("filter")
    Groups(dim=0, budget='layer')
    >>> as_layout("2:4"), as_layout(None)
    (NM(n=2, m=4), Unstructured())
"""

from __future__ import annotations

import numbers
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchbip._edges import Edges, called_edges, traced_edges
from torchbip._frames import user_stacklevel
from torchbip._func import PRUNABLE_TYPES, Target, default_targets, transposed_linear
from torchbip._tensors import copy_into, split_like
from torchbip.config import is_bool
from torchbip.masks import (
    GlobalTopK,
    cap_counts,
    count_from_amount,
    floor_counts,
    nm_mask,
    topk_mask,
)
from torchbip.method import BiPPruningMethod
from torchbip.scores import init_scores
from torchbip.semistructured import BiPSemiStructured
from torchbip.structured import (
    BiPStructured,
    allowed_groups,
    expand_groups,
    group_keep_counts,
    group_reduce,
    group_unit,
    validate_budget,
)

__all__ = [
    "NM",
    "GroupLayout",
    "Groups",
    "Layout",
    "MaskLayout",
    "NMLayout",
    "Unstructured",
    "UnstructuredLayout",
    "as_layout",
]

Amount = int | float
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_GROUP_DIMS = {"filter": 0, "channel": 1}


# -- bound layouts: what a run calls ---------------------------------------------------------


class MaskLayout(ABC):
    """A layout bound to the tensors and the budget of one run.

    Attributes:
        n_keep: the number of entries (or groups) that the selection keeps in all.
        structured: the shorthand of a structured layout (``"filter"``, ``"2:4"``), ``None`` for
            one score per entry ranked freely.
        budget: ``"layer"`` or ``"global"`` for group layouts, else ``None``.
        elementwise: whether every target has one score per entry and :meth:`score_grad` copies
            the element-wise gradient unchanged (the pruner then writes it in place).
    """

    n_keep: int
    structured: str | None = None
    budget: str | None = None
    elementwise: bool = False

    @abstractmethod
    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        """Initial scores, one tensor per target, from the current (masked) weights."""

    @abstractmethod
    def select(self, scores: Sequence[Tensor], flat: Tensor | None = None) -> list[Tensor]:
        """Boolean keeps in the scores' shapes (``flat``: the same scores as one buffer, if any)."""

    @abstractmethod
    def mask(self, index: int, keep: Tensor) -> Tensor:
        """The boolean element mask of target ``index`` for its keep."""

    @abstractmethod
    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        """Write the score gradient of target ``index`` (from the element-wise one) into ``out``."""

    def masks(self, keeps: Sequence[Tensor]) -> list[Tensor]:
        """The boolean element masks of all targets for their keeps (one :meth:`mask` each).

        Layouts whose masks couple several targets (one score shared by many tensors) override
        this instead of :meth:`mask`.
        """
        return [self.mask(i, keep) for i, keep in enumerate(keeps)]

    def write_masks(self, scores: Sequence[Tensor], flat: Tensor | None, masks: Sequence[Tensor]) -> None:
        """Select from ``scores`` and write the element masks into ``masks`` (torch's mask buffers)."""
        for mask, element in zip(masks, self.masks(self.select(scores, flat)), strict=True):
            copy_into(mask, element)

    def score_grads(
        self, element_grads: Iterable[tuple[int, Tensor]], outs: Sequence[Tensor], masks: Sequence[Tensor]
    ) -> None:
        """Write every target's score gradient into ``outs``, from ``(index, gradient)`` pairs.

        The element-wise gradients may come one at a time (a generator), so a layout that
        reduces each tensor on its own (one :meth:`score_grad` each, the default) never holds
        them all. ``masks`` are the current element masks (torch's 0/1 mask buffers), one per target.
        """
        for index, element in element_grads:
            self.score_grad(index, element, outs[index])

    def held_masks(self, masks: Sequence[Tensor]) -> Sequence[Tensor]:
        """The masks whose zeros mark the pruned entries that :meth:`torchbip.BiP.step` holds.

        ``masks`` are the current training masks (torch's 0/1 mask buffers), one per target;
        by default (every layout whose training masks are its final ones) they are returned as
        they are.
        """
        return masks

    def finish_masks(self, scores: Sequence[Tensor]) -> list[Tensor] | None:
        """The masks :meth:`torchbip.BiP.finish` leaves for the selection of ``scores``.

        ``None`` (the default): the training masks are final.
        """
        return None

    def kept_targets(self, targets: Sequence[Target]) -> list[Target]:
        """The targets this bound layout prunes (all of them, unless the layout dropped some)."""
        return list(targets)

    @abstractmethod
    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        """Put torch pruning state (with this layout's pruning method) on the target."""

    def describe(self) -> dict[str, object]:
        """What defines this bound layout, in plain types (checkpoints compare it)."""
        return {"layout": type(self).__name__, "n_keep": int(self.n_keep)}


class UnstructuredLayout(MaskLayout):
    """One score per entry; a global top-k (with per-tensor floors and caps) or per-tensor counts."""

    elementwise = True

    def __init__(
        self,
        targets: Sequence[Target],
        amount: Amount | Sequence[Amount],
        allowed: Sequence[Tensor | None],
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
    ) -> None:
        self.allowed = list(allowed)
        n_allowed = [
            t.weight().numel() if a is None else int(a.sum())
            for t, a in zip(targets, self.allowed, strict=True)
        ]
        self.per_tensor: list[int] | None = None
        if isinstance(amount, (int, float)):
            self.n_keep = sum(n_allowed) - count_from_amount(amount, sum(n_allowed))
            floors, caps = _floors_and_caps(
                [t.weight().numel() for t in targets], n_allowed, min_keep, max_keep
            )
            _check_floors_and_caps(targets, self.n_keep, amount, min_keep, floors, max_keep, caps, "entries")
            self.topk = GlobalTopK(self.n_keep, floors if min_keep is not None else None, caps)
            self.fast = all(a is None for a in self.allowed) and min_keep is None and caps is None
        else:
            self.per_tensor = [
                n - count_from_amount(a, n, f"amount (for {t.fqn!r})")
                for a, n, t in zip(amount, n_allowed, targets, strict=True)
            ]
            self.n_keep = sum(self.per_tensor)
            self.fast = False

    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        """See :meth:`MaskLayout.init_scores`."""
        return [init_scores(w, method) for w in weights]

    def select(self, scores: Sequence[Tensor], flat: Tensor | None = None) -> list[Tensor]:
        """See :meth:`MaskLayout.select`."""
        if self.per_tensor is not None:
            return [topk_mask(s, k, a) for s, k, a in zip(scores, self.per_tensor, self.allowed, strict=True)]
        if self.fast and flat is not None:
            return split_like(self.topk.select_flat(flat), scores)
        return self.topk(list(scores), self.allowed)

    def mask(self, index: int, keep: Tensor) -> Tensor:
        """See :meth:`MaskLayout.mask`."""
        return keep

    def write_masks(self, scores: Sequence[Tensor], flat: Tensor | None, masks: Sequence[Tensor]) -> None:
        """See :meth:`MaskLayout.write_masks`.

        With one global ranking each mask is written by one comparison of its scores (no
        boolean masks in between). When entries equal to the threshold are left out (ties), the
        masks keep what lies strictly above it, and then the ties of lowest index, found tensor
        by tensor until there are enough.
        """
        if not (self.fast and flat is not None and self.n_keep > 0):
            super().write_masks(scores, flat, masks)
            return
        found = self.topk.locate(flat)
        compare = torch.ge if found.exact else torch.gt
        for s, mask in zip(scores, masks, strict=True):
            compare(s, found.value, out=mask)
        remaining = 0 if found.exact else found.kept
        for s, mask in zip(scores, masks, strict=True):
            if remaining == 0:
                break
            ties = torch.nonzero(s.detach().reshape(-1) == found.value).flatten()[:remaining]
            if ties.numel():
                mask[torch.unravel_index(ties, mask.shape)] = 1  # any strides
                remaining -= ties.numel()

    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        """See :meth:`MaskLayout.score_grad`."""
        out.copy_(element_grad)

    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        """See :meth:`MaskLayout.apply`."""
        allow = self.allowed[index]
        remaining = scores.numel() if allow is None else int(allow.sum())
        BiPPruningMethod.apply(module, name, amount=remaining - int(keep.sum()), importance_scores=scores)
        getattr(module, name + "_mask").copy_(keep)

    def describe(self) -> dict[str, object]:
        """See :meth:`MaskLayout.describe`."""
        return {
            **super().describe(),
            "per_tensor": self.per_tensor,
            "floors": self.topk.floors if self.per_tensor is None else None,
            "caps": self.topk.caps if self.per_tensor is None else None,
        }


class GroupLayout(MaskLayout):
    """One score per filter or input channel; see :func:`torchbip.structured.select_groups`."""

    def __init__(
        self,
        targets: Sequence[Target],
        dim: int,
        amount: Amount | Sequence[Amount],
        budget: str,
        allowed: Sequence[Tensor | None],
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
    ) -> None:
        validate_budget(budget)
        self.shapes = [tuple(t.weight().shape) for t in targets]
        for target, shape in zip(targets, self.shapes, strict=True):
            if len(shape) <= dim:
                raise ValueError(f"{target.fqn!r} has shape {shape}: no dim={dim} to group along")
            _refuse_transposed(target, f"Groups(dim={dim})")
            if dim == 1 and _is_grouped(target.module):
                raise ValueError(
                    f"parameters names {target.fqn!r}, a grouped convolution "
                    f"(groups={getattr(target.module, 'groups', 1)}): dim 1 "
                    "of its weight indexes the channels within each group, not the layer's input "
                    "channels, so channel pruning does not apply; leave it out of the pruned tensors or "
                    "prune its filters (the filter layout)"
                )
        self.dim, self.budget, self.allowed = dim, _plain_str(budget), list(allowed)
        self.structured = {0: "filter", 1: "channel"}.get(dim, f"dim={dim}")
        unit = group_unit(dim)
        self.group_allowed = [None if a is None else allowed_groups(a, dim) for a in self.allowed]
        self.n_groups = [
            s[dim] if g is None else int(g.sum())
            for s, g in zip(self.shapes, self.group_allowed, strict=True)
        ]
        self._global: GlobalTopK | None = None
        if not isinstance(amount, (int, float)):
            self.counts = [
                n - count_from_amount(a, n, f"amount (for {t.fqn!r})", unit)
                for a, n, t in zip(amount, self.n_groups, targets, strict=True)
            ]
            self.n_keep = sum(self.counts)
            return
        if budget != "global":
            self.n_keep, self.counts = group_keep_counts(
                self.n_groups, amount, budget, min_keep, unit, [t.fqn for t in targets]
            )
        else:
            total = sum(self.n_groups)
            self.n_keep = total - count_from_amount(amount, total, unit=unit)
            # (a float floor or cap counts the tensor's groups, also those pruned before)
            self.counts, caps = _floors_and_caps(
                [s[dim] for s in self.shapes], self.n_groups, min_keep, max_keep
            )
            _check_floors_and_caps(targets, self.n_keep, amount, min_keep, self.counts, max_keep, caps, unit)
            self._global = GlobalTopK(self.n_keep, self.counts if min_keep is not None else None, caps)

    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        """See :meth:`MaskLayout.init_scores`."""
        out = []
        for w in weights:
            size = w.numel() // w.shape[self.dim] if w.shape[self.dim] else 1
            out.append(group_reduce(init_scores(w, method), self.dim) / max(size, 1))
        return out

    def select(self, scores: Sequence[Tensor], flat: Tensor | None = None) -> list[Tensor]:
        """See :meth:`MaskLayout.select`."""
        if self._global is not None:
            return self._global(list(scores), self.group_allowed)
        return [topk_mask(s, k, a) for s, k, a in zip(scores, self.counts, self.group_allowed, strict=True)]

    def mask(self, index: int, keep: Tensor) -> Tensor:
        """See :meth:`MaskLayout.mask`."""
        full = expand_groups(keep, self.shapes[index], self.dim)
        allowed = self.allowed[index]
        return full if allowed is None else full & allowed

    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        """See :meth:`MaskLayout.score_grad`."""
        out.copy_(group_reduce(element_grad, self.dim))

    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        """See :meth:`MaskLayout.apply`."""
        n_prune = self.n_groups[index] - int(keep.sum())
        BiPStructured.apply(module, name, amount=n_prune, dim=self.dim, importance_scores=scores)
        getattr(module, name + "_mask").copy_(self.mask(index, keep))

    def describe(self) -> dict[str, object]:
        """See :meth:`MaskLayout.describe`."""
        return {**super().describe(), "dim": self.dim, "budget": self.budget, "counts": list(self.counts)}


class NMLayout(MaskLayout):
    """The top ``n`` scores of every block of ``m`` along the input dimension."""

    elementwise = True

    def __init__(
        self,
        targets: Sequence[Target],
        n: int,
        m: int,
        amount: Amount | Sequence[Amount],
        allowed: Sequence[Tensor | None],
    ) -> None:
        fraction = 1 - n / m
        for value in [amount] if isinstance(amount, (int, float)) else list(amount):
            if isinstance(value, int) or abs(float(value) - fraction) > 1e-9:
                # repr: a float literal (0.0, not 0, which counts entries) that this check accepts
                raise ValueError(
                    f"amount={value!r} but the layout {n}:{m} keeps the top {n} entries of every block of "
                    f"{m}, which is the amount 1 - n/m = {fraction:g} (the fraction it prunes of a tensor "
                    f"not pruned before; of one pruned before, at most that); pass amount={fraction!r}"
                )
        for target in targets:
            _refuse_transposed(target, f"'{n}:{m}'")
        self.n, self.m, self.allowed = n, m, list(allowed)
        self.structured = f"{n}:{m}"
        self.dims = [_input_dim(t.weight()) for t in targets]
        for target, dim in zip(targets, self.dims, strict=True):
            size = target.weight().shape[dim]
            if size % m:
                raise ValueError(
                    f"{target.fqn!r} has {size} inputs along dim={dim}, not a multiple of m={m}; leave "
                    "it out of parameters"
                )
        kept = [
            int(
                nm_mask(
                    torch.zeros(t.weight().shape, device=None if a is None else a.device), n, m, d, allowed=a
                ).sum()
            )
            for t, d, a in zip(targets, self.dims, self.allowed, strict=True)
        ]
        for target, count, allow in zip(targets, kept, self.allowed, strict=True):
            # (N:M does not compound: a tensor whose every block already has at most n entries
            # left has nothing to choose, and the round would prune none of it)
            if allow is not None and n < m and count == int(allow.sum()):
                raise ValueError(
                    f"parameters names {target.fqn!r}, pruned before so that every block of {m} inputs "
                    f"has at most {n} entries left: the layout {n}:{m} keeps the top {n} remaining entries "
                    "of each block, so it would prune none of this tensor (N:M does not compound: a second "
                    f"{n}:{m} round does not reach 1 - (1 - p)^2); leave the tensor out of parameters, or "
                    "prune it further with another layout (e.g. unstructured)"
                )
        self.n_keep = sum(kept)

    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        """See :meth:`MaskLayout.init_scores`."""
        return [init_scores(w, method) for w in weights]

    def select(self, scores: Sequence[Tensor], flat: Tensor | None = None) -> list[Tensor]:
        """See :meth:`MaskLayout.select`."""
        return [
            nm_mask(s, self.n, self.m, d, allowed=a)
            for s, d, a in zip(scores, self.dims, self.allowed, strict=True)
        ]

    def mask(self, index: int, keep: Tensor) -> Tensor:
        """See :meth:`MaskLayout.mask`."""
        return keep

    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        """See :meth:`MaskLayout.score_grad`."""
        out.copy_(element_grad)

    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        """See :meth:`MaskLayout.apply`."""
        BiPSemiStructured.apply(
            module, name, n=self.n, m=self.m, dim=self.dims[index], importance_scores=scores
        )
        getattr(module, name + "_mask").copy_(keep)

    def describe(self) -> dict[str, object]:
        """See :meth:`MaskLayout.describe`."""
        return {**super().describe(), "n": self.n, "m": self.m}


# -- layout objects: what users pass ---------------------------------------------------------


class Layout(ABC):
    """A mask layout, as users choose it (``layout=Groups(dim=0)``, or its shorthand string)."""

    @property
    @abstractmethod
    def shorthand(self) -> str:
        """The string that names this layout (``"unstructured"``, ``"filter"``, ``"2:4"``, ...)."""

    def default_parameters(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """The tensors this layout prunes when ``parameters`` is not given."""
        return default_targets(model)

    def check_parameters(self, parameters: object) -> None:  # noqa: B027 - a hook, no-op by default
        """Refuse a ``parameters`` argument this layout cannot honour (``ValueError``).

        Every layout but :class:`torchbip.Coupled` accepts any tensors.
        """

    def check_budget(
        self, budget: str, min_keep: Amount | None, max_keep: Amount | None, arg: str = "layout"
    ) -> None:
        """Refuse settings that this layout would silently ignore (``ValueError``).

        ``arg`` is the name of the argument that chose the layout, for the message.
        """
        validate_budget(budget)
        if budget != "layer":
            raise ValueError(
                f"budget={budget!r} applies to structured runs (Groups layouts); an unstructured run "
                "ranks globally"
            )

    @abstractmethod
    def bind(
        self,
        targets: Sequence[Target],
        amount: Amount | Sequence[Amount],
        allowed: Sequence[Tensor | None],
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
    ) -> MaskLayout:
        """The bound layout for ``targets`` (``amount``: one value, or one per target)."""


@dataclass(frozen=True)
class Unstructured(Layout):
    """One score per entry; ``amount`` ranks the entries of all tensors together.

    ``min_keep`` and ``max_keep`` bound each tensor's share of the global ranking (a float is a
    fraction of the whole tensor, also of one pruned before, not of its remaining entries); a
    per-tensor ``amount`` (a dict of name patterns) prunes each tensor on its own.

    Example:
        >>> Unstructured().shorthand
        'unstructured'
    """

    @property
    def shorthand(self) -> str:
        """See :meth:`Layout.shorthand`."""
        return "unstructured"

    def bind(
        self,
        targets: Sequence[Target],
        amount: Amount | Sequence[Amount],
        allowed: Sequence[Tensor | None],
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
    ) -> MaskLayout:
        """See :meth:`Layout.bind`."""
        return UnstructuredLayout(targets, amount, allowed, min_keep, max_keep)


@dataclass(frozen=True)
class Groups(Layout):
    """One learned score per group of entries that share an index along ``dim``.

    ``dim=0`` groups output filters (shorthand ``"filter"``), ``dim=1`` input channels
    (``"channel"``). ``amount`` counts groups. ``budget="layer"`` prunes the same fraction of
    groups in every tensor (the paper; an int ``amount`` is a count per tensor);
    ``budget="global"`` ranks all groups together, with the per-tensor floor ``min_keep`` and
    cap ``max_keep`` (a float: a fraction of all the tensor's groups, also those pruned before).
    A group's score moves along the sum of its entries' upper gradients.

    Args:
        dim: ``0`` (filters) or ``1`` (input channels).
        budget: ``"layer"`` or ``"global"``.

    Example:
        >>> Groups(dim=1).shorthand, Groups(0, budget="global")
        ('channel', Groups(dim=0, budget='global'))
    """

    dim: int = 0
    budget: str = "layer"

    def __post_init__(self) -> None:
        integer = isinstance(self.dim, numbers.Integral) and not is_bool(self.dim)
        if not integer or self.dim not in (0, 1):
            raise ValueError(
                f"Groups(dim={self.dim!r}): dim must be 0 (filters) or 1 (input channels), an int "
                f"(not a float or a bool), got {self.dim!r} of type {type(self.dim).__name__}"
            )
        validate_budget(self.budget)
        # Plain types (a NumPy int, a numpy.str_ or a StrEnum value as given): describe(), the
        # states and the checkpoints hold them, which torch.load(weights_only=True) must read.
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "budget", _plain_str(self.budget))

    @property
    def shorthand(self) -> str:
        """See :meth:`Layout.shorthand`."""
        return "filter" if self.dim == 0 else "channel"

    def default_parameters(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """Every ``Linear``/``Conv`` weight but the output layers' (filters) or the input layers' (channels).

        The output layers' filters are the model's outputs, the input layers' channels its
        inputs. They are found from the order in which the model calls its layers, not the order
        in which it registers them: the output layers are those whose outputs reach the model's
        outputs without passing through another ``Linear``/``Conv`` layer (the last layer called,
        or every head), the input layers those called before any other (the first layer called,
        or the first of every input branch). The calls come from tracing a copy of the model with
        :mod:`torch.fx`; where torch.fx cannot trace the model's ends, the last (filters) or
        first (channels) layer the model registers is left out, with a ``UserWarning``.
        :func:`torchbip.global_prune` runs the model on its first batch there instead
        (:meth:`called_default_parameters`).

        Channels also leave out grouped (and depthwise) convolutions, whose weight's dim 1 is a
        channel within each group; naming one in ``parameters`` is an error.
        """
        return self._without_edges(
            model, self.candidate_parameters(model), lambda layers: self._traced(model, layers, None)
        )

    def _traced(
        self, model: nn.Module, layers: list[nn.Module], fallback: Callable[[], Edges] | None
    ) -> Edges:
        """The edges from :func:`torchbip._edges.traced_edges`, or where torch.fx cannot trace.

        There: ``fallback()``, or else the layers by registration order, with a warning.
        """
        side = "outputs" if self.dim == 0 else "inputs"
        try:
            return traced_edges(model, layers, f"layout={self.shorthand!r}", side)
        except ValueError as err:
            if fallback is not None:
                return fallback()
            names = {id(m): n for n, m in model.named_modules()}
            end = layers[-1] if self.dim == 0 else layers[0]
            warnings.warn(
                f"{err}. Until then, the {'last' if self.dim == 0 else 'first'} Linear/Conv layer the "
                f"model registers, {names.get(id(end), type(end).__name__)!r}, is taken for that layer "
                "and left out",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return Edges(inputs=[end], outputs=[end])

    def called_default_parameters(
        self, model: nn.Module, inputs: Any, source: str
    ) -> list[tuple[nn.Module, str]]:
        """:meth:`default_parameters`, or where torch.fx cannot trace, one forward pass on ``inputs``.

        The pass changes nothing (see :func:`torchbip._edges.called_edges`). ``source`` names
        where the batch came from, for the error when the model fails on it.
        """
        candidates = self.candidate_parameters(model)
        weights = [getattr(m, "weight", None) for m, _ in candidates]
        if any(
            isinstance(w, nn.parameter.UninitializedParameter) or (isinstance(w, Tensor) and w.is_meta)
            for w in weights
        ):
            return candidates  # the checks of the tensors refuse them, with their own reason
        return self._without_edges(
            model,
            candidates,
            lambda layers: self._traced(model, layers, lambda: called_edges(model, layers, inputs, source)),
        )

    def candidate_parameters(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """The tensors :meth:`default_parameters` chooses from, before the edges are left out.

        Those of every layout, less grouped convolutions for channels.
        """
        # (a grouped convolution's dim 1 is not its input channels: left out)
        return [(m, "weight") for m, _ in default_targets(model) if self.dim == 0 or not _is_grouped(m)]

    def _without_edges(
        self,
        model: nn.Module,
        candidates: list[tuple[nn.Module, str]],
        find: Callable[[list[nn.Module]], Edges],
    ) -> list[tuple[nn.Module, str]]:
        """``candidates`` (:meth:`candidate_parameters`) less the output (filters) or input (channels) layers.

        The edges are found among all ``Linear``/``Conv`` layers (grouped ones included: a layer
        after a grouped convolution does not read the model's inputs).
        """
        # every Linear/Conv layer, also those left out of the defaults (a weight_norm head): the
        # layer before such a head is not an output layer
        layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
        if not layers or not candidates:
            return []
        edges = find(layers)
        ends = {id(m) for m in (edges.outputs if self.dim == 0 else edges.inputs)}
        return [(m, name) for m, name in candidates if id(m) not in ends]

    def check_budget(
        self, budget: str, min_keep: Amount | None, max_keep: Amount | None, arg: str = "layout"
    ) -> None:
        """See :meth:`Layout.check_budget`.

        ``budget`` is the argument that comes with the layout: for a :class:`Groups` object the
        object's own budget rules, and an argument that asks for another one is refused.
        """
        validate_budget(budget)
        if budget != "layer" and budget != self.budget:
            raise ValueError(
                f"budget={budget!r} conflicts with {arg}={self!r}, whose budget is {self.budget!r}: pass "
                f"Groups(dim={self.dim}, budget={budget!r})"
            )
        if self.budget == "layer" and (min_keep is not None or max_keep is not None):
            name, value = ("min_keep", min_keep) if min_keep is not None else ("max_keep", max_keep)
            raise ValueError(
                f"{name}={value!r} applies to budget='global' (a bound of the global ranking); "
                f"with {arg}={self!r}, budget='layer' prunes the same fraction of every tensor"
            )

    def bind(
        self,
        targets: Sequence[Target],
        amount: Amount | Sequence[Amount],
        allowed: Sequence[Tensor | None],
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
    ) -> MaskLayout:
        """See :meth:`Layout.bind`."""
        return GroupLayout(targets, self.dim, amount, self.budget, allowed, min_keep, max_keep)


@dataclass(frozen=True)
class NM(Layout):
    """N:M semi-structured sparsity: the top ``n`` scores of every block of ``m`` inputs.

    ``amount`` must be ``1 - n/m``. By default every ``Linear``/``Conv`` weight whose input size
    is a multiple of ``m`` is pruned.

    N:M does not compound. A round keeps the top ``n`` remaining (allowed) entries of every block,
    so on a tensor pruned before (by an earlier N:M round, or an unstructured one) it prunes only
    the blocks that still have more than ``n`` entries, and prunes at most ``1 - n/m`` of what
    remains: a second ``2:4`` round prunes nothing, where a second unstructured round at ``p``
    reaches :math:`1 - (1 - p)^2`. A tensor whose every block already has at most ``n`` entries
    left (nothing to choose) is refused with a ``ValueError`` naming it, before anything changes.

    Args:
        n: entries kept per block.
        m: block size.

    Example:
        >>> NM(2, 4).shorthand
        '2:4'
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (self.n, self.m))
        if not (integers and self.m >= 1 and 0 <= self.n <= self.m):
            raise ValueError(f"NM(n={self.n!r}, m={self.m!r}): need integers with 0 <= n <= m and m >= 1")
        # (NumPy integers become Python ints: the shorthand and the checkpoints hold plain ints)
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "m", int(self.m))

    @property
    def shorthand(self) -> str:
        """See :meth:`Layout.shorthand`."""
        return f"{self.n}:{self.m}"

    def default_parameters(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """See :meth:`Layout.default_parameters`."""
        layers = [m for m, _ in default_targets(model)]
        fitting = [(m, "weight") for m in layers if _weight(m).shape[_input_dim(_weight(m))] % self.m == 0]
        if layers and not fitting:
            sizes = sorted({_weight(m).shape[_input_dim(_weight(m))] for m in layers})
            raise ValueError(
                f"layout='{self.shorthand}': none of the model's {len(layers)} nn.Linear/nn.Conv*d weights "
                f"has an input size divisible by {self.m} (input sizes {sizes}); choose another N:M "
                "pattern or pass parameters=[(module, 'weight'), ...]"
            )
        return fitting

    def check_budget(
        self, budget: str, min_keep: Amount | None, max_keep: Amount | None, arg: str = "layout"
    ) -> None:
        """See :meth:`Layout.check_budget`."""
        if budget != "layer":
            raise ValueError(
                f"budget={budget!r} does not apply to {arg}='{self.shorthand}': an N:M pattern prunes "
                "the same fraction of every block; leave budget at 'layer'"
            )
        for name, value in (("min_keep", min_keep), ("max_keep", max_keep)):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} does not apply to {arg}='{self.shorthand}': an N:M pattern "
                    "keeps n of every m entries in every tensor"
                )

    def bind(
        self,
        targets: Sequence[Target],
        amount: Amount | Sequence[Amount],
        allowed: Sequence[Tensor | None],
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
    ) -> MaskLayout:
        """See :meth:`Layout.bind`."""
        return NMLayout(targets, self.n, self.m, amount, allowed)


def as_layout(layout: object, budget: str = "layer", arg: str = "layout") -> Layout:
    """The layout object for ``layout`` (an object, a shorthand string or ``None``).

    Args:
        layout: a :class:`Layout`, ``None``/``"unstructured"``, ``"filter"``, ``"channel"`` or
            an ``"N:M"`` pattern such as ``"2:4"``.
        budget: with ``"filter"``/``"channel"``: ``"layer"`` or ``"global"``.
        arg: the argument's name, for the message.

    Returns:
        A :class:`Layout`.

    Raises:
        ValueError: for anything else (the message names the value).

    Example:
        >>> as_layout("channel", budget="global")
        Groups(dim=1, budget='global')
    """
    if isinstance(layout, Layout):
        return layout
    if layout is None or layout == "unstructured":
        return Unstructured()
    if isinstance(layout, str):
        if layout in _GROUP_DIMS:
            validate_budget(budget)
            return Groups(_GROUP_DIMS[layout], budget)
        match = _NM.match(layout)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if m >= 1 and 0 <= n <= m:
                return NM(n, m)
    raise ValueError(
        f"{arg} must be None, 'unstructured', 'filter' (output filters), 'channel' (input channels), "
        f"an 'N:M' pattern such as '2:4', or a torchbip.layouts.Layout, got {layout!r}"
    )


def _plain_str(value: str) -> str:
    """``value`` as a plain ``str`` (a ``numpy.str_`` or an ``enum.StrEnum`` member becomes its text)."""
    return str.__str__(value) if isinstance(value, str) and type(value) is not str else value


def _floors_and_caps(
    sizes: Sequence[int], remaining: Sequence[int], min_keep: Amount | None, max_keep: Amount | None
) -> tuple[list[int], list[int] | None]:
    """Each tensor's floor ``min_keep`` and cap ``max_keep`` of a global ranking, as counts.

    An int is a count, a float a fraction of the whole tensor: of its ``sizes`` (entries, or
    groups), also those an earlier pruning removed, not of its ``remaining`` ones (the floor
    rounded up and at least one, the cap rounded down; see :func:`torchbip.masks.floor_counts`
    and :func:`torchbip.masks.cap_counts`). Neither exceeds what remains of the tensor: a
    floor larger than that keeps all of it.

    Example:
        >>> _floors_and_caps([100, 100], [100, 10], 0.05, 0.5)
        ([5, 5], [50, 10])
        >>> _floors_and_caps([100, 100], [100, 10], 20, None)
        ([20, 10], None)
    """
    floors = [min(f, n) for f, n in zip(floor_counts(sizes, min_keep), remaining, strict=True)]
    caps = cap_counts(sizes, max_keep)
    if caps is not None:
        caps = [min(c, n) for c, n in zip(caps, remaining, strict=True)]
    return floors, caps


def _check_floors_and_caps(
    targets: Sequence[Target],
    n_keep: int,
    amount: Amount,
    min_keep: Amount | None,
    floors: Sequence[int],
    max_keep: Amount | None,
    caps: Sequence[int] | None,
    unit: str,
) -> None:
    """Refuse per-tensor floors and caps of a global ranking that its budget cannot meet.

    ``unit``: what the counts count (``"entries"``, ``"filters"``, ``"channels"``).
    """
    if min_keep is not None and sum(floors) > n_keep:
        raise ValueError(
            f"min_keep={min_keep!r} keeps at least {sum(floors)} {unit} (its floor in each of the "
            f"{len(targets)} tensors), more than the {n_keep} that amount={amount!r} leaves; lower "
            "min_keep or amount"
        )
    if caps is not None and sum(caps) < n_keep:
        raise ValueError(
            f"max_keep={max_keep!r} keeps at most {sum(caps)} {unit} (its cap in each of the "
            f"{len(targets)} tensors), fewer than the {n_keep} that amount={amount!r} keeps; raise "
            "max_keep or amount"
        )
    if caps is not None and min_keep is not None:
        for target, low, high in zip(targets, floors, caps, strict=True):
            if low > high:
                raise ValueError(
                    f"min_keep={min_keep!r} keeps {low} {unit} of {target.fqn!r} but max_keep="
                    f"{max_keep!r} at most {high}"
                )


def _is_grouped(module: nn.Module) -> bool:
    """A convolution with ``groups > 1``: dim 1 of its weight is a channel within each group."""
    groups = getattr(module, "groups", 1)
    return isinstance(groups, int) and groups > 1


def _refuse_transposed(target: Target, layout: str) -> None:
    """Refuse a transposed convolution (``(in, out / groups, *kernel)``) or a transformers ``Conv1D``.

    Filters, channels and N:M blocks are defined on the ``(out, in, ...)`` layout of
    ``nn.Linear`` and ``nn.Conv*d`` weights.
    """
    if isinstance(target.module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        raise ValueError(
            f"parameters names {target.fqn!r}, the weight of a {type(target.module).__name__}, laid out "
            f"(in, out, ...): layout {layout} groups the (out, in, ...) weights of nn.Linear and "
            "nn.Conv*d; prune it with the unstructured layout or leave it out"
        )
    if transposed_linear(target.module) and target.name == "weight":
        raise ValueError(
            f"parameters names {target.fqn!r}, the weight of a transformers Conv1D, laid out "
            f"(in_features, out_features): layout {layout} groups the (out, in) weights of nn.Linear "
            "and nn.Conv*d, and would prune its input features as filters; prune it with the "
            "unstructured layout or leave it out"
        )


def _input_dim(weight: Tensor) -> int:
    """The input dimension of a Linear (``-1``) or Conv (``1``) weight."""
    return -1 if weight.dim() <= 2 else 1


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight
