"""Hand-checked cases for torchbip.masks: amounts, top-k masks, floors, GlobalTopK.

Their errors on bad arguments are checked in ``tests/failure_modes/test_arguments.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import torch

from torchbip import masks
from torchbip.masks import (
    GlobalTopK,
    cap_counts,
    count_from_amount,
    floor_counts,
    topk_mask,
    validate_amount,
)

T, F = True, False


def bools(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# --------------------------------------------------------------------------- validate_amount


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        pytest.param(0, 0, id="int-zero"),
        pytest.param(7, 7, id="int"),
        pytest.param(0.0, 0.0, id="float-zero"),
        pytest.param(1.0, 1.0, id="float-one"),
        pytest.param(0.3, 0.3, id="float"),
        pytest.param(np.int64(3), 3, id="numpy-int"),
        pytest.param(np.float32(0.5), 0.5, id="numpy-float"),
    ],
)
def test_validate_amount_accepts(amount: object, expected: int | float) -> None:
    got = validate_amount(amount)
    assert got == expected
    assert type(got) is type(expected)


# --------------------------------------------------------------------------- count_from_amount


@pytest.mark.parametrize(
    ("amount", "n", "expected"),
    [
        pytest.param(0.5, 4, 2, id="half-of-4"),
        pytest.param(0.5, 5, 2, id="2.5-rounds-half-to-even"),
        pytest.param(0.3, 5, 2, id="1.5-rounds-half-to-even"),
        pytest.param(0.7, 5, 4, id="3.5-rounds-half-to-even"),
        pytest.param(0.9, 5, 4, id="4.5-rounds-half-to-even"),
        pytest.param(0.1, 5, 0, id="0.5-rounds-to-zero"),
        pytest.param(0.0, 9, 0, id="float-zero"),
        pytest.param(1.0, 9, 9, id="float-one"),
        pytest.param(0.5, 0, 0, id="float-of-empty"),
        pytest.param(0, 9, 0, id="int-zero"),
        pytest.param(3, 9, 3, id="int"),
        pytest.param(9, 9, 9, id="int-all"),
        pytest.param(0, 0, 0, id="int-of-empty"),
        pytest.param(0.95, 266_200, 252_890, id="lenet-95"),
    ],
)
def test_count_from_amount(amount: int | float, n: int, expected: int) -> None:
    assert count_from_amount(amount, n) == expected


def test_int_and_float_amounts_agree_when_they_should() -> None:
    assert count_from_amount(1, 4) == count_from_amount(0.25, 4) == 1
    # An int is a count even when it is 1: it never means "100%".
    assert count_from_amount(1, 10) == 1
    assert count_from_amount(1.0, 10) == 10


# --------------------------------------------------------------------------- topk_mask


@pytest.mark.parametrize(
    ("scores", "n_keep", "expected"),
    [
        pytest.param([0.3, 0.1, 0.3, 0.9], 2, [T, F, F, T], id="tie-lowest-index-kept"),
        pytest.param([1.0, 1.0, 1.0, 1.0], 2, [T, T, F, F], id="all-tied"),
        pytest.param([1.0, 1.0, 1.0, 1.0], 0, [F, F, F, F], id="keep-none"),
        pytest.param([1.0, 1.0, 1.0, 1.0], 4, [T, T, T, T], id="keep-all"),
        pytest.param([-1.0, -3.0, -2.0], 2, [T, F, T], id="negative-scores-by-value"),
        pytest.param([0.0, -0.0, 0.0], 1, [T, F, F], id="signed-zeros-tie"),
        pytest.param([[4.0, 1.0], [3.0, 2.0]], 2, [[T, F], [T, F]], id="2d"),
        pytest.param([[2.0, 5.0, 2.0], [5.0, 2.0, 1.0]], 3, [[T, T, F], [T, F, F]], id="2d-ties"),
        pytest.param([[[1.0], [2.0]], [[2.0], [1.0]]], 3, [[[T], [T]], [[T], [F]]], id="3d-ties"),
        pytest.param(3.0, 1, T, id="0d"),
    ],
)
def test_topk_mask_by_hand(scores: list, n_keep: int, expected: list) -> None:
    got = topk_mask(torch.tensor(scores), n_keep)
    assert got.dtype == torch.bool
    assert got.tolist() == expected


@pytest.mark.parametrize(
    ("scores", "allowed", "n_keep", "expected"),
    [
        pytest.param([[4.0, 1.0], [3.0, 2.0]], [[F, T], [T, T]], 2, [[F, F], [T, T]], id="skip-disallowed"),
        pytest.param([5.0, 5.0, 5.0, 5.0], [F, T, F, T], 1, [F, T, F, F], id="ties-among-allowed"),
        pytest.param([1.0, 2.0, 3.0], [F, F, F], 0, [F, F, F], id="nothing-allowed"),
        pytest.param([1.0, 9.0, 3.0], [T, F, T], 2, [T, F, T], id="keep-all-allowed"),
    ],
)
def test_topk_mask_allowed_by_hand(scores: list, allowed: list, n_keep: int, expected: list) -> None:
    assert topk_mask(torch.tensor(scores), n_keep, bools(allowed)).tolist() == expected


def test_topk_mask_flat_index_is_row_major_of_a_view() -> None:
    scores = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]).t()  # non-contiguous, shape (2, 3)
    assert not scores.is_contiguous()
    assert topk_mask(scores, 3).tolist() == [[T, T, F], [T, F, F]]


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32],
    ids=str,
)
def test_topk_mask_dtypes(dtype: torch.dtype) -> None:
    scores = torch.tensor([3, 1, 2, 2, 0]).to(dtype)
    assert topk_mask(scores, 3).tolist() == [T, F, T, T, F]
    assert topk_mask(scores, 2, bools([F, T, T, T, T])).tolist() == [F, F, T, T, F]


def test_topk_mask_bool_scores() -> None:
    scores = bools([F, T, F, T])
    assert topk_mask(scores, 3).tolist() == [T, T, F, T]


def test_topk_mask_leaves_scores_alone() -> None:
    scores = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    before = scores.detach().clone()
    got = topk_mask(scores, 1)
    assert not got.requires_grad
    assert torch.equal(scores.detach(), before)


def test_topk_mask_empty_tensor() -> None:
    got = topk_mask(torch.zeros(0, 3), 0)
    assert got.shape == (0, 3)


# --------------------------------------------------------------------------- floor_counts


@pytest.mark.parametrize(
    ("numels", "min_keep", "expected"),
    [
        pytest.param([10, 1000], None, [0, 0], id="none"),
        pytest.param([10, 1000], 0.01, [1, 10], id="fraction-at-least-one"),
        pytest.param([3, 7], 0.5, [2, 4], id="fraction-rounds-up"),
        pytest.param([3, 7], 1.0, [3, 7], id="fraction-one"),
        pytest.param([3, 7], 0.0, [0, 0], id="fraction-zero-is-no-floor"),
        pytest.param([3, 7], 1e-9, [1, 1], id="tiny-fraction-keeps-one"),
        pytest.param([0, 5], 0.5, [0, 3], id="empty-tensor"),
        pytest.param([10, 1000], 20, [10, 20], id="count-capped"),
        pytest.param([10, 1000], 0, [0, 0], id="count-zero"),
        pytest.param([4], np.int64(2), [2], id="numpy-int"),
    ],
)
def test_floor_counts(numels: list[int], min_keep: int | float | None, expected: list[int]) -> None:
    assert floor_counts(numels, min_keep) == expected


@pytest.mark.parametrize("n", [1, 7, 100, 200, 1000, 4096])
def test_fractional_floors_and_caps_round_the_decimal_fraction(n: int) -> None:
    """Oracle: integer arithmetic on the fraction i/100 as written (no binary float product)."""
    for i in range(101):
        fraction = i / 100
        assert cap_counts([n], fraction) == [i * n // 100], fraction
        if i:
            assert floor_counts([n], fraction) == [min(n, max(1, -(-i * n // 100)))], fraction


def test_a_cap_of_what_amount_keeps_is_always_feasible() -> None:
    """max_keep = 1 - amount caps every tensor at what amount keeps: never one entry fewer."""
    for i in range(1, 100):
        amount = i / 100
        n = 100
        keep = n - count_from_amount(amount, n)
        assert cap_counts([n], round(1 - amount, 2)) == [keep], amount


# --------------------------------------------------------------------------- GlobalTopK


def test_global_topk_by_hand() -> None:
    masks_ = GlobalTopK(3)([torch.tensor([0.5, 0.1]), torch.tensor([0.9, 0.2, 0.7])])
    assert [m.tolist() for m in masks_] == [[T, F], [T, F, T]]


def test_global_topk_ties_across_tensors_keep_lowest_global_index() -> None:
    masks_ = GlobalTopK(3)([torch.ones(2), torch.ones(2, 2)])
    assert [m.tolist() for m in masks_] == [[T, T], [[T, F], [F, F]]]
    masks_ = GlobalTopK(2)([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])])
    assert [m.tolist() for m in masks_] == [[F, T], [T, F]]


def test_global_topk_floors_by_hand() -> None:
    scores = [torch.tensor([0.5, 0.1]), torch.tensor([0.9, 0.7]), torch.tensor([0.0])]
    masks_ = GlobalTopK(3, floors=[0, 0, 1])(scores)
    assert [m.tolist() for m in masks_] == [[F, F], [T, T], [T]]
    # Floors are the best entries of their own tensor; the rest is ranked globally.
    scores = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0.2, 0.3, 0.3])]
    masks_ = GlobalTopK(4, floors=[0, 2])(scores)
    assert [m.tolist() for m in masks_] == [[T, T, F], [F, T, T]]


def test_global_topk_allowed_by_hand() -> None:
    scores = [torch.tensor([5.0, 4.0, 3.0]), torch.tensor([0.0, 9.0])]
    allowed = [bools([F, T, T]), bools([T, F])]
    masks_ = GlobalTopK(3)(scores, allowed)
    assert [m.tolist() for m in masks_] == [[F, T, T], [T, F]]
    masks_ = GlobalTopK(2, floors=[1, 1])(scores, allowed)
    assert [m.tolist() for m in masks_] == [[F, T, F], [T, F]]
    masks_ = GlobalTopK(1)(scores, [None, bools([T, F])])
    assert [m.tolist() for m in masks_] == [[T, F, F], [F, F]]


def test_global_topk_caps_count_the_allowed_entries() -> None:
    a, b = torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8])
    allow_a = bools([T, T, F, F])
    # a holds 2 allowed entries: a cap of 3 there is no cap, and b's cap of 2 leaves 4 in all
    masks_ = GlobalTopK(4, caps=[3, 2])([a, b], [allow_a, None])
    assert [m.tolist() for m in masks_] == [[T, T, F, F], [F, F, T, T]]
    # caps of 4 and 1 reach 2 + 1 allowed entries, fewer than 4: refused, no disallowed entry kept
    with pytest.raises(ValueError, match="caps keep at most 3 of the allowed entries, fewer than the 4"):
        GlobalTopK(4, caps=[4, 1])([a, b], [allow_a, None])


def test_infinite_scores_never_beat_the_allowed_floor_and_cap_rules() -> None:
    inf = math.inf
    assert topk_mask(torch.tensor([-inf, -inf]), 1, bools([F, T])).tolist() == [F, T]
    masks_ = GlobalTopK(1)([torch.tensor([-inf, -inf])], [bools([F, T])])
    assert masks_[0].tolist() == [F, T]
    masks_ = GlobalTopK(1, floors=[0, 1])([torch.tensor([inf]), torch.tensor([0.0])])
    assert [m.tolist() for m in masks_] == [[F], [T]]
    masks_ = GlobalTopK(2, caps=[1, 2])([torch.tensor([inf, inf]), torch.tensor([-inf, 0.0])])
    assert [m.tolist() for m in masks_] == [[T, F], [F, T]]


def test_the_banded_search_on_float16_scores_beyond_their_range_warns_nothing() -> None:
    select = GlobalTopK(1)
    base = torch.rand(70_000, generator=torch.Generator().manual_seed(0))
    for top in (64225.0, 13560.0, 64929.0, 20372.0):  # the threshold jumps: band edges past 65504
        scores = (base * top).half()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            keep = select.select_flat(scores)
        assert torch.equal(keep, topk_mask(scores, 1))


@pytest.mark.parametrize("n_keep", [0, 5])
def test_global_topk_extremes(n_keep: int) -> None:
    masks_ = GlobalTopK(n_keep)([torch.tensor([1.0, 2.0]), torch.tensor([[3.0, 4.0, 5.0]])])
    assert sum(int(m.sum()) for m in masks_) == n_keep
    assert all(bool(m.all()) == (n_keep == 5) for m in masks_)


def _spy_kth() -> mock._patch:
    return mock.patch.object(masks, "_kth_largest", wraps=masks._kth_largest)


@pytest.fixture
def _banded_on_cpu() -> Iterator[None]:
    """Run the banded path on small CPU tensors too (it starts at masks._BANDED_MIN_CPU scores)."""
    with mock.patch.object(masks, "_BANDED_MIN_CPU", 0):
        yield


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n_keep", [1, 7, 500, 999, 1000])
def test_kth_largest_on_cpu_equals_torch_kthvalue(dtype: torch.dtype, n_keep: int) -> None:
    """The NumPy selection that CPUs use gives torch.kthvalue's value, ties and infinities included."""
    gen = torch.Generator().manual_seed(n_keep)
    flat = torch.randint(-20, 20, (1000,), generator=gen).to(dtype) / 4  # many ties
    flat[:3] = torch.tensor([math.inf, -math.inf, -math.inf], dtype=dtype)
    got = masks._kth_largest(flat, n_keep)
    want = torch.kthvalue(flat.double(), 1000 - n_keep + 1).values.to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_small_cpu_selections_rank_every_score() -> None:
    """Below masks._BANDED_MIN_CPU scores a CPU selection skips the band (a full selection is faster)."""
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(4000, generator=gen)]
    select = GlobalTopK(2000)
    select(scores)
    with _spy_kth() as spy:
        second = select([scores[0] + 1e-6])
    assert [args[0].numel() for args, _ in spy.call_args_list] == [4000]
    assert torch.equal(second[0], GlobalTopK(2000)([scores[0] + 1e-6])[0])


@pytest.mark.usefixtures("_banded_on_cpu")
def test_global_topk_banded_path_selects_in_a_small_band() -> None:
    """The second call runs the selection on a band, not on every score, with the same result."""
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(4000, generator=gen), torch.randn(3000, generator=gen)]
    select = GlobalTopK(2000)
    first = select(scores)
    perturbed = [s + 1e-6 * torch.randn(s.shape, generator=gen) for s in scores]
    with _spy_kth() as spy:
        second = select(perturbed)
    (args, _), *_ = spy.call_args_list
    assert spy.call_count == 1
    assert args[0].numel() < 7000, "the banded path should not rank every score"
    fresh = GlobalTopK(2000)(perturbed)
    for got, want in zip(second, fresh, strict=True):
        assert torch.equal(got, want)
    assert sum(int(m.sum()) for m in first) == sum(int(m.sum()) for m in second) == 2000


@pytest.mark.usefixtures("_banded_on_cpu")
def test_global_topk_banded_path_falls_back_after_a_jump() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = [torch.randn(500, generator=gen)]
    select = GlobalTopK(100)
    select(scores)
    for jumped in ([scores[0] * 50], [scores[0] - 10], [-scores[0]], [torch.zeros(500)]):
        want = GlobalTopK(100)(jumped)
        assert torch.equal(select(jumped)[0], want[0])


@pytest.mark.usefixtures("_banded_on_cpu")
def test_global_topk_banded_path_with_many_ties_at_the_threshold() -> None:
    scores = [torch.cat([torch.full((3000,), 2.0), torch.ones(5000)]), torch.ones(2000)]
    select = GlobalTopK(4000)
    for _ in range(3):
        got = select(scores)
        assert int(got[0][:3000].sum()) == 3000
        assert int(got[0][3000:4000].sum()) == 1000
        assert int(got[0][4000:].sum()) == 0
        assert not bool(got[1].any())


def test_global_topk_threshold_at_zero() -> None:
    scores = [torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, -1.0])]
    select = GlobalTopK(3)
    for _ in range(2):
        got = select(scores)
        assert [m.tolist() for m in got] == [[T, T, T, F], [F, F]]


def test_global_topk_reset_runs_a_full_selection() -> None:
    scores = [torch.arange(100.0)]
    select = GlobalTopK(10)
    select(scores)
    select.reset()
    with _spy_kth() as spy:
        select(scores)
    assert spy.call_args_list[0].args[0].numel() == 100


def test_nm_mask_takes_numpy_integers() -> None:
    from torchbip.masks import nm_mask

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    want = [[False, True, True, False, True, True, False, False]]  # the top 2 of each block of 4, by hand
    assert nm_mask(scores, np.int64(2), np.int32(4), dim=np.int64(-1)).tolist() == want
    with pytest.raises(TypeError, match=r"n must be an int, got np.True_"):
        nm_mask(scores, np.bool_(True), 4)
