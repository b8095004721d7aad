"""BiPStructured and bip_structured: torch's contract, hand-written group masks, budgets, errors."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip import BiPStructured, bip_structured
from torchbip.method import scores_name
from torchbip.semistructured import BiPSemiStructured, bip_semi_structured
from torchbip.structured import (
    expand_groups,
    group_keep_counts,
    group_reduce,
    normalize_dim,
    select_groups,
)
from torchbip.testing.contract import PruningMethodContract, pruning_hooks

# --------------------------------------------------------------------------- the torch contract


class TestStructuredContractFilters(PruningMethodContract):
    METHOD = BiPStructured
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0.4, "dim": 0}
    PRUNING_TYPE = "structured"


class TestStructuredContractChannelCount(PruningMethodContract):
    METHOD = BiPStructured
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 3, "dim": 1}
    PRUNING_TYPE = "structured"


class TestStructuredContractConvLastDim(PruningMethodContract):
    METHOD = BiPStructured
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0.5, "dim": -1}
    PRUNING_TYPE = "structured"

    def make_module(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Conv2d(2, 4, kernel_size=(3, 2))

    def make_input(self, module: nn.Module) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return torch.randn(2, 2, 5, 5)


# --------------------------------------------------------------------------- hand-written masks


def test_filters_with_lowest_l1_norm_are_pruned() -> None:
    weight = torch.tensor([[1.0, -1.0], [0.1, 0.2], [3.0, 0.0], [-0.5, -0.4]])
    mask = BiPStructured(amount=2, dim=0).compute_mask(weight.abs(), torch.ones(4, 2))
    assert mask.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]


def test_ties_keep_the_lower_index() -> None:
    mask = BiPStructured(amount=0.5, dim=0).compute_mask(torch.ones(4, 3), torch.ones(4, 3))
    assert mask[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_amount_counts_groups_not_entries() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3)
    bip_structured(conv, "weight", amount=0.25, dim=0)
    pruned_filters = int((conv.weight_mask.sum(dim=(1, 2, 3)) == 0).sum())
    assert pruned_filters == 2  # 25% of 8 filters, not 25% of the 216 entries
    assert int((conv.weight_mask == 0).sum()) == 2 * 27


def test_dim_one_prunes_input_channels() -> None:
    conv = nn.Conv2d(4, 6, kernel_size=1)
    scores = torch.tensor([0.4, 0.1, 0.3, 0.2])
    bip_structured(conv, "weight", amount=2, dim=1, importance_scores=scores)
    assert conv.weight_mask[:, :, 0, 0].sum(dim=0).tolist() == [6.0, 0.0, 6.0, 0.0]
    torch.testing.assert_close(getattr(conv, scores_name("weight")), scores)


def test_default_scores_match_torch_ln_structured() -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Conv2d(4, 16, 3), nn.Conv2d(4, 16, 3)
    theirs.load_state_dict(ours.state_dict())
    bip_structured(ours, "weight", amount=0.5, dim=0)
    prune.ln_structured(theirs, "weight", amount=0.5, n=1, dim=0)
    torch.testing.assert_close(ours.weight_mask, theirs.weight_mask, rtol=0, atol=0)


def test_full_shape_scores_rank_by_the_group_l1_norm() -> None:
    scores = torch.tensor([[5.0, -5.0], [1.0, 1.0], [0.0, -0.5]])
    mask = BiPStructured(amount=1, dim=0).compute_mask(scores, torch.ones(3, 2))
    assert mask[:, 0].tolist() == [1.0, 1.0, 0.0]  # L1 norms 10, 2, 0.5 (signed sums 0, 2, -0.5)


def test_never_revives_and_counts_among_remaining_groups() -> None:
    default = torch.ones(5, 2)
    default[0] = 0  # a whole filter pruned earlier
    default[1, 0] = 0  # one entry of another filter pruned earlier
    scores = torch.tensor([9.0, 8.0, 1.0, 2.0, 3.0]).unsqueeze(1).expand(5, 2)
    mask = BiPStructured(amount=0.5, dim=0).compute_mask(scores, default)
    # 4 groups remain, round(0.5 * 4) = 2 are pruned: the two lowest (2 and 3)
    assert mask.tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]


def test_container_with_ln_structured_counts_remaining_channels() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, 3)
    prune.ln_structured(conv, "weight", amount=4, n=2, dim=0)
    bip_structured(conv, "weight", amount=0.5, dim=0)
    hooks = pruning_hooks(conv, "weight")
    assert [type(h) for h in hooks[0]] == [prune.LnStructured, BiPStructured]
    assert int((conv.weight_mask.sum(dim=(1, 2, 3)) == 0).sum()) == 4 + 3


def test_remove_drops_the_score_buffer() -> None:
    layer = nn.Linear(4, 6)
    bip_structured(layer, "weight", amount=2)
    assert tuple(getattr(layer, scores_name("weight")).shape) == (6,)
    prune.remove(layer, "weight")
    assert not hasattr(layer, scores_name("weight"))
    assert not prune.is_pruned(layer)


# --------------------------------------------------------------------------- NumPy integers


def l1_group_keep_oracle(weight: Tensor, dim: int, n_prune: int) -> list[bool]:
    """Hand-written: the groups of highest L1 norm survive, ties keep the lower index."""
    rows = weight.abs().tolist() if dim == 0 else weight.abs().t().tolist()
    norms = [sum(row) for row in rows]
    order = sorted(range(len(norms)), key=lambda i: (norms[i], -i))  # pruned first
    pruned = set(order[:n_prune])
    return [i not in pruned for i in range(len(norms))]


@pytest.mark.parametrize(
    ("dim", "axis"),
    [(np.int64(0), 0), (np.int32(1), 1), (np.int64(-1), 1), (np.uint8(0), 0)],
    ids=["int64-filters", "int32-channels", "int64-last", "uint8-filters"],
)
def test_numpy_integer_dim_prunes_the_groups_of_lowest_l1_norm(dim: Any, axis: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    n_groups = layer.weight.shape[axis]
    expected = l1_group_keep_oracle(layer.weight.detach(), axis, n_groups // 2)
    bip_structured(layer, "weight", amount=0.5, dim=dim)
    kept = (layer.weight_mask != 0).any(dim=1 - axis).tolist()
    assert kept == expected
    (hook,) = pruning_hooks(layer, "weight")
    assert type(hook.dim) is int
    assert hook.dim == int(dim)


def test_numpy_integer_dim_of_the_method_itself() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.7, 0.1]])  # channel L1 norms 1.4, 0.8, 0.6
    method = BiPStructured(amount=np.int64(1), dim=np.int64(1))
    assert type(method.dim) is int
    assert method.compute_mask(scores, torch.ones(2, 3)).tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


def nm_keep_oracle(weight: Tensor, n: int, m: int) -> list[list[bool]]:
    """Hand-written N:M along the last dim: the ``n`` largest ``|w|`` per block, ties to the lower index."""
    keep = []
    for row in weight.abs().tolist():
        kept_row = []
        for start in range(0, len(row), m):
            block = row[start : start + m]
            best = sorted(range(m), key=lambda i: (-block[i], i))[:n]
            kept_row += [i in best for i in range(m)]
        keep.append(kept_row)
    return keep


def test_numpy_integer_n_and_m_give_the_n_m_mask_of_ints() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    expected = nm_keep_oracle(layer.weight.detach(), 2, 4)
    bip_semi_structured(layer, "weight", np.int64(2), np.int64(4), dim=np.int64(-1))
    assert (layer.weight_mask != 0).tolist() == expected
    (hook,) = pruning_hooks(layer, "weight")
    assert (type(hook.n), type(hook.m), type(hook.dim)) == (int, int, int)
    assert (hook.n, hook.m, hook.dim) == (2, 4, -1)
    method = BiPSemiStructured(n=np.int32(1), m=np.uint16(4))
    scores = torch.tensor([[4.0, -5.0, 3.0, 2.0, 0.1, 0.2, -0.3, 0.0]])
    expected = [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]
    assert method.compute_mask(scores, torch.ones(1, 8)).tolist() == expected


@pytest.mark.parametrize(
    "kwargs",
    [{"n": np.bool_(True)}, {"m": np.bool_(True)}, {"dim": np.bool_(False)}, {"n": np.float64(2.0)}],
    ids=["numpy-bool-n", "numpy-bool-m", "numpy-bool-dim", "numpy-float-n"],
)
def test_numpy_bools_and_floats_are_refused_as_n_m_or_dim(kwargs: dict[str, Any]) -> None:
    layer = nn.Linear(8, 3)
    with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be an int"):
        bip_semi_structured(layer, "weight", **kwargs)
    assert not prune.is_pruned(layer)


# --------------------------------------------------------------------------- helpers and budgets


def test_group_reduce_and_expand_are_adjoint() -> None:
    torch.manual_seed(0)
    t, g = torch.randn(3, 4, 2), torch.randn(4)
    lhs = (t * expand_groups(g, t.shape, 1)).sum()
    rhs = (group_reduce(t, 1) * g).sum()
    torch.testing.assert_close(lhs, rhs)


def test_group_gradient_is_the_sum_of_element_gradients() -> None:
    """Chain rule through the broadcast, checked by autograd."""
    torch.manual_seed(0)
    theta, x = torch.randn(5, 3), torch.randn(7, 3)
    bits = torch.ones(5, requires_grad=True)
    mask = expand_groups(bits, theta.shape, 0)
    loss = (x @ (mask * theta).t()).square().sum()
    (group_grad,) = torch.autograd.grad(loss, bits)
    element_mask = torch.ones(5, 3, requires_grad=True)
    (element_grad,) = torch.autograd.grad((x @ (element_mask * theta).t()).square().sum(), element_mask)
    torch.testing.assert_close(group_grad, group_reduce(element_grad, 0))


def test_layer_budget_prunes_the_same_fraction_everywhere() -> None:
    scores = [torch.arange(10.0), torch.arange(4.0) * 100]
    keeps = select_groups(scores, 0.5, budget="layer")
    assert [int(k.sum()) for k in keeps] == [5, 2]


def test_global_budget_ranks_across_tensors_with_a_floor() -> None:
    scores = [torch.arange(10.0), torch.arange(4.0) / 100]
    keeps = select_groups(scores, 0.5, budget="global")
    assert [int(k.sum()) for k in keeps] == [7, 0]
    keeps = select_groups(scores, 0.5, budget="global", min_keep=2)
    assert [int(k.sum()) for k in keeps] == [5, 2]
    assert keeps[1].tolist() == [False, False, True, True]


def test_global_float_floor_is_a_fraction_of_the_whole_tensor_with_allowed() -> None:
    # Tensor 0: 10 groups, 4 still allowed (an earlier pruning removed 6), all scored low.
    # min_keep=0.3 is 3 of its 10 groups (not 2 = ceil(0.3 * 4) of the remaining ones).
    scores = [torch.arange(10.0) / 100, torch.arange(10.0) + 1]
    allowed = [torch.tensor([True] * 4 + [False] * 6), None]
    keeps = select_groups(scores, 0.5, budget="global", min_keep=0.3, allowed=allowed)
    assert keeps[0].tolist() == [False, True, True, True] + [False] * 6  # its 3 best allowed groups
    assert keeps[1].tolist() == [False] * 6 + [True] * 4  # 7 kept of 14 allowed, less the floor's 3
    # A floor above what remains keeps all of it.
    keeps = select_groups(scores, 4, budget="global", min_keep=0.45, allowed=allowed)  # keeps 10
    assert keeps[0].tolist() == [True] * 4 + [False] * 6  # a floor of 5, capped at the 4 left
    assert keeps[1].tolist() == [False] * 4 + [True] * 6


def test_group_keep_counts_layer_and_global() -> None:
    assert group_keep_counts([10, 4], 3) == (8, [7, 1])  # an int counts per tensor
    assert group_keep_counts([10, 4], 3, budget="global", min_keep=0.5) == (11, [5, 2])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"amount": 1.5}, ValueError, "amount=1.5", id="amount-above-one"),
        pytest.param({"amount": -1}, ValueError, "amount=-1", id="negative-count"),
        pytest.param({"amount": 0.5, "dim": 2}, ValueError, "dim=2", id="dim-out-of-range"),
        pytest.param({"amount": 0.5, "dim": 0.0}, TypeError, "dim must be an int", id="float-dim"),
        pytest.param(
            {"amount": 0.5, "dim": np.bool_(False)}, TypeError, "dim must be an int", id="numpy-bool-dim"
        ),
        pytest.param(
            {"amount": 0.5, "dim": np.float64(0.0)}, TypeError, "dim must be an int", id="numpy-float-dim"
        ),
        pytest.param({"amount": 7}, ValueError, "amount=7", id="more-groups-than-exist"),
        pytest.param(
            {"amount": 1, "importance_scores": torch.ones(3)},
            ValueError,
            "importance_scores",
            id="bad-scores",
        ),
        pytest.param(
            {"amount": 1, "importance_scores": torch.full((6, 4), float("nan"))},
            ValueError,
            "NaN",
            id="nan-scores",
        ),
    ],
)
def test_errors_name_the_argument_and_leave_the_module(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    layer = nn.Linear(4, 6)
    with pytest.raises(error, match=match):
        bip_structured(layer, "weight", **kwargs)
    assert not prune.is_pruned(layer)
    assert "weight" in layer._parameters


def test_budget_errors() -> None:
    with pytest.raises(ValueError, match="budget must be one of"):
        select_groups([torch.ones(3)], 0.5, budget="per-layer")
    with pytest.raises(ValueError, match="dim=-3"):
        normalize_dim(-3, 2)
    with pytest.raises(ValueError, match="values has shape"):
        expand_groups(torch.ones(3), (4, 2), 0)


def test_import_does_not_load_the_optional_export_dependency() -> None:
    code = "import sys, torchbip, torchbip.sparse; assert 'torch_pruning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
