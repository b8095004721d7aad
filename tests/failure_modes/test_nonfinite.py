"""Non-finite gradients with a finite loss, and non-finite scores, raise ``FloatingPointError``.

Each step checks what it applies: the loss, the gradients of every trainable tensor (through the
score gradient, which is non-finite wherever ``g`` is, also at pruned entries) and the new mask's
exact count. The error names the step, and the model is restored exactly. Cases from the
catalogue: a ``torch.where(cond, x.log(), 0)`` term (finite loss, NaN gradients) on the last step
and with ``steps=1``, an infinite gradient, NaN only in a bias gradient, NaN only where the mask
is 0, both modes, structured and N:M layouts, BatchNorm models, and NaN scores reaching the
selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from failure_cases import make_data, make_model, raises_and_restores
from torch import Tensor, nn

import torchbip
import torchbip.masks as masks_module
from torchbip.masks import GlobalTopK, topk_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def nan_grad_term(out: Tensor) -> Tensor:
    """Zero in value, NaN in gradient: ``log`` of 0 under a ``where`` whose condition is False."""
    zero = out - out.detach()
    return torch.where(out > 1e9, zero.log(), torch.zeros_like(out)).sum()


def loss_with_nan_grads(from_step: int = 0) -> Callable[[Tensor, Tensor], Tensor]:
    calls = {"n": 0}

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss + nan_grad_term(out) if calls["n"] > from_step else loss

    return loss_fn


def loss_with_inf_grads(out: Tensor, y: Tensor) -> Tensor:
    """Finite loss, infinite gradient: ``sqrt`` at 0 has an infinite derivative."""
    zero = out - out.detach()
    return F.cross_entropy(out, y) + zero.abs().sqrt().sum()


def test_the_nan_term_has_a_finite_loss_and_nan_gradients() -> None:
    """The adversarial loss is what it claims to be (checked with plain autograd)."""
    out = torch.randn(4, 3, requires_grad=True)
    loss = F.cross_entropy(out, torch.tensor([0, 1, 2, 0])) + nan_grad_term(out)
    loss.backward()
    assert torch.isfinite(loss)
    assert out.grad is not None
    assert torch.isnan(out.grad).all()


@pytest.mark.parametrize("kind", ["dense", "l1-pruned", "bn"])
@pytest.mark.parametrize("mode", ["fused", "two_batch"])
@pytest.mark.parametrize(
    ("steps", "from_step"),
    [
        pytest.param(1, 0, id="steps=1"),
        pytest.param(6, 5, id="last-step"),
        pytest.param(6, 2, id="mid-run"),
    ],
)
def test_nan_gradients_with_a_finite_loss(kind: str, mode: str, steps: int, from_step: int) -> None:
    # In two_batch mode each step calls the loss twice.
    calls_per_step = 2 if mode == "two_batch" else 1
    fails_at = from_step
    info = raises_and_restores(
        make_model(kind),
        FloatingPointError,
        rf"non-finite gradients at step {fails_at} .* although the loss .* is finite",
        loss_fn=loss_with_nan_grads(from_step * calls_per_step),
        steps=steps,
        mode=mode,
    )
    assert "restored" in str(info.value)


def test_infinite_gradients_are_refused() -> None:
    raises_and_restores(
        make_model("dense"),
        FloatingPointError,
        r"non-finite gradients at step 0",
        loss_fn=loss_with_inf_grads,
    )


class NaNOffset(nn.Module):
    """``Linear(x) + offset``, with a term that is 0 in value and NaN in the gradient of ``offset``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.offset = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor) -> Tensor:
        zero = self.offset - self.offset.detach()
        poison = torch.where(self.offset > 1e9, zero.log(), torch.zeros_like(zero))
        return self.fc(x) + self.offset + poison


def test_nan_only_in_a_tensor_that_is_not_pruned_is_found_and_named() -> None:
    """A tensor outside the pruned ones: its gradient is checked too, and named."""
    torch.manual_seed(0)
    raises_and_restores(NaNOffset(), FloatingPointError, r"step 0 .* in \['offset'\]")


def test_nan_only_at_pruned_entries_is_found() -> None:
    """NaN in ``g`` where the mask is 0 reaches neither the masked output nor ``m*g``: still refused."""
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    torch.manual_seed(0)

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        # d(loss)/d(weight entry) through the mask gradient: NaN for every entry of row 0.
        return F.cross_entropy(out, y.clamp_max(3)) + nan_grad_term(out[:, :1])

    raises_and_restores(model, FloatingPointError, r"non-finite gradients at step 0", loss_fn=loss_fn)


@pytest.mark.parametrize("structured", ["filter", "channel", "2:4"])
def test_structured_and_n_m_runs(structured: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    raises_and_restores(
        model,
        FloatingPointError,
        r"non-finite gradients at step 3",
        loss_fn=loss_with_nan_grads(3),
        structured=structured,
    )


def test_the_finished_model_never_holds_nan() -> None:
    """The same loss without the NaN term: the run finishes, with finite weights and exact sparsity."""
    model = make_model("dense")
    report = torchbip.global_prune(model, 0.5, make_data(), steps=6, progress=False)
    n = sum(m.weight_mask.numel() for m in model if isinstance(m, nn.Linear))
    assert report.sparsity.zeros == round(0.5 * n)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "scores",
    [
        pytest.param([torch.tensor([0.5, float("nan"), 0.2, 0.9])], id="one-nan"),
        pytest.param([torch.full((4,), float("nan")), torch.tensor([1.0, 2.0])], id="all-nan-tensor"),
    ],
)
def test_selection_never_returns_a_mask_of_the_wrong_count(scores: list[Tensor]) -> None:
    """NaN scores cannot be ranked: the selection raises instead of keeping fewer entries."""
    n_keep = 3
    with pytest.raises(FloatingPointError, match=r"NaN"):
        GlobalTopK(n_keep)(scores)
    with pytest.raises(FloatingPointError, match=r"NaN"):
        topk_mask(torch.cat(scores), n_keep)
    with pytest.raises(FloatingPointError, match=r"NaN"):
        GlobalTopK(n_keep).threshold(torch.cat(scores))


def test_threshold_refuses_nan_also_after_the_band_took_over() -> None:
    """The band search counts what lies above and inside it, where NaN never lies: still refused."""
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(100_000, generator=gen)  # above the size from which CPUs use the band
    select = GlobalTopK(1000)
    select.threshold(flat)
    flat[123] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN"):
        select.threshold(flat)


@pytest.mark.parametrize("numpy_path", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", ["in-band", "far-below", "far-above"])
def test_banded_selection_finds_nan_anywhere(
    numpy_path: bool, dtype: torch.dtype, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first call the band search's counts find NaN wherever it lies, on both paths."""
    if not numpy_path:  # the path of devices other than the CPU
        monkeypatch.setattr(masks_module, "_numpy", lambda flat: None)
    gen = torch.Generator().manual_seed(1)
    flat = torch.randn(100_000, generator=gen).to(dtype)
    select = GlobalTopK(5_000)
    value, _ = select.threshold(flat)
    index = {"in-band": int(torch.argmin((flat - value).abs())), "far-below": int(flat.argmin())}
    flat[index.get(where, int(flat.argmax()))] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN"):
        select.threshold(flat)
    with pytest.raises(FloatingPointError, match=r"NaN"):
        select.select_flat(flat)


@pytest.mark.parametrize("numpy_path", [True, False], ids=["numpy", "torch"])
def test_banded_selection_ranks_infinities(numpy_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Infinite scores are ranked (only NaN is refused): the mask equals a sort's top-k."""
    if not numpy_path:
        monkeypatch.setattr(masks_module, "_numpy", lambda flat: None)
    gen = torch.Generator().manual_seed(2)
    flat = torch.randn(100_000, generator=gen)
    select = GlobalTopK(5_000)
    select.select_flat(flat)
    flat[:10] = math.inf
    flat[10:20] = -math.inf
    flat += 1e-4 * torch.randn(100_000, generator=gen)  # a small move: the band's case
    expected = torch.zeros(100_000, dtype=torch.bool)
    expected[torch.sort(flat, descending=True, stable=True).indices[:5_000]] = True
    assert torch.equal(select.select_flat(flat), expected)


def test_nan_scores_in_the_loop_raise_naming_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores that turn NaN (here forced by an upper step that writes NaN) stop the run at that step."""
    original = torch.optim.SGD.step
    calls = {"n": 0}

    def poisoned(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # the upper optimiser's step in step 3 (lower, upper per step)
            with torch.no_grad():
                self.param_groups[0]["params"][0][0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    raises_and_restores(make_model("dense"), FloatingPointError, r"at step 3: .*NaN")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_before_any_work(value: float) -> None:
    """Scores start from the weights' magnitudes: a NaN weight would poison the first mask."""
    model = make_model("dense")
    with torch.no_grad():
        model[2].weight[3, 4] = value
    raises_and_restores(
        model, ValueError, r"parameters names '2\.weight', which holds NaN or infinite values"
    )
