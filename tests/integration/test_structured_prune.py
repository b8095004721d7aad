"""global_prune(structured=...): group scores, budgets, N:M, the group gradient, slim export."""

from __future__ import annotations

import ast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip import BiPStructured, export_slim, global_prune
from torchbip._func import resolve_targets
from torchbip._loop import BiPLoop
from torchbip.config import BiPConfig
from torchbip.data import BatchStream
from torchbip.layouts import Groups
from torchbip.semistructured import BiPSemiStructured
from torchbip.structured import group_reduce
from torchbip.testing.contract import pruning_hooks


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def batches(n: int = 64) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def kept_groups(mask: Tensor, dim: int) -> int:
    moved = mask.movedim(dim, 0)
    return int((moved.reshape(moved.shape[0], -1).sum(dim=1) > 0).sum())


def is_group_mask(mask: Tensor, dim: int) -> bool:
    moved = mask.movedim(dim, 0).reshape(mask.shape[dim], -1)
    return bool(((moved == 0).all(dim=1) | (moved == 1).all(dim=1)).all())


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_filter_layer_budget_prunes_the_same_fraction_in_every_layer(seed: int) -> None:
    model = cnn()
    report = global_prune(model, 0.5, batches(), steps=6, progress=False, structured="filter")
    convs_and_fc = layers(model)
    for layer in convs_and_fc[:-1]:
        assert isinstance(pruning_hooks(layer, "weight")[0], BiPStructured)
        assert is_group_mask(layer.weight_mask, 0)
        assert kept_groups(layer.weight_mask, 0) == layer.weight_mask.shape[0] // 2
        assert not hasattr(layer, "weight_scores")
    assert not prune.is_pruned(convs_and_fc[-1])  # the output layer is left alone by default
    assert set(report.sparsity.tensors) == {"0.weight", "3.weight", "8.weight"}
    assert report.global_sparsity == pytest.approx(0.5)
    prune.remove(convs_and_fc[0], "weight")
    assert isinstance(convs_and_fc[0].weight, nn.Parameter)


def test_global_budget_with_a_floor(seed: int) -> None:
    model = cnn()
    global_prune(
        model, 0.75, batches(), steps=6, progress=False, structured="filter", budget="global", min_keep=2
    )
    kept = [kept_groups(m.weight_mask, 0) for m in layers(model)[:-1]]
    assert sum(kept) == round((8 + 16 + 32) * 0.25)
    assert min(kept) >= 2


def test_channel_mode_leaves_the_input_layer(seed: int) -> None:
    model = cnn()
    global_prune(model, 3, batches(), steps=4, progress=False, structured="channel")
    first, *rest = layers(model)
    assert not prune.is_pruned(first)
    for layer in rest:
        assert is_group_mask(layer.weight_mask, 1)
        assert kept_groups(layer.weight_mask, 1) == layer.weight_mask.shape[1] - 3


def test_two_four_masks_keep_two_of_every_four_inputs(seed: int) -> None:
    model = cnn()
    global_prune(model, 0.5, batches(), steps=4, progress=False, structured="2:4")
    pruned = [m for m in layers(model) if prune.is_pruned(m)]
    assert len(pruned) == 4 - 1  # the first conv has 1 input channel: not a multiple of 4
    for layer in pruned:
        assert isinstance(pruning_hooks(layer, "weight")[0], BiPSemiStructured)
        mask = layer.weight_mask.movedim(1, -1) if layer.weight_mask.dim() == 4 else layer.weight_mask
        assert bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())


@pytest.mark.parametrize(
    ("pattern", "amount"), [("4:4", 0), ("0:4", 1), ("2:4", 0.9), ("1:3", 0.5), ("2:3", 1), ("0:1", 1)]
)
def test_nm_amount_error_suggests_an_amount_that_is_accepted(pattern: str, amount: float) -> None:
    """The hint of a refused N:M amount is a float literal equal to 1 - n/m, which a run accepts."""
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 4))
    with pytest.raises(ValueError, match=r"; pass amount=") as err:
        global_prune(model, amount, batches(), steps=1, progress=False, structured=pattern)
    hint = str(err.value).rsplit("pass amount=", 1)[1]
    value = ast.literal_eval(hint)
    assert isinstance(value, float)
    assert value == pytest.approx(1 - n / m, abs=1e-12)
    report = global_prune(model, value, batches(), steps=1, progress=False, structured=pattern)
    assert report.sparsity.global_sparsity == pytest.approx(1 - n / m)


def test_structured_run_exports_to_an_equal_slim_model(seed: int) -> None:
    model = cnn()
    global_prune(model, 0.5, batches(), steps=6, progress=False, structured="filter")
    x = batches()[0][0]
    slim = export_slim(model.eval(), x)
    assert slim[0].out_channels < 8 or slim[3].out_channels < 16
    with torch.no_grad():
        torch.testing.assert_close(slim.eval()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"structured": "blocks"}, "structured must be", id="unknown-mode"),
        pytest.param({"structured": "2:4", "amount": 0.9}, r"amount=0.9 .* 1 - n/m", id="nm-amount"),
        pytest.param({"structured": "filter", "budget": "net"}, "budget must be one of", id="bad-budget"),
        pytest.param({"budget": "global"}, "budget='global' applies to structured runs", id="budget-alone"),
        pytest.param({"structured": "filter", "amount": 9}, "amount=9", id="count-too-large"),
    ],
)
def test_errors_name_the_value_and_leave_the_model(kwargs: dict, match: str) -> None:
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    amount = kwargs.pop("amount", 0.5)
    with pytest.raises(ValueError, match=match):
        global_prune(model, amount, batches(), steps=2, progress=False, **kwargs)
    assert not prune.is_pruned(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nm_parameters_must_tile(seed: int) -> None:
    model = cnn()
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        global_prune(
            model,
            0.5,
            batches(),
            steps=2,
            progress=False,
            structured="2:4",
            parameters=[(model[0], "weight")],
        )


def test_group_score_gradient_is_the_sum_of_element_upper_gradients(seed: int) -> None:
    """One loop step moves each group score by -upper_lr times the summed element gradient."""
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False))
    targets = resolve_targets(model, [(model[0], "weight")])
    cfg = BiPConfig(
        steps=1, upper_lr=0.5, upper_momentum=0.0, lower_lr=1e-3, implicit_coef=2.0, progress=False
    )
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    stream = BatchStream([(x, y)], "loader")
    loop = BiPLoop(model, targets, 2, Groups(dim=0), 1, cfg, F.cross_entropy, stream, stream)
    theta = model[0].weight_orig.detach().clone()
    mask = model[0].weight_mask.detach().clone()
    scores = loop.bip.flat_scores.detach().clone()
    # the element gradient by eager autograd: dl/dm = theta * g - c * m * g * g, summed over each group
    z = (mask * theta).requires_grad_(True)
    loss = F.cross_entropy(model[1](x @ z.t()), y)
    (g,) = torch.autograd.grad(loss, z)
    element = theta * g - 2.0 * mask * g * g
    loop.step()
    torch.testing.assert_close(loop.bip.flat_scores, scores - 0.5 * group_reduce(element, 0))
    assert kept_groups(model[0].weight_mask, 0) == 3
