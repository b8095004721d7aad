"""After ``global_prune`` a model is in exactly the form torch's own pruning methods leave."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip import BiPPruningMethod


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


# Tiny models: one intra-op thread is faster and makes float reductions reproducible.
pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = [pytest.param(make_mlp, id="mlp"), pytest.param(make_cnn, id="cnn")]


def make_data(
    model: nn.Module, n_batches: int = 6, batch: int = 16, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """A learnable task: labels are the argmax of a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 6, 6) if isinstance(model[0], nn.Conv2d) else (8,)
    x = torch.randn(n_batches * batch, *shape, generator=gen)
    w = torch.randn(x[0].numel(), 3, generator=gen)
    y = (x.flatten(1) @ w).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def run(model: nn.Module, amount: float | int, **options: Any) -> torchbip.PruneReport:
    options = {"steps": 12, "lower_lr": 0.05, "progress": False, "seed": 0, **options}
    return torchbip.global_prune(model, amount, make_data(model), **options)


@pytest.mark.parametrize("factory", MODELS)
def test_pruned_form_is_exactly_torchs(factory: Callable[[], nn.Module]) -> None:
    model = factory()
    originals = {id(m): m.weight for m in prunable(model)}
    run(model, 0.8)

    assert prune.is_pruned(model)
    for module in prunable(model):
        assert set(module._parameters) == {"weight_orig", "bias"}
        assert module.weight_orig is originals[id(module)]
        assert set(module._buffers) == {"weight_mask"}
        hooks = list(module._forward_pre_hooks.values())
        assert len(hooks) == 1
        assert isinstance(hooks[0], BiPPruningMethod)
        assert hooks[0]._tensor_name == "weight"
        mask = module.weight_mask
        assert mask.dtype == module.weight_orig.dtype
        assert mask.shape == module.weight_orig.shape
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        # the masked weight is current, a plain tensor (no graph), and zero where pruned
        assert torch.equal(module.weight, module.weight_orig * mask)
        assert module.weight.grad_fn is None
        assert (module.weight[mask == 0] == 0).all()
    assert not [n for n, _ in model.named_buffers() if n.endswith("_scores")]
    keys = set(model.state_dict())
    for name, module in model.named_modules():
        if module in prunable(model):
            assert {f"{name}.weight_orig", f"{name}.weight_mask"} <= keys
            assert f"{name}.weight" not in keys


@pytest.mark.parametrize("factory", MODELS)
def test_remove_leaves_plain_weights_that_load_strictly_into_a_fresh_model(
    factory: Callable[[], nn.Module],
) -> None:
    model = factory()
    run(model, 0.75)
    model.eval()
    x = make_data(model)[0][0]
    with torch.no_grad():
        expected = model(x)
    masks = {id(m): m.weight_mask.clone() for m in prunable(model)}

    for module in prunable(model):
        prune.remove(module, "weight")
    assert not prune.is_pruned(model)
    for module in prunable(model):
        assert isinstance(module._parameters["weight"], nn.Parameter)
        assert set(module._buffers) == set()
        assert not module._forward_pre_hooks
        assert (module.weight[masks[id(module)] == 0] == 0).all()

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = factory()
    assert fresh.load_state_dict(state, strict=True) == nn.modules.module._IncompatibleKeys([], [])
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        assert torch.equal(model(x), expected)


def test_pruned_state_dict_loads_into_a_model_prepared_with_identity() -> None:
    model = make_mlp()
    run(model, 0.6)
    model.eval()
    x = make_data(model)[0][0]
    fresh = make_mlp()
    for module in prunable(fresh):
        prune.identity(module, "weight")
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_deepcopy_works_after_global_prune() -> None:
    """torch's own methods leave a non-leaf ``weight`` that cannot be deep-copied (#37322)."""
    model = make_mlp()
    run(model, 0.5)
    clone = copy.deepcopy(model)
    x = make_data(model)[0][0]
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_bip_on_top_of_l1_unstructured_keeps_earlier_zeros() -> None:
    model = make_mlp()
    first = model[0]
    prune.l1_unstructured(first, "weight", amount=0.3)
    earlier = first.weight_mask == 0
    frozen_values = first.weight_orig.detach()[earlier].clone()
    n_total = sum(m.weight.numel() for m in prunable(model))
    remaining = n_total - int(earlier.sum())

    report = run(model, 0.5, steps=20, lower_lr=0.2, upper_lr=1.0)

    hook = next(iter(first._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer)
    assert [type(m) for m in hook._pruning_methods] == [prune.L1Unstructured, BiPPruningMethod]
    assert len(first._forward_pre_hooks) == 1
    assert (first.weight_mask[earlier] == 0).all()
    assert torch.equal(first.weight_orig.detach()[earlier], frozen_values)
    zeros = sum(int((m.weight_mask == 0).sum()) for m in prunable(model))
    assert zeros == int(earlier.sum()) + round(0.5 * remaining)
    assert report.sparsity.zeros == zeros
    prune.remove(first, "weight")
    assert (first.weight[earlier] == 0).all()


def test_l1_unstructured_on_top_of_bip() -> None:
    model = make_mlp()
    run(model, 0.5)
    layer = model[2]
    bip_zeros = layer.weight_mask == 0
    n = layer.weight_mask.numel()

    prune.l1_unstructured(layer, "weight", amount=0.4)

    hook = next(iter(layer._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer)
    assert [type(m) for m in hook._pruning_methods] == [BiPPruningMethod, prune.L1Unstructured]
    assert (layer.weight_mask[bip_zeros] == 0).all()
    n_bip = int(bip_zeros.sum())
    assert int((layer.weight_mask == 0).sum()) == n_bip + round(0.4 * (n - n_bip))
    prune.remove(layer, "weight")
    assert not prune.is_pruned(layer)
    # nothing of torchbip is left: what a never-pruned Linear holds
    assert set(layer._parameters) == {"weight", "bias"}
    assert not layer._buffers
    assert not layer._non_persistent_buffers_set
    assert not layer._forward_hooks
    assert not layer._forward_pre_hooks


@pytest.mark.parametrize("p", [pytest.param(0.3, id="p=0.3"), pytest.param(0.6, id="p=0.6")])
@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_global_prune_twice_composes(p: float, mode: str) -> None:
    model = make_mlp()
    n_total = sum(m.weight.numel() for m in prunable(model))
    run(model, p, mode=mode)
    first = {id(m): m.weight_mask == 0 for m in prunable(model)}
    first_values = {id(m): m.weight_orig.detach()[first[id(m)]].clone() for m in prunable(model)}
    z1 = sum(int(z.sum()) for z in first.values())
    assert z1 == round(p * n_total)

    report = run(model, p, mode=mode, seed=1)

    z2 = sum(int((m.weight_mask == 0).sum()) for m in prunable(model))
    assert z2 == z1 + round(p * (n_total - z1))
    assert report.sparsity.zeros == z2
    assert abs(z2 / n_total - (1 - (1 - p) ** 2)) <= 1.0 / n_total
    for module in prunable(model):
        assert (module.weight_mask[first[id(module)]] == 0).all()
        assert torch.equal(module.weight_orig.detach()[first[id(module)]], first_values[id(module)])
        (hook,) = module._forward_pre_hooks.values()
        assert isinstance(hook, prune.PruningContainer)
        assert [type(m) for m in hook._pruning_methods] == [BiPPruningMethod, BiPPruningMethod]
        assert not hasattr(module, "weight_scores")


def test_pruned_model_trains_like_a_torch_pruned_model() -> None:
    """Masked entries get zero gradient and stay zero in ``weight`` after an optimiser step."""
    model = make_mlp()
    run(model, 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_data(model)[0]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for module in prunable(model):
        pruned = module.weight_mask == 0
        assert (module.weight_orig.grad[pruned] == 0).all()
        assert (module.weight[pruned] == 0).all()
