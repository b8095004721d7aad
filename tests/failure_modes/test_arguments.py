"""Bad arguments are refused up front, with an error that names the argument and its value, and the
model is left exactly as it was (parameters, gradients, buffers, hooks, flags).

One section per argument of ``global_prune``, each with one table of bad values, checked through
:func:`failure_cases.raises_and_restores` on each of :data:`MODELS` (the ``parameters`` table builds
its own model per row). The bad amounts are also checked on the mask functions that take an amount,
and the last section holds the mask functions' other arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from failure_cases import KINDS, RUN, make_data, make_model, raises_and_restores
from model_state import assert_unchanged, capture
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as legacy_spectral_norm
from torch.nn.utils import weight_norm as legacy_weight_norm

import torchbip
from torchbip.masks import GlobalTopK, count_from_amount, floor_counts, topk_mask, validate_amount
from torchbip.semistructured import bip_semi_structured

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [pytest.param("two-layer", id="two-layer"), *KINDS]

N_WEIGHTS = 8 * 16 + 16 * 3  # the prunable entries of make_model("two-layer")


def unpruned(model: nn.Module) -> int:
    """The entries of the model's Linear weights that no earlier pruning has zeroed."""
    return sum(
        int(m.weight_mask.sum()) if hasattr(m, "weight_mask") else m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


# --- amount ----------------------------------------------------------------------------------------

BAD_AMOUNTS = [
    pytest.param(-0.1, ValueError, r"amount=-0\.1 is a float outside \[0, 1\]", id="negative-float"),
    pytest.param(-1, ValueError, r"amount=-1 is a negative count", id="minus-one"),
    pytest.param(-2, ValueError, r"amount=-2 is a negative count", id="minus-two"),
    pytest.param(-3, ValueError, r"amount=-3 is a negative count", id="minus-three"),
    pytest.param(1.5, ValueError, r"amount=1\.5 is a float outside \[0, 1\]", id="above-1"),
    pytest.param(float("inf"), ValueError, r"amount=inf is a float outside \[0, 1\]", id="inf"),
    pytest.param(float("nan"), ValueError, r"amount=nan is NaN", id="nan"),
    pytest.param("0.5", TypeError, r"amount must be an int .* got '0\.5' of type str", id="str"),
    pytest.param(True, TypeError, r"amount must be an int .* got True of type bool", id="bool-true"),
    pytest.param(False, TypeError, r"amount must be an int .* got False of type bool", id="bool-false"),
    pytest.param(None, TypeError, r"amount must be an int .* got None of type NoneType", id="none"),
    pytest.param(
        torch.tensor(0.5),
        TypeError,
        r"amount must be an int .* got tensor\(0\.5000\) of type Tensor",
        id="tensor",
    ),
]

# An int amount above the number of unpruned entries ``n``.
TOO_LARGE = [
    pytest.param(lambda n: n + 1, id="one-above"),
    pytest.param(lambda n: 10**6, id="a-million"),
]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(("amount", "exc", "match"), BAD_AMOUNTS)
def test_global_prune_refuses_bad_amount(kind: str, amount: object, exc: type[Exception], match: str) -> None:
    raises_and_restores(make_model(kind), exc, match, amount=amount)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(validate_amount, id="validate_amount"),
        pytest.param(lambda amount: count_from_amount(amount, 4), id="count_from_amount"),
    ],
)
@pytest.mark.parametrize(("amount", "exc", "match"), BAD_AMOUNTS)
def test_mask_functions_refuse_bad_amount(
    call: Callable[[object], object], amount: object, exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        call(amount)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("too_large", TOO_LARGE)
def test_global_prune_refuses_an_int_amount_above_the_unpruned_entries(
    kind: str, too_large: Callable[[int], int]
) -> None:
    """An int counts only the entries that earlier pruning left (``l1-pruned``)."""
    model = make_model(kind)
    n = unpruned(model)
    amount = too_large(n)
    match = rf"amount={amount} is larger than the number of unpruned entries \({n}\)"
    raises_and_restores(model, ValueError, match, amount=amount)


@pytest.mark.parametrize("too_large", TOO_LARGE)
def test_count_from_amount_refuses_an_int_amount_above_the_remaining_entries(
    too_large: Callable[[int], int],
) -> None:
    amount = too_large(4)
    with pytest.raises(
        ValueError, match=rf"amount={amount} is larger than the number of unpruned entries \(4\)"
    ):
        count_from_amount(amount, 4)


def test_int_amount_equal_to_the_prunable_count_is_valid() -> None:
    """The boundary of the ``one-above`` case: every entry may be pruned."""
    model = make_model("two-layer")
    report = torchbip.global_prune(model, N_WEIGHTS, make_data(), **RUN)
    assert report.sparsity.zeros == N_WEIGHTS


def test_validate_amount_uses_given_name() -> None:
    with pytest.raises(ValueError, match=r"^sparsity=2\.0 is a float"):
        validate_amount(2.0, name="sparsity")


# --- parameters ------------------------------------------------------------------------------------

PAIRS_HINT = r"pass a list of \(module, name\) pairs"


def _tied_model() -> nn.Sequential:
    model = make_model("dense")
    model[4] = nn.Linear(16, 16)
    model[4].weight = model[2].weight
    return model


def _parametrized(wrap: Callable[[nn.Module], nn.Module], *which: int) -> Callable[[], nn.Sequential]:
    """``make_model("two-layer")`` with layers ``which`` wrapped (weight_norm, spectral_norm, ...)."""

    def build() -> nn.Sequential:
        model = make_model("two-layer")
        for i in which:
            model[i] = wrap(model[i])
        return model

    return build


def _on_two_devices() -> nn.Sequential:
    """Simulated with the ``meta`` device: resolve_targets sees each tensor's device."""
    model = make_model("two-layer")
    model[2].to("meta")
    return model


@pytest.mark.parametrize(
    ("build", "parameters", "exc", "match"),
    [
        pytest.param(
            lambda: make_model("bn"),
            lambda m: [(m[0], "weight", 1)],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got \(Linear\(.*\), 'weight', 1\)",
            id="triple",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: ["weight"],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got 'weight'$",
            id="bare-name",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: [("weight", m[0])],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got \('weight', Linear\(",
            id="swapped",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: [(m[0], 0)],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got \(Linear\(.*\), 0\)",
            id="name-not-str",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: [(m[0], "weight"), None],
            TypeError,
            r"parameters must hold \(module, name\) pairs, got None",
            id="none-entry",
        ),
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [m[0]],
            TypeError,
            r"parameters must hold \(module, name\) pairs",
            id="not-pairs",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: m[0],
            TypeError,
            rf"parameters is a Linear module, not \(module, name\) pairs; {PAIRS_HINT}",
            id="a-module",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: (m[0], "weight"),
            TypeError,
            r"parameters is one \(module, name\) pair \(Linear, 'weight'\), not a list of pairs; "
            + PAIRS_HINT,
            id="one-pair-not-in-a-list",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: {m[0]: "weight"},
            TypeError,
            r"parameters is a dict, not \(module, name\) pairs; .*parameters=list\(mapping\.items\(\)\)",
            id="dict",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: "weight",
            TypeError,
            rf"parameters is the str 'weight', not \(module, name\) pairs; {PAIRS_HINT}",
            id="str",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: 3,
            TypeError,
            rf"parameters is 3 of type int, not \(module, name\) pairs; {PAIRS_HINT}",
            id="not-iterable",
        ),
        pytest.param(
            lambda: make_model("bn"),
            lambda m: [(m[1], "running_mean")],
            ValueError,
            r"parameters names '1\.running_mean', but BatchNorm1d has no parameter 'running_mean'",
            id="a-buffer",
        ),
        pytest.param(
            lambda: make_model("dense"),
            lambda m: [(m[0], "weight2")],
            ValueError,
            r"parameters names '0\.weight2', but Linear has no parameter 'weight2'",
            id="missing-tensor",
        ),
        pytest.param(
            lambda: make_model("l1-pruned"),
            lambda m: [(m[0], "weight"), (m[1], "weight")],
            ValueError,
            r"parameters names '1\.weight', but ReLU has no parameter 'weight'",
            id="no-parameter-module",
        ),
        pytest.param(
            _parametrized(parametrizations.weight_norm, 2),
            lambda m: [(m[0], "weight"), (m[2], "weight")],
            ValueError,
            r"parameters names '2\.weight', a parametrized tensor \(_WeightNorm, through "
            r"torch\.nn\.utils\.parametrize\), computed from module\.parametrizations\.weight each time "
            r"it is read; remove the parametrization first .*remove_parametrizations\(module, 'weight'\)",
            id="parametrized",
        ),
        pytest.param(
            _parametrized(parametrizations.spectral_norm, 0),
            lambda m: [(m[0], "weight")],
            ValueError,
            r"parameters names '0\.weight', a parametrized tensor \(_SpectralNorm,",
            id="spectral-norm",
        ),
        pytest.param(
            _parametrized(legacy_weight_norm, 0),
            lambda m: [(m[0], "weight")],
            ValueError,
            r"parameters names '0\.weight', computed from weight_g and weight_v before every forward by "
            r"torch\.nn\.utils\.weight_norm; remove it first",
            id="legacy-weight-norm",
            marks=pytest.mark.filterwarnings(
                "ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning"
            ),
        ),
        pytest.param(
            _parametrized(legacy_spectral_norm, 2),
            lambda m: [(m[2], "weight")],
            ValueError,
            r"parameters names '2\.weight', computed from weight_orig before every forward by "
            r"torch\.nn\.utils\.spectral_norm",
            id="legacy-spectral-norm",
        ),
        pytest.param(
            _parametrized(parametrizations.weight_norm, 0, 2),
            lambda m: None,
            ValueError,
            r"nothing to prune: the model Sequential has only computed nn\.Linear/nn\.Conv\*d weights "
            r"\('0\.weight', '2\.weight': .*which cannot be pruned and are left out; remove their "
            r"parametrizations first, or pass parameters=",
            id="all-parametrized-default",
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
            _on_two_devices,
            lambda m: None,
            ValueError,
            r"the tensors to prune live on several devices \['cpu', 'meta'\]; move the model to one device",
            id="several-devices",
        ),
        pytest.param(
            lambda: make_model("two-layer").to("meta"),
            lambda m: None,
            ValueError,
            r"parameters names '0\.weight', which is on the meta device \(shapes without values\); "
            r"materialise the model first",
            id="meta-device",
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


def test_a_generator_of_pairs_is_valid() -> None:
    model = make_model("two-layer")
    report = torchbip.global_prune(
        model, 0.5, make_data(), parameters=((m, "weight") for m in (model[0], model[2])), **RUN
    )
    assert report.sparsity.zeros == N_WEIGHTS // 2


# --- loader and upper_loader -----------------------------------------------------------------------

X, Y = make_data()[0]


def _mixed(bad: Any) -> list[Any]:
    """Two good batches, then ``bad``: the error comes mid-run, after the model was changed."""
    return [*make_data()[:2], bad]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        pytest.param({"loader": None}, ValueError, r"loader is required", id="no-loader"),
        pytest.param({"loader": []}, ValueError, r"loader is empty: it yielded no batch", id="empty-loader"),
        pytest.param(
            {"loader": 3}, TypeError, r"loader must be an iterable of batches, got 3", id="not-iterable"
        ),
        pytest.param(
            {"loader": 2.5, "steps": None},
            TypeError,
            r"loader must be an iterable of batches, got 2.5",
            id="not-iterable-no-steps",
        ),
        pytest.param(
            {"loader": iter(make_data()), "steps": None},
            ValueError,
            r"loader has no len\(\); pass steps=",
            id="no-len",
        ),
        pytest.param(
            {"loader": [torch.zeros(16, 8)]},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs",
            id="not-pairs",
        ),
        pytest.param(
            {"loader": [{"x": X, "y": Y}], "steps": 4},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got dict\(x=Tensor\[16, 8\] float32, "
            r"y=Tensor\[16\] int64\)",
            id="dicts",
        ),
        pytest.param(
            {"loader": [(X, Y, Y)], "steps": 4},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got tuple\(Tensor\[16, 8\] float32, "
            r"Tensor\[16\] int64, Tensor\[16\] int64\)",
            id="3-tuples",
        ),
        pytest.param(
            {"loader": [(X,)], "steps": 4},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got tuple\(Tensor\[16, 8\] float32\)$",
            id="1-tuples",
        ),
        pytest.param(
            {"loader": [None], "steps": 4},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got NoneType",
            id="none",
        ),
        pytest.param(
            {"loader": _mixed({"x": X, "y": Y}), "steps": 4},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got dict",
            id="dict-mid-run",
        ),
        pytest.param(
            {"loader": _mixed((X, Y, Y)), "steps": 4},
            ValueError,
            r"loader must yield \(inputs, targets\) pairs, got tuple\(.*, .*, .*\)",
            id="3-tuple-mid-run",
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
    ],
)
def test_bad_loader(kind: str, kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    raises_and_restores(make_model(kind), exc, match, **kwargs)


# --- loss_fn ---------------------------------------------------------------------------------------

LOSS_FAILED = (
    r"the model or loss_fn failed on a batch from loader at step 0 \(inputs Tensor\[16, 8\] float32, "
)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    ("loss_fn", "exc", "match"),
    [
        pytest.param("ce", TypeError, r"loss_fn must be callable, got 'ce'", id="not-callable"),
        pytest.param(
            lambda out: out.sum(),
            ValueError,
            LOSS_FAILED + r".*TypeError: .*takes 1 positional argument but 2 were given",
            id="one-argument",
        ),
        pytest.param(
            lambda out, y, weight: F.cross_entropy(out, y, weight),
            ValueError,
            LOSS_FAILED + r".*TypeError: .*missing 1 required positional argument: 'weight'",
            id="three-arguments",
        ),
        pytest.param(
            lambda out, y: 1.0,
            ValueError,
            LOSS_FAILED + r".*ValueError: loss_fn must return a scalar tensor, got float",
            id="returns-float",
        ),
        pytest.param(
            lambda out, y: (F.cross_entropy(out, y), out),
            ValueError,
            LOSS_FAILED + r".*ValueError: loss_fn must return a scalar tensor, got tuple",
            id="returns-tuple",
        ),
        pytest.param(
            lambda out, y: (out.argmax(1) == y).sum(), ValueError, r"loss_fn", id="returns-an-integer"
        ),
    ],
)
def test_bad_loss_fn(kind: str, loss_fn: Any, exc: type[Exception], match: str) -> None:
    raises_and_restores(make_model(kind), exc, match, loss_fn=loss_fn)


# --- config and options ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    ("options", "exc", "match"),
    [
        pytest.param({"config": {"steps": 3}}, TypeError, r"config must be a BiPConfig", id="config-dict"),
        pytest.param(
            {"stpes": 3}, TypeError, r"unknown BiP option\(s\) \['stpes'\]; valid options: \[", id="typo"
        ),
        pytest.param({"lr": 0.1}, TypeError, r"unknown BiP option\(s\) \['lr'\]", id="lr"),
        pytest.param(
            {"lr": 0.1, "epoch": 1}, TypeError, r"unknown BiP option\(s\) \['epoch', 'lr'\]", id="two"
        ),
        pytest.param({"foo": 1}, TypeError, r"unknown BiP option\(s\) \['foo'\]", id="unknown-option"),
        pytest.param(
            {"steps": "10"}, ValueError, r"steps must be an int >= 1 or None, got '10'", id="steps-str"
        ),
        pytest.param(
            {"steps": 10.0}, ValueError, r"steps must be an int >= 1 or None, got 10\.0", id="steps-float"
        ),
        pytest.param(
            {"steps": True}, ValueError, r"steps must be an int >= 1 or None, got True", id="steps-bool"
        ),
        pytest.param({"steps": 0}, ValueError, r"steps must be an int >= 1 or None, got 0", id="steps-zero"),
        pytest.param(
            {"lower_lr": float("nan")},
            ValueError,
            r"lower_lr must be a finite number > 0, got nan",
            id="lower_lr-nan",
        ),
        pytest.param(
            {"lower_lr": "0.1"},
            ValueError,
            r"lower_lr must be a finite number > 0, got '0\.1'",
            id="lower_lr-str",
        ),
        pytest.param(
            {"lower_lr": -1.0}, ValueError, r"lower_lr must be a finite number > 0", id="lower_lr-negative"
        ),
        pytest.param(
            {"upper_lr": None},
            ValueError,
            r"upper_lr must be a finite number > 0, got None",
            id="upper_lr-none",
        ),
        pytest.param(
            {"gamma": float("inf")}, ValueError, r"gamma must be a finite number > 0, got inf", id="gamma-inf"
        ),
        pytest.param(
            {"momentum": 1.0},
            ValueError,
            r"momentum must be a number in \[0, 1\), got 1\.0",
            id="momentum-one",
        ),
        pytest.param(
            {"implicit_coef": "1"},
            ValueError,
            r"implicit_coef must be a finite number >= 0 or None, got '1'",
            id="implicit_coef-str",
        ),
        pytest.param(
            {"epochs": "1"}, ValueError, r"epochs must be a finite number > 0, got '1'", id="epochs-str"
        ),
        pytest.param(
            {"seed": 1.5},
            ValueError,
            r"seed must be an int in \[-2\*\*63, 2\*\*64 - 1\] \(the range torch\.manual_seed takes\) "
            r"or None, got 1\.5",
            id="seed-float",
        ),
        pytest.param(
            {"mode": None},
            ValueError,
            r"mode must be one of \('fused', 'two_batch'\), got None",
            id="mode-none",
        ),
        pytest.param({"mode": "fast"}, ValueError, r"mode must be one of", id="mode-unknown"),
        pytest.param(
            {"score_init": "random"},
            ValueError,
            r"score_init must be one of .* got 'random'",
            id="score_init-unknown",
        ),
        pytest.param(
            {"log_every": 0}, ValueError, r"log_every must be an int >= 1, got 0", id="log_every-zero"
        ),
        pytest.param(
            {"min_keep": float("nan")},
            ValueError,
            r"min_keep as a float must lie in \[0, 1\], got nan",
            id="min_keep-nan",
        ),
        pytest.param(
            {"min_keep": 100},
            ValueError,
            r"min_keep=100 keeps at least \d+ entries \(its floor in each of the \d+ tensors\), "
            r"more than the \d+ that amount=0\.5 leaves",
            id="min_keep-floor-too-high",
        ),
        pytest.param(
            {"checkpoint_every": 1.5},
            ValueError,
            r"checkpoint_every must be an int >= 0, got 1\.5",
            id="checkpoint_every-float",
        ),
        pytest.param(
            {"checkpoint_path": 3},
            ValueError,
            r"checkpoint_path must be a str or None, got 3",
            id="checkpoint_path-int",
        ),
        pytest.param({"resume": 1}, ValueError, r"resume must be a bool, got 1", id="resume-int"),
        pytest.param(
            {"amp": "fp8"},
            ValueError,
            r"amp must be None, 'bfloat16' or 'float16', got 'fp8'",
            id="amp-unknown",
        ),
        pytest.param({"progress": "no"}, ValueError, r"progress must be a bool, got 'no'", id="progress-str"),
    ],
)
def test_bad_config_or_option(kind: str, options: dict[str, Any], exc: type[Exception], match: str) -> None:
    raises_and_restores(make_model(kind), exc, match, **options)


# --- device ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cuda:7", id="missing-gpu"),
        pytest.param("cuda:1000", id="index-torch-wraps"),  # (torch.device keeps 8 bits: index -24)
        pytest.param("tpu", id="unknown"),
    ],
)
def test_unavailable_device(kind: str, device: str) -> None:
    """The error names ``device=`` and the value; the model is restored."""
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    raises_and_restores(make_model(kind), ValueError, rf"device='{device}'", device=device)


# --- process_group ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("group", [pytest.param("x", id="str"), pytest.param(0, id="int")])
def test_process_group_must_be_a_group(kind: str, group: Any) -> None:
    raises_and_restores(
        make_model(kind),
        TypeError,
        rf"process_group must be a .*ProcessGroup.*got {group!r}",
        process_group=group,
    )


# --- mask functions: min_keep, n_keep, allowed, floors, scores -------------------------------------


def _bools(values: list[bool]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        # min_keep
        pytest.param(
            lambda: floor_counts([4, 4], -1),
            ValueError,
            r"min_keep=-1 is a negative count",
            id="floor_counts-min_keep-negative",
        ),
        pytest.param(
            lambda: floor_counts([4, 4], 1.5),
            ValueError,
            r"min_keep=1\.5 is a float outside \[0, 1\]",
            id="floor_counts-min_keep-above-one",
        ),
        pytest.param(
            lambda: floor_counts([4, 4], float("nan")),
            ValueError,
            r"min_keep=nan is a float outside \[0, 1\]",
            id="floor_counts-min_keep-nan",
        ),
        pytest.param(
            lambda: floor_counts([4, 4], True),
            TypeError,
            r"min_keep must be .* got True of type bool",
            id="floor_counts-min_keep-bool",
        ),
        pytest.param(
            lambda: floor_counts([4, 4], "2"),  # type: ignore[arg-type]
            TypeError,
            r"min_keep must be .* got '2' of type str",
            id="floor_counts-min_keep-str",
        ),
        # n_keep
        pytest.param(
            lambda: topk_mask(torch.arange(4.0), 5),
            ValueError,
            r"n_keep=5 must lie in \[0, 4\]",
            id="topk_mask-n_keep-too-many",
        ),
        pytest.param(
            lambda: topk_mask(torch.arange(4.0), -1),
            ValueError,
            r"n_keep=-1 must lie in \[0, 4\]",
            id="topk_mask-n_keep-negative",
        ),
        pytest.param(
            lambda: topk_mask(torch.arange(4.0), 3, _bools([True, False, True, False])),
            ValueError,
            r"n_keep=3 must lie in \[0, 2\]",
            id="topk_mask-n_keep-more-than-allowed",
        ),
        pytest.param(
            lambda: GlobalTopK(4)([torch.ones(3)]),
            ValueError,
            r"n_keep=4 .* \(3\)|n_keep=4 must lie in \[0, 3\]",
            id="GlobalTopK-n_keep-above-total",
        ),
        pytest.param(  # asking for more entries than ``allowed`` leaves is an error, never a revival
            lambda: GlobalTopK(3)([torch.tensor([1.0, 2.0, 3.0])], [_bools([True, False, True])]),
            ValueError,
            r"n_keep=3 is larger than the number of allowed entries \(2\)",
            id="GlobalTopK-n_keep-above-allowed",
        ),
        # allowed
        pytest.param(
            lambda: topk_mask(torch.ones(2, 2), 1, torch.ones(4, dtype=torch.bool)),
            ValueError,
            r"allowed has shape \(4,\), scores \(2, 2\)",
            id="topk_mask-allowed-shape",
        ),
        pytest.param(
            lambda: GlobalTopK(1)(scores=[torch.ones(2)], allowed=[None, None]),
            ValueError,
            r"allowed has 2 entries but scores has 1",
            id="GlobalTopK-allowed-length",
        ),
        pytest.param(
            lambda: GlobalTopK(1)(scores=[torch.ones(2)], allowed=[torch.ones(3, dtype=torch.bool)]),
            ValueError,
            r"allowed\[0\] has shape \(3,\), scores\[0\] \(2,\)",
            id="GlobalTopK-allowed-shape",
        ),
        # floors
        pytest.param(
            lambda: GlobalTopK(2, floors=[1, 2]),
            ValueError,
            r"floors keep 3 entries, more than the 2",
            id="GlobalTopK-floors-above-n_keep",
        ),
        pytest.param(
            lambda: GlobalTopK(2, floors=[2, 0])(
                [torch.tensor([1.0, 2.0, 3.0]), torch.ones(2)], [_bools([True, False, False]), None]
            ),
            ValueError,
            r"floors\[0\]=2 is larger than the number of allowed entries",
            id="GlobalTopK-floor-above-allowed",
        ),
        pytest.param(
            lambda: GlobalTopK(1, floors=[1])([torch.ones(2), torch.ones(2)]),
            ValueError,
            r"floors has 1 entries but scores has 2",
            id="GlobalTopK-floors-length",
        ),
        # scores
        pytest.param(
            lambda: GlobalTopK(1)(scores=[]),
            ValueError,
            r"scores is empty",
            id="GlobalTopK-scores-empty",
        ),
    ],
)
def test_mask_functions_refuse_bad_arguments(
    call: Callable[[], object], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        call()


# --- settings checked up front that used to fail late or be ignored --------------------------------


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    ("options", "exc", "match"),
    [
        pytest.param(
            {"seed": 2**70},
            ValueError,
            r"seed must be an int in \[-2\*\*63, 2\*\*64 - 1\] .*got 1180591620717411303424",
            id="seed-2**70",
        ),
        pytest.param(
            {"seed": -(2**63) - 1}, ValueError, r"seed must be an int in \[-2\*\*63", id="seed-below"
        ),
        pytest.param(
            {"checkpoint_path": ""}, ValueError, r"checkpoint_path='' is empty", id="checkpoint_path-empty"
        ),
        pytest.param(
            {"checkpoint_path": "  "},
            ValueError,
            r"checkpoint_path='  ' is empty",
            id="checkpoint_path-blank",
        ),
        pytest.param(
            {"checkpoint_every": 2},
            ValueError,
            r"checkpoint_every=2 needs checkpoint_path .* no checkpoint would be written",
            id="checkpoint_every-without-path",
        ),
        pytest.param(
            {"device": "mps"}, ValueError, r"device='mps' is not available here \(0 mps devices\)", id="mps"
        ),
        pytest.param({"device": "xpu:1"}, ValueError, r"device='xpu:1' is not available here", id="xpu"),
        pytest.param({"device": "meta"}, ValueError, r"device='meta' is not supported", id="meta"),
        pytest.param(
            {"structured": "2:4", "budget": "global"},
            ValueError,
            r"budget='global' does not apply to structured='2:4'",
            id="n:m-budget",
        ),
        pytest.param(
            {"structured": "2:4", "min_keep": 1},
            ValueError,
            r"min_keep=1 does not apply to structured='2:4'",
            id="n:m-min_keep",
        ),
        pytest.param(
            {"structured": "filter", "min_keep": 0.1},
            ValueError,
            r"min_keep=0\.1 applies to budget='global' .* budget='layer' prunes the same fraction",
            id="layer-budget-min_keep",
        ),
        pytest.param(
            {"budget": "per-layer"},
            ValueError,
            r"budget must be one of .* got 'per-layer'",
            id="budget-unknown",
        ),
    ],
)
def test_settings_refused_before_any_work(
    kind: str, options: dict[str, Any], exc: type[Exception], match: str
) -> None:
    if options.get("device") == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    raises_and_restores(make_model(kind), exc, match, **options)


@pytest.mark.parametrize(
    ("min_keep", "amount"),
    [
        pytest.param(20, 0.95, id="count"),
        pytest.param(0.5, 0.9, id="fraction"),
        pytest.param(100, 150, id="int-amount"),
    ],
)
def test_an_infeasible_min_keep_names_min_keep_and_amount(min_keep: int | float, amount: int | float) -> None:
    raises_and_restores(
        make_model("two-layer"),
        ValueError,
        rf"min_keep={min_keep!r} keeps at least \d+ entries .* "
        rf"more than the \d+ that amount={amount!r} leaves",
        amount=amount,
        min_keep=min_keep,
    )


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got \[1, 2\] of type list"):
        torchbip.global_prune([1, 2], 0.5, make_data(), **RUN)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"lower_lr": np.float32(0.05), "upper_lr": np.float64(1.0)}, id="numpy-float-lr"),
        pytest.param({"steps": np.int64(3)}, id="numpy-int-steps"),
        pytest.param({"epochs": np.float32(0.5), "steps": None}, id="numpy-epochs"),
        pytest.param({"momentum": np.float16(0.5), "gamma": np.float64(1e-4)}, id="numpy-momentum-gamma"),
        pytest.param({"seed": np.uint64(2**63), "log_every": np.int8(2)}, id="numpy-seed"),
        pytest.param({"min_keep": np.int32(2), "checkpoint_every": np.int16(0)}, id="numpy-min_keep"),
    ],
)
def test_numpy_scalars_are_accepted_like_python_numbers(options: dict[str, Any]) -> None:
    """As torch's optimisers and ``amount`` accept them; the report holds plain Python numbers."""
    model = make_model("two-layer")
    report = torchbip.global_prune(model, np.float64(0.5), make_data(), **{**RUN, **options})
    assert report.global_sparsity == 0.5
    for name, value in options.items():
        got = report.config[name]
        if value is None:
            assert got is None
            continue
        assert type(got) in (int, float)
        assert got == pytest.approx(float(value), rel=1e-6)
    json.dumps(report.config)  # JSON-serialisable


def test_numpy_bool_is_not_a_count() -> None:
    raises_and_restores(
        make_model("two-layer"),
        ValueError,
        r"steps must be an int >= 1 or None, got np\.True_",
        steps=np.bool_(True),
    )


@pytest.mark.parametrize(
    "prune_fn",
    [
        pytest.param(
            lambda m, s: torchbip.bip_unstructured(m, "weight", 0.5, importance_scores=s), id="unstructured"
        ),
        pytest.param(
            lambda m, s: torchbip.bip_structured(m, "weight", 0.5, importance_scores=s), id="structured"
        ),
        pytest.param(
            lambda m, s: bip_semi_structured(m, "weight", importance_scores=s), id="semi-structured"
        ),
    ],
)
@pytest.mark.parametrize(
    "scores",
    [
        pytest.param([[0.5] * 8] * 4, id="list"),
        pytest.param(np.ones((4, 8)), id="ndarray"),
        pytest.param(3.0, id="float"),
    ],
)
def test_importance_scores_must_be_a_tensor(prune_fn: Callable[[nn.Module, Any], Any], scores: Any) -> None:
    layer = nn.Linear(8, 4)
    before = capture(layer)
    with pytest.raises(
        TypeError, match=rf"importance_scores must be a torch\.Tensor .* got {type(scores).__name__}"
    ):
        prune_fn(layer, scores)
    assert_unchanged(before, layer)


# --- inference mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_global_prune_under_inference_mode_is_refused(kind: str) -> None:
    model = make_model(kind)
    before = capture(model)
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match=r"cannot run under torch\.inference_mode\(\)"),
    ):
        torchbip.global_prune(model, 0.5, make_data(), **RUN)
    assert_unchanged(before, model)
    # The next ordinary training step works.
    x, y = make_data()[0]
    F.cross_entropy(model(x), y).backward()


def test_a_model_of_inference_tensors_is_refused() -> None:
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 3))
    raises_and_restores(model, ValueError, r"parameters names '0\.weight', an inference tensor")


@pytest.mark.parametrize(
    "prune_fn",
    [
        pytest.param(lambda m: torchbip.bip_unstructured(m, "weight", 0.5), id="unstructured"),
        pytest.param(lambda m: torchbip.bip_structured(m, "weight", 0.5), id="structured"),
        pytest.param(lambda m: bip_semi_structured(m, "weight"), id="semi-structured"),
    ],
)
def test_methods_under_inference_mode_leave_trainable_state(prune_fn: Callable[[nn.Module], Any]) -> None:
    """Pruned under inference_mode(), the masks are ordinary tensors and the next training step works."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.inference_mode():
        prune_fn(layer)
    assert not any(b.is_inference() for b in layer.buffers())
    layer(torch.randn(2, 8)).sum().backward()
    assert layer.weight_orig.grad is not None
    torch.testing.assert_close(layer.weight_orig.grad.ne(0).float().amax(0), layer.weight_mask.amax(0))


@pytest.mark.parametrize("structured", ["filter", "channel"])
def test_an_infeasible_min_keep_of_a_structured_global_budget_names_it(structured: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    raises_and_restores(
        model,
        ValueError,
        rf"min_keep=4 keeps at least 8 {structured}s \(its floor in each of the 2 tensors\), more than "
        r"the 2 that amount=0\.9 leaves; lower min_keep or amount",
        amount=0.9,
        structured=structured,
        budget="global",
        min_keep=4,
    )


# -- layout objects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: torchbip.NM(True, 4), r"NM\(n=True, m=4\): need integers"),
        (lambda: torchbip.NM(2, 4.0), r"NM\(n=2, m=4.0\): need integers"),
        (lambda: torchbip.NM(5, 4), r"NM\(n=5, m=4\): need integers with 0 <= n <= m"),
        (lambda: torchbip.Groups(dim=True), r"Groups\(dim=True\): dim must be 0"),
    ],
)
def test_layout_objects_refuse_bad_fields_by_name(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_nm_takes_numpy_integers_as_plain_ints() -> None:
    layout = torchbip.NM(np.int64(2), np.int64(4))
    assert layout.shorthand == "2:4"
    assert type(layout.n) is int
    assert type(layout.m) is int
    assert layout == torchbip.NM(2, 4)


@pytest.mark.parametrize("structured", ["filter", "channel"])
def test_an_int_amount_too_large_for_one_layer_names_the_layer(structured: str) -> None:
    """With budget="layer" an int amount is a count per tensor: the tensor it does not fit is named."""
    model = make_model("dense")  # Linear(8, 16), Linear(16, 16), Linear(16, 3): 16 filters / channels
    raises_and_restores(
        model,
        ValueError,
        r"amount \(a count per tensor with budget='layer', for '[024]\.weight'\)=20 is larger than the "
        r"number of unpruned (filters|channels) \(\d+\)",
        amount=20,
        structured=structured,
    )


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_adamw_on_float16_parameters_is_refused_by_name(mode: str) -> None:
    """torch's AdamW turns entries with a zero gradient into NaN in float16 (its eps rounds to 0):
    every pruned entry has one, so the run would end in a NaN loss blamed on the learning rates."""
    half = torch.ones(3, dtype=torch.float16, requires_grad=True)
    half.grad = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float16)
    torch.optim.AdamW([half], lr=0.1).step()
    assert bool(half.detach().isnan().any())  # the oracle: torch's own AdamW on float16
    raises_and_restores(
        make_model("two-layer").half(),
        ValueError,
        r"optimizer='adamw' with float16 parameters \('0.weight', '0.bias', '2.weight', \.\.\.\)",
        optimizer="adamw",
        mode=mode,
    )


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_amp_on_a_float64_model_is_refused_by_name(amp: str) -> None:
    """torch.autocast leaves float64 operations alone: the run would be full precision silently."""
    weight = torch.ones(2, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=getattr(torch, amp)):
        assert (weight @ weight).dtype == torch.float64  # the oracle: torch's own autocast
    raises_and_restores(
        make_model("two-layer").double(),
        ValueError,
        rf"amp='{amp}' with a float64 model: torch\.autocast leaves float64 operations in float64",
        amp=amp,
    )
