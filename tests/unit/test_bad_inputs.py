"""A catalogue of bad inputs to ``global_prune``: each raises an error that names the argument and
its value, and leaves the model exactly as it was (parameters, gradients, buffers, hooks, flags).

Complements ``test_errors.py`` (failures mid-run, atomicity) with the remaining kinds of bad
``amount``, ``parameters``, ``loss_fn``, loader batches and options.
"""

from __future__ import annotations

from collections.abc import Callable
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


# --- state capture ---------------------------------------------------------------------------------


def test_the_helper_sees_changes() -> None:
    changes: list[Callable[[nn.Sequential], object]] = [
        lambda m: m[0].weight.data.add_(1e-7),
        lambda m: setattr(m[0].weight, "grad", None),
        lambda m: m[0].register_forward_hook(lambda *_: None),
        lambda m: m[0].register_forward_pre_hook(lambda *_: None),
        lambda m: m.eval(),
        lambda m: prune.identity(m[2], "weight"),
    ]
    for change in changes:
        model = make_model()
        before = capture(model)
        change(model)
        with pytest.raises(AssertionError):
            assert_unchanged(before, model)


# --- model, data, runner ---------------------------------------------------------------------------

N_WEIGHTS = 8 * 16 + 16 * 3  # the prunable entries of make_model()


def make_model(bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(16))
    model = nn.Sequential(*layers)
    x, y = make_data()[0]
    F.cross_entropy(model(x), y).backward()  # gradients, so that they are checked too
    return model


def make_data(n_batches: int = 3, batch: int = 8) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * batch, 8, generator=gen)
    y = x[:, :3].argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


RUN: dict[str, Any] = {"steps": 3, "progress": False}


def expect_error(model: nn.Module, exc: type[BaseException], match: str, **kwargs: Any) -> None:
    """``global_prune`` raises ``exc`` matching ``match``, and the model is as it was."""
    kwargs = {"amount": 0.5, "loader": make_data(), **RUN, **kwargs}
    before = capture(model)
    with pytest.raises(exc, match=match):
        torchbip.global_prune(model, **kwargs)
    assert_unchanged(before, model)


# --- amount ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "exc", "match"),
    [
        pytest.param(
            N_WEIGHTS + 1,
            ValueError,
            rf"amount={N_WEIGHTS + 1} is larger than the number of unpruned entries \({N_WEIGHTS}\)",
            id="int-one-above-prunable",
        ),
        pytest.param(float("nan"), ValueError, r"amount=nan is NaN", id="nan"),
        pytest.param(float("inf"), ValueError, r"amount=inf is a float outside \[0, 1\]", id="inf"),
        pytest.param("0.5", TypeError, r"amount must be an int .* got '0\.5' of type str", id="str"),
        pytest.param(True, TypeError, r"amount must be an int .* got True of type bool", id="bool-true"),
        pytest.param(False, TypeError, r"amount must be an int .* got False of type bool", id="bool-false"),
        pytest.param(None, TypeError, r"amount must be an int .* got None of type NoneType", id="none"),
        pytest.param(
            torch.tensor(0.5), TypeError, r"amount must be an int .* got tensor\(0\.5000\)", id="tensor"
        ),
    ],
)
def test_bad_amount(amount: object, exc: type[Exception], match: str) -> None:
    expect_error(make_model(), exc, match, amount=amount)


def test_int_amount_equal_to_the_prunable_count_is_valid() -> None:
    """The boundary of the ``int-one-above-prunable`` case: every entry may be pruned."""
    model = make_model()
    report = torchbip.global_prune(model, N_WEIGHTS, make_data(), **RUN)
    assert report.sparsity.zeros == N_WEIGHTS


# --- parameters ------------------------------------------------------------------------------------

PAIRS_HINT = r"pass a list of \(module, name\) pairs"


@pytest.mark.parametrize(
    ("parameters", "exc", "match"),
    [
        pytest.param(
            lambda m: [(m[0], "weight", 1)],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got \(Linear\(.*\), 'weight', 1\)",
            id="triple",
        ),
        pytest.param(
            lambda m: ["weight"],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got 'weight'$",
            id="bare-name",
        ),
        pytest.param(
            lambda m: [("weight", m[0])],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got \('weight', Linear\(",
            id="swapped",
        ),
        pytest.param(
            lambda m: [(m[0], 0)],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got \(Linear\(.*\), 0\)",
            id="name-not-str",
        ),
        pytest.param(
            lambda m: [(m[0], "weight"), None],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got None",
            id="none-entry",
        ),
        pytest.param(
            lambda m: m[0],
            TypeError,
            rf"parameters is a Linear module, not \(module, name\) pairs; {PAIRS_HINT}",
            id="a-module",
        ),
        pytest.param(
            lambda m: (m[0], "weight"),
            TypeError,
            r"parameters is one \(module, name\) pair \(Linear, 'weight'\), not a list of pairs; "
            + PAIRS_HINT,
            id="one-pair-not-in-a-list",
        ),
        pytest.param(
            lambda m: {m[0]: "weight"},
            TypeError,
            r"parameters is a dict, not \(module, name\) pairs; .*parameters=list\(mapping\.items\(\)\)",
            id="dict",
        ),
        pytest.param(
            lambda m: "weight",
            TypeError,
            rf"parameters is the str 'weight', not \(module, name\) pairs; {PAIRS_HINT}",
            id="str",
        ),
        pytest.param(
            lambda m: 3,
            TypeError,
            rf"parameters is 3 of type int, not \(module, name\) pairs; {PAIRS_HINT}",
            id="not-iterable",
        ),
        pytest.param(
            lambda m: [(m[1], "running_mean")],
            ValueError,
            r"parameters names '1\.running_mean', but BatchNorm1d has no parameter 'running_mean'",
            id="a-buffer",
        ),
    ],
)
def test_bad_parameters(parameters: Callable[[nn.Module], Any], exc: type[Exception], match: str) -> None:
    model = make_model(bn=True)
    expect_error(model, exc, match, parameters=parameters(model))


def test_a_generator_of_pairs_is_valid() -> None:
    model = make_model()
    report = torchbip.global_prune(
        model, 0.5, make_data(), parameters=((m, "weight") for m in (model[0], model[2])), **RUN
    )
    assert report.sparsity.zeros == N_WEIGHTS // 2


def test_parameters_on_several_devices() -> None:
    """Simulated with the ``meta`` device: resolve_targets sees each tensor's device."""
    model = make_model()
    model[2].to("meta")
    expect_error(
        model,
        ValueError,
        r"the tensors to prune live on several devices \['cpu', 'meta'\]; move the model to one device",
    )


def test_parameters_on_the_meta_device() -> None:
    model = make_model()
    model.to("meta")
    expect_error(
        model,
        ValueError,
        r"parameters names '0\.weight', which is on the meta device \(shapes without values\); "
        r"materialise the model first",
    )


# --- loss_fn ---------------------------------------------------------------------------------------

LOSS_FAILED = (
    r"the model or loss_fn failed on a batch from loader at step 0 \(inputs Tensor\[8, 8\] float32, "
)


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        pytest.param(
            lambda out: out.sum(),
            LOSS_FAILED + r".*TypeError: .*takes 1 positional argument but 2 were given",
            id="one-argument",
        ),
        pytest.param(
            lambda out, y, weight: F.cross_entropy(out, y, weight),
            LOSS_FAILED + r".*TypeError: .*missing 1 required positional argument: 'weight'",
            id="three-arguments",
        ),
        pytest.param(
            lambda out, y: 1.0,
            LOSS_FAILED + r".*ValueError: loss_fn must return a scalar tensor, got float",
            id="returns-float",
        ),
        pytest.param(
            lambda out, y: (F.cross_entropy(out, y), out),
            LOSS_FAILED + r".*ValueError: loss_fn must return a scalar tensor, got tuple",
            id="returns-tuple",
        ),
    ],
)
def test_bad_loss_fn(loss_fn: Callable[..., Any], match: str) -> None:
    expect_error(make_model(), ValueError, match, loss_fn=loss_fn)


def test_integer_loss_is_rejected() -> None:
    expect_error(make_model(), ValueError, r"loss_fn", loss_fn=lambda out, y: (out.argmax(1) == y).sum())


# --- loader batches --------------------------------------------------------------------------------


def _mixed(bad: Any) -> list[Any]:
    """Two good batches, then ``bad``: the error comes mid-run, after the model was changed."""
    return [*make_data()[:2], bad]


X, Y = make_data()[0]


@pytest.mark.parametrize(
    ("loader", "match"),
    [
        pytest.param(
            [{"x": X, "y": Y}],
            r"loader must yield \(inputs, targets\) pairs, got dict\(x=Tensor\[8, 8\] float32, "
            r"y=Tensor\[8\] int64\)",
            id="dicts",
        ),
        pytest.param(
            [(X, Y, Y)],
            r"loader must yield \(inputs, targets\) pairs, got tuple\(Tensor\[8, 8\] float32, "
            r"Tensor\[8\] int64, Tensor\[8\] int64\)",
            id="3-tuples",
        ),
        pytest.param(
            [(X,)],
            r"loader must yield \(inputs, targets\) pairs, got tuple\(Tensor\[8, 8\] float32\)$",
            id="1-tuples",
        ),
        pytest.param([None], r"loader must yield \(inputs, targets\) pairs, got NoneType", id="none"),
        pytest.param(
            _mixed({"x": X, "y": Y}),
            r"loader must yield \(inputs, targets\) pairs, got dict",
            id="dict-mid-run",
        ),
        pytest.param(
            _mixed((X, Y, Y)),
            r"loader must yield \(inputs, targets\) pairs, got tuple\(.*, .*, .*\)",
            id="3-tuple-mid-run",
        ),
    ],
)
def test_bad_batches(loader: list[Any], match: str) -> None:
    expect_error(make_model(bn=True), ValueError, match, loader=loader, steps=4)


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"steps": "10"}, r"steps must be an int >= 1 or None, got '10'", id="steps-str"),
        pytest.param({"steps": 10.0}, r"steps must be an int >= 1 or None, got 10\.0", id="steps-float"),
        pytest.param({"steps": True}, r"steps must be an int >= 1 or None, got True", id="steps-bool"),
        pytest.param({"steps": 0}, r"steps must be an int >= 1 or None, got 0", id="steps-zero"),
        pytest.param(
            {"lower_lr": float("nan")}, r"lower_lr must be a finite number > 0, got nan", id="lower_lr-nan"
        ),
        pytest.param(
            {"lower_lr": "0.1"}, r"lower_lr must be a finite number > 0, got '0\.1'", id="lower_lr-str"
        ),
        pytest.param(
            {"upper_lr": None}, r"upper_lr must be a finite number > 0, got None", id="upper_lr-none"
        ),
        pytest.param({"gamma": float("inf")}, r"gamma must be a finite number > 0, got inf", id="gamma-inf"),
        pytest.param(
            {"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1\.0", id="momentum-one"
        ),
        pytest.param(
            {"implicit_coef": "1"},
            r"implicit_coef must be a finite number >= 0 or None, got '1'",
            id="implicit_coef-str",
        ),
        pytest.param({"epochs": "1"}, r"epochs must be a finite number > 0, got '1'", id="epochs-str"),
        pytest.param({"seed": 1.5}, r"seed must be an int or None, got 1\.5", id="seed-float"),
        pytest.param(
            {"mode": None}, r"mode must be one of \('fused', 'two_batch'\), got None", id="mode-none"
        ),
        pytest.param(
            {"score_init": "random"}, r"score_init must be one of .* got 'random'", id="score_init-unknown"
        ),
        pytest.param({"log_every": 0}, r"log_every must be an int >= 1, got 0", id="log_every-zero"),
        pytest.param(
            {"min_keep": float("nan")},
            r"min_keep as a float must lie in \[0, 1\], got nan",
            id="min_keep-nan",
        ),
        pytest.param(
            {"checkpoint_every": 1.5},
            r"checkpoint_every must be an int >= 0, got 1\.5",
            id="checkpoint_every-float",
        ),
        pytest.param(
            {"checkpoint_path": 3}, r"checkpoint_path must be a str or None, got 3", id="checkpoint_path-int"
        ),
        pytest.param({"resume": 1}, r"resume must be a bool, got 1", id="resume-int"),
        pytest.param(
            {"amp": "fp8"}, r"amp must be None, 'bfloat16' or 'float16', got 'fp8'", id="amp-unknown"
        ),
    ],
)
def test_option_of_the_wrong_type_or_value(options: dict[str, Any], match: str) -> None:
    expect_error(make_model(), ValueError, match, **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"stpes": 3}, r"unknown BiP option\(s\) \['stpes'\]; valid options: \[", id="typo"),
        pytest.param({"lr": 0.1}, r"unknown BiP option\(s\) \['lr'\]", id="lr"),
        pytest.param({"lr": 0.1, "epoch": 1}, r"unknown BiP option\(s\) \['epoch', 'lr'\]", id="two"),
    ],
)
def test_unknown_option(options: dict[str, Any], match: str) -> None:
    expect_error(make_model(), TypeError, match, **options)


def test_progress_must_be_a_bool() -> None:
    expect_error(make_model(), ValueError, r"progress must be a bool, got 'no'", progress="no")


def test_config_must_be_a_bipconfig() -> None:
    expect_error(make_model(), TypeError, r"config must be a BiPConfig", config={"steps": 3})


@pytest.mark.parametrize(
    "device", [pytest.param("cuda:7", id="missing-gpu"), pytest.param("tpu", id="unknown")]
)
def test_unavailable_device_restores_the_model(device: str) -> None:
    """The error names ``device=`` and the value; the model is restored."""
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    expect_error(make_model(), ValueError, rf"device='{device}'", device=device)


@pytest.mark.parametrize("group", [pytest.param("x", id="str"), pytest.param(0, id="int")])
def test_process_group_must_be_a_group(group: Any) -> None:
    expect_error(
        make_model(),
        TypeError,
        rf"process_group must be a .*ProcessGroup.*got {group!r}",
        process_group=group,
    )
