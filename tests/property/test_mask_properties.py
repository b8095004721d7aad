"""Properties of per-tensor masks, checked against independent oracles and torch's L1 method."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip import BiPPruningMethod, bip_unstructured
from torchbip.masks import count_from_amount, topk_mask, validate_amount
from torchbip.testing.strategies import (
    amounts,
    default_masks,
    fractions,
    invalid_amounts,
    pruning_cases,
    score_tensors,
    shapes,
)

pytestmark = pytest.mark.property


# --------------------------------------------------------------------------- oracles


def expected_count(amount: int | float, n: int) -> int:
    """torch's rule, written out: an int is a count, a float ``round(amount * n)``."""
    return amount if isinstance(amount, int) else round(amount * n)


def oracle_keep(scores: Tensor, allowed: Tensor, n_keep: int) -> list[bool]:
    """Keep the ``n_keep`` allowed entries first in the order (score descending, flat index)."""
    values = scores.reshape(-1).double().tolist()
    allow = allowed.reshape(-1).tolist()
    ranked = sorted((i for i in range(len(values)) if allow[i]), key=lambda i: (-values[i], i))
    keep = [False] * len(values)
    for i in ranked[:n_keep]:
        keep[i] = True
    return keep


def oracle_mask(scores: Tensor, default_mask: Tensor, amount: int | float) -> list[bool]:
    allowed = default_mask != 0
    n_allowed = int(allowed.sum())
    return oracle_keep(scores, allowed, n_allowed - expected_count(amount, n_allowed))


def holder(shape: tuple[int, ...]) -> nn.Module:
    """A bare module with one parameter ``weight`` of ``shape`` (pruning needs no forward)."""
    module = nn.Module()
    module.register_parameter("weight", nn.Parameter(torch.zeros(shape)))
    return module


# --------------------------------------------------------------------------- amounts


@given(n=st.integers(0, 10_000), data=st.data())
def test_count_from_amount_is_torch_rule(n: int, data: st.DataObject) -> None:
    amount = data.draw(amounts(n))
    count = count_from_amount(amount, n)
    assert count == expected_count(amount, n)
    assert 0 <= count <= n
    # torch's own method prunes the same number of (distinct) entries
    l1_mask = prune.L1Unstructured(amount).compute_mask(torch.arange(n, dtype=torch.float32), torch.ones(n))
    assert int((l1_mask == 0).sum()) == count


@given(n=st.integers(0, 100), data=st.data())
def test_invalid_amounts_are_rejected(n: int, data: st.DataObject) -> None:
    amount = data.draw(invalid_amounts(n))
    with pytest.raises((TypeError, ValueError), match="amount"):
        count_from_amount(amount, n)  # type: ignore[arg-type]


@given(amount=fractions())
def test_validate_amount_keeps_valid_fractions(amount: float) -> None:
    assert validate_amount(amount) == amount


# --------------------------------------------------------------------------- compute_mask


@given(case=pruning_cases(ties=None))
def test_compute_mask_equals_sort_oracle(case: tuple[Tensor, Tensor, int | float]) -> None:
    scores, default_mask, amount = case
    got = BiPPruningMethod(amount).compute_mask(scores, default_mask)
    # 1. same shape and dtype, binary
    assert got.shape == default_mask.shape
    assert got.dtype == default_mask.dtype
    assert bool(((got == 0) | (got == 1)).all())
    # 2. never revives an entry that default_mask pruned
    assert bool((got <= default_mask).all())
    # 3. exactly the requested number of new zeros
    remaining = int(default_mask.count_nonzero())
    new_zeros = int((got == 0).sum()) - (default_mask.numel() - remaining)
    assert new_zeros == expected_count(amount, remaining)
    # 4. the highest scores are kept, ties to the lowest flat index
    assert got.bool().reshape(-1).tolist() == oracle_mask(scores.abs(), default_mask, amount)


@given(
    shape=shapes(max_numel=256),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float64]),
    data=st.data(),
)
def test_topk_mask_equals_sort_oracle_in_other_dtypes(
    shape: tuple[int, ...], dtype: torch.dtype, data: st.DataObject
) -> None:
    scores = data.draw(score_tensors(shape, ties=True, dtype=dtype))
    allowed = data.draw(default_masks(shape, dtype=torch.bool))
    n_keep = data.draw(st.integers(0, int(allowed.sum())))
    got = topk_mask(scores, n_keep, allowed)
    assert got.dtype == torch.bool
    assert got.reshape(-1).tolist() == oracle_keep(scores, allowed, n_keep)


@given(case=pruning_cases(ties=True))
def test_mask_is_invariant_to_magnitude_preserving_transforms(
    case: tuple[Tensor, Tensor, int | float],
) -> None:
    """compute_mask ranks magnitudes (as torch's methods do): scaling and sign flips change nothing."""
    scores, default_mask, amount = case
    method = BiPPruningMethod(amount)
    want = method.compute_mask(scores, default_mask)
    assert torch.equal(method.compute_mask(scores * 2.0, default_mask), want)
    assert torch.equal(method.compute_mask(-scores, default_mask), want)
    assert torch.equal(method.compute_mask(scores.double(), default_mask), want)


@given(case=pruning_cases(ties=False), seed=st.integers(0, 2**16))
def test_mask_is_permutation_equivariant_without_ties(
    case: tuple[Tensor, Tensor, int | float], seed: int
) -> None:
    scores, default_mask, amount = case
    perm = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(seed))
    method = BiPPruningMethod(amount)
    want = method.compute_mask(scores, default_mask).reshape(-1)[perm]
    got = method.compute_mask(scores.reshape(-1)[perm], default_mask.reshape(-1)[perm])
    assert torch.equal(got, want)


@given(shape=shapes(), data=st.data())
def test_equals_torch_l1_without_ties(shape: tuple[int, ...], data: st.DataObject) -> None:
    """On a fresh tensor BiP with scores |s| prunes exactly what L1Unstructured prunes."""
    scores = data.draw(score_tensors(shape, ties=False))
    amount = data.draw(amounts(scores.numel()))
    ones = torch.ones(shape)
    want = prune.L1Unstructured(amount).compute_mask(scores, ones)
    got = BiPPruningMethod(amount).compute_mask(scores.abs(), ones)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- applied twice


@given(shape=shapes(), p=fractions(), q=fractions(), data=st.data())
def test_twice_equals_l1_twice_without_ties(
    shape: tuple[int, ...], p: float, q: float, data: st.DataObject
) -> None:
    scores = data.draw(score_tensors(shape, ties=False))
    bip, l1 = holder(shape), holder(shape)
    for amount in (p, q):
        bip_unstructured(bip, "weight", amount, importance_scores=scores.abs())
        prune.l1_unstructured(l1, "weight", amount, importance_scores=scores)
    assert torch.equal(bip.weight_mask, l1.weight_mask)
    n = math.prod(shape)
    first = round(p * n)
    assert int((bip.weight_mask == 0).sum()) == first + round(q * (n - first))
    hook = next(iter(bip._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer)
    assert [type(m) for m in hook] == [BiPPruningMethod, BiPPruningMethod]


@given(shape=shapes(), p=fractions(), data=st.data())
def test_twice_with_ties_equals_oracle_twice(shape: tuple[int, ...], p: float, data: st.DataObject) -> None:
    scores = data.draw(score_tensors(shape, ties=True))
    module = holder(shape)
    bip_unstructured(module, "weight", p, importance_scores=scores)
    first = module.weight_mask.clone()
    second_amount = data.draw(amounts(int(first.count_nonzero())))
    bip_unstructured(module, "weight", second_amount, importance_scores=scores)
    want_first = oracle_mask(scores.abs(), torch.ones(shape), p)
    assert first.bool().reshape(-1).tolist() == want_first
    want = oracle_mask(scores.abs(), first, second_amount)
    assert module.weight_mask.bool().reshape(-1).tolist() == want
    n = math.prod(shape)
    zeros_first = n - sum(want_first)
    assert int((module.weight_mask == 0).sum()) == zeros_first + expected_count(
        second_amount, n - zeros_first
    )


@given(shape=shapes(max_numel=512), p=fractions(), data=st.data())
def test_bip_after_l1_never_revives(shape: tuple[int, ...], p: float, data: st.DataObject) -> None:
    scores = data.draw(score_tensors(shape, ties=True))
    module = holder(shape)
    with torch.no_grad():
        module.weight.copy_(data.draw(score_tensors(shape, ties=None)))
    prune.l1_unstructured(module, "weight", p)
    first = module.weight_mask.clone()
    amount = data.draw(amounts(int(first.count_nonzero())))
    bip_unstructured(module, "weight", amount, importance_scores=scores)
    assert bool((module.weight_mask <= first).all())
    assert module.weight_mask.bool().reshape(-1).tolist() == oracle_mask(scores.abs(), first, amount)
    torch.testing.assert_close(module.weight_scores, scores, rtol=0, atol=0)
