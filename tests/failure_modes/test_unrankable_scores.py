"""``importance_scores`` of a layout or dtype whose magnitudes cannot be ranked.

A sparse tensor, a float8 tensor or a quantized tensor of the right shape: the pruning methods
refuse it with a ``TypeError`` that names ``importance_scores``, what it got and what they take,
before torch touches the module (docs/failure_modes.rst, "Pruning methods").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.semistructured import bip_semi_structured

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(scores: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch deprecates its quantized tensors)
        return torch.quantize_per_tensor(scores, 0.1, 0, torch.qint8)


def _sparse_csr(scores: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's beta warning for sparse CSR)
        return scores.to_sparse_csr()


# (make the scores, what the message says they are)
SCORES: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "sparse_coo": (lambda s: s.to_sparse(), "a sparse_coo tensor of dtype torch.float32"),
    "sparse_csr": (_sparse_csr, "a sparse_csr tensor of dtype torch.float32"),
    "float8_e4m3fn": (lambda s: s.to(torch.float8_e4m3fn), "a strided tensor of dtype torch.float8_e4m3fn"),
    "float8_e5m2": (lambda s: s.to(torch.float8_e5m2), "a strided tensor of dtype torch.float8_e5m2"),
    "qint8": (_quantized, "a strided tensor of dtype torch.qint8"),
}

METHODS: dict[str, Callable[[nn.Module, Tensor], object]] = {
    "bip_unstructured": lambda m, s: torchbip.bip_unstructured(m, "weight", 0.5, importance_scores=s),
    "bip_structured": lambda m, s: torchbip.bip_structured(m, "weight", 0.5, dim=0, importance_scores=s),
    "bip_semi_structured": lambda m, s: bip_semi_structured(m, "weight", 2, 4, importance_scores=s),
}


@pytest.mark.parametrize("pruned_before", [False, True], ids=["dense", "pruned-before"])
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
@pytest.mark.parametrize("kind", SCORES.values(), ids=SCORES.keys())
def test_unrankable_importance_scores_are_refused(
    kind: tuple[Callable[[Tensor], Tensor], str],
    method: Callable[[nn.Module, Tensor], object],
    pruned_before: bool,
) -> None:
    make, got = kind
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    if pruned_before:
        prune.l1_unstructured(layer, "weight", amount=4)
    before = capture(layer)
    with pytest.raises(TypeError, match=r"^importance_scores must be a dense") as info:
        method(layer, make(torch.randn(4, 8)))
    assert got in str(info.value)
    assert_unchanged(before, layer)


def test_float8_scores_through_global_unstructured_are_refused() -> None:
    """Torch's global entry point hands the scores to ``compute_mask``, which names them too."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    before = capture(layer)
    scores = torch.randn(4, 8).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"importance_scores must be a dense.*torch\.float8_e4m3fn"):
        prune.global_unstructured(
            [(layer, "weight")],
            pruning_method=torchbip.BiPPruningMethod,
            importance_scores={(layer, "weight"): scores},
            amount=0.5,
        )
    assert_unchanged(before, layer)


@pytest.mark.parametrize(
    "dtype",
    [torch.bool, torch.uint8, torch.int8, torch.int64, torch.float16, torch.bfloat16, torch.complex64],
)
def test_rankable_dtypes_are_still_taken(dtype: torch.dtype) -> None:
    """Scores ``[[0, 1, 2, 3]] * 2`` in any rankable dtype (bool: ``0, 1, 1, 1``): the two zeros go."""
    layer = nn.Linear(4, 2)
    torchbip.bip_unstructured(
        layer, "weight", 2, importance_scores=torch.tensor([[0, 1, 2, 3]] * 2).to(dtype)
    )
    assert torch.equal(layer.weight_mask, torch.tensor([[0.0, 1.0, 1.0, 1.0]] * 2))


INTEGER_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_the_most_negative_integer_score_ranks_as_a_large_magnitude(
    method: Callable[[nn.Module, Tensor], object], dtype: torch.dtype
) -> None:
    """``|iinfo.min|`` is the largest magnitude (level with ``iinfo.max`` in int64, which cannot hold it).

    torch's ``abs`` of a signed integer's minimum overflows back to the minimum; ranked as such,
    the entry with the largest magnitude was pruned first. Oracle: the masks of the same scores
    in float64 with the minimum replaced by a magnitude larger than every other score (no ties,
    so every rule of the three methods decides the same way).
    """
    low = torch.iinfo(dtype).min
    rows = [[low, 1, 2, 13], [12, 5, 3, 4], [6, 7, low, 11], [8, 9, 10, 0]]
    scores = torch.tensor(rows, dtype=dtype)
    oracle_scores = torch.tensor(rows, dtype=torch.float64).where(scores != low, 1000.0)
    got, want = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    method(got, scores)
    method(want, oracle_scores)
    assert torch.equal(got.weight_mask, want.weight_mask)
    assert got.weight_mask[scores == low].all()
