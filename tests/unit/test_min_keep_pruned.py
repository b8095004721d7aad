"""A float ``min_keep`` / ``max_keep`` is a fraction of the whole tensor, also of one pruned before.

``amount`` counts the remaining entries (torch's rule for rounds); the per-tensor floor and cap
do not: ``min_keep=0.05`` keeps at least ``ceil(0.05 * numel)`` entries of a tensor (capped at
what remains of it), as ``docs/howto/choose_parameters.rst`` says, whether it is dense or pruned
before. The same for the groups (filters) of ``Groups(dim=0, budget="global")``.

Oracles: counts worked out by hand in each test. A layer's weights are scaled so that BiP's
initial scores (the weights' magnitudes) rank it below (``1e-3``) or above (``1e3``) every other
layer: at construction the global top-k then keeps exactly its floor (or cap) there.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.layouts import Groups

torch.set_num_threads(1)


def _model(scale: dict[int, float] | None = None) -> nn.Sequential:
    """Linear 10 -> 20 -> 20 -> 4: weights of 200, 400 and 80 entries (20, 20, 4 filters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    with torch.no_grad():
        for index, factor in (scale or {}).items():
            model[index].weight.mul_(factor)
    return model


def _kept(module: nn.Module) -> int:
    return int(module.weight_mask.count_nonzero())


def _kept_filters(module: nn.Module) -> int:
    return int((module.weight_mask.flatten(1) != 0).any(1).sum())


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 10, generator=g)
    return [(x[i : i + 16], x[i : i + 16, :4].argmax(1)) for i in (0, 16)]


def test_a_float_floor_counts_the_whole_of_a_tensor_pruned_before() -> None:
    """400 entries, 40 left after l1 (0.9): min_keep=0.05 keeps ceil(0.05 * 400) = 20 of them,
    not ceil(0.05 * 40) = 2. amount=0.5 keeps 160 of the 200 + 40 + 80 = 320 remaining."""
    model = _model({2: 1e-3})
    prune.l1_unstructured(model[2], "weight", amount=0.9)
    before = model[2].weight_mask.clone()
    bip = torchbip.BiP(model, amount=0.5, min_keep=0.05)
    assert bip.layout.describe()["floors"] == [10, 20, 4]
    assert _kept(model[2]) == 20  # its floor: the ranking wants none of it
    assert sum(_kept(model[i]) for i in (0, 2, 4)) == 160
    assert not bool((model[2].weight_mask.bool() & ~before.bool()).any())  # nothing revived
    assert bip.n_keep == 160
    bip.finish()


def test_a_float_floor_above_what_remains_keeps_all_of_it() -> None:
    """4 of 400 entries left (l1 0.99): the floor 20 is capped at the 4 that remain."""
    model = _model({2: 1e-3})
    prune.l1_unstructured(model[2], "weight", amount=0.99)
    bip = torchbip.BiP(model, amount=0.5, min_keep=0.05)
    assert bip.layout.describe()["floors"] == [10, 4, 4]
    assert _kept(model[2]) == 4
    bip.finish()


def test_a_float_cap_counts_the_whole_of_a_tensor_pruned_before() -> None:
    """200 entries, 100 left: max_keep=0.4 keeps at most floor(0.4 * 200) = 80 of them (not
    floor(0.4 * 100) = 40). amount=0.55 keeps 580 - round(0.55 * 580) = 261 of 100 + 400 + 80;
    the caps 80 + 160 + 32 = 272 hold them."""
    model = _model({0: 1e3})
    prune.random_unstructured(model[0], "weight", amount=0.5)
    bip = torchbip.BiP(model, amount=0.55, max_keep=0.4)
    assert bip.layout.describe()["caps"] == [80, 160, 32]
    assert _kept(model[0]) == 80
    assert sum(_kept(model[i]) for i in (0, 2, 4)) == 261
    bip.finish()


def test_a_float_cap_above_what_remains_is_what_remains() -> None:
    model = _model({0: 1e3})
    prune.random_unstructured(model[0], "weight", amount=0.75)  # 50 of 200 left
    bip = torchbip.BiP(model, amount=0.5, max_keep=0.5)  # cap min(100, 50): keeps all 50 (not 25)
    assert bip.layout.describe()["caps"] == [50, 200, 40]
    assert _kept(model[0]) == 50
    bip.finish()


def test_a_floor_that_no_longer_fits_the_budget_is_refused_and_changes_nothing() -> None:
    """Floors of the whole tensors, 10 + 20 + 4 = 34, and amount=0.9 keeps 320 - 288 = 32."""
    model = _model()
    prune.l1_unstructured(model[2], "weight", amount=0.9)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"min_keep=0\.05 keeps at least 34 entries .* than the 32 that"):
        torchbip.BiP(model, amount=0.9, min_keep=0.05)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("min_keep", "floors"), [(0.05, [10, 20, 4]), (3, [3, 3, 3]), (0.0, [0, 0, 0])])
def test_fresh_tensors_are_unchanged(min_keep: float | int, floors: list[int]) -> None:
    model = _model()
    bip = torchbip.BiP(model, amount=0.5, min_keep=min_keep, max_keep=0.9)
    assert bip.layout.describe()["floors"] == floors
    assert bip.layout.describe()["caps"] == [180, 360, 72]
    bip.finish()


def test_an_int_floor_is_still_a_count_capped_at_what_remains() -> None:
    model = _model({2: 1e-3})
    prune.l1_unstructured(model[2], "weight", amount=0.99)  # 4 left
    bip = torchbip.BiP(model, amount=0.5, min_keep=6)
    assert bip.layout.describe()["floors"] == [6, 4, 6]
    bip.finish()


def test_global_prune_keeps_the_floor_of_the_whole_tensor() -> None:
    """global_prune binds the same layout: 20 of the 40 remaining entries, at least."""
    model = _model({2: 1e-3})
    prune.l1_unstructured(model[2], "weight", amount=0.9)
    report = torchbip.global_prune(model, 0.5, _batches(), min_keep=0.05, steps=2, progress=False, seed=0)
    for name, t in report.sparsity.tensors.items():
        assert t.numel - t.zeros >= math.ceil(0.05 * t.numel), name
    assert report.sparsity.tensors["2.weight"].numel - report.sparsity.tensors["2.weight"].zeros >= 20
    assert report.sparsity.zeros == 360 + 160  # the l1 round's 360, and half of the 320 left


def test_a_filter_floor_counts_all_the_tensor_s_filters() -> None:
    """Groups(dim=0, 'global') on 0.weight (20 filters) and 2.weight (5 of 20 filters left):
    amount=0.5 keeps 25 - round(12.5) = 13 filters; min_keep=0.2 keeps ceil(0.2 * 20) = 4 of
    2.weight (not ceil(0.2 * 5) = 1)."""
    model = _model({2: 1e-3})
    prune.ln_structured(model[2], "weight", amount=0.75, n=2, dim=0)
    layout = Groups(dim=0, budget="global")
    parameters = [(model[0], "weight"), (model[2], "weight")]
    bip = torchbip.BiP(model, amount=0.5, layout=layout, parameters=parameters, min_keep=0.2)
    assert bip.layout.describe()["counts"] == [4, 4]
    assert (_kept_filters(model[0]), _kept_filters(model[2])) == (9, 4)
    bip.finish()


def test_a_filter_cap_counts_all_the_tensor_s_filters() -> None:
    """0.weight has 10 of 20 filters left: max_keep=0.4 keeps at most floor(0.4 * 20) = 8 of
    them (not 4, which with 2.weight's 8 could not hold the 15 of 30 filters amount=0.5 keeps)."""
    model = _model({0: 1e3})
    prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    layout = Groups(dim=0, budget="global")
    parameters = [(model[0], "weight"), (model[2], "weight")]
    bip = torchbip.BiP(model, amount=0.5, layout=layout, parameters=parameters, max_keep=0.4)
    assert (_kept_filters(model[0]), _kept_filters(model[2])) == (8, 7)
    bip.finish()


def test_global_prune_keeps_the_filter_floor_of_the_whole_tensor() -> None:
    model = _model({2: 1e-3})
    prune.ln_structured(model[2], "weight", amount=0.75, n=2, dim=0)
    parameters = [(model[0], "weight"), (model[2], "weight")]
    torchbip.global_prune(
        model, 0.5, _batches(), parameters=parameters, structured="filter", budget="global",
        min_keep=0.2, steps=2, progress=False, seed=0,
    )  # fmt: skip
    assert _kept_filters(model[2]) >= 4
    assert _kept_filters(model[0]) + _kept_filters(model[2]) == 13


def test_numpy_float32_floor_and_cap_count_their_binary_value_as_documented() -> None:
    """docs/differences.rst: a NumPy float32 ``min_keep``/``max_keep`` is its Python float first.

    ``np.float32(0.3)`` is 0.30000001192092896 and ``np.float32(0.7)`` 0.699999988079071, so of
    200, 400 and 80 entries the floors are one more than 0.3's (61, 121, 25 against 60, 120, 24)
    and the caps one fewer than 0.7's (139, 279, 55 against 140, 280, 56).
    """
    import numpy as np

    sizes = [200, 400, 80]
    bip = torchbip.BiP(_model(), amount=0.5, min_keep=np.float32(0.3))
    assert bip.layout.describe()["floors"] == [61, 121, 25]
    assert bip.layout.describe()["floors"] == [math.ceil(0.30000001192092896 * n) for n in sizes]
    bip.finish()
    python = torchbip.BiP(_model(), amount=0.5, min_keep=0.3)
    assert python.layout.describe()["floors"] == [60, 120, 24]
    python.finish()
    bip = torchbip.BiP(_model(), amount=0.5, max_keep=np.float32(0.7))
    assert bip.layout.describe()["caps"] == [139, 279, 55]
    bip.finish()
    python = torchbip.BiP(_model(), amount=0.5, max_keep=0.7)
    assert python.layout.describe()["caps"] == [140, 280, 56]
    python.finish()
