"""Gradient hooks on parameters are honoured by ``global_prune``; module backward hooks are refused.

``global_prune`` computes gradients with :mod:`torch.func`, which never calls the hooks on the
user's Parameters; the loop calls them itself. A ``p.register_hook(fn)`` sees the gradient of the
whole lower objective (the loss and the L2 term ``gamma/2 |theta|^2``), as in a loop whose loss
holds the L2 term, so a hook that returns zeros freezes the parameter; a
``register_post_accumulate_grad_hook`` is called with ``p.grad`` set, before the optimiser
step. Module backward hooks cannot run under :mod:`torch.func`: refused up front.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from failure_cases import make_data, raises_and_restores
from torch import Tensor, nn
from torch.nn.modules import module as module_impl

import torchbip

pytestmark = pytest.mark.usefixtures("one_thread")

RUN: dict[str, Any] = {"steps": 6, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0, "seed": 0}
GAMMA = 5e-4  # BiPConfig's default


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
@pytest.mark.parametrize(
    "which", [pytest.param("bias", id="bias-not-pruned"), pytest.param("weight", id="pruned-weight")]
)
def test_a_hook_returning_zeros_freezes_the_parameter(mode: str, which: str) -> None:
    model = make_model()
    param = getattr(model[2], which)
    frozen = param.detach().clone()
    param.register_hook(torch.zeros_like)
    other = model[0].bias.detach().clone()
    torchbip.global_prune(model, 0.5, make_data(), mode=mode, **RUN)
    now = model[2].bias if which == "bias" else model[2].weight_orig
    assert now is param  # same Parameter object
    assert torch.equal(now.detach(), frozen)
    assert not torch.equal(model[0].bias.detach(), other)  # the rest trained


def test_the_hook_sees_the_gradient_of_the_lower_objective() -> None:
    """Oracle: plain autograd on the first batch, masked model, loss + gamma/2 |b|^2."""
    model = make_model()
    seen: list[Tensor] = []
    model[2].bias.register_hook(lambda g: seen.append(g.clone()))
    reference = make_model()
    torchbip.global_prune(model, 0.5, make_data(), **{**RUN, "steps": 1, "score_init": "magnitude"})
    assert len(seen) == 1
    # The first step's forward used the first mask: the global top half of the initial magnitudes.
    weights = [reference[0].weight, reference[2].weight]
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    threshold = magnitudes.sort(descending=True).values[magnitudes.numel() // 2 - 1]
    for w in weights:
        w.data.mul_(w.detach().abs() >= threshold)
    x, y = make_data()[0]
    loss = F.cross_entropy(reference(x), y) + GAMMA / 2 * reference[2].bias.pow(2).sum()
    (want,) = torch.autograd.grad(loss, reference[2].bias)
    torch.testing.assert_close(seen[0], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_a_clipping_hook_is_called_every_step_and_bounds_the_update(mode: str) -> None:
    model = make_model()
    calls: list[float] = []
    clip = 1e-4

    def clamp(g: Tensor) -> Tensor:
        calls.append(float(g.abs().max()))
        return g.clamp(-clip, clip)

    model[0].bias.register_hook(clamp)
    before = model[0].bias.detach().clone()
    torchbip.global_prune(model, 0.5, make_data(), mode=mode, **{**RUN, "momentum": 0.0})
    assert len(calls) == RUN["steps"]
    assert max(calls) > clip  # the hook had something to clip
    # Without momentum each step moves an entry by at most lower_lr * clip.
    assert float((model[0].bias - before).abs().max()) <= RUN["steps"] * RUN["lower_lr"] * clip * (1 + 1e-5)


def test_several_hooks_run_in_registration_order() -> None:
    model = make_model()
    order: list[str] = []

    def first(g: Tensor) -> Tensor:
        order.append("first")
        return g * 0

    def second(g: Tensor) -> None:
        order.append("second")
        assert torch.count_nonzero(g) == 0  # sees what the first returned

    model[2].bias.register_hook(first)
    model[2].bias.register_hook(second)
    torchbip.global_prune(model, 0.5, make_data(), **{**RUN, "steps": 2})
    assert order == ["first", "second"] * 2


def test_post_accumulate_grad_hook_is_called_with_the_gradient_set() -> None:
    model = make_model()
    grads: list[Tensor] = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
    torchbip.global_prune(model, 0.5, make_data(), **RUN)
    assert len(grads) == RUN["steps"]
    mask = model[0].weight_mask
    # The gradient applied to a pruned tensor is zero where its mask of that step was zero; the
    # last step's gradient was computed under the mask before the last upper update, so only check
    # that pruned entries get zeros and kept ones do not all vanish.
    assert all(torch.count_nonzero(g) <= mask.numel() for g in grads)
    assert all(torch.count_nonzero(g) > 0 for g in grads)


def test_hooks_stay_registered_and_work_after_the_run() -> None:
    model = make_model()
    calls = []
    model[2].bias.register_hook(lambda g: calls.append(1))
    torchbip.global_prune(model, 0.5, make_data(), **{**RUN, "steps": 1})
    x, y = make_data()[0]
    F.cross_entropy(model(x), y).backward()
    assert len(calls) == 2  # one call from the run, one from the ordinary backward


# --- module backward hooks: refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    "register",
    [
        pytest.param(lambda m: m.register_full_backward_hook(lambda *a: None), id="full-backward"),
        pytest.param(lambda m: m.register_full_backward_pre_hook(lambda *a: None), id="full-backward-pre"),
        pytest.param(lambda m: m.register_backward_hook(lambda *a: None), id="old-backward"),
    ],
)
def test_module_backward_hooks_are_refused_up_front(register: Any) -> None:
    model = make_model()
    register(model[2])
    raises_and_restores(
        model,
        ValueError,
        r"module .2. \(Linear\) has a backward hook .* with torch\.func, .*p\.register_hook",
    )


@pytest.fixture
def global_backward_hook() -> Iterator[None]:
    handle = module_impl.register_module_full_backward_hook(lambda *a: None)
    yield
    handle.remove()


@pytest.mark.usefixtures("global_backward_hook")
def test_a_global_module_backward_hook_is_refused() -> None:
    raises_and_restores(make_model(), ValueError, r"a global module backward hook is registered")
