"""pruned_tensors / named_pruning_hooks / pruning_hook against models pruned by torch itself."""

from __future__ import annotations

import pytest
from torch import nn
from torch.nn.utils import prune

from torchbip import bip_unstructured
from torchbip.method import pruning_hook as reexported_pruning_hook
from torchbip.pruned import named_pruning_hooks, pruned_tensors, pruning_hook


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.Linear(8, 3),
    )


def oracle(model: nn.Module) -> list[tuple[str, nn.Module, nn.utils.prune.BasePruningMethod]]:
    """Pruned tensors read off torch's own reparametrisation: ``<name>_orig`` plus ``<name>_mask``."""
    out = []
    for module_fqn, module in model.named_modules():
        for param_name in module._parameters:
            if param_name.endswith("_orig") and param_name[: -len("_orig")] + "_mask" in module._buffers:
                name = param_name[: -len("_orig")]
                hooks = [
                    h
                    for h in module._forward_pre_hooks.values()
                    if isinstance(h, prune.BasePruningMethod) and h._tensor_name == name
                ]
                assert len(hooks) == 1
                out.append((f"{module_fqn}.{name}" if module_fqn else name, module, hooks[0]))
    return out


def test_unpruned_model_has_no_pruned_tensors(seed: int) -> None:
    model = make_model()
    assert pruned_tensors(model) == []
    assert all(list(named_pruning_hooks(m)) == [] for m in model.modules())
    assert pruning_hook(model[0], "weight") is None


def test_matches_torch_pruning(seed: int) -> None:
    model = make_model()
    prune.l1_unstructured(model[0], "weight", amount=5)
    prune.random_structured(model[2][0], "weight", amount=1, dim=0)
    prune.l1_unstructured(model[4], "weight", amount=0.3)  # two prunings: a PruningContainer
    prune.random_unstructured(model[4], "weight", amount=0.2)
    prune.identity(model[4], "bias")
    prune.identity(model[2][1], "weight")
    found = pruned_tensors(model)
    assert [fqn for fqn, _, _ in found] == ["0.weight", "2.0.weight", "2.1.weight", "4.weight", "4.bias"]
    assert [(fqn, id(m), id(h)) for fqn, m, h in found] == [(f, id(m), id(h)) for f, m, h in oracle(model)]
    assert [m for _, m, _ in found] == [model[0], model[2][0], model[2][1], model[4], model[4]]
    hooks = {fqn: hook for fqn, _, hook in found}
    assert type(hooks["0.weight"]) is prune.L1Unstructured
    assert type(hooks["2.0.weight"]) is prune.RandomStructured
    assert type(hooks["2.1.weight"]) is prune.Identity
    assert type(hooks["4.weight"]) is prune.PruningContainer
    assert [type(m) for m in hooks["4.weight"]] == [prune.L1Unstructured, prune.RandomUnstructured]
    assert type(hooks["4.bias"]) is prune.Identity
    assert [name for name, _ in named_pruning_hooks(model[4])] == ["weight", "bias"]
    assert pruning_hook(model[4], "weight") is hooks["4.weight"]
    assert pruning_hook(model[4], "bias") is hooks["4.bias"]
    assert pruning_hook(model[5], "weight") is None
    assert reexported_pruning_hook is pruning_hook


def test_bip_hooks_and_removed_pruning(seed: int) -> None:
    model = make_model()
    bip_unstructured(model[5], "weight", amount=0.5)
    prune.l1_unstructured(model[0], "bias", amount=1)
    prune.remove(model[0], "bias")
    assert [(fqn, m) for fqn, m, _ in pruned_tensors(model)] == [("5.weight", model[5])]
    assert pruned_tensors(model) == oracle(model)


def test_hook_without_mask_buffer_is_not_a_pruned_tensor(seed: int) -> None:
    layer = nn.Linear(3, 2)
    prune.l1_unstructured(layer, "weight", amount=1)
    del layer._buffers["weight_mask"]
    assert pruned_tensors(layer) == []
    assert [name for name, _ in named_pruning_hooks(layer)] == ["weight"]


def test_shared_module_is_listed_once_under_its_first_name(seed: int) -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    prune.l1_unstructured(shared, "weight", amount=1)
    assert [(fqn, m) for fqn, m, _ in pruned_tensors(model)] == [("0.weight", shared)]


def test_root_module_names_have_no_prefix(seed: int) -> None:
    layer = nn.Linear(3, 2)
    prune.random_unstructured(layer, "bias", amount=1)
    ((fqn, module, hook),) = pruned_tensors(layer)
    assert (fqn, module, type(hook)) == ("bias", layer, prune.RandomUnstructured)


@pytest.mark.parametrize("hook", [lambda module, inputs: None, prune.Identity()])
def test_other_forward_pre_hooks_are_ignored(seed: int, hook: object) -> None:
    layer = nn.Linear(3, 2)
    layer.register_forward_pre_hook(hook)  # not a pruning hook / a method without a tensor name
    assert list(named_pruning_hooks(layer)) == []
    assert pruned_tensors(layer) == []
