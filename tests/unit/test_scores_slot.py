"""A module's own ``<name>_scores`` attribute: every per-tensor BiP method refuses it up front.

BiP keeps the scores of ``module.<name>`` in the buffer ``<name>_scores``. A buffer, parameter,
plain attribute or property of the user's under that name would be overwritten (a persistent
buffer made non-persistent, so lost from ``state_dict`` and deleted by ``prune.remove``) or break
the registration after torch had already pruned the module. :func:`torchbip.global_prune` and
:class:`torchbip.BiP` refuse it (``tests/integration/test_bip_in_loop.py``); so do the methods
here, before anything changes. A score buffer that BiP itself left (the tensor pruned by BiP
again) is replaced as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torchbip import BiPPruningMethod, BiPStructured, bip_structured, bip_unstructured
from torchbip.method import BiPMethod, check_scores_slot, holds_bip
from torchbip.semistructured import BiPSemiStructured, bip_semi_structured

ENTRY_POINTS: dict[str, Callable[[nn.Module], object]] = {
    "bip_unstructured": lambda m: bip_unstructured(m, "weight", amount=2),
    "BiPPruningMethod.apply": lambda m: BiPPruningMethod.apply(m, "weight", 0.5),
    "bip_structured": lambda m: bip_structured(m, "weight", amount=1, dim=0),
    "BiPStructured.apply": lambda m: BiPStructured.apply(m, "weight", 1, dim=1),
    "bip_semi_structured": lambda m: bip_semi_structured(m, "weight", n=2, m=4),
    "BiPSemiStructured.apply": lambda m: BiPSemiStructured.apply(m, "weight", n=1, m=2),
}


class WithBuffer(nn.Linear):
    """A persistent buffer of the user's named ``weight_scores``."""

    def __init__(self) -> None:
        super().__init__(4, 3)
        self.register_buffer("weight_scores", torch.arange(12.0).view(3, 4))


class WithParameter(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)
        self.weight_scores = nn.Parameter(torch.ones(3, 4))


class WithAttribute(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)
        self.weight_scores = "user metadata"


class WithProperty(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)

    @property
    def weight_scores(self) -> str:
        return "a property of the user's class"


HOLDERS = [WithBuffer, WithParameter, WithAttribute, WithProperty]


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything a pruning call could change: objects (by identity), values, order and hooks."""
    return {
        "parameters": [(n, id(p)) for n, p in module._parameters.items()],
        "parameter values": [p.detach().clone() for p in module._parameters.values() if p is not None],
        "buffers": [(n, id(b)) for n, b in module._buffers.items()],
        "buffer values": [b.clone() for b in module._buffers.values() if b is not None],
        "non-persistent": set(module._non_persistent_buffers_set),
        "hooks": list(module._forward_pre_hooks.items()),
        "methods": [
            list(h) for h in module._forward_pre_hooks.values() if isinstance(h, prune.PruningContainer)
        ],
        "attributes": {k: v for k, v in vars(module).items() if not k.startswith("_")},
        "state_dict": list(module.state_dict()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        if key.endswith("values"):
            assert len(after[key]) == len(before[key]), key
            assert all(torch.equal(a, b) for a, b in zip(after[key], before[key], strict=True)), key
        else:
            assert after[key] == before[key], key


@pytest.mark.parametrize("holder", HOLDERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("pruned_before", [False, True], ids=["fresh", "torch-pruned-before"])
def test_a_users_scores_attribute_is_refused_and_the_module_unchanged(
    entry: str, holder: type[nn.Module], pruned_before: bool
) -> None:
    torch.manual_seed(0)
    module = holder()
    if pruned_before:  # a hook of torch's (holding no BiP method) that must stay as it is
        prune.l1_unstructured(module, "weight", amount=2)
    before = snapshot(module)
    message = (
        rf"module {holder.__name__} already has an attribute 'weight_scores', the name under which "
        r"BiP keeps the scores of 'weight': rename that attribute"
    )
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](module)
    assert_same(before, snapshot(module))
    assert prune.is_pruned(module) == pruned_before


def test_a_users_buffer_stays_in_the_state_dict_and_survives_torchs_remove() -> None:
    """The refused call took nothing: torch's methods and remove still keep the user's buffer."""
    module = WithBuffer()
    with pytest.raises(ValueError, match="'weight_scores'"):
        bip_unstructured(module, "weight", amount=2)
    assert "weight_scores" in module.state_dict()
    prune.l1_unstructured(module, "weight", amount=2)
    prune.remove(module, "weight")
    assert sorted(module.state_dict()) == ["bias", "weight", "weight_scores"]
    assert torch.equal(module.weight_scores, torch.arange(12.0).view(3, 4))


def test_only_the_pruned_tensors_slot_counts() -> None:
    """``weight_scores`` of the user's does not stop BiP from pruning the bias (``bias_scores``)."""
    module = WithBuffer()
    bip_unstructured(module, "bias", amount=1)
    assert int((module.bias_mask == 0).sum()) == 1
    assert "bias_scores" in module._non_persistent_buffers_set
    assert "weight_scores" in module.state_dict()
    prune.remove(module, "bias")
    assert sorted(module.state_dict()) == ["bias", "weight", "weight_scores"]


def test_the_message_can_name_the_caller() -> None:
    module = WithAttribute()
    with pytest.raises(ValueError, match=r"^parameters names 'fc\.weight', but the module 'fc' already has"):
        check_scores_slot(module, "weight", where="parameters names 'fc.weight', but the module 'fc'")
    check_scores_slot(module, "bias")  # nothing of that name: no error


# --------------------------------------------------------------------------- BiP on BiP still works


def _layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 4)


def _zeros(module: nn.Module) -> int:
    return int((module.weight_mask == 0).sum())


@pytest.mark.parametrize("first", list(ENTRY_POINTS)[::2])
@pytest.mark.parametrize("second", list(ENTRY_POINTS))
def test_bip_on_bip_replaces_its_own_score_buffer(first: str, second: str) -> None:
    module = _layer()
    ENTRY_POINTS[first](module)
    zeros = _zeros(module)
    old_scores = module.weight_scores
    ENTRY_POINTS[second](module)
    assert _zeros(module) > zeros or second.startswith(("bip_semi", "BiPSemi"))
    assert module.weight_scores is not old_scores
    assert "weight_scores" in module._non_persistent_buffers_set
    assert sorted(module.state_dict()) == ["bias", "weight_mask", "weight_orig"]
    assert holds_bip(module._forward_pre_hooks[next(iter(module._forward_pre_hooks))])
    prune.remove(module, "weight")
    assert not module._buffers
    assert not module._non_persistent_buffers_set


def test_bip_after_torch_on_bip_and_on_a_deep_copy() -> None:
    """A container of torch's holding a BiP method, and a deep copy of a BiP-pruned module."""
    module = _layer()
    bip_unstructured(module, "weight", amount=4)
    prune.l1_unstructured(module, "weight", amount=4)  # torch's container around BiP's method
    bip_structured(module, "weight", amount=1, dim=0)
    assert _zeros(module) >= 8 + 4
    twin = copy.deepcopy(module)
    bip_unstructured(twin, "weight", amount=0.5)
    assert _zeros(twin) > _zeros(module)
    for m in (module, twin):
        hook = next(iter(m._forward_pre_hooks.values()))
        assert any(isinstance(h, BiPMethod) for h in hook)
        prune.remove(m, "weight")
        assert not m._buffers


def test_iterative_bip_on_a_bip_pruned_model_through_global_prune() -> None:
    """global_prune on a model that bip_unstructured pruned: BiP's own buffer is no collision."""
    import torchbip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    bip_unstructured(model[0], "weight", amount=0.25)  # 12 of 48 entries
    earlier = model[0].weight_mask.clone()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    torchbip.global_prune(model, 0.5, [(x, y)], steps=2, progress=False)
    masks = [m.weight_mask for m in (model[0], model[2])]
    assert sum(int((m == 0).sum()) for m in masks) == 12 + round(0.5 * (48 + 24 - 12))  # of the rest
    assert bool((masks[0][earlier == 0] == 0).all())  # never revived
    assert not any(n.endswith("_scores") for n, _ in model.named_buffers())
