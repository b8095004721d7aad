"""Properties of the global ranking (GlobalTopK, floors) against a sort oracle and torch."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip import masks, sparsity_report
from torchbip.layouts import UnstructuredLayout
from torchbip.masks import GlobalTopK, count_from_amount, floor_counts
from torchbip.testing.strategies import (
    amounts,
    default_masks,
    fractions,
    score_lists,
    shape_lists,
)

pytestmark = pytest.mark.property

Case = tuple[list[Tensor], list[Tensor | None], int, list[int] | None]


# --------------------------------------------------------------------------- oracle and cases


def oracle_global(
    scores: list[Tensor], allowed: list[Tensor | None], n_keep: int, floors: list[int] | None
) -> list[list[bool]]:
    """Floors first (each tensor's best entries), then the rest in global (score desc, flat index)."""
    values = [s.reshape(-1).double().tolist() for s in scores]
    allow = [
        [True] * len(v) if a is None else a.reshape(-1).tolist() for v, a in zip(values, allowed, strict=True)
    ]
    keep = [[False] * len(v) for v in values]
    for t, floor in enumerate(floors or [0] * len(scores)):
        ranked = sorted((j for j in range(len(values[t])) if allow[t][j]), key=lambda j: (-values[t][j], j))
        for j in ranked[:floor]:
            keep[t][j] = True
    rest = [
        (-values[t][j], offset + j, t, j)
        for t, offset in zip(range(len(values)), _offsets(values), strict=True)
        for j in range(len(values[t]))
        if allow[t][j] and not keep[t][j]
    ]
    for _, _, t, j in sorted(rest)[: n_keep - sum(map(sum, keep))]:
        keep[t][j] = True
    return keep


def _offsets(values: list[list[float]]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += len(v)
    return out


def as_lists(masks: list[Tensor]) -> list[list[bool]]:
    return [m.reshape(-1).tolist() for m in masks]


@st.composite
def global_cases(draw: st.DrawFn, ties: bool | None = True, with_floors: bool = True) -> Case:
    shape_list = draw(shape_lists(max_numel=1024))
    scores = draw(score_lists(shape_list, ties=ties))
    allowed = [draw(st.none() | default_masks(s, dtype=torch.bool)) for s in shape_list]
    counts = [s.numel() if a is None else int(a.sum()) for s, a in zip(scores, allowed, strict=True)]
    floors = None
    if with_floors and draw(st.booleans()):
        floors = [draw(st.integers(0, c)) for c in counts]
    n_keep = draw(st.integers(sum(floors or [0]), sum(counts)))
    return scores, allowed, n_keep, floors


def holders(shape_list: list[tuple[int, ...]]) -> nn.ModuleDict:
    """Bare modules ``l0, l1, ...``, each with a parameter ``weight`` of the given shape."""
    modules = nn.ModuleDict()
    for i, shape in enumerate(shape_list):
        module = nn.Module()
        module.register_parameter("weight", nn.Parameter(torch.zeros(shape)))
        modules[f"l{i}"] = module
    return modules


# --------------------------------------------------------------------------- GlobalTopK


@given(case=global_cases(ties=None))
def test_global_topk_equals_sort_oracle(case: Case) -> None:
    scores, allowed, n_keep, floors = case
    got = GlobalTopK(n_keep, floors)(scores, allowed)
    # 1. one boolean mask per tensor, of its shape
    assert [m.shape for m in got] == [s.shape for s in scores]
    assert all(m.dtype == torch.bool for m in got)
    # 2. the exact global count, floors respected, disallowed entries never kept
    assert sum(int(m.sum()) for m in got) == n_keep
    for i, (m, a) in enumerate(zip(got, allowed, strict=True)):
        if floors is not None:
            assert int(m.sum()) >= floors[i]
        if a is not None:
            assert not bool((m & ~a).any())
    # 3. the same entries as the sort oracle
    assert as_lists(got) == oracle_global(scores, allowed, n_keep, floors)


@given(
    case=global_cases(ties=True),
    steps=st.lists(
        st.tuples(st.sampled_from([1e-7, 1e-5, 1e-3, 0.1, 10.0]), st.integers(0, 2**16)),
        min_size=1,
        max_size=4,
    ),
)
def test_banded_path_equals_fresh_selection(case: Case, steps: list[tuple[float, int]]) -> None:
    """Repeated calls with slightly (or wildly) moved scores give what a fresh selector gives."""
    scores, allowed, n_keep, floors = case
    select = GlobalTopK(n_keep, floors)
    select(scores, allowed)
    for (scale, seed), banded_min in zip(steps, [0, 1 << 22, 0, 0], strict=False):
        gen = torch.Generator().manual_seed(seed)
        # Move about half of the entries: ties among the others survive.
        scores = [
            s + scale * torch.randn(s.shape, generator=gen) * (torch.rand(s.shape, generator=gen) < 0.5)
            for s in scores
        ]
        # The band runs on CPUs only from masks._BANDED_MIN_CPU scores: force it, and once not.
        with mock.patch.object(masks, "_BANDED_MIN_CPU", banded_min):
            got = select(scores, allowed)
        fresh = GlobalTopK(n_keep, floors)(scores, allowed)
        assert as_lists(got) == as_lists(fresh)
        assert as_lists(got) == oracle_global(scores, allowed, n_keep, floors)


@given(
    case=global_cases(ties=True, with_floors=False),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 1e-7, 1e-5, 1e-3, 0.1, 10.0]),
            st.sampled_from([0.0, 1e-4, 1e-2]),  # a drift of every score: the threshold moves
            st.integers(0, 2**16),
        ),
        min_size=1,
        max_size=5,
    ),
    strided=st.booleans(),
)
def test_written_masks_equal_the_oracle_over_moving_scores(
    case: Case, dtype: torch.dtype, steps: list[tuple[float, float, int]], strided: bool
) -> None:
    """The layout's direct mask writes (one comparison per tensor, or ties by index) keep the
    oracle's entries in the masks' own dtype, call after call, in the band and outside it, also
    into masks of other strides (as ``ones_like`` of a channels-last weight makes)."""
    scores, _, n_keep, _ = case
    if n_keep == 0:
        return
    scores = [s.to(dtype) for s in scores]
    targets = [mock.Mock(weight=lambda s=s: s, fqn=f"t{i}") for i, s in enumerate(scores)]
    layout = UnstructuredLayout(targets, sum(s.numel() for s in scores) - n_keep, [None] * len(scores))
    for i, (scale, drift, seed) in enumerate([(0.0, 0.0, 0), *steps]):
        gen = torch.Generator().manual_seed(seed)
        moved = []
        for s in scores:
            noise = scale * torch.randn(s.shape, generator=gen) * (torch.rand(s.shape, generator=gen) < 0.5)
            moved.append((s.double() + noise + drift * (i + 1)).to(dtype))
        scores = moved
        flat = torch.cat([s.reshape(-1) for s in scores])
        parts = flat.split([s.numel() for s in scores])
        views = [v.view(s.shape) for v, s in zip(parts, scores, strict=True)]
        # garbage: every entry is written
        out = [
            reversed_strides(s.shape, dtype) if strided else torch.full(s.shape, 7.0, dtype=dtype)
            for s in scores
        ]
        # every other call through the band, whatever the size (it starts at 64k scores on CPUs)
        with mock.patch.object(masks, "_BANDED_MIN_CPU", 0 if i % 2 else 1 << 22):
            layout.write_masks(views, flat, out)
        assert all(m.dtype == dtype for m in out)
        assert set(torch.cat([m.reshape(-1) for m in out]).tolist()) <= {0.0, 1.0}
        assert as_lists([m != 0 for m in out]) == oracle_global(views, [None] * len(views), n_keep, None)


def reversed_strides(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A tensor of ``shape`` full of 7.0 whose memory runs along its dimensions in reverse."""
    dims = list(range(len(shape)))[::-1]
    return torch.full(tuple(shape[d] for d in dims), 7.0, dtype=dtype).permute(*dims)


@given(
    case=global_cases(ties=True, with_floors=False),
    moves=st.lists(st.sampled_from([0.0, 1e-6, 1e-3, 1.0]), min_size=1, max_size=4),
)
def test_locate_counts_equal_direct_counts(case: Case, moves: list[float]) -> None:
    """locate's value and counts (above, equal, kept) match a sort, in the band and outside it."""
    scores, _, n_keep, _ = case
    if n_keep == 0:
        return
    flat = torch.cat([s.reshape(-1) for s in scores])
    select = GlobalTopK(n_keep)
    for i, move in enumerate([0.0, *moves]):
        flat = flat + move * torch.randn(flat.shape, generator=torch.Generator().manual_seed(i))
        with mock.patch.object(masks, "_BANDED_MIN_CPU", 0):
            found = select.locate(flat)
        value = torch.sort(flat, descending=True).values[n_keep - 1]
        above, ties = int((flat > value).sum()), int((flat == value).sum())
        assert (float(found.value), found.above, found.ties, found.kept) == (
            float(value),
            above,
            ties,
            n_keep - above,
        )
        assert found.exact == (above + ties == n_keep)


@given(shape_list=shape_lists(max_numel=1024), data=st.data())
def test_equals_torch_global_unstructured_without_ties(
    shape_list: list[tuple[int, ...]], data: st.DataObject
) -> None:
    """On scores |w| the global path prunes what prune.global_unstructured(L1Unstructured) does."""
    weights = data.draw(score_lists(shape_list, ties=False))
    earlier = [data.draw(st.none() | default_masks(s)) for s in shape_list]
    model = holders(shape_list)
    for module, w, mask in zip(model.values(), weights, earlier, strict=True):
        with torch.no_grad():
            module.weight.copy_(w)
        if mask is not None:
            prune.custom_from_mask(module, "weight", mask)
    allowed = [None if m is None else m.bool() for m in earlier]
    n_allowed = sum(w.numel() if a is None else int(a.sum()) for w, a in zip(weights, allowed, strict=True))
    amount = data.draw(amounts(n_allowed))

    n_prune = count_from_amount(amount, n_allowed)
    ours = GlobalTopK(n_allowed - n_prune)([w.abs() for w in weights], allowed)
    prune.global_unstructured(
        [(m, "weight") for m in model.values()], pruning_method=prune.L1Unstructured, amount=amount
    )
    theirs = [m.weight_mask for m in model.values()]
    assert as_lists(ours) == [t.bool().reshape(-1).tolist() for t in theirs]
    # Global counts add up: earlier zeros + round(amount * remaining).
    n = sum(w.numel() for w in weights)
    assert sum(int((t == 0).sum()) for t in theirs) == (n - n_allowed) + n_prune


@given(case=global_cases(ties=None, with_floors=False))
def test_sparsity_report_counts_the_zeros(case: Case) -> None:
    scores, allowed, n_keep, _ = case
    masks = GlobalTopK(n_keep)(scores, allowed)
    model = holders([tuple(s.shape) for s in scores])
    for module, keep in zip(model.values(), masks, strict=True):
        prune.custom_from_mask(module, "weight", keep)
    report = sparsity_report(model)
    n = sum(s.numel() for s in scores)
    assert report.numel == n
    assert report.zeros == n - n_keep
    assert report.global_sparsity == pytest.approx((n - n_keep) / n if n else 0.0)
    for i, keep in enumerate(masks):
        assert report.tensors[f"l{i}.weight"].zeros == keep.numel() - int(keep.sum())


# --------------------------------------------------------------------------- floors


@given(
    numels=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    min_keep=st.none() | st.integers(0, 6000) | fractions(),
)
def test_floor_counts(numels: list[int], min_keep: int | float | None) -> None:
    floors = floor_counts(numels, min_keep)
    assert len(floors) == len(numels)
    for n, floor in zip(numels, floors, strict=True):
        assert 0 <= floor <= n
        if min_keep is None:
            assert floor == 0
        elif isinstance(min_keep, int):
            assert floor == min(min_keep, n)
        elif min_keep == 0.0:  # no floor, as the count 0
            assert floor == 0
        else:
            assert floor == min(n, max(1, math.ceil(min_keep * n)))
            assert floor >= min(n, 1)


@given(
    shape_list=shape_lists(max_numel=1024),
    min_keep=st.integers(0, 50) | fractions(),
    amount=fractions(),
    data=st.data(),
)
def test_floors_with_amount_keep_every_layer_alive(
    shape_list: list[tuple[int, ...]], min_keep: int | float, amount: float, data: st.DataObject
) -> None:
    """With a float floor (above 0.0) every non-empty tensor keeps an entry, even at amount=1.0."""
    scores = data.draw(score_lists(shape_list, ties=True))
    numels = [s.numel() for s in scores]
    floors = floor_counts(numels, min_keep)
    n_keep = max(sum(numels) - count_from_amount(amount, sum(numels)), sum(floors))
    got = GlobalTopK(n_keep, floors)(scores)
    assert sum(int(m.sum()) for m in got) == n_keep
    for m, floor in zip(got, floors, strict=True):
        assert int(m.sum()) >= floor
        if isinstance(min_keep, float) and min_keep > 0.0:
            assert int(m.sum()) >= min(1, m.numel())
    assert as_lists(got) == oracle_global(scores, [None] * len(scores), n_keep, floors)
