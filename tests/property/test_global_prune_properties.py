"""Properties of ``global_prune`` on random small models (``models_with_data``)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.masks import count_from_amount
from torchbip.testing.strategies import Batches, amounts, models_with_data

pytestmark = pytest.mark.property

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _dense_grads(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """The gradient of every prunable layer's weight with every mask set to one (the oracle)."""
    layers = {name: m for name, m in model.named_children() if isinstance(m, PRUNABLE)}
    masks = {name: m.weight_mask.clone() for name, m in layers.items() if hasattr(m, "weight_mask")}
    weights = {name: getattr(m, "weight_orig", m.weight) for name, m in layers.items()}
    try:
        for name in masks:
            layers[name].weight_mask.fill_(1)
        loss = F.cross_entropy(model(batch[0]), batch[1])
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    finally:
        for name, mask in masks.items():
            layers[name].weight_mask.copy_(mask)
    return {n: torch.zeros(1) if g is None else g for n, g in zip(weights, grads, strict=True)}


def _earlier_zeros(module: nn.Module) -> Tensor:
    if hasattr(module, "weight_mask"):
        return module.weight_mask == 0
    return torch.zeros_like(module.weight, dtype=torch.bool)


@settings(max_examples=max(1, settings.default.max_examples // 2), deadline=None)
@given(case=models_with_data(), data=st.data())
def test_global_prune_on_random_models(case: tuple[nn.Sequential, Batches], data: st.DataObject) -> None:
    """Exact global count, binary masks, earlier zeros kept, finite outputs, remove-equivalence."""
    model, batches = case
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    earlier = [_earlier_zeros(m) for m in layers]
    frozen = [
        m.weight_orig.detach()[e].clone() if hasattr(m, "weight_orig") else None
        for m, e in zip(layers, earlier, strict=True)
    ]
    remaining = sum(int((~e).sum()) for e in earlier)
    amount = data.draw(amounts(remaining), label="amount")
    mode = data.draw(st.sampled_from(["fused", "two_batch"]), label="mode")
    min_keep = data.draw(st.sampled_from([None, 1]), label="min_keep")
    if min_keep is not None and remaining - count_from_amount(amount, remaining) < len(layers):
        min_keep = None  # the floor would keep more than the amount allows

    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]):
            report = torchbip.global_prune(
                model, amount, batches, loss_fn=F.cross_entropy, steps=3, mode=mode, min_keep=min_keep,
                seed=0, progress=False, lower_lr=0.05, upper_lr=1.0,
            )  # fmt: skip
    except ValueError as err:
        # A drawn network can be dead (a ReLU that is zero on every input cuts every layer off
        # the loss): the run refuses it, names those layers and leaves the model as it was.
        if "on which the loss does not depend" not in str(err):
            raise
        named = re.findall(r"'([^']+)\.weight'", str(err).split("(no gradient")[0])
        assert named
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        dense = _dense_grads(model, batches[-1])
        assert all(not bool(dense[name].any()) for name in named), "a named layer gets a gradient"
        return

    masks = [m.weight_mask for m in layers]
    expected = sum(int(e.sum()) for e in earlier) + count_from_amount(amount, remaining)
    assert sum(int((mask == 0).sum()) for mask in masks) == expected
    assert report.sparsity.zeros == expected
    for mask, old, layer, values in zip(masks, earlier, layers, frozen, strict=True):
        assert mask.dtype == layer.weight_orig.dtype
        assert bool(((mask == 0) | (mask == 1)).all())
        assert bool((mask[old] == 0).all()), "an earlier zero was revived"
        if values is not None:
            assert torch.equal(layer.weight_orig.detach()[old], values), "a pruned weight moved"
        if min_keep is not None and int((~old).sum()) > 0:
            assert int(mask.sum()) >= 1

    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all()
        for layer in layers:
            prune.remove(layer, "weight")
        assert not prune.is_pruned(model)
        assert torch.equal(model(x), out)
