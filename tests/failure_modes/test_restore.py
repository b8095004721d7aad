"""Whatever fails during a run of ``global_prune`` (the model, the loss or the loader raising at some
step, a non-finite loss, ``KeyboardInterrupt``, a failure after an earlier pruning, a BatchNorm
model, ...), it raises a clear error and the model is restored exactly.

"Exactly" is what :mod:`model_state` checks: the same parameter and buffer objects with the same
values and gradients, the same hooks, flags and training modes; the first test checks that it
sees every kind of change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from failure_cases import KINDS, RUN, make_data, make_model, raises_and_restores
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the state helper ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m[0].weight.data.add_(1e-7), id="weight-value"),
        pytest.param(
            lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
            id="weight-object",
        ),
        pytest.param(lambda m: m[0].weight.grad.mul_(2), id="grad-value"),
        pytest.param(lambda m: setattr(m[0].weight, "grad", None), id="grad-dropped"),
        pytest.param(lambda m: m[0].bias.requires_grad_(False), id="requires-grad"),
        pytest.param(lambda m: m[1].running_mean.add_(1), id="buffer-value"),
        pytest.param(lambda m: m[1].register_buffer("extra", torch.zeros(1)), id="buffer-added"),
        pytest.param(lambda m: m[1].eval(), id="one-module-eval"),
        pytest.param(lambda m: m.eval(), id="model-eval"),
        pytest.param(lambda m: m[0].register_forward_pre_hook(lambda *_: None), id="pre-hook-first"),
        pytest.param(lambda m: m[3].register_forward_pre_hook(lambda *_: None), id="pre-hook-last"),
        pytest.param(lambda m: m[0].register_forward_hook(lambda *_: None), id="forward-hook"),
        pytest.param(lambda m: prune.identity(m[3], "weight"), id="pruned"),
        pytest.param(lambda m: setattr(m[1], "stale", torch.zeros(1)), id="tensor-attribute"),
    ],
)
def test_the_state_helper_sees_every_kind_of_change(change: Callable[[nn.Sequential], object]) -> None:
    """The helper itself must fail on each change it is meant to catch."""
    model = make_model("bn")
    before = capture(model)
    change(model)
    with pytest.raises(AssertionError):
        assert_unchanged(before, model)


# --- failures in the middle of a run ---------------------------------------------------------------


class FailingLoader:
    """Yields good batches, then ``bad`` (a batch, or an exception to raise) at draw ``at``."""

    def __init__(self, at: int, bad: Any) -> None:
        self.at, self.bad, self.draws = at, bad, 0
        self.batches = make_data()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            self.draws += 1
            if self.draws == self.at:
                if isinstance(self.bad, BaseException):
                    raise self.bad
                yield self.bad
            else:
                yield batch


def nan_after(k: int) -> Callable[[Tensor, Tensor], Tensor]:
    """A cross-entropy loss that turns NaN after its first ``k`` calls."""
    calls = [0]

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        calls[0] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if calls[0] > k else loss

    return loss_fn


MODES = [pytest.param("fused", id="fused"), pytest.param("two_batch", id="two_batch")]
X, Y = make_data()[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        pytest.param(
            lambda: {"loss_fn": nan_after(3)},
            FloatingPointError,
            r"loss_fn returned a non-finite loss \(nan\) at step \d on a batch from \w+; "
            r"the model was restored",
            id="nan-loss",
        ),
        pytest.param(
            lambda: {"loader": FailingLoader(4, (X[:, :5], Y))},
            ValueError,
            r"the model or loss_fn failed on a batch from loader at step \d "
            r"\(inputs Tensor\[16, 5\] float32, targets Tensor\[16\] int64\): "
            r"RuntimeError: mat1 and mat2 shapes cannot be multiplied",
            id="wrong-shape",
        ),
        pytest.param(
            lambda: {"loader": FailingLoader(3, (X, Y + 7))},
            ValueError,
            r"the model or loss_fn failed on a batch from loader .*IndexError: Target \d+ is out of bounds",
            id="label-out-of-range",
        ),
        pytest.param(
            lambda: {"loss_fn": lambda o, y: F.cross_entropy(o, y, reduction="none")},
            ValueError,
            r"loss_fn failed .*: ValueError: loss_fn must return a scalar tensor, got \(16,\)",
            id="non-scalar-loss",
        ),
        pytest.param(
            lambda: {"loader": FailingLoader(3, RuntimeError("disk on fire"))},
            RuntimeError,
            r"^disk on fire$",
            id="loader-raises",
        ),
        pytest.param(
            lambda: {"loader": FailingLoader(5, KeyboardInterrupt("stop"))},
            KeyboardInterrupt,
            r"^stop$",
            id="loader-interrupt",
        ),
        pytest.param(
            lambda: {"loader": FailingLoader(2, "not a batch")},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got str",
            id="loader-bad-batch",
        ),
    ],
)
def test_failure_mid_run_restores_the_model(
    mode: str, kind: str, kwargs: Callable[[], dict[str, Any]], exc: type[BaseException], match: str
) -> None:
    options = kwargs()
    raises_and_restores(make_model(kind), exc, match, mode=mode, seed=0, **options)
    if isinstance(options.get("loader"), FailingLoader):
        assert options["loader"].draws >= 2  # it failed mid-run, not before the first step


def test_interrupt_inside_the_loss_restores_and_a_later_run_works() -> None:
    model = make_model("bn")
    calls = [0]

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, targets)

    raises_and_restores(model, KeyboardInterrupt, "^$", loss_fn=loss_fn)
    report = torchbip.global_prune(model, 0.5, make_data(), **RUN)
    assert report.sparsity.zeros == round(0.5 * (8 * 16 + 16 * 3))
    assert model[0].weight.grad_fn is None
    assert torch.isfinite(model[0].weight).all()


def test_loss_fn_raising_is_wrapped_with_the_batch_description() -> None:
    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        raise KeyError("label")

    info = raises_and_restores(
        make_model("dense"),
        ValueError,
        r"loss_fn failed on a batch from loader at step 0 .*KeyError",
        loss_fn=loss_fn,
    )
    assert isinstance(info.value.__cause__, KeyError)


def test_restored_model_can_be_pruned_and_removed_normally() -> None:
    model = make_model("l1-pruned")
    raises_and_restores(model, FloatingPointError, "non-finite", loss_fn=nan_after(2))
    torchbip.global_prune(model, 0.5, make_data(), **RUN)
    for layer in (model[0], model[2], model[4]):
        prune.remove(layer, "weight")
    assert not prune.is_pruned(model)


# --- random number generators ------------------------------------------------------------------


class RaisingAt:
    """Wraps a loader; raises at its ``at``-th batch of the first pass."""

    def __init__(self, loader: Any, at: int) -> None:
        self.loader, self.at = loader, at
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.loader):
            if i == self.at:
                raise RuntimeError("loader broke")
            yield batch


@pytest.mark.parametrize("at", [0, 3], ids=["first-batch", "mid-run"])
@pytest.mark.parametrize("where", ["dataloader", "sampler"])
def test_a_failed_call_leaves_the_generators_as_they_were(at: int, where: str) -> None:
    """The loader's own generator and torch's global one are the caller's: restored too."""
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x[:, :3].argmax(1))
    g = torch.Generator().manual_seed(7)
    if where == "dataloader":
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=g)
    else:
        loader = DataLoader(data, batch_size=16, sampler=RandomSampler(data, generator=g))
    model = make_model("dense")  # seeds torch's RNG: before the states are taken
    torch.rand(3)  # some caller state, not the one make_model left
    g_state, cpu_state = g.get_state(), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="loader broke"):
        torchbip.global_prune(model, 0.5, RaisingAt(loader, at), **RUN)
    assert torch.equal(g.get_state(), g_state)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    # The same call on the same loader now draws the order it would have drawn first.
    first = [yb.tolist() for _, yb in loader]
    g.set_state(g_state)
    assert [yb.tolist() for _, yb in loader] == first


def loader_of(x: Tensor, y: Tensor) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_a_failed_call_on_a_gpu_leaves_cudas_generator_as_it_was(device: torch.device) -> None:
    """Dropout on a GPU model draws from CUDA's generator: a failed call puts it back."""
    if device.type != "cuda":
        pytest.skip("CUDA's generator: needs TORCH_DEVICE=cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)).to(device)
    data = loader_of(torch.randn(96, 8, device=device), torch.randint(0, 3, (96,), device=device))
    torch.rand(3, device=device)  # some caller state
    before = torch.cuda.get_rng_state(device)
    with pytest.raises(RuntimeError, match="loader broke"):
        torchbip.global_prune(model, 0.5, RaisingAt(data, 3), **RUN)
    assert torch.equal(torch.cuda.get_rng_state(device), before)


def test_a_failed_call_puts_back_the_cuda_generators_it_found_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA is in use, its generators' states from before the call are set back on failure.

    (A stand-in for CUDA on machines without it: the states are recorded, not drawn from.)
    """
    state = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored: list[list[Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state.clone()])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    data = loader_of(torch.randn(96, 8), torch.randint(0, 3, (96,)))
    with pytest.raises(RuntimeError, match="loader broke"):
        torchbip.global_prune(make_model("dense"), 0.5, RaisingAt(data, 3), **RUN)
    assert [[s.tolist() for s in states] for states in restored] == [[[1, 2, 3]]]
