r"""Hypothesis strategies for pruning tests: shapes, scores with ties, amounts, default masks.

Everything stays small (at most 4-D and a few thousand entries) so that property tests run in
seconds on a CPU. Large tensors are filled from a drawn seed with a :class:`torch.Generator`
instead of element by element, which keeps generation fast; tensors of up to
:data:`ELEMENTWISE_LIMIT` entries are drawn element by element, so hypothesis can shrink them.

This module imports :mod:`hypothesis` (a test dependency); ``import torchbip`` never imports it.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, deadline=None)
    ... @given(pruning_cases())
    ... def check(case):
    ...     scores, default_mask, amount = case
    ...     assert scores.shape == default_mask.shape
    >>> check()
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = [
    "ELEMENTWISE_LIMIT",
    "MAX_NUMEL",
    "TIE_VALUES",
    "amounts",
    "default_masks",
    "fractions",
    "invalid_amounts",
    "models_with_data",
    "pruning_cases",
    "score_lists",
    "score_tensors",
    "shape_lists",
    "shapes",
    "tiny_mlps",
]

#: Default upper bound on the number of entries of a drawn tensor.
MAX_NUMEL = 2048

#: Tensors with at most this many entries are drawn element by element (they shrink well).
ELEMENTWISE_LIMIT = 64

#: The small set of score values that tied score tensors draw from (exact in every float dtype).
TIE_VALUES: tuple[float, ...] = tuple(i / 4 for i in range(-8, 9))


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


_seeds = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def shapes(
    draw: st.DrawFn,
    *,
    min_dims: int = 1,
    max_dims: int = 4,
    min_side: int = 1,
    max_side: int = 16,
    max_numel: int = MAX_NUMEL,
) -> tuple[int, ...]:
    """Draw a tensor shape with at most ``max_numel`` entries.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        min_dims: fewest dimensions.
        max_dims: most dimensions (at most 4 keeps the tests fast).
        min_side: smallest size of a dimension (``0`` allows empty tensors).
        max_side: largest size of a dimension.
        max_numel: largest number of entries.

    Returns:
        A shape tuple; each side is capped so that the product stays within ``max_numel``.

    Example:
        >>> import math
        >>> from hypothesis import find
        >>> shape = find(shapes(min_dims=2), lambda s: math.prod(s) > 100)
        >>> len(shape) >= 2, math.prod(shape) <= MAX_NUMEL
        (True, True)
    """
    ndim = draw(st.integers(min_value=min_dims, max_value=max_dims))
    sides: list[int] = []
    budget = max_numel
    for _ in range(ndim):
        high = max(min_side, min(max_side, budget))
        side = draw(st.integers(min_value=min_side, max_value=high))
        sides.append(side)
        budget = budget // max(side, 1)
    return tuple(sides)


@st.composite
def score_tensors(
    draw: st.DrawFn,
    shape: Sequence[int] | None = None,
    *,
    ties: bool | None = True,
    nonnegative: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw a tensor of finite scores, by default with many ties.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        shape: the tensor's shape; drawn with :func:`shapes` when ``None``.
        ties: ``True``: values come from a small subset of :data:`TIE_VALUES`, so equal scores
            are common. ``False``: all values *and all magnitudes* are distinct. ``None``: either.
        nonnegative: draw only scores ``>= 0``.
        dtype: a floating dtype; ``ties=False`` needs one that holds the integers up to the
            number of entries exactly (``float32`` and ``float64`` do for these sizes).

    Returns:
        A contiguous tensor of ``shape`` and ``dtype``.

    Example:
        >>> from hypothesis import find
        >>> find(score_tensors((2, 3), ties=False), lambda t: True).abs().unique().numel()
        6
    """
    if shape is None:
        shape = draw(shapes())
    shape = tuple(shape)
    n = math.prod(shape)
    if ties is None:
        ties = draw(st.booleans())
    if ties:
        values = [v for v in TIE_VALUES if v >= 0] if nonnegative else list(TIE_VALUES)
        pool = draw(st.lists(st.sampled_from(values), min_size=1, max_size=4, unique=True))
        pool_t = torch.tensor(pool, dtype=dtype)
        if n <= ELEMENTWISE_LIMIT:
            index = torch.tensor(
                draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n)), dtype=torch.long
            )
        else:
            index = torch.randint(len(pool), (n,), generator=_generator(draw(_seeds)))
        return pool_t[index].reshape(shape)
    # Distinct magnitudes: a random permutation of 1..n, with random signs, times a scale.
    gen = _generator(draw(_seeds))
    magnitudes = (torch.randperm(n, generator=gen) + 1).to(dtype)
    if not nonnegative:
        signs = torch.randint(2, (n,), generator=gen).to(dtype) * 2 - 1
        magnitudes = magnitudes * signs
    scale = draw(st.sampled_from([1.0, 0.5, 1e-3, 100.0]))
    return (magnitudes * scale).reshape(shape)


@st.composite
def default_masks(
    draw: st.DrawFn,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    allow_empty: bool = True,
) -> Tensor:
    """Draw a binary mask such as an earlier pruning step leaves (``1`` kept, ``0`` pruned).

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        shape: the mask's shape.
        dtype: the mask's dtype (torch's masks have the pruned tensor's dtype).
        allow_empty: allow a mask that prunes every entry.

    Returns:
        A tensor of zeros and ones: all ones, all zeros, or random with a drawn keep rate.

    Example:
        >>> from hypothesis import find
        >>> mask = find(default_masks((2, 2)), lambda m: bool((m == 0).any() and m.any()))
        >>> sorted(mask.unique().tolist()), mask.dtype
        ([0.0, 1.0], torch.float32)
    """
    shape = tuple(shape)
    n = math.prod(shape)
    rates = [1.0, 0.9, 0.5, 0.1] + ([0.0] if allow_empty else [])
    rate = draw(st.sampled_from(rates))
    if rate in (0.0, 1.0):
        return torch.full(shape, rate).to(dtype)
    if n <= ELEMENTWISE_LIMIT:
        bits = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    else:
        bits = torch.rand(n, generator=_generator(draw(_seeds))) < rate
    if not allow_empty and n > 0 and not bits.any():
        bits[0] = True
    return bits.reshape(shape).to(dtype)


def fractions() -> st.SearchStrategy[float]:
    """Float amounts in ``[0, 1]``, the edges and halves (Python's rounding cases) included.

    Returns:
        A strategy of floats.

    Example:
        >>> from hypothesis import find
        >>> 0.5 < find(fractions(), lambda a: a > 0.5) <= 1.0
        True
    """
    edges = st.sampled_from([0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 0.9, 0.95])
    return st.one_of(edges, st.floats(min_value=0.0, max_value=1.0, allow_nan=False))


def amounts(n: int) -> st.SearchStrategy[int | float]:
    """Valid ``amount`` values for a tensor with ``n`` unpruned entries: counts and fractions.

    Args:
        n: the number of entries that are still unpruned.

    Returns:
        A strategy of ints in ``[0, n]`` and floats in ``[0, 1]``.

    Example:
        >>> from hypothesis import find
        >>> find(amounts(10), lambda a: isinstance(a, int) and a > 3) in range(4, 11)
        True
    """
    counts = st.one_of(st.sampled_from([0, n]), st.integers(min_value=0, max_value=n))
    return st.one_of(counts, fractions())


def invalid_amounts(n: int) -> st.SearchStrategy[object]:
    """``amount`` values that torch's convention rejects for ``n`` unpruned entries.

    Args:
        n: the number of entries that are still unpruned.

    Returns:
        A strategy of negative ints, floats outside ``[0, 1]``, NaN, infinities, ints above ``n``,
        booleans, strings and ``None``.

    Example:
        >>> from hypothesis import find
        >>> find(invalid_amounts(4), lambda a: type(a) is int and a > 0) > 4
        True
    """
    return st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=n + 1),
        st.floats(min_value=1.0, exclude_min=True),
        st.floats(max_value=-sys.float_info.min),
        st.sampled_from([math.nan, math.inf, -math.inf, True, False, "0.5", None]),
    )


@st.composite
def pruning_cases(
    draw: st.DrawFn,
    *,
    ties: bool | None = True,
    dtype: torch.dtype = torch.float32,
    max_numel: int = MAX_NUMEL,
) -> tuple[Tensor, Tensor, int | float]:
    """Draw ``(scores, default_mask, amount)`` for one ``compute_mask`` call.

    ``amount`` is valid for the number of entries that ``default_mask`` leaves.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        ties: passed to :func:`score_tensors`.
        dtype: dtype of the scores and of the mask.
        max_numel: largest number of entries.

    Returns:
        The scores, a default mask of their shape and dtype, and an amount.

    Example:
        >>> from hypothesis import find
        >>> scores, mask, amount = find(pruning_cases(), lambda c: c[0].dim() > 1)
        >>> scores.shape == mask.shape, scores.dtype == mask.dtype
        (True, True)
    """
    shape = draw(shapes(max_numel=max_numel))
    scores = draw(score_tensors(shape, ties=ties, dtype=dtype))
    mask = draw(default_masks(shape, dtype=dtype))
    amount = draw(amounts(int(mask.count_nonzero())))
    return scores, mask, amount


@st.composite
def shape_lists(
    draw: st.DrawFn,
    *,
    min_size: int = 1,
    max_size: int = 4,
    max_numel: int = MAX_NUMEL,
) -> list[tuple[int, ...]]:
    """Draw the shapes of several tensors (e.g. one model's weights) within one entry budget.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        min_size: fewest tensors.
        max_size: most tensors.
        max_numel: largest total number of entries.

    Returns:
        A list of shapes.

    Example:
        >>> from hypothesis import find
        >>> len(find(shape_lists(min_size=2), lambda s: True)) >= 2
        True
    """
    count = draw(st.integers(min_value=min_size, max_value=max_size))
    per_tensor = max(1, max_numel // count)
    return [draw(shapes(max_numel=per_tensor)) for _ in range(count)]


@st.composite
def score_lists(
    draw: st.DrawFn,
    shape_list: Sequence[Sequence[int]] | None = None,
    *,
    ties: bool | None = True,
    nonnegative: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Draw one score tensor per shape; ``ties=False`` makes magnitudes distinct *across* tensors.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        shape_list: the shapes; drawn with :func:`shape_lists` when ``None``.
        ties: as in :func:`score_tensors`, but over the concatenation of all tensors.
        nonnegative: draw only scores ``>= 0``.
        dtype: a floating dtype.

    Returns:
        A list of score tensors.

    Example:
        >>> from hypothesis import find
        >>> [s.shape for s in find(score_lists([(2,), (1, 3)]), lambda s: True)]
        [torch.Size([2]), torch.Size([1, 3])]
    """
    if shape_list is None:
        shape_list = draw(shape_lists())
    sizes = [math.prod(s) for s in shape_list]
    flat = draw(score_tensors((sum(sizes),), ties=ties, nonnegative=nonnegative, dtype=dtype))
    return [part.reshape(tuple(s)).clone() for part, s in zip(flat.split(sizes), shape_list, strict=True)]


@st.composite
def tiny_mlps(
    draw: st.DrawFn,
    *,
    min_layers: int = 1,
    max_layers: int = 3,
    max_width: int = 16,
) -> nn.Sequential:
    """Draw a small ``nn.Sequential`` of ``nn.Linear`` layers and ReLUs with seeded weights.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        min_layers: fewest linear layers.
        max_layers: most linear layers.
        max_width: largest layer width.

    Returns:
        A float32 model on the CPU; the global RNG is left untouched.

    Example:
        >>> from hypothesis import find
        >>> model = find(tiny_mlps(min_layers=2), lambda m: True)
        >>> isinstance(model[0], nn.Linear), isinstance(model[1], nn.ReLU)
        (True, True)
    """
    depth = draw(st.integers(min_value=min_layers, max_value=max_layers))
    widths = draw(st.lists(st.integers(1, max_width), min_size=depth + 1, max_size=depth + 1))
    seed = draw(_seeds)
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(depth):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


Batches = list[tuple[Tensor, Tensor]]


@st.composite
def models_with_data(
    draw: st.DrawFn,
    *,
    max_layers: int = 3,
    max_width: int = 8,
    n_batches: int = 2,
    batch_size: int = 4,
) -> tuple[nn.Sequential, Batches]:
    """Draw a small classifier (``Linear``, ``Conv1d`` or ``Conv2d`` layers) and batches for it.

    The model is an ``nn.Sequential`` of 1 to ``max_layers`` layers of one kind, each with or
    without a bias, optionally followed by a ``BatchNorm`` or a ``LayerNorm``, then ``ReLU`` or
    ``Tanh``; convolutional models end in ``Flatten`` and a ``Linear`` head. One layer may already
    be pruned by :func:`torch.nn.utils.prune.l1_unstructured`. The batches are
    ``(inputs, labels)`` pairs with integer labels for ``cross_entropy``.

    Args:
        draw: hypothesis' draw function (supplied by :func:`hypothesis.strategies.composite`).
        max_layers: most hidden layers.
        max_width: largest number of features or channels.
        n_batches: number of batches.
        batch_size: examples per batch (at least 2, for ``BatchNorm`` in train mode).

    Returns:
        ``(model, batches)``: a float32 model on the CPU in train mode and a list of batches. The
        global RNG is left untouched.

    Example:
        >>> from hypothesis import find
        >>> model, data = find(models_with_data(), lambda case: isinstance(case[0][0], nn.Conv2d))
        >>> x, y = data[0]
        >>> model(x).shape[0] == len(y), x.dim()
        (True, 4)
    """
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 2 (BatchNorm in train mode)")
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    depth = draw(st.integers(min_value=1, max_value=max_layers))
    widths = draw(st.lists(st.integers(1, max_width), min_size=depth + 1, max_size=depth + 1))
    biases = draw(st.lists(st.booleans(), min_size=depth + 1, max_size=depth + 1))
    norms = draw(st.lists(st.sampled_from([None, "batch", "layer"]), min_size=depth, max_size=depth))
    activations = draw(st.lists(st.sampled_from([nn.ReLU, nn.Tanh]), min_size=depth, max_size=depth))
    kernels = draw(st.lists(st.sampled_from([1, 3]), min_size=depth, max_size=depth))
    n_classes = draw(st.integers(min_value=2, max_value=4))
    side = draw(st.integers(min_value=2, max_value=5))
    pre_pruned = draw(st.none() | st.integers(min_value=0, max_value=depth))  # depth: the head
    pre_amount = draw(st.sampled_from([0.25, 0.5, 0.9, 1]))
    seed = draw(_seeds)

    spatial: tuple[int, ...] = {"linear": (), "conv1d": (side,), "conv2d": (side, side)}[kind]
    layers: list[nn.Module] = []
    prunable: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(depth):
            c_in, c_out, k = widths[i], widths[i + 1], kernels[i]
            if kind == "linear":
                layer: nn.Module = nn.Linear(c_in, c_out, bias=biases[i])
            elif kind == "conv1d":
                layer = nn.Conv1d(c_in, c_out, k, padding=k // 2, bias=biases[i])
            else:
                layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=biases[i])
            layers.append(layer)
            prunable.append(layer)
            if norms[i] == "batch":
                layers.append(
                    {"linear": nn.BatchNorm1d, "conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d}[kind](
                        c_out
                    )
                )
            elif norms[i] == "layer":
                layers.append(nn.LayerNorm([c_out, *spatial]))
            layers.append(activations[i]())
        if spatial:
            layers.append(nn.Flatten())
        head = nn.Linear(widths[depth] * math.prod(spatial), n_classes, bias=biases[depth])
        layers.append(head)
        prunable.append(head)
        if pre_pruned is not None:
            prune.l1_unstructured(prunable[pre_pruned], "weight", amount=pre_amount)
        gen = _generator(seed)
        batches = [
            (
                torch.randn(batch_size, widths[0], *spatial, generator=gen),
                torch.randint(n_classes, (batch_size,), generator=gen),
            )
            for _ in range(n_batches)
        ]
    return nn.Sequential(*layers), batches
