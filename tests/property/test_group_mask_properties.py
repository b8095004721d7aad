"""Properties of group (structured) masks and N:M masks, against independent oracles."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from torchbip.masks import nm_mask
from torchbip.semistructured import BiPSemiStructured
from torchbip.structured import BiPStructured, select_groups
from torchbip.testing.strategies import amounts, default_masks, score_lists, score_tensors, shapes

pytestmark = pytest.mark.property


@st.composite
def structured_cases(draw: st.DrawFn) -> tuple[Tensor, Tensor, int, int | float]:
    """``(scores, default_mask, dim, amount)`` with an amount valid for the remaining groups."""
    shape = draw(shapes(min_dims=1, max_dims=4, max_numel=512))
    scores = draw(score_tensors(shape, ties=None))
    mask = draw(default_masks(shape))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    remaining = int(_groups_in_use(mask, dim).sum())
    return scores, mask, dim, draw(amounts(remaining))


def _groups_in_use(mask: Tensor, dim: int) -> Tensor:
    moved = (mask != 0).movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).any(dim=1)


def _oracle_kept_groups(scores: Tensor, mask: Tensor, dim: int, amount: int | float) -> list[bool]:
    """Rank the groups in use by summed magnitude (descending), then index; keep the top ones."""
    moved = scores.double().abs().movedim(dim, 0)
    sums = moved.reshape(moved.shape[0], -1).sum(dim=1).tolist()
    in_use = _groups_in_use(mask, dim).tolist()
    n_use = sum(in_use)
    n_prune = amount if isinstance(amount, int) else round(amount * n_use)
    ranked = sorted((g for g in range(len(sums)) if in_use[g]), key=lambda g: (-sums[g], g))
    kept = set(ranked[: n_use - n_prune])
    return [g in kept for g in range(len(sums))]


@given(structured_cases())
def test_whole_groups_exact_count_never_revive(case: tuple[Tensor, Tensor, int, int | float]) -> None:
    scores, default, dim, amount = case
    new = BiPStructured(amount, dim=dim).compute_mask(scores, default)
    assert new.shape == default.shape
    assert new.dtype == default.dtype
    assert bool(((new == 0) | (new == 1)).all())
    # never revive: every entry pruned before stays pruned
    assert bool((new <= default).all())
    before, after = _groups_in_use(default, dim), _groups_in_use(new, dim)
    # exactly the requested number of groups goes, among those still in use
    n_use = int(before.sum())
    n_prune = amount if isinstance(amount, int) else round(amount * n_use)
    assert int(before.sum()) - int(after.sum()) == n_prune
    # whole groups: a group is either untouched (equal to default) or entirely zero
    moved_new, moved_old = new.movedim(dim, 0), default.movedim(dim, 0)
    for g in range(moved_new.shape[0]):
        assert bool((moved_new[g] == 0).all()) or torch.equal(moved_new[g], moved_old[g])
    # and they are the groups an independent ranking keeps
    oracle = _oracle_kept_groups(scores, default, dim, amount)
    assert after.tolist() == [k and b for k, b in zip(oracle, before.tolist(), strict=True)]


@given(st.data())
def test_group_selection_budgets(data: st.DataObject) -> None:
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    scores = data.draw(score_lists([(n,) for n in sizes], ties=None))
    amount = data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
    layer = select_groups(scores, amount, budget="layer")
    assert [int(k.sum()) for k in layer] == [n - round(amount * n) for n in sizes]
    total = sum(sizes)
    floor = 1 if total - round(amount * total) >= len(sizes) else None
    glob = select_groups(scores, amount, budget="global", min_keep=floor)
    assert sum(int(k.sum()) for k in glob) == total - round(amount * total)
    if floor is not None:
        assert all(bool(k.any()) for k in glob)  # the floor keeps a group in every tensor


@st.composite
def nm_cases(draw: st.DrawFn) -> tuple[Tensor, Tensor, int, int, int]:
    m = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(0, m))
    base = draw(shapes(min_dims=1, max_dims=3, max_side=6, max_numel=256))
    dim = draw(st.integers(-len(base), len(base) - 1))
    shape = list(base)
    shape[dim] = shape[dim] * m
    scores = draw(score_tensors(tuple(shape), ties=None))
    default = draw(default_masks(tuple(shape)))
    return scores, default, n, m, dim


@given(nm_cases())
def test_nm_mask_keeps_top_n_per_block(case: tuple[Tensor, Tensor, int, int, int]) -> None:
    scores, default, n, m, dim = case
    allowed = default != 0
    keep = nm_mask(scores, n, m, dim, allowed=allowed)
    assert keep.shape == scores.shape
    assert keep.dtype == torch.bool
    assert bool((keep <= allowed).all())  # never revive
    values = scores.double().movedim(dim, -1).reshape(-1, m).tolist()
    allow = allowed.movedim(dim, -1).reshape(-1, m).tolist()
    got = keep.movedim(dim, -1).reshape(-1, m).tolist()
    for v, a, k in zip(values, allow, got, strict=True):
        ranked = sorted((i for i in range(m) if a[i]), key=lambda i: (-v[i], i))[:n]
        assert k == [i in ranked for i in range(m)]
    # with nothing pruned before, exactly n per block: sparsity 1 - n/m
    full = nm_mask(scores, n, m, dim)
    assert int(full.sum()) == full.numel() * n // m


@given(nm_cases())
def test_semi_structured_method_never_revives(case: tuple[Tensor, Tensor, int, int, int]) -> None:
    scores, default, n, m, dim = case
    new = BiPSemiStructured(n, m, dim).compute_mask(scores, default)
    assert bool((new <= default).all())
    blocks = new.movedim(dim, -1).reshape(-1, m).sum(dim=1)
    assert bool((blocks <= n).all())
    assert math.isclose(float(new.sum()), float(nm_mask(scores, n, m, dim, allowed=default != 0).sum()))
