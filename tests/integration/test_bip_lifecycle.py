"""``torchbip.BiP`` when the model changes under it between steps, and after ``finish()``.

A rollback with ``model.load_state_dict``, a pruned module replaced in the model, calls after
``finish()`` and a refused first step. The oracles are written by hand: the upper gradient
``theta * g - c * m * g * g`` with ``g`` the loss's gradient at ``z = m * theta`` from plain
autograd, and the values the model must keep.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchbip

pytestmark = pytest.mark.usefixtures("one_thread")

UPPER_LR = 3.0
PRUNED = (0, 2)  # the Linear layers of _model()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, pruner: torchbip.BiP, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    pruner.step()


def _expected_scores(
    scores: list[Tensor],
    thetas: list[Tensor],
    masks: list[Tensor],
    biases: list[Tensor],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    """The scores after one SGD step without momentum: ``s - lr * (theta * g - m * g * g)``.

    ``g`` is the loss's gradient at ``z = m * theta`` of the two Linear layers, by plain autograd.
    """
    z = [(theta * mask).detach().requires_grad_() for theta, mask in zip(thetas, masks, strict=True)]
    hidden = torch.relu(F.linear(x, z[0], biases[0]))
    gz = torch.autograd.grad(F.cross_entropy(F.linear(hidden, z[1], biases[1]), y), z)
    return torch.cat([
        (s - UPPER_LR * (theta * g - mask * g * g)).reshape(-1)
        for s, theta, mask, g in zip(scores, thetas, masks, gz, strict=True)
    ])  # fmt: skip


def test_a_model_load_state_dict_mid_training_is_what_the_next_step_sees() -> None:
    """A rollback with ``model.load_state_dict``: the next step takes the loaded weights as theta
    and keeps them (no optimizer step, so nothing to undo); a load into an EMA copy of the model
    is the copy's and changes nothing of the live pruner."""
    model = _model()
    pruner = torchbip.BiP(model, amount=0.6, upper_lr=UPPER_LR, upper_momentum=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = _batches(6)
    for x, y in batches[:2]:
        _train(model, opt, pruner, x, y)
    ckpt = copy.deepcopy(model.state_dict())
    ema = torch.optim.swa_utils.AveragedModel(model)  # a deep copy of the pruned model
    for x, y in batches[2:5]:
        _train(model, opt, pruner, x, y)
    model.load_state_dict(ckpt)
    ema.module.load_state_dict({k: v + 1.0 if k.endswith("_orig") else v for k, v in ckpt.items()})

    x, y = batches[5]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = _expected_scores(
        [s.clone() for s in pruner.score_views],
        [ckpt[f"{i}.weight_orig"] for i in PRUNED],
        [ckpt[f"{i}.weight_mask"] for i in PRUNED],
        [ckpt[f"{i}.bias"] for i in PRUNED],
        x,
        y,
    )
    pruner.step()  # without optimizer.step(): every entry keeps its loaded value
    for i in PRUNED:
        assert torch.equal(model[i].weight_orig.detach(), ckpt[f"{i}.weight_orig"])
    torch.testing.assert_close(pruner.flat_scores, expected, rtol=0, atol=1e-6)


def test_finish_after_a_model_load_state_dict_keeps_the_loaded_weights() -> None:
    """No optimizer step since the load: finish() has nothing to put back into pruned entries."""
    model = _model()
    pruner = torchbip.BiP(model, amount=0.6, upper_lr=50.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = _batches(5)
    _train(model, opt, pruner, *batches[0])
    ckpt = copy.deepcopy(model.state_dict())
    for x, y in batches[1:]:
        _train(model, opt, pruner, x, y)
    model.load_state_dict(ckpt)
    pruner.finish()
    for i in PRUNED:
        assert torch.equal(model[i].weight_orig.detach(), ckpt[f"{i}.weight_orig"])


@pytest.mark.parametrize("steps_before", [0, 1])
def test_a_replaced_pruned_module_is_refused_at_the_next_step_and_left_out_of_the_report(
    steps_before: int,
) -> None:
    model = _model()
    pruner = torchbip.BiP(model, amount=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _batches(steps_before + 1)
    for x, y in batches[:steps_before]:
        _train(model, opt, pruner, x, y)
    model[2] = nn.Linear(8, 3)  # a new, dense head
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches[-1]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"'2\.weight' is no longer in the model .* call finish\(\)"):
        pruner.step()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="released as it is"):
        report = pruner.finish()
    assert list(report.tensors) == ["0.weight"]  # what the model holds
    assert report.tensors["0.weight"].zeros == int((model[0].weight_mask == 0).sum())
    assert report.tensors["0.weight"].numel == 48
    assert list(pruner.report().tensors) == ["0.weight"]
    after = model.state_dict()
    assert list(after) == list(kept)
    assert all(torch.equal(after[k], kept[k]) for k in kept)
    assert torchbip.BiP(model, amount=0.5).names == ["0.weight", "2.weight"]  # the way out


@pytest.mark.parametrize("call", ["apply", "update_masks"])
def test_apply_and_update_masks_after_finish_are_refused_and_change_nothing(call: str) -> None:
    model = _model()
    pruner = torchbip.BiP(model, amount=0.5, upper_lr=50.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches(3):
        _train(model, opt, pruner, x, y)
    pruner.finish()
    final = copy.deepcopy(model.state_dict())
    for _ in range(3):
        with pytest.raises(RuntimeError, match=r"has finished \(finish\(\) was called\)"):
            getattr(pruner, call)()
    assert pruner.step_count == 3
    after = model.state_dict()
    assert list(after) == list(final)
    assert all(torch.equal(final[k], after[k]) for k in final)


def test_a_refused_first_step_does_not_count_its_gradients_again() -> None:
    """The first step refuses a tensor frozen after construction; once it is unfrozen, the next
    step's upper gradient is that iteration's batch alone (as after a non-finite refusal)."""
    model = _model()
    pruner = torchbip.BiP(model, amount=0.6, upper_lr=UPPER_LR, upper_momentum=0.0)
    thetas = [model[i].weight_orig.detach().clone() for i in PRUNED]
    masks = [model[i].weight_mask.clone() for i in PRUNED]
    biases = [model[i].bias.detach().clone() for i in PRUNED]
    scores = [s.clone() for s in pruner.score_views]
    model[2].weight_orig.requires_grad_(False)
    (x0, y0), (x1, y1) = _batches(2)
    F.cross_entropy(model(x0), y0).backward()
    with pytest.raises(ValueError, match="requires_grad=False"):
        pruner.step()
    assert not pruner.has_grad
    model[2].weight_orig.requires_grad_(True)
    model.zero_grad()
    F.cross_entropy(model(x1), y1).backward()
    pruner.step()
    expected = _expected_scores(scores, thetas, masks, biases, x1, y1)
    torch.testing.assert_close(pruner.flat_scores, expected, rtol=0, atol=1e-6)
