"""BiP's scores inside Torch-Pruning's own pruner (``BiPImportance``), with the real package."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import torchbip

tp = pytest.importorskip("torch_pruning")
from torchbip.integrations.torch_pruning import BiPImportance  # noqa: E402


def _trained(layout: object) -> tuple[torch.nn.Module, torchbip.BiP, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    bip = torchbip.BiP(
        model, amount=0.5, layout=layout if layout is not None else torchbip.Coupled(x), upper_lr=1e3
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        optimizer.step()
        bip.step()
    return model, bip, x


def test_metapruner_with_bip_importance_removes_exactly_bip_s_channels() -> None:
    model, bip, x = _trained(None)
    importance = BiPImportance(bip)
    bip.finish()
    reference = torchbip.export_slim(model.eval(), x)  # torchbip's own export, on a copy
    torchbip.export.make_permanent(model)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # the same kept channels, in the same order
        assert torch.equal(got[key], want[key]), key
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference(images), rtol=1e-5, atol=1e-6)


def test_filter_layout_scores_rank_each_layer() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    bip = torchbip.BiP(model, amount=0.5, layout="filter")  # the first conv only (the last is the output)
    scores = model[0].weight_scores.clone()
    importance = BiPImportance(bip)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[5, 1, 6])
    assert torch.equal(importance(group), scores[[5, 1, 6]])
    other = graph.get_pruning_group(model[2], tp.prune_conv_out_channels, idxs=[0, 1])
    assert importance(other) is None  # not scored by BiP: Torch-Pruning leaves it


def test_bad_inputs_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match=r"needs a torchbip\.BiP object, got Linear"):
        BiPImportance(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    unstructured = torchbip.BiP(model, amount=0.5)
    with pytest.raises(TypeError, match=r"needs one score per channel: a BiP with layout=torchbip\.Coupled"):
        BiPImportance(unstructured)
    unstructured.finish()
    with pytest.raises(RuntimeError, match="has finished"):
        BiPImportance(unstructured)


@pytest.mark.parametrize("amount", [0.25, 0.3, 0.5])
def test_the_documented_count_rule_holds_for_the_installed_torch_pruning(amount: float) -> None:
    """Torch-Pruning keeps int(C * (1 - ratio)) channels, BiP C - round(amount * C): where they
    agree Torch-Pruning removes exactly BiP's channels; at 0.3 of 8 it keeps one fewer (5, not 6)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    bip = torchbip.BiP(model, amount=amount, layout=torchbip.Coupled(x))
    importance = BiPImportance(bip)
    bip.finish()
    torchbip.export.make_permanent(model)
    kept = (model[0].weight.detach().flatten(1) != 0).any(1).nonzero().flatten()
    bias = model[1].bias.detach()[kept].clone()
    assert len(kept) == 8 - round(amount * 8)
    tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=amount, ignored_layers=[model[3]]
    ).step()
    assert model[0].out_channels == int(8 * (1 - amount))
    if model[0].out_channels == len(kept):
        assert torch.equal(model[1].bias.detach(), bias)  # the same channels, in order


def test_a_pruner_that_prunes_in_several_steps_is_refused_not_misranked() -> None:
    """After Torch-Pruning's first iterative step the layers are smaller than what BiP scored:
    the importance refuses instead of ranking the remaining channels by the wrong scores."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
        torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )  # fmt: skip
    x = torch.randn(4, 3, 16, 16)
    bip = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x))
    importance = BiPImportance(bip)
    bip.finish()
    torchbip.export.make_permanent(model)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model[8]]
    )
    pruner.step()
    with pytest.raises(RuntimeError, match=r"output channels now, BiP scored \d+: .*iterative_steps=1"):
        pruner.step()
