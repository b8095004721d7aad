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


def test_filter_importance_is_the_weight_s_scores_not_the_bias_s() -> None:
    """A filter BiP that also prunes a layer's bias scores the bias's filters too: the
    importance ranks by the weight's own scores, not the bias's."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    bip = torchbip.BiP(
        model, amount=0.5, layout="filter", parameters=[(model[0], "weight"), (model[0], "bias")]
    )
    weight_scores = model[0].weight_scores.clone()
    assert not torch.equal(weight_scores, model[0].bias_scores)  # (the test tells them apart)
    importance = BiPImportance(bip)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 3, 8, 8))
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    assert torch.equal(importance(group), weight_scores)


class _Residual(torch.nn.Module):
    """c1 and c2 feed one add: Torch-Pruning removes their output channels together."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        h = F.relu(h + self.c2(h))
        return self.fc(F.relu(self.c3(h)).mean((2, 3)))


def _trained_residual(layout: object) -> tuple[_Residual, torchbip.BiP, torch.Tensor]:
    torch.manual_seed(0)
    model, x = _Residual(), torch.randn(2, 3, 8, 8)
    bip = torchbip.BiP(model, amount=0.5, layout=layout, upper_lr=100.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        optimizer.zero_grad()
        images, labels = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        bip.step()
    return model, bip, x


def test_filter_importance_refuses_a_group_of_layers_bip_scored_apart() -> None:
    """With a filter layout c1 and c2 keep different filters; Torch-Pruning removes the same
    channels of both: the importance refuses the group (naming both) instead of ranking it by
    the root's scores alone (which kept filters BiP zeroed and removed ones it kept)."""
    model, bip, x = _trained_residual("filter")
    kept = [
        set((m.weight_mask.flatten(1) != 0).any(1).nonzero().flatten().tolist()) for m in (model.c1, model.c2)
    ]
    assert kept[0] != kept[1]  # (what makes one ranking impossible)
    importance = BiPImportance(bip)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model.c1, tp.prune_conv_out_channels, idxs=list(range(8)))
    with pytest.raises(
        ValueError, match=r"'c1' and 'c2' together .*layout=torchbip\.Coupled\(example_inputs\)"
    ):
        importance(group)
    group = graph.get_pruning_group(model.c2, tp.prune_conv_out_channels, idxs=list(range(8)))
    with pytest.raises(ValueError, match=r"'c2' and 'c1' together"):
        importance(group)
    other = graph.get_pruning_group(model.c3, tp.prune_conv_out_channels, idxs=[4, 0])
    assert torch.equal(importance(other), model.c3.weight_scores[[4, 0]])  # a layer alone: fine
    bip.finish()
    torchbip.export.make_permanent(model)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    with pytest.raises(ValueError, match="scored the filters of each layer on its own"):
        pruner.step()


def test_coupled_importance_prunes_the_residual_group_as_bip_did() -> None:
    """The fix the refusal names: Coupled scores c1 and c2's shared channels jointly, and
    Torch-Pruning removes exactly the channels BiP pruned (torchbip's own export agrees)."""
    model, bip, x = _trained_residual(torchbip.Coupled(torch.randn(2, 3, 8, 8)))
    importance = BiPImportance(bip)
    bip.finish()
    reference = torchbip.export_slim(model.eval(), x)
    torchbip.export.make_permanent(model)
    tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=0.5, ignored_layers=[model.fc]).step()
    assert (model.c1.out_channels, model.c2.out_channels, model.c3.out_channels) == (4, 4, 3)
    for conv in (model.c1, model.c2, model.c3):  # no filter BiP zeroed survives
        assert bool((conv.weight.detach().flatten(1) != 0).any(1).all())
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
