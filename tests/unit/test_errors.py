"""Every failure of ``global_prune`` raises a clear error and leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip

# Tiny models: one intra-op thread is faster and makes float reductions reproducible.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_state_helper_sees_every_kind_of_change() -> None:
    """The helper itself must fail on each change it is meant to catch."""
    changes: list[Callable[[nn.Sequential], object]] = [
        lambda m: m[0].weight.data.add_(1e-7),
        lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
        lambda m: m[0].weight.grad.mul_(2),
        lambda m: setattr(m[0].weight, "grad", None),
        lambda m: m[0].bias.requires_grad_(False),
        lambda m: m[1].running_mean.add_(1),
        lambda m: m[1].register_buffer("extra", torch.zeros(1)),
        lambda m: m[1].eval(),
        lambda m: m[3].register_forward_pre_hook(lambda *_: None),
        lambda m: prune.identity(m[3], "weight"),
        lambda m: setattr(m[1], "stale", torch.zeros(1)),
    ]
    for change in changes:
        model = make_model("bn")
        before = capture(model)
        change(model)
        with pytest.raises(AssertionError):
            assert_unchanged(before, model)


# --- models and data -------------------------------------------------------------------------------


def make_model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "bn":
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    if kind == "l1-pruned":
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.l1_unstructured(model[2], "weight", amount=10)
        prune.l1_unstructured(model[2], "weight", amount=0.25)  # a PruningContainer
    # gradients, so that their restoration is checked too
    x, y = make_data()[0]
    F.cross_entropy(model(x), y).backward()
    model.train()
    return model


KINDS = [
    pytest.param("dense", id="dense"),
    pytest.param("l1-pruned", id="l1-pruned"),
    pytest.param("bn", id="bn"),
]


def make_data(n_batches: int = 4, batch: int = 16, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 8, generator=gen)
    y = (x[:, :3]).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


RUN: dict[str, Any] = {"steps": 6, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0}


def raises_and_restores(
    model: nn.Module, exc: type[BaseException], match: str, **kwargs: Any
) -> pytest.ExceptionInfo[BaseException]:
    """Call ``global_prune``, expect ``exc`` matching ``match``, then check the model is intact."""
    kwargs = {"amount": 0.5, "loader": make_data(), **RUN, **kwargs}
    before = capture(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match) as info:
        torchbip.global_prune(model, **kwargs)
    assert_unchanged(before, model)
    if kwargs.get("seed") is not None:
        assert torch.equal(torch.get_rng_state(), rng)
    return info


# --- bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("amount", "exc", "match"),
    [
        pytest.param(-0.1, ValueError, r"amount=-0\.1 is a float outside \[0, 1\]", id="negative-float"),
        pytest.param(-3, ValueError, r"amount=-3 is a negative count", id="negative-int"),
        pytest.param(1.5, ValueError, r"amount=1\.5 is a float outside \[0, 1\]", id="above-1"),
        pytest.param(float("nan"), ValueError, r"amount=nan is NaN", id="nan"),
        pytest.param("0.5", TypeError, r"amount must be an int .* got '0\.5' of type str", id="str"),
        pytest.param(True, TypeError, r"got True of type bool", id="bool"),
        pytest.param(
            10**6,
            ValueError,
            r"amount=1000000 is larger than the number of unpruned entries",
            id="int-too-large",
        ),
    ],
)
def test_bad_amount(kind: str, amount: object, exc: type[Exception], match: str) -> None:
    raises_and_restores(make_model(kind), exc, match, amount=amount)


def test_int_amount_counts_only_unpruned_entries() -> None:
    model = make_model("l1-pruned")
    remaining = sum(
        int(m.weight_mask.sum()) if hasattr(m, "weight_mask") else m.weight.numel()
        for m in model
        if isinstance(m, nn.Linear)
    )
    raises_and_restores(
        model, ValueError, rf"amount={remaining + 1} is larger than .* \({remaining}\)", amount=remaining + 1
    )


def _tied_model() -> nn.Sequential:
    model = make_model("dense")
    model[4] = nn.Linear(16, 16)
    model[4].weight = model[2].weight
    return model


@pytest.mark.parametrize(
    ("build", "parameters", "exc", "match"),
    [
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [(m[0], "weight2")],
            ValueError,
            r"parameters names '0\.weight2', but Linear has no parameter 'weight2'",
            id="missing-tensor",
        ),
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [(m[0], "weight"), (nn.Linear(2, 2), "weight")],
            ValueError,
            r"parameters names a Linear that is not part of the model",
            id="foreign-module",
        ),
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [(m[0], "weight"), (m[2], "weight"), (m[0], "weight")],
            ValueError,
            r"parameters names '0\.weight' more than once",
            id="duplicate",
        ),
        pytest.param(
            _tied_model,
            lambda m: [(m[2], "weight"), (m[4], "weight")],
            ValueError,
            r"parameters names '2\.weight', which is tied to \(the same Parameter as\) '4\.weight'; "
            r"torch's pruning masks one module at a time",
            id="tied",
        ),
        pytest.param(
            _tied_model,
            lambda m: [(m[4], "weight")],
            ValueError,
            r"parameters names '4\.weight', which is tied to \(the same Parameter as\) '2\.weight'",
            id="tied-one-side",
        ),
        pytest.param(
            _tied_model,
            lambda m: None,
            ValueError,
            r"parameters names '2\.weight', which is tied to",
            id="tied-default",
        ),
        pytest.param(
            lambda: make_model("dense").requires_grad_(False),
            lambda m: [(m[2], "weight")],
            ValueError,
            r"parameters names '2\.weight', which is frozen \(requires_grad=False\)",
            id="frozen",
        ),
        pytest.param(
            lambda: make_model("l1-pruned"),
            lambda m: [(m[0], "weight"), (m[1], "weight")],
            ValueError,
            r"parameters names '1\.weight', but ReLU has no parameter 'weight'",
            id="no-parameter-module",
        ),
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [m[0]],
            TypeError,
            r"parameters must hold \(module, name\) pairs",
            id="not-pairs",
        ),
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [],
            ValueError,
            r"nothing to prune: .* has an empty list",
            id="empty-list",
        ),
        pytest.param(
            lambda: nn.Sequential(nn.BatchNorm1d(8), nn.ReLU()),
            lambda m: None,
            ValueError,
            r"nothing to prune: the model Sequential has no nn\.Linear or nn\.Conv\*d weights",
            id="nothing-to-prune",
        ),
    ],
)
def test_bad_parameters(
    build: Callable[[], nn.Module], parameters: Callable[[nn.Module], Any], exc: type[Exception], match: str
) -> None:
    model = build()
    raises_and_restores(model, exc, match, parameters=parameters(model))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        pytest.param({"foo": 1}, TypeError, r"unknown BiP option\(s\) \['foo'\]", id="unknown-option"),
        pytest.param(
            {"lower_lr": -1.0}, ValueError, r"lower_lr must be a finite number > 0", id="bad-option"
        ),
        pytest.param({"mode": "fast"}, ValueError, r"mode must be one of", id="bad-mode"),
        pytest.param(
            {"loss_fn": "ce"}, TypeError, r"loss_fn must be callable, got 'ce'", id="loss-not-callable"
        ),
        pytest.param({"loader": None}, ValueError, r"loader is required", id="no-loader"),
        pytest.param({"loader": []}, ValueError, r"loader is empty: it yielded no batch", id="empty-loader"),
        pytest.param(
            {"loader": 3}, TypeError, r"loader must be an iterable of batches, got 3", id="not-iterable"
        ),
        pytest.param(
            {"loader": iter(make_data()), "steps": None},
            ValueError,
            r"loader has no len\(\); pass steps=",
            id="no-len",
        ),
        pytest.param(
            {"mode": "two_batch", "upper_loader": []},
            ValueError,
            r"upper_loader is empty",
            id="empty-upper",
        ),
        pytest.param(
            {"upper_loader": make_data()},
            ValueError,
            r"upper_loader is used only with mode='two_batch' \(got mode='fused'\)",
            id="upper-in-fused",
        ),
        pytest.param(
            {"min_keep": 100},
            ValueError,
            r"the per-layer floors keep \d+ entries, more than",
            id="floor-too-high",
        ),
        pytest.param(
            {"loader": [torch.zeros(16, 8)]},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs",
            id="not-pairs",
        ),
    ],
)
def test_bad_options_and_loaders(kind: str, kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    raises_and_restores(make_model(kind), exc, match, **kwargs)


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
