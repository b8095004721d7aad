"""BiPPruningMethod: torch's contract, hand-written masks, score buffer, errors."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip import BiPPruningMethod, bip_structured, bip_unstructured
from torchbip.masks import count_from_amount, validate_amount
from torchbip.method import scores_name
from torchbip.semistructured import bip_semi_structured
from torchbip.testing.contract import PruningMethodContract, pruning_hooks

# --------------------------------------------------------------------------- the torch contract


class TestBiPContractFraction(PruningMethodContract):
    METHOD = BiPPruningMethod
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0.5}
    PRUNING_TYPE = "unstructured"


class TestBiPContractCount(PruningMethodContract):
    METHOD = BiPPruningMethod
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 9}
    PRUNING_TYPE = "unstructured"


class TestBiPContractEverything(PruningMethodContract):
    METHOD = BiPPruningMethod
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 1.0}
    PRUNING_TYPE = "unstructured"


class TestBiPContractNothing(PruningMethodContract):
    METHOD = BiPPruningMethod
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0}
    PRUNING_TYPE = "unstructured"


class TestBiPContractImportanceScores(PruningMethodContract):
    """Scores whose magnitudes reverse the weights' ranking, on a conv layer."""

    METHOD = BiPPruningMethod
    PRUNING_TYPE = "unstructured"
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0.7}

    def make_module(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Conv2d(2, 3, kernel_size=2)

    def make_input(self, module: nn.Module) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return torch.randn(2, 2, 4, 4)

    def apply_method(self, module: nn.Module) -> prune.BasePruningMethod:
        magnitude = getattr(module, self.NAME).detach().abs()
        scores = magnitude.max() + 1.0 - magnitude
        return BiPPruningMethod.apply(module, self.NAME, importance_scores=scores, **self.KWARGS)


# --------------------------------------------------------------------------- compute_mask by hand

ONES_2x2 = torch.ones(2, 2)


@pytest.mark.parametrize(
    ("amount", "scores", "default_mask", "expected"),
    [
        pytest.param(0.5, [[0.9, 0.1], [0.5, 0.7]], None, [[1, 0], [0, 1]], id="half"),
        pytest.param(
            0.5, [[0.9, 0.1], [0.5, 0.7]], [[0, 1], [1, 1]], [[0, 0], [0, 1]], id="half-of-3-rounds-to-2"
        ),
        pytest.param(2, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], None, [[1, 1, 1], [1, 0, 0]], id="ties-by-count"),
        pytest.param(
            0.5,
            [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]],
            [[1, 0, 1], [1, 0, 1]],
            [[1, 0, 1], [0, 0, 0]],
            id="ties-allowed",
        ),
        pytest.param(2, [-3.0, 1.0, 2.0, -1.5], None, [1, 0, 1, 0], id="negative-scores-rank-by-magnitude"),
        pytest.param(1, [-0.5, 0.25, -4.0], [1, 1, 0], [1, 0, 0], id="negative-pruned-earlier-stays"),
        pytest.param(0, [3.0, 1.0, 2.0], [1, 0, 1], [1, 0, 1], id="amount-zero-keeps-default"),
        pytest.param(0.0, [3.0, 1.0, 2.0], None, [1, 1, 1], id="amount-zero-float"),
        pytest.param(1.0, [3.0, 1.0, 2.0], [1, 0, 1], [0, 0, 0], id="amount-one"),
        pytest.param(2, [3.0, 1.0, 2.0], [1, 0, 1], [0, 0, 0], id="int-all-remaining"),
        pytest.param(1, [3.0, 1.0, 2.0, 4.0], None, [1, 0, 1, 1], id="int-one-is-a-count"),
        pytest.param(0.25, [3.0, 1.0, 2.0, 4.0], None, [1, 0, 1, 1], id="float-quarter"),
        pytest.param(0.5, [5.0, 4.0, 3.0, 2.0, 1.0], None, [1, 1, 1, 0, 0], id="2.5-rounds-to-2"),
        pytest.param(0.7, [5.0, 4.0, 3.0, 2.0, 1.0], None, [1, 0, 0, 0, 0], id="3.5-rounds-to-4"),
        pytest.param(1, [0.0, 0.0], [0, 0], None, id="nothing-left"),
    ],
)
def test_compute_mask_by_hand(
    amount: int | float, scores: list, default_mask: list | None, expected: list | None
) -> None:
    t = torch.tensor(scores)
    mask = torch.ones_like(t) if default_mask is None else torch.tensor(default_mask, dtype=t.dtype)
    method = BiPPruningMethod(amount)
    if expected is None:
        with pytest.raises(ValueError, match=r"amount=1 is larger than the number of unpruned entries \(0\)"):
            method.compute_mask(t, mask)
        return
    got = method.compute_mask(t, mask)
    assert got.dtype == mask.dtype
    assert got.tolist() == torch.tensor(expected, dtype=mask.dtype).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.bool], ids=str)
def test_compute_mask_keeps_default_mask_dtype(dtype: torch.dtype) -> None:
    default_mask = torch.tensor([1, 1, 0, 1]).to(dtype)
    got = BiPPruningMethod(1).compute_mask(torch.tensor([3.0, 1.0, 9.0, 2.0]), default_mask)
    assert got.dtype == dtype
    assert got.tolist() == torch.tensor([1, 0, 0, 1]).to(dtype).tolist()


def test_compute_mask_integer_scores() -> None:
    got = BiPPruningMethod(2).compute_mask(torch.tensor([3, 1, 2, 2]), torch.ones(4))
    assert got.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_compute_mask_does_not_modify_inputs() -> None:
    scores = torch.tensor([3.0, 1.0, 2.0])
    default_mask = torch.tensor([1.0, 1.0, 0.0])
    got = BiPPruningMethod(1).compute_mask(scores, default_mask)
    assert got.tolist() == [1.0, 0.0, 0.0]
    assert default_mask.tolist() == [1.0, 1.0, 0.0]
    assert scores.tolist() == [3.0, 1.0, 2.0]


def test_compute_mask_rejects_shape_mismatch() -> None:
    with pytest.raises(
        ValueError, match=r"importance scores have shape \(4,\) but default_mask has shape \(2, 2\)"
    ):
        BiPPruningMethod(0.5).compute_mask(torch.ones(4), ONES_2x2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_compute_mask_rejects_non_finite_scores(bad: float) -> None:
    with pytest.raises(ValueError, match=r"importance_scores contain NaN or infinite values"):
        BiPPruningMethod(0.5).compute_mask(torch.tensor([1.0, bad]), torch.ones(2))


# --------------------------------------------------------------------------- amount errors


@pytest.mark.parametrize(
    ("amount", "error", "match"),
    [
        pytest.param(-1, ValueError, "amount=-1 is a negative count", id="negative-int"),
        pytest.param(-0.5, ValueError, "amount=-0.5 is a float outside [0, 1]", id="negative-float"),
        pytest.param(1.01, ValueError, "amount=1.01 is a float outside [0, 1]", id="above-one"),
        pytest.param(math.nan, ValueError, "amount=nan is NaN", id="nan"),
        pytest.param("0.5", TypeError, "got '0.5' of type str", id="str"),
        pytest.param(True, TypeError, "got True of type bool", id="bool"),
    ],
)
def test_bad_amounts(amount: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        BiPPruningMethod(amount)  # type: ignore[arg-type]
    layer = nn.Linear(3, 2)
    weight = layer.weight
    with pytest.raises(error, match=re.escape(match)):
        bip_unstructured(layer, "weight", amount)  # type: ignore[arg-type]
    assert layer.weight is weight
    assert not prune.is_pruned(layer)


def test_int_amount_larger_than_tensor() -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"amount=7 is larger than the number of unpruned entries \(6\)"):
        bip_unstructured(layer, "weight", 7)
    assert not prune.is_pruned(layer)
    assert not hasattr(layer, scores_name("weight"))


def test_int_amount_larger_than_remaining_keeps_earlier_pruning() -> None:
    """The count is checked against the remaining entries before torch drops the old hook."""
    layer = nn.Linear(3, 2)
    prune.l1_unstructured(layer, "weight", amount=4)
    hook = pruning_hooks(layer, "weight")[0]
    mask = layer.weight_mask.clone()
    with pytest.raises(ValueError, match=r"amount=3 is larger than the number of unpruned entries \(2\)"):
        bip_unstructured(layer, "weight", 3)
    assert pruning_hooks(layer, "weight") == [hook]
    assert torch.equal(layer.weight_mask, mask)
    assert not hasattr(layer, scores_name("weight"))
    bip_unstructured(layer, "weight", 2)
    assert int(layer.weight_mask.count_nonzero()) == 0


def test_bad_importance_scores_leave_module_unchanged() -> None:
    layer = nn.Linear(3, 2)
    weight = layer.weight
    with pytest.raises(
        ValueError, match=r"importance_scores has shape \(3, 2\) but weight has shape \(2, 3\)"
    ):
        bip_unstructured(layer, "weight", 0.5, importance_scores=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"importance_scores contain NaN or infinite values"):
        bip_unstructured(layer, "weight", 0.5, importance_scores=torch.full((2, 3), math.nan))
    assert layer.weight is weight
    assert not prune.is_pruned(layer)
    assert set(layer.state_dict()) == {"weight", "bias"}


def module_state(module: nn.Module) -> dict[str, Any]:
    """What pruning may change on a module: its tensors (objects and values), in order, and hooks."""
    tensors = {
        **{f"parameter {n}": t for n, t in module._parameters.items()},
        **{f"buffer {n}": t for n, t in module._buffers.items()},
        **{f"attribute {n}": t for n, t in vars(module).items() if isinstance(t, Tensor)},
    }
    hooks = list(module._forward_pre_hooks.items())
    return {
        "tensors": tensors,
        "values": {n: t.detach().clone() for n, t in tensors.items() if t is not None},
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "hooks": hooks,
        "methods": [list(h) for _, h in hooks if isinstance(h, prune.PruningContainer)],
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert list(after["tensors"]) == list(before["tensors"])
    for name, tensor in before["tensors"].items():
        assert after["tensors"][name] is tensor, name
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name
    for key in ("non_persistent", "hooks", "methods"):
        assert after[key] == before[key], key


@pytest.mark.parametrize("pruned_before", [False, True], ids=["fresh", "pruned-before"])
@pytest.mark.parametrize(
    "apply",
    [
        pytest.param(lambda m, s: bip_unstructured(m, "weight", 0.5, importance_scores=s), id="unstructured"),
        pytest.param(lambda m, s: bip_structured(m, "weight", 2, dim=0, importance_scores=s), id="filters"),
        pytest.param(
            lambda m, s: bip_structured(m, "weight", 2, dim=0, importance_scores=s[:, 0]), id="filter-scores"
        ),
        pytest.param(lambda m, s: bip_semi_structured(m, "weight", 1, 4, importance_scores=s), id="1:4"),
    ],
)
def test_importance_scores_on_another_device_are_refused_and_change_nothing(
    apply: Any, pruned_before: bool
) -> None:
    """Before: torch's "not on the expected device" error, or (pruned before) nothing pruned."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    if pruned_before:
        prune.l1_unstructured(layer, "weight", amount=8)
    before = module_state(layer)
    message = r"importance_scores are on device meta but 'weight' is on device cpu"
    with pytest.raises(ValueError, match=message):
        apply(layer, torch.randn(4, 8, device="meta"))
    assert_same_state(before, module_state(layer))
    # the same scores on the weight's device prune as usual: more zeros than before
    zeros = int((getattr(layer, "weight_mask", torch.ones(1)) == 0).sum())
    apply(layer, torch.randn(4, 8).abs() + 1)
    assert int((layer.weight_mask == 0).sum()) > zeros


def test_meta_scores_for_a_meta_tensor_are_accepted() -> None:
    """Only a mismatch is refused: a meta module takes meta scores (a meta mask, as torch gives)."""
    layer = nn.Linear(8, 4, device="meta")
    bip_unstructured(layer, "weight", 0.5, importance_scores=torch.randn(4, 8, device="meta"))
    assert layer.weight_mask.is_meta
    assert layer.weight_scores.is_meta


def test_unknown_tensor_name() -> None:
    with pytest.raises(ValueError, match=r"module Linear has no tensor named name='kernel'"):
        bip_unstructured(nn.Linear(3, 2), "kernel", 0.5)


# --------------------------------------------------------------------------- apply, scores, remove


def _layer(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def test_default_scores_are_magnitudes() -> None:
    layer = _layer([[0.5, -3.0, 0.1], [-0.2, 2.0, 1.0]])
    assert bip_unstructured(layer, "weight", 3) is layer
    assert layer.weight_mask.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    torch.testing.assert_close(layer.weight_scores, layer.weight_orig.detach().abs(), rtol=0, atol=0)


def test_importance_scores_decide_the_mask() -> None:
    layer = _layer([[0.5, -3.0, 0.1], [-0.2, 2.0, 1.0]])
    scores = torch.tensor([[6.0, 5.0, 4.0], [3.0, 2.0, 1.0]])
    bip_unstructured(layer, "weight", 0.5, importance_scores=scores)
    assert layer.weight_mask.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(layer.weight, torch.tensor([[0.5, -3.0, 0.1], [0.0, 0.0, 0.0]]))


def test_score_buffer_is_a_copy_and_not_in_state_dict() -> None:
    layer = nn.Linear(3, 2)
    scores = torch.arange(6.0).view(2, 3)
    bip_unstructured(layer, "weight", 2, importance_scores=scores)
    buffer = layer.get_buffer(scores_name("weight"))
    assert torch.equal(buffer, scores)
    assert buffer.data_ptr() != scores.data_ptr()
    scores.zero_()
    assert buffer.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert "weight_scores" in dict(layer.named_buffers())
    assert set(layer.state_dict()) == {"bias", "weight_orig", "weight_mask"}


def test_default_scores_of_a_pruned_tensor_are_masked_magnitudes() -> None:
    layer = _layer([[4.0, -3.0], [2.0, -1.0]])
    prune.custom_from_mask(layer, "weight", torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    bip_unstructured(layer, "weight", 1)
    assert layer.weight_scores.tolist() == [[0.0, 3.0], [2.0, 1.0]]
    assert layer.weight_mask.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_remove_drops_the_score_buffer() -> None:
    layer = nn.Linear(3, 2)
    bip_unstructured(layer, "weight", 0.5)
    prune.remove(layer, "weight")
    assert not hasattr(layer, scores_name("weight"))
    assert "weight_scores" not in dict(layer.named_buffers())
    assert scores_name("weight") not in layer._non_persistent_buffers_set


def test_state_dict_after_container_remove_loads_into_a_fresh_model() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bip_unstructured(model[0], "weight", 0.5)
    prune.l1_unstructured(model[0], "weight", 0.5)
    prune.l1_unstructured(model[2], "weight", 0.5)
    bip_unstructured(model[2], "weight", 0.5)
    for layer in (model[0], model[2]):
        prune.remove(layer, "weight")
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_bias_and_other_parameters() -> None:
    layer = _layer([[1.0, 2.0]])
    with torch.no_grad():
        layer.bias.fill_(-5.0)
    bip_unstructured(layer, "bias", 1)
    assert layer.bias_mask.tolist() == [0.0]
    assert layer(torch.ones(1, 2)).tolist() == [[3.0]]


# --------------------------------------------------------------------------- the suite itself


class TestContractHoldsForTorchL1(PruningMethodContract):
    """The contract suite passes for torch's own method (it tests torch's behaviour, not BiP's)."""

    METHOD = prune.L1Unstructured
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 0.5}
    PRUNING_TYPE = "unstructured"


class TestContractHoldsForTorchRandom(PruningMethodContract):
    METHOD = prune.RandomUnstructured
    KWARGS: ClassVar[dict[str, Any]] = {"amount": 4}
    PRUNING_TYPE = "unstructured"


def test_importing_torchbip_does_not_import_test_dependencies() -> None:
    code = (
        "import sys, torchbip, torchbip.testing; "
        "bad = sorted({'hypothesis', 'pytest'} & set(sys.modules)); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_non_finite_weight_without_importance_scores_is_named_as_such() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0, 0] = math.inf
    before = layer.weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"the values of 'weight' \(ranked by magnitude, as no importance_scores"
    ):
        bip_unstructured(layer, "weight", 0.5)
    assert torch.equal(layer.weight, before)
    assert not hasattr(layer, "weight_mask")


def test_structured_counts_say_filters_or_channels() -> None:
    conv = nn.Conv2d(3, 6, 3)
    with pytest.raises(ValueError, match=r"amount=7 is larger than the number of unpruned filters \(6\)"):
        bip_structured(conv, "weight", 7, dim=0)
    with pytest.raises(ValueError, match=r"amount=4 is larger than the number of unpruned channels \(3\)"):
        bip_structured(conv, "weight", 4, dim=1)
    assert not hasattr(conv, "weight_mask")


# --------------------------------------------------------------------------- a soft default_mask


@pytest.mark.parametrize("amount", [1, 3, 0.25, 0.5, 1.0])
def test_compute_mask_of_a_soft_default_mask_equals_torchs_l1(amount: int | float) -> None:
    """``default_mask`` with entries zeroed, its other values kept: torch's L1Unstructured is the oracle.

    (Every entry of these default masks is non-zero, so torch's method, which ranks all entries,
    and BiP's, which ranks the entries ``default_mask`` keeps, choose among the same ones.)
    """
    generator = torch.Generator().manual_seed(0)
    # distinct magnitudes (|x + 0.1| for the integers -6..5), so no tie decides anything
    importance = torch.randperm(12, generator=generator).float().sub(6.0).add(0.1).view(3, 4)
    default_mask = torch.tensor([[0.5, 1.0, 0.25, 1.0], [1.0, 2.0, 1.0, 0.75], [1.0, 1.0, 0.1, 1.0]])
    want = prune.L1Unstructured(amount).compute_mask(importance, default_mask)
    got = BiPPruningMethod(amount).compute_mask(importance, default_mask)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    assert bool((got <= default_mask).all())
    # through prune(): the tensor times that mask, as torch's method gives
    assert torch.equal(
        BiPPruningMethod(amount).prune(importance, default_mask=default_mask),
        prune.L1Unstructured(amount).prune(importance, default_mask=default_mask),
    )


def test_compute_mask_of_a_soft_channels_last_default_mask() -> None:
    """The values of torch's mask, in ``default_mask``'s memory format (the weight's, as before)."""
    torch.manual_seed(0)
    importance = torch.randn(4, 3, 2, 2)
    default_mask = (torch.rand(4, 3, 2, 2) + 0.5).contiguous(memory_format=torch.channels_last)
    got = BiPPruningMethod(0.4).compute_mask(importance, default_mask)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, prune.L1Unstructured(0.4).compute_mask(importance, default_mask))


def test_a_module_pruned_with_a_soft_mask_then_by_bip_matches_torch() -> None:
    """``prune.custom_from_mask`` with a soft mask, then BiP or torch's L1 method on top."""
    masks = {}
    for method in (prune.l1_unstructured, bip_unstructured):
        layer = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
        prune.custom_from_mask(layer, "weight", torch.tensor([[0.5, 1.0, 1.0, 1.0]]))
        method(layer, "weight", 1)
        masks[method.__name__] = layer.weight_mask
    assert masks["bip_unstructured"].tolist() == [[0.5, 1.0, 1.0, 0.0]]
    assert torch.equal(masks["bip_unstructured"], masks["l1_unstructured"])


def test_semi_structured_compute_mask_keeps_a_soft_default_mask() -> None:
    from torchbip.semistructured import BiPSemiStructured

    t = torch.tensor([[4.0, 1.0, -3.0, 2.0, 0.5, -0.1, 0.2, -0.9]])
    default_mask = torch.tensor([[0.5, 1.0, 1.0, 2.0, 1.0, 0.25, 1.0, 0.75]])
    got = BiPSemiStructured(n=2, m=4).compute_mask(t, default_mask)
    binary = BiPSemiStructured(n=2, m=4).compute_mask(t, torch.ones(1, 8))
    assert binary.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]]
    assert torch.equal(got, default_mask * binary)


# --------------------------------------------------------------------------- NumPy and Fraction amounts


@pytest.mark.parametrize(
    ("amount", "n"),
    [
        pytest.param(np.float32(0.7), 5, id="float32-0.7-of-5"),
        pytest.param(np.float32(0.1), 5, id="float32-0.1-of-5"),
        pytest.param(np.float16(0.55), 10, id="float16-0.55-of-10"),
        pytest.param(Fraction(7, 10), 45, id="Fraction-7/10-of-45"),
    ],
)
def test_a_non_python_float_amount_counts_as_its_python_float(amount: Any, n: int) -> None:
    """The documented rule (docs/differences.rst): ``round(float(amount) * n)`` in float64.

    Torch computes ``round(amount * n)`` in the amount's own arithmetic, which can differ: in
    float32, ``0.7 * 5`` rounds to 3.5, so torch prunes 4 of 5 entries; torchbip prunes 3.
    """
    expected = round(float(amount) * n)
    assert count_from_amount(amount, n) == expected
    assert type(validate_amount(amount)) is float
    t = torch.arange(1.0, n + 1)
    got = BiPPruningMethod(amount).compute_mask(t, torch.ones(n))
    assert int((got == 0).sum()) == expected
    assert got.tolist() == [0.0] * expected + [1.0] * (n - expected)  # the lowest magnitudes
    layer = nn.Linear(n, 1, bias=False)
    bip_unstructured(layer, "weight", amount)
    assert int((layer.weight_mask == 0).sum()) == expected


def test_the_float32_example_of_the_documentation() -> None:
    amount, t = np.float32(0.7), torch.arange(1.0, 6.0)
    assert int((prune.L1Unstructured(amount).compute_mask(t, torch.ones(5)) == 0).sum()) == 4  # torch
    assert int((BiPPruningMethod(amount).compute_mask(t, torch.ones(5)) == 0).sum()) == 3  # torchbip
