r"""Pure tensor functions that turn scores into exact top-k masks.

Nothing here knows about modules, data or optimisation. Every selection is exact (the number of
kept entries is always the requested one) and deterministic: among entries whose score ties at
the threshold, the ones with the lowest flat index are kept.

Example:
    >>> import torch
    >>> from torchbip.masks import count_from_amount, topk_mask
    >>> count_from_amount(0.5, 4), count_from_amount(3, 4)
    (2, 3)
    >>> topk_mask(torch.tensor([0.3, 0.1, 0.3, 0.9]), n_keep=2).tolist()
    [True, False, False, True]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple, NoReturn

import numpy as np
import torch
from torch import Tensor

from torchbip._tensors import split_like

__all__ = [
    "GlobalTopK",
    "Threshold",
    "cap_counts",
    "count_from_amount",
    "exact_fraction",
    "floor_counts",
    "nm_mask",
    "threshold_mask",
    "topk_mask",
    "validate_amount",
]


def validate_amount(amount: object, name: str = "amount") -> int | float:
    """Check that ``amount`` follows :mod:`torch.nn.utils.prune`'s convention.

    A float in ``[0, 1]`` is a fraction of the entries that are still unpruned; a non-negative
    int is a count. Any real number is accepted: an integral one (a NumPy integer) becomes a
    Python ``int``, any other (a NumPy ``float32``/``float16``, a :class:`fractions.Fraction`)
    a Python ``float``, so the count later follows ``round(float(amount) * n)`` in float64. That
    is a deliberate difference from torch, which computes ``amount * n`` in the amount's own
    arithmetic: ``np.float32(0.7)`` of 5 entries prunes 3 here and 4 in torch (float32's
    ``0.7 * 5`` rounds to 3.5); see ``docs/differences.rst``.

    Args:
        amount: the value to check.
        name: the argument name used in error messages.

    Returns:
        ``amount`` as a Python ``int`` or ``float``.

    Raises:
        TypeError: if ``amount`` is not a real number (a ``bool`` is rejected too).
        ValueError: if it is NaN, negative, or a float above 1.

    Example:
        >>> validate_amount(0.9)
        0.9
        >>> validate_amount(1.5)
        Traceback (most recent call last):
        ...
        ValueError: amount=1.5 is a float outside [0, 1] ...
    """
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(
            f"{name} must be an int (a count) or a float in [0, 1] (a fraction), "
            f"got {amount!r} of type {type(amount).__name__}"
        )
    if isinstance(amount, numbers.Integral):
        if int(amount) < 0:
            raise ValueError(f"{name}={amount} is a negative count; use an int >= 0")
        return int(amount)
    value = float(amount)
    if math.isnan(value):
        raise ValueError(f"{name}={amount!r} is NaN; use a float in [0, 1] or an int count")
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name}={amount!r} is a float outside [0, 1] (a fraction of the remaining entries); "
            "pass an int to prune a count"
        )
    return value


def count_from_amount(amount: int | float, n: int, name: str = "amount", unit: str = "entries") -> int:
    """Return how many of ``n`` remaining entries ``amount`` asks to prune.

    Follows torch's rule, ``round(amount * n)`` for a float and the value itself for an int,
    with ``amount`` first converted to a Python ``float`` (:func:`validate_amount`), so the
    product is rounded in float64. For a NumPy ``float32``/``float16`` or a
    :class:`fractions.Fraction` this can differ by one from torch, which multiplies in the
    amount's own arithmetic; a deliberate difference (``docs/differences.rst``).

    Args:
        amount: a float in ``[0, 1]`` (fraction) or an int (count).
        n: the number of entries that are still unpruned.
        name: the argument name used in error messages.
        unit: what ``n`` counts, for the message (``"entries"``, ``"filters"``, ...).

    Returns:
        The number of entries to prune, in ``[0, n]``.

    Raises:
        ValueError: if an int ``amount`` exceeds ``n`` (and see :func:`validate_amount`).

    Example:
        >>> count_from_amount(0.95, 266_200)
        252890
        >>> import numpy as np
        >>> count_from_amount(np.float32(0.7), 5)  # round(3.49999994...); torch prunes 4
        3
    """
    value = validate_amount(amount, name)
    if isinstance(value, int):
        if value > n:
            raise ValueError(f"{name}={value} is larger than the number of unpruned {unit} ({n})")
        return value
    return round(value * n)


# Below this many scores a CPU selection skips the band (measured on one thread: the band is
# faster from about 64k scores, 1.1 ms against 1.4 ms for a full selection at 266k; at 32k the
# full ``np.partition`` is faster).
_BANDED_MIN_CPU = 1 << 16


def threshold_mask(flat: Tensor, n_keep: int, threshold: Tensor) -> Tensor:
    """Keep the entries above ``threshold`` plus the lowest-index ties, ``n_keep`` in all.

    Args:
        flat: 1-D scores.
        n_keep: the number of entries to keep.
        threshold: the ``n_keep``-th largest value of ``flat`` (e.g. from
            :meth:`GlobalTopK.threshold`).

    Returns:
        A boolean tensor of ``flat``'s shape with ``n_keep`` ``True`` entries.

    Raises:
        FloatingPointError: when fewer than ``n_keep`` entries rank at or above the threshold
            (the scores hold NaN).

    Example:
        >>> import torch
        >>> threshold_mask(torch.tensor([0.3, 0.1, 0.3, 0.9]), 2, torch.tensor(0.3)).tolist()
        [True, False, False, True]
    """
    keep = _at_least(flat, threshold)
    count = int(torch.count_nonzero(keep))
    if count == n_keep:  # no surplus ties: the common case
        return keep
    if count < n_keep:  # only NaN escapes both ``>=`` and the k-th value selection
        raise FloatingPointError(
            f"the scores hold NaN: a top-k mask of exactly {n_keep} entries cannot be selected "
            f"({count} entries rank at or above the threshold)"
        )
    return _above_and_first_ties(flat, threshold, n_keep)


def _above_and_first_ties(flat: Tensor, value: Tensor, n_keep: int) -> Tensor:
    """``flat > value``, topped up to ``n_keep`` entries by those equal to ``value`` of lowest index."""
    keep = flat > value
    ties = torch.nonzero(flat == value).flatten()
    keep[ties[: n_keep - int(torch.count_nonzero(keep))]] = True
    return keep


class Threshold(NamedTuple):
    """Where a top-k selection cuts: the ``n_keep``-th largest score and the counts around it.

    The selection keeps the ``above`` entries strictly above ``value`` and the ``kept`` entries
    equal to it of lowest index, out of the ``ties`` entries equal to it.
    """

    value: Tensor
    above: int
    ties: int
    kept: int

    @property
    def exact(self) -> bool:
        """Whether ``scores >= value`` keeps exactly the selection (no entry equal to it left out)."""
        return self.kept == self.ties


def _as_float(flat: Tensor) -> Tensor:
    """Integer and boolean scores are ranked as float64 (selection needs ``-inf`` and kthvalue)."""
    return flat if flat.is_floating_point() else flat.to(torch.float64)


def _finite_ranks(flat: Tensor) -> Tensor:
    """``flat`` with ``+inf``/``-inf`` scores moved to the dtype's largest finite values.

    The selection marks entries that are never kept with ``-inf`` and entries that are always
    kept with ``+inf``; a score of the same value would tie with the marks. (An infinite score
    then ties with the largest finite one; NaN stays NaN.)
    """
    big = torch.finfo(flat.dtype).max
    return torch.nan_to_num(flat, nan=math.nan, posinf=big, neginf=-big)


def _numpy(flat: Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU score tensor (bfloat16 widened exactly to float32), else ``None``.

    On CPUs NumPy's selection (``np.partition``) and comparisons run several times faster than
    ``torch.kthvalue`` and torch's boolean indexing; the results are the same values.
    """
    if (
        flat.device.type != "cpu"
        or flat.requires_grad
        or torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(flat)
    ):
        return None
    if flat.dtype == torch.bfloat16:
        flat = flat.float()
    if flat.dtype not in (torch.float16, torch.float32, torch.float64):
        return None
    return flat.numpy()


def _at_least(flat: Tensor, threshold: Tensor) -> Tensor:
    """``flat >= threshold`` (through NumPy on CPUs)."""
    arr = _numpy(flat)
    if arr is None:
        return flat >= threshold
    return torch.from_numpy(arr >= arr.dtype.type(threshold.item()))


def _counts_around(flat: Tensor, value: Tensor) -> tuple[int, int]:
    """How many entries of ``flat`` lie strictly above ``value`` and how many equal it."""
    arr = _numpy(flat)
    if arr is None:
        above, ties = torch.stack(
            [torch.count_nonzero(flat > value), torch.count_nonzero(flat == value)]
        ).tolist()
        return int(above), int(ties)
    v = arr.dtype.type(value.item())
    return int(np.count_nonzero(arr > v)), int(np.count_nonzero(arr == v))


def _kth_largest(flat: Tensor, n_keep: int) -> Tensor:
    """The ``n_keep``-th largest value of a 1-D tensor (an O(n) selection)."""
    arr = _numpy(flat)
    if arr is None:
        return torch.kthvalue(flat, flat.numel() - n_keep + 1).values
    index = arr.size - n_keep
    return torch.tensor(np.partition(arr, index)[index].item(), dtype=flat.dtype)


def topk_mask(scores: Tensor, n_keep: int, allowed: Tensor | None = None) -> Tensor:
    """Boolean mask of the ``n_keep`` highest scores, never keeping a disallowed entry.

    Args:
        scores: a tensor of scores, any shape (with ``allowed``, ``+inf``/``-inf`` rank as the
            largest/smallest finite value: a disallowed entry is never kept).
        n_keep: how many entries to keep (``0 <= n_keep <= allowed.sum()``).
        allowed: optional boolean tensor of ``scores``' shape; ``False`` entries are never kept.

    Returns:
        A boolean tensor of ``scores``' shape with exactly ``n_keep`` ``True`` entries.

    Raises:
        ValueError: if ``n_keep`` is out of range or the shapes differ.

    Example:
        >>> import torch
        >>> topk_mask(torch.tensor([[4.0, 1.0], [3.0, 2.0]]), 2).tolist()
        [[True, False], [True, False]]
        >>> allowed = torch.tensor([[False, True], [True, True]])
        >>> topk_mask(torch.tensor([[4.0, 1.0], [3.0, 2.0]]), 2, allowed).tolist()
        [[False, False], [True, True]]
    """
    flat = _as_float(scores.detach().reshape(-1))
    n_allowed = flat.numel()
    if allowed is not None:
        if allowed.shape != scores.shape:
            raise ValueError(f"allowed has shape {tuple(allowed.shape)}, scores {tuple(scores.shape)}")
        allowed_flat = allowed.reshape(-1).bool()
        n_allowed = int(allowed_flat.sum())
        flat = torch.where(allowed_flat, _finite_ranks(flat), torch.full_like(flat, -math.inf))
    if not 0 <= n_keep <= n_allowed:
        raise ValueError(f"n_keep={n_keep} must lie in [0, {n_allowed}]")
    if n_keep == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    keep = threshold_mask(flat, n_keep, _kth_largest(flat, n_keep))
    if allowed is not None:
        keep &= allowed_flat
    return keep.view(scores.shape)


def floor_counts(numels: Sequence[int], min_keep: int | float | None) -> list[int]:
    """Per-tensor number of entries that a per-layer floor keeps.

    Args:
        numels: number of (allowed) entries of each tensor.
        min_keep: ``None`` (no floor), an int count kept in every tensor (capped at its size),
            or a float in ``[0, 1]``, the fraction of each tensor kept (the exact product with the
            decimal fraction as written, rounded up, at least 1;
            ``0.0`` is no floor, as ``0``).

    Returns:
        One count per tensor.

    Raises:
        TypeError: if ``min_keep`` is not ``None``, an int or a float (a ``bool`` is rejected).
        ValueError: if it is a negative int, or a float outside ``[0, 1]`` or NaN.

    Example:
        >>> floor_counts([10, 1000], 0.01)
        [1, 10]
        >>> floor_counts([10, 1000], 20)
        [10, 20]
        >>> floor_counts([10, 1000], 0.0)
        [0, 0]
    """
    if min_keep is None:
        return [0] * len(numels)
    if isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Real):
        raise TypeError(
            f"min_keep must be None, an int (a count) or a float in [0, 1] (a fraction), "
            f"got {min_keep!r} of type {type(min_keep).__name__}"
        )
    if isinstance(min_keep, numbers.Integral):
        if int(min_keep) < 0:
            raise ValueError(f"min_keep={min_keep} is a negative count; use an int >= 0")
        return [min(int(min_keep), n) for n in numels]
    fraction = float(min_keep)
    if not 0.0 <= fraction <= 1.0:  # also catches NaN
        raise ValueError(f"min_keep={min_keep!r} is a float outside [0, 1] (a fraction of each tensor)")
    if fraction == 0.0:  # no floor, as min_keep=0
        return [0] * len(numels)
    exact = exact_fraction(min_keep)
    return [min(n, max(1, math.ceil(exact * n))) for n in numels]


def cap_counts(numels: Sequence[int], max_keep: int | float | None) -> list[int] | None:
    """Per-tensor number of entries that a per-layer cap keeps at most.

    Args:
        numels: number of (allowed) entries of each tensor.
        max_keep: ``None`` (no cap), an int count (at most that many kept in every tensor) or a
            float in ``[0, 1]``, the largest fraction of each tensor kept (the exact product with
            the decimal fraction as written, rounded down: 0.58 of 100 is 58).

    Returns:
        One count per tensor, or ``None`` without a cap.

    Raises:
        TypeError: if ``max_keep`` is not ``None``, an int or a float (a ``bool`` is rejected).
        ValueError: if it is a negative int, or a float outside ``[0, 1]`` or NaN.

    Example:
        >>> cap_counts([10, 1000], 0.5)
        [5, 500]
        >>> cap_counts([10, 1000], 20)
        [10, 20]
    """
    if max_keep is None:
        return None
    if isinstance(max_keep, bool) or not isinstance(max_keep, numbers.Real):
        raise TypeError(
            f"max_keep must be None, an int (a count) or a float in [0, 1] (a fraction), "
            f"got {max_keep!r} of type {type(max_keep).__name__}"
        )
    if isinstance(max_keep, numbers.Integral):
        if int(max_keep) < 0:
            raise ValueError(f"max_keep={max_keep} is a negative count; use an int >= 0")
        return [min(int(max_keep), n) for n in numels]
    fraction = float(max_keep)
    if not 0.0 <= fraction <= 1.0:  # also catches NaN
        raise ValueError(f"max_keep={max_keep!r} is a float outside [0, 1] (a fraction of each tensor)")
    exact = exact_fraction(max_keep)
    return [math.floor(exact * n) for n in numels]


def exact_fraction(value: float | numbers.Real) -> Fraction:
    """``value`` as the exact fraction it is written as: ``0.45`` is 9/20.

    Float arithmetic on the binary value rounds some counts the wrong way (``0.58 * 100`` is
    57.99999999999999, ``100 * (1 - 0.45)`` is 55.00000000000001); the shortest decimal that
    prints as ``value`` gives the count the decimal promises.

    Args:
        value: a real number (a ``float``, a NumPy scalar, a :class:`~fractions.Fraction` ...).

    Returns:
        The fraction: exact for a rational ``value``, else that of ``str(value)`` (a float's
        shortest round-tripping decimal), else the float's binary value.

    Example:
        >>> exact_fraction(0.58) * 100, exact_fraction(0.45)
        (Fraction(58, 1), Fraction(9, 20))
    """
    if isinstance(value, numbers.Rational):
        return Fraction(int(value.numerator), int(value.denominator))
    try:
        return Fraction(str(value))
    except ValueError:
        return Fraction(float(value))


class GlobalTopK:
    """Exact global top-k over many score tensors, with an optional per-tensor floor.

    Selection is O(n): an exact k-th value selection (``np.partition`` on CPUs, several times
    faster than :func:`torch.kthvalue` there; ``torch.kthvalue`` elsewhere) finds the threshold
    on the first call. For large tensors (on CPUs, 64k scores and more) later calls reuse the
    previous threshold, count the entries above a narrow band around it and run the selection
    only inside the band (a few elementwise passes), falling back to a full selection when the
    threshold left the band. The result is identical to a full selection.

    Args:
        n_keep: the number of entries kept across all tensors.
        floors: optional per-tensor counts that are always kept (the highest-scoring ones).
        caps: optional per-tensor counts that are never exceeded (only a tensor's
            highest-scoring ``cap`` entries can be kept; a cap above the tensor's number of
            allowed entries does not bind).

    Example:
        >>> import torch
        >>> select = GlobalTopK(n_keep=3)
        >>> masks = select([torch.tensor([0.5, 0.1]), torch.tensor([0.9, 0.2, 0.7])])
        >>> [m.tolist() for m in masks]
        [[True, False], [True, False, True]]
        >>> masks = GlobalTopK(3, floors=[0, 0, 1])(
        ...     [torch.tensor([0.5, 0.1]), torch.tensor([0.9, 0.7]), torch.tensor([0.0])]
        ... )
        >>> [m.tolist() for m in masks]
        [[False, False], [True, True], [True]]
    """

    def __init__(
        self, n_keep: int, floors: Sequence[int] | None = None, caps: Sequence[int] | None = None
    ) -> None:
        self.n_keep = int(n_keep)
        self.floors = list(floors) if floors is not None else None
        self.caps = list(caps) if caps is not None else None
        if self.floors is not None and sum(self.floors) > self.n_keep:
            raise ValueError(
                f"the per-layer floors keep {sum(self.floors)} entries, more than the "
                f"{self.n_keep} that the amount allows"
            )
        if self.caps is not None and sum(self.caps) < self.n_keep:
            raise ValueError(
                f"the per-layer caps keep at most {sum(self.caps)} entries, fewer than the "
                f"{self.n_keep} that the amount keeps"
            )
        if self.floors is not None and self.caps is not None:
            for i, (lo, hi) in enumerate(zip(self.floors, self.caps, strict=True)):
                if lo > hi:
                    raise ValueError(f"tensor {i}: its floor ({lo}) is above its cap ({hi})")
        self._threshold: Tensor | None = None
        self._move = 0.0  # the threshold's move in the last call
        self._half: float | None = None  # the next band's half-width
        self._band = 1e-3  # the first band's half-width, relative to the threshold
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        """Forget the previous threshold (the next call runs a full selection)."""
        self._threshold, self._move, self._half = None, 0.0, None

    def __call__(
        self, scores: Sequence[Tensor], allowed: Sequence[Tensor | None] | None = None
    ) -> list[Tensor]:
        """Return one boolean mask per score tensor; ``n_keep`` ``True`` entries in all.

        Args:
            scores: finite score tensors (any shapes).
            allowed: optional boolean tensors (one per score tensor, or ``None``); ``False``
                entries are never kept.

        Returns:
            One boolean mask per score tensor, of its shape.

        Raises:
            ValueError: if the lists are empty or of different lengths, if ``n_keep`` or a
                floor exceeds the number of allowed entries, or if the caps leave fewer than
                ``n_keep`` of them.
        """
        if len(scores) == 0:
            raise ValueError("scores is empty: pass at least one score tensor")
        if allowed is not None and len(allowed) != len(scores):
            raise ValueError(f"allowed has {len(allowed)} entries but scores has {len(scores)}")
        if self.floors is not None and len(self.floors) != len(scores):
            raise ValueError(f"floors has {len(self.floors)} entries but scores has {len(scores)}")
        if self.caps is not None and len(self.caps) != len(scores):
            raise ValueError(f"caps has {len(self.caps)} entries but scores has {len(scores)}")
        allows: list[Tensor | None] = [None] * len(scores)
        if allowed is not None:
            for i, (s, allow) in enumerate(zip(scores, allowed, strict=True)):
                if allow is None:
                    continue
                if allow.shape != s.shape:
                    raise ValueError(
                        f"allowed[{i}] has shape {tuple(allow.shape)}, scores[{i}] {tuple(s.shape)}"
                    )
                allows[i] = allow.reshape(-1).bool()
        counts = self._check_counts(scores, allows)
        flats = []
        for i, s in enumerate(scores):
            flat = _as_float(s.detach().reshape(-1))
            allow = allows[i]
            if allow is not None or self.caps is not None or self.floors is not None:
                flat = _finite_ranks(flat)  # -inf and +inf below mark left-out and forced entries
            if allow is not None:
                flat = torch.where(allow, flat, -math.inf)
            if self.caps is not None and self.caps[i] < counts[i]:
                allow = topk_mask(flat, self.caps[i], allow)  # the entries within the cap
                flat = torch.where(allow, flat, -math.inf)
            if self.floors is not None and self.floors[i] > 0:
                forced = topk_mask(flat, self.floors[i], allow)
                flat = torch.where(forced, math.inf, flat)
            flats.append(flat)
        flat = torch.cat(flats) if len(flats) > 1 else flats[0]
        return split_like(self._select(flat), scores)

    def _check_counts(self, scores: Sequence[Tensor], allows: Sequence[Tensor | None]) -> list[int]:
        """Each tensor's number of allowed entries.

        Raises if ``n_keep``, a floor or the caps ask for more entries than ``allowed`` leaves.
        """
        present = [a.sum() for a in allows if a is not None]
        allowed_counts = iter(torch.stack(present).tolist() if present else [])  # one device sync
        counts = [
            s.numel() if a is None else int(next(allowed_counts)) for s, a in zip(scores, allows, strict=True)
        ]
        if self.n_keep > sum(counts):
            raise ValueError(
                f"n_keep={self.n_keep} is larger than the number of allowed entries ({sum(counts)})"
            )
        if self.floors is not None:
            for i, (floor, count) in enumerate(zip(self.floors, counts, strict=True)):
                if floor > count:
                    raise ValueError(
                        f"floors[{i}]={floor} is larger than the number of allowed entries of "
                        f"tensor {i} ({count})"
                    )
        if self.caps is not None:
            reachable = sum(min(cap, count) for cap, count in zip(self.caps, counts, strict=True))
            if reachable < self.n_keep:
                raise ValueError(
                    f"the per-layer caps keep at most {reachable} of the allowed entries, fewer than "
                    f"the {self.n_keep} that n_keep asks for"
                )
        return counts

    def select_flat(self, flat: Tensor) -> Tensor:
        """Select ``n_keep`` entries of one flat score tensor (no floors, nothing disallowed).

        The fast path of :meth:`__call__` for scores that already live in one buffer.

        Example:
            >>> import torch
            >>> GlobalTopK(2).select_flat(torch.tensor([0.1, 0.9, 0.5, 0.3])).tolist()
            [False, True, True, False]
        """
        if (self.floors is not None and any(self.floors)) or self.caps is not None:
            raise ValueError("select_flat does not apply per-tensor floors or caps; call the selector")
        return self._select(_as_float(flat.detach().reshape(-1)))

    def threshold(self, flat: Tensor) -> tuple[Tensor, bool]:
        """The ``n_keep``-th largest value of one flat score tensor, and whether it is exact.

        Exact: ``flat >= value`` keeps exactly ``n_keep`` entries (callers may write that
        comparison straight into a mask of another dtype), which holds unless entries equal to
        the value are left out; those ties are broken by index (:meth:`select_flat` does both,
        :meth:`locate` gives the counts). No floors, caps or disallowed entries (as
        :meth:`select_flat`). Calls after the first search a band around the threshold the
        previous call moved to (see the class docstring).

        Raises:
            ValueError: with floors or caps, or for ``n_keep`` outside ``[1, flat.numel()]``.
            FloatingPointError: when the scores hold NaN.

        Example:
            >>> import torch
            >>> select = GlobalTopK(2)
            >>> value, exact = select.threshold(torch.tensor([0.1, 0.9, 0.5, 0.3]))
            >>> float(value), exact
            (0.5, True)
        """
        found = self.locate(flat)
        return found.value, found.exact

    def locate(self, flat: Tensor) -> Threshold:
        """Where the top-k of one flat score tensor cuts, with the counts around the cut.

        As :meth:`threshold`, and also how many entries lie strictly above the value, how many
        equal it and how many of those the selection keeps (the ones of lowest index).

        Raises:
            ValueError: with floors or caps, or for ``n_keep`` outside ``[1, flat.numel()]``.
            FloatingPointError: when the scores hold NaN.

        Example:
            >>> import torch
            >>> found = GlobalTopK(3).locate(torch.tensor([0.1, 0.5, 0.9, 0.5, 0.5]))
            >>> float(found.value), found.above, found.ties, found.kept, found.exact
            (0.5, 1, 3, 2, False)
        """
        if (self.floors is not None and any(self.floors)) or self.caps is not None:
            raise ValueError("locate/threshold do not apply per-tensor floors or caps; call the selector")
        flat = _as_float(flat.detach().reshape(-1))
        if not 1 <= self.n_keep <= flat.numel():
            raise ValueError(f"n_keep={self.n_keep} must lie in [1, {flat.numel()}] for a threshold")
        return self._kth_value(flat)

    def _select(self, flat: Tensor) -> Tensor:
        n, k = flat.numel(), self.n_keep
        if not 0 <= k <= n:
            raise ValueError(f"n_keep={k} must lie in [0, {n}]")
        if k == 0:
            return torch.zeros_like(flat, dtype=torch.bool)
        found = self._kth_value(flat)
        return _at_least(flat, found.value) if found.exact else _above_and_first_ties(flat, found.value, k)

    def _kth_value(self, flat: Tensor) -> Threshold:
        """The ``n_keep``-th largest value of ``flat`` (``n_keep >= 1``) and the counts around it.

        After the first call the value is searched in a band around the predicted threshold;
        otherwise (and when the band misses) by a full selection.
        """
        # Small CPU tensors: NumPy's full selection is faster than the band's extra passes.
        small_cpu = flat.device.type == "cpu" and flat.numel() < _BANDED_MIN_CPU
        if self._threshold is not None and not small_cpu:
            found = self._banded_threshold(flat)  # finds NaN itself, from its counts
            if found is not None:
                return found
        # NaN ranks nowhere, so ``flat >= value`` would keep fewer than n_keep: one sum finds it
        if math.isnan(float(flat.sum())) and bool(torch.isnan(flat).any()):
            self._nan()
        value = _kth_largest(flat, self.n_keep)
        self._remember(value, None)
        above, ties = _counts_around(flat, value)
        return Threshold(value, above, ties, self.n_keep - above)

    def _nan(self) -> NoReturn:
        raise FloatingPointError(
            f"the scores hold NaN: a top-k mask of exactly {self.n_keep} entries cannot be selected"
        )

    def _remember(self, value: Tensor, predicted: float | None) -> None:
        """Keep the threshold, its move and the next band's half-width."""
        new = float(value)
        if self._threshold is None or not math.isfinite(new):
            self._threshold, self._move, self._half = value, 0.0, None
            return
        last = float(self._threshold)
        move = new - last if math.isfinite(last) else 0.0
        error = abs(new - predicted) if predicted is not None else abs(move)
        # The next band: centred on the threshold moved by this step's move (thresholds drift
        # steadily while scores train), four times this step's prediction error wide on each side.
        self._threshold, self._move = value, move
        self._half = max(4.0 * error, 0.5 * abs(move), 1e-7 * max(abs(new), 1e-12))

    def _banded_threshold(self, flat: Tensor) -> Threshold | None:
        """The exact k-th largest value if it lies in a band around the predicted threshold.

        With the counts around it (all entries equal to it lie in the band).
        Two comparisons and one gather of the band (a few hundred to a few thousand entries);
        when the value lies outside, the band widens and the search repeats, at most three
        times, before the caller falls back to a full selection. The comparisons' counts also
        find NaN (see :meth:`_count_and_gather`), which raises :class:`FloatingPointError`.
        """
        assert self._threshold is not None
        last = float(self._threshold)
        if not math.isfinite(last):
            return None
        center = last + self._move
        half = self._half if self._half is not None else self._band * max(abs(last), 1e-12)
        n, k = flat.numel(), self.n_keep
        for _ in range(3):
            lo, hi = center - half, center + half
            counted = self._count_and_gather(flat, lo, hi)
            if counted is not None:
                above, band, complete = counted
                if not complete:
                    self._nan()
                need = k - above
                if 0 < need <= band.numel():
                    value = _kth_largest(band, need)
                    self._remember(value, center)
                    if band.numel() > max(4096, n // 64):  # wide: aim narrower next time
                        self._half = min(self._half or half, half / 2)
                    in_band_above, ties = _counts_around(band, value)
                    return Threshold(value, above + in_band_above, ties, need - in_band_above)
            half *= 4
        self._threshold = None
        return None

    def _count_and_gather(self, flat: Tensor, lo: float, hi: float) -> tuple[int, Tensor, bool] | None:
        """The number of scores above ``hi``, the scores in ``[lo, hi]`` and whether none is NaN.

        For ``lo <= hi`` every score but NaN is ``>= lo`` or ``<= hi`` (or both, in the band), so
        the scores hold NaN exactly when the two counts less the band's miss some.
        """
        arr = _numpy(flat)
        if arr is None:
            at_least, at_most = flat >= lo, flat <= hi
            band = flat[at_least & at_most]
            n_ge, n_le = torch.stack([torch.count_nonzero(at_least), torch.count_nonzero(at_most)]).tolist()
            return n_ge - band.numel(), band, n_ge + n_le - band.numel() == flat.numel()
        if max(abs(lo), abs(hi)) < 65504.0:  # within every dtype's range (np.errstate costs ~10 us)
            low, high = arr.dtype.type(lo), arr.dtype.type(hi)
        else:
            with np.errstate(over="ignore"):  # a band edge beyond a narrow dtype's range: checked below
                low, high = arr.dtype.type(lo), arr.dtype.type(hi)
        if not low <= high:  # overflow of a narrow dtype
            return None
        if self._buffers is None or self._buffers[0].size != arr.size:
            self._buffers = (np.empty(arr.size, dtype=bool), np.empty(arr.size, dtype=bool))
        ge, inside = self._buffers  # reused: fresh ones cost page faults on every call
        np.greater_equal(arr, low, out=ge)
        np.less_equal(arr, high, out=inside)
        at_or_above, at_or_below = int(np.count_nonzero(ge)), int(np.count_nonzero(inside))
        np.logical_and(ge, inside, out=inside)
        band = torch.from_numpy(arr[inside])
        if flat.dtype == torch.bfloat16:
            band = band.to(torch.bfloat16)
        return at_or_above - band.numel(), band, at_or_above + at_or_below - band.numel() == arr.size


def nm_mask(
    scores: Tensor, n: int = 2, m: int = 4, dim: int = -1, *, allowed: Tensor | None = None
) -> Tensor:
    """N:M mask: keep the ``n`` highest scores in every block of ``m`` consecutive entries.

    Blocks run along ``dim`` (for a ``Linear`` weight ``(out, in)``, ``dim=-1`` is the input
    dimension, the layout that :func:`torch.sparse.to_sparse_semi_structured` expects for 2:4).
    Ties keep the lower index. With ``allowed``, an entry pruned earlier is never kept, so a block
    with fewer than ``n`` allowed entries keeps fewer than ``n``.

    Args:
        scores: finite scores, at least one dimension.
        n: entries kept per block, ``0 <= n <= m``.
        m: block length; ``scores.shape[dim]`` must be a multiple of ``m``.
        dim: the dimension along which blocks run.
        allowed: optional boolean tensor of ``scores``' shape; ``False`` entries are never kept.

    Returns:
        A boolean tensor of ``scores``' shape.

    Raises:
        TypeError: if ``n``, ``m`` or ``dim`` is not an int.
        ValueError: if ``n`` or ``m`` is out of range, ``dim`` is out of range, the size along
            ``dim`` is not a multiple of ``m``, or ``allowed`` has another shape.

    Example:
        >>> import torch
        >>> nm_mask(torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])).int().tolist()
        [[0, 1, 1, 0, 1, 1, 0, 0]]
        >>> nm_mask(torch.tensor([1.0, 1.0, 1.0, 1.0]), n=1, m=2).int().tolist()
        [1, 0, 1, 0]
    """
    for arg, value in (("n", n), ("m", m), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # (NumPy ints too)
            raise TypeError(f"{arg} must be an int, got {value!r} of type {type(value).__name__}")
    n, m, dim = int(n), int(m), int(dim)
    if m < 1:
        raise ValueError(f"m={m} must be >= 1")
    if not 0 <= n <= m:
        raise ValueError(f"n={n} must lie in [0, m={m}]")
    if scores.dim() == 0:
        raise ValueError("scores is a scalar; an N:M mask needs at least one dimension")
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {scores.dim()} dimensions")
    size = scores.shape[dim]
    if size % m:
        raise ValueError(
            f"scores has size {size} along dim={dim}, not a multiple of m={m}; N:M blocks must tile it"
        )
    if allowed is not None and allowed.shape != scores.shape:
        raise ValueError(f"allowed has shape {tuple(allowed.shape)}, scores {tuple(scores.shape)}")
    values = _as_float(scores.detach()).movedim(dim, -1)
    if allowed is not None:
        values = torch.where(allowed.movedim(dim, -1).bool(), values, -math.inf)
    blocks = values.reshape(*values.shape[:-1], size // m, m)
    order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    if allowed is not None:
        keep &= blocks > -math.inf
    return keep.reshape(values.shape).movedim(-1, dim)
