"""CSR layers, to_sparse_csr, N:M masks and the 2:4 semi-structured conversion."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torchbip import bip_unstructured
from torchbip.masks import nm_mask
from torchbip.semistructured import BiPSemiStructured, bip_semi_structured
from torchbip.sparse import (
    SparseCSRConv2d,
    SparseCSRLinear,
    is_nm_sparse,
    to_semi_structured,
    to_sparse_csr,
)
from torchbip.testing.contract import PruningMethodContract


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 32), (2, 3, 32), (32,), (0, 32), (2, 0, 32)])
def test_csr_linear_equals_dense(seed: int, bias: bool, shape: tuple[int, ...]) -> None:
    dense = nn.Linear(32, 8, bias=bias)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(8, 32) > 0.9)
    layer = SparseCSRLinear.from_dense(dense)
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)
    assert layer.weight.layout == torch.sparse_csr
    assert layer.weight.values().numel() == int(dense.weight.count_nonzero())


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv2d(3, 6, 3), id="plain"),
        pytest.param(lambda: nn.Conv2d(3, 6, (3, 1), stride=2, padding=(1, 0), dilation=2), id="strided"),
        pytest.param(lambda: nn.Conv2d(3, 6, 1, bias=False), id="pointwise"),
    ],
)
@pytest.mark.parametrize(
    "shape", [(2, 3, 11, 9), (3, 11, 9), (0, 3, 11, 9)], ids=["batch", "unbatched", "empty"]
)
def test_csr_conv_equals_dense(seed: int, conv, shape: tuple[int, ...]) -> None:
    dense = conv()
    layer = SparseCSRConv2d.from_dense(dense)
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dense", "shape"),
    [
        pytest.param(lambda: nn.Linear(8, 3), (4, 6), id="linear-features"),
        pytest.param(lambda: nn.Linear(8, 3), (3,), id="linear-unbatched-features"),
        pytest.param(lambda: nn.Linear(8, 3), (), id="linear-scalar"),
        pytest.param(lambda: nn.Conv2d(3, 4, 3), (2, 4, 6, 6), id="conv-channels"),
        pytest.param(lambda: nn.Conv2d(3, 4, 3), (4, 6, 6), id="conv-unbatched-channels"),
        pytest.param(lambda: nn.Conv2d(3, 4, 3), (6, 6), id="conv-2d"),
        pytest.param(lambda: nn.Conv2d(3, 4, 3), (1, 2, 3, 6, 6), id="conv-5d"),
    ],
)
def test_csr_layers_refuse_what_the_dense_layer_refuses(dense, shape: tuple[int, ...]) -> None:
    """An input the dense layer rejects is rejected, with a message that names the expected shape
    (it used to fail inside the reshape, or unpack, with an unrelated message)."""
    layer, x = dense(), torch.randn(shape)
    csr = SparseCSRLinear.from_dense(layer) if isinstance(layer, nn.Linear) else SparseCSRConv2d(layer)
    with pytest.raises(RuntimeError):
        layer(x)
    with pytest.raises(RuntimeError, match=rf"takes inputs of shape .*, got shape {re.escape(str(shape))}"):
        csr(x)


def test_to_sparse_csr_model_takes_the_unbatched_inputs_the_model_takes(seed: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(0), nn.Linear(8 * 36, 4))
    for layer in (model[0], model[3]):
        bip_unstructured(layer, "weight", amount=0.95)
    csr = to_sparse_csr(model, include_conv=True)
    assert [type(m).__name__ for m in csr] == ["SparseCSRConv2d", "ReLU", "Flatten", "SparseCSRLinear"]
    x = torch.randn(3, 6, 6)  # one sample, no batch dimension
    torch.testing.assert_close(csr(x), model(x), rtol=1e-5, atol=1e-5)


def test_csr_conv_rejects_groups() -> None:
    with pytest.raises(ValueError, match="groups=3"):
        SparseCSRConv2d(nn.Conv2d(3, 6, 3, groups=3))


def test_to_sparse_csr_converts_sparse_layers_only(seed: int) -> None:
    model = mlp()
    bip_unstructured(model[0], "weight", amount=0.95)
    bip_unstructured(model[2], "weight", amount=0.5)
    csr = to_sparse_csr(model, min_sparsity=0.9)
    assert [type(m).__name__ for m in csr if not isinstance(m, nn.ReLU)] == [
        "SparseCSRLinear",
        "Linear",
        "Linear",
    ]
    x = torch.randn(7, 32)
    torch.testing.assert_close(csr(x), model(x), rtol=1e-5, atol=1e-5)
    assert prune.is_pruned(model)  # the input model is unchanged
    assert not prune.is_pruned(csr)


def test_to_sparse_csr_with_convolutions(seed: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    for layer in (model[0], model[3]):
        bip_unstructured(layer, "weight", amount=0.95)
    csr = to_sparse_csr(model, include_conv=True)
    assert isinstance(csr[0], SparseCSRConv2d)
    assert isinstance(csr[3], SparseCSRLinear)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(csr(x), model(x), rtol=1e-5, atol=1e-5)


def test_csr_state_dict_round_trip_with_weights_only(seed: int) -> None:
    model = mlp()
    bip_unstructured(model[0], "weight", amount=0.97)
    csr = to_sparse_csr(model)
    buffer = io.BytesIO()
    torch.save(csr.state_dict(), buffer)
    buffer.seek(0)
    fresh = mlp()
    bip_unstructured(fresh[0], "weight", amount=0.99)  # the same layout, fewer nonzeros
    other = to_sparse_csr(fresh)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 32)
    assert torch.equal(other(x), csr(x))


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_to_sparse_csr_converts_a_model_that_is_one_layer(seed: int, layer: str) -> None:
    model: nn.Module = nn.Linear(32, 16) if layer == "linear" else nn.Conv2d(3, 8, 3)
    bip_unstructured(model, "weight", amount=0.95)
    csr = to_sparse_csr(model, include_conv=True, min_sparsity=np.float32(0.9))
    assert isinstance(csr, SparseCSRLinear if layer == "linear" else SparseCSRConv2d)
    x = torch.randn(4, 32) if layer == "linear" else torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(csr(x), model(x), rtol=1e-5, atol=1e-5)
    assert prune.is_pruned(model)  # the input model is unchanged


def test_to_sparse_csr_converts_a_layer_used_at_two_places_at_both(seed: int) -> None:
    shared = nn.Linear(6, 6)
    prune.l1_unstructured(shared, "weight", amount=0.95)
    inner = nn.Sequential(nn.ReLU(), shared)  # a second parent of the same layer
    model = nn.Sequential(shared, nn.ReLU(), shared, inner)
    csr = to_sparse_csr(model)
    assert isinstance(csr[0], SparseCSRLinear)
    assert csr[2] is csr[0]  # one layer, as in the model
    assert csr[3][1] is csr[0]
    assert csr[0].weight.values().numel() == int(shared.weight.count_nonzero())
    x = torch.randn(3, 6)
    torch.testing.assert_close(csr(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.9", True])
def test_to_sparse_csr_rejects_bad_thresholds(value: object) -> None:
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse_csr(mlp(), min_sparsity=value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- N:M


class TestSemiStructuredContract(PruningMethodContract):
    METHOD = BiPSemiStructured
    KWARGS = {"n": 2, "m": 4}  # noqa: RUF012
    PRUNING_TYPE = "global"

    def make_module(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Linear(8, 5)

    def make_input(self, module: nn.Module) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return torch.randn(3, 8)


def test_nm_mask_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [1.0, 1.0, 1.0, 1.0]])
    assert nm_mask(scores).int().tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    assert nm_mask(scores.t(), dim=0).t().int().tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    allowed = torch.tensor([[True, False, False, True], [True, True, True, True]])
    assert nm_mask(scores, allowed=allowed).int().tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"m": 3}, ValueError, "not a multiple of m=3", id="tiling"),
        pytest.param({"n": 5}, ValueError, "n=5", id="n-above-m"),
        pytest.param({"m": 0}, ValueError, "m=0", id="m-zero"),
        pytest.param({"dim": 2}, ValueError, "dim=2", id="dim"),
        pytest.param({"n": 2.0}, TypeError, "n must be an int", id="float-n"),
    ],
)
def test_nm_mask_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        nm_mask(torch.ones(2, 8), **kwargs)


def test_bip_semi_structured_feeds_the_two_four_check() -> None:
    layer = nn.Linear(16, 4)
    bip_semi_structured(layer, "weight")
    assert is_nm_sparse(layer.weight.detach(), 2, 4)
    assert not is_nm_sparse(torch.ones(4, 16), 2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_semi_structured_needs_a_gpu() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        to_semi_structured(nn.Linear(8, 8))


def test_semi_structured_leaves_the_layers_torch_refuses_dense_and_names_them() -> None:
    """torch's kernels refuse small shapes (a 10-class head): that layer stays dense, the rest
    converts. The GPU (weights on it included) and torch's conversion are stood in for (the
    refusal rule and its message are torch's own shape check for float16 with CUTLASS:
    dimensions multiples of 32 and 64)."""
    model = _two_four_model()

    def convert(weight: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        if rows % 32 or cols % 64:
            raise RuntimeError(
                f"Error original_tensor.shape {weight.shape} is not supported! "
                "Both dimensions must be larger than or equal to and a multiple of (32, 64)"
            )
        return weight.to_sparse()  # a stand-in sparse tensor

    with (
        _fake_gpu(convert),
        mock.patch("torchbip.sparse._on_cuda", return_value=True),
        pytest.warns(UserWarning, match=r"left 1 2:4-sparse layer\(s\) dense.*'?2'? \(10, 64\)"),
    ):
        converted = to_semi_structured(model)
    assert converted[0].weight.layout == torch.sparse_coo
    assert converted[2].weight.layout == torch.strided
    assert torch.equal(converted[2].weight, model[2].weight)
    assert prune.is_pruned(model)  # the input model is unchanged


def _two_four_model(dtype: torch.dtype = torch.float16) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
    for layer in (model[0], model[2]):
        bip_semi_structured(layer, "weight")
    return model


@contextlib.contextmanager
def _fake_gpu(convert: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Any]:
    """An sm90 GPU, and ``convert`` for torch's conversion."""
    with (
        mock.patch.object(torch.cuda, "is_available", return_value=True),
        mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)),
        mock.patch.object(torch.sparse, "to_sparse_semi_structured", side_effect=convert) as patched,
    ):
        yield patched


@pytest.mark.parametrize(
    ("dtype", "on_cuda", "what"),
    [
        pytest.param(torch.float16, False, "torch.float16 weight on cpu", id="cpu"),
        pytest.param(torch.float32, True, "torch.float32 weight on", id="float32"),
    ],
)
def test_semi_structured_refuses_weights_not_fp16_or_bf16_on_a_gpu(
    dtype: torch.dtype, on_cuda: bool, what: str
) -> None:
    """A model left on the CPU (or in float32) on a GPU machine is refused, naming the layer: it
    used to come back dense with a warning that quoted torch's device error."""
    model = _two_four_model(dtype)
    with (
        _fake_gpu(lambda weight: weight.to_sparse()) as convert,
        mock.patch("torchbip.sparse._on_cuda", return_value=True) if on_cuda else contextlib.nullcontext(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=rf"layer '0' has a {what}.*need float16 or bfloat16 weights"):
            to_semi_structured(model)
    convert.assert_not_called()


def test_semi_structured_lets_other_errors_of_the_conversion_through() -> None:
    """Only torch's refusal of a shape leaves a layer dense; any other error of the conversion
    (here a stand-in for a contiguity or kernel error) propagates, with no warning."""

    def convert(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("Error original_tensor is not contiguous!Only contiguous tensors are supported.")

    with (
        _fake_gpu(convert),
        mock.patch("torchbip.sparse._on_cuda", return_value=True),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="not contiguous"):
            to_semi_structured(_two_four_model())


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="needs a CUDA GPU with compute capability >= 8.0",
)
def test_semi_structured_on_gpu_matches_the_masked_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda()
    for layer in (model[0], model[2]):
        bip_semi_structured(layer, "weight")
    sparse = to_semi_structured(model)
    assert type(sparse[0].weight).__name__.startswith("SparseSemiStructured")
    x = torch.randn(32, 128, dtype=torch.half, device="cuda")
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- checks and loading


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        pytest.param(
            lambda: SparseCSRLinear("w"), TypeError, "weight must be a tensor, got str", id="weight"
        ),
        pytest.param(
            lambda: SparseCSRLinear(torch.ones(3, 4), torch.ones(4)),
            ValueError,
            r"bias must be None or a tensor of shape \(3,\), got \(4,\)",
            id="bias",
        ),
        pytest.param(
            lambda: SparseCSRLinear.from_dense(nn.Conv2d(1, 1, 1)),
            TypeError,
            r"linear must be an nn\.Linear, got Conv2d",
            id="from-dense",
        ),
        pytest.param(
            lambda: SparseCSRConv2d(nn.Linear(2, 2)),
            TypeError,
            r"conv must be an nn\.Conv2d, got Linear",
            id="conv",
        ),
        pytest.param(
            lambda: to_sparse_csr("net"), TypeError, r"model must be an nn\.Module, got str", id="model"
        ),
        pytest.param(
            lambda: to_sparse_csr(mlp(), include_conv=1),
            TypeError,
            "include_conv must be a bool, got 1",
            id="conv-flag",
        ),
    ],
)
def test_csr_entry_points_reject_bad_arguments(make, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


def test_csr_layer_loads_a_dense_weight_with_another_number_of_nonzeros(seed: int) -> None:
    layer = SparseCSRLinear.from_dense(nn.Linear(8, 4))
    dense = nn.Linear(8, 4)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(4, 8) > 0.5)
    layer.load_state_dict(dense.state_dict())
    assert layer.weight.layout == torch.sparse_csr
    assert torch.equal(layer.weight.to_dense(), dense.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)


def test_csr_layer_inside_a_model_keeps_its_weight_when_its_bias_fails(seed: int) -> None:
    model = nn.Sequential(SparseCSRLinear.from_dense(nn.Linear(8, 4)), nn.ReLU())
    weight, bias = model[0].weight, model[0].bias.clone()
    state = SparseCSRLinear.from_dense(nn.Linear(8, 4)).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.bias"):
        model.load_state_dict({"0.weight": state["weight"], "0.bias": torch.zeros(5)})
    assert model[0].weight is weight
    assert torch.equal(model[0].bias, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_sparse_csr_refuses_narrow_dtypes_on_the_cpu_before_converting(dtype: torch.dtype) -> None:
    """torch has no CPU CSR product for them: refused naming the layer, not at the first forward."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    bip_unstructured(model[0], "weight", amount=0.95)
    model.to(dtype)
    with pytest.raises(
        ValueError, match=rf"'0' holds {dtype} weights, for which torch has no CSR matrix product"
    ):
        to_sparse_csr(model)
    dense_enough = nn.Sequential(nn.Linear(16, 8)).to(dtype)  # nothing to convert: nothing refused
    assert type(to_sparse_csr(dense_enough)[0]) is nn.Linear
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))  # a conv it does not convert: not refused
    bip_unstructured(grouped[0], "weight", amount=0.95)
    assert type(to_sparse_csr(grouped.to(dtype), include_conv=True)[0]) is nn.Conv2d


def _nm_oracle(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every block of m along the last dimension holds at most n nonzeros, block by block."""
    rows = (weight != 0).tolist()
    if len(rows[0]) % m:
        return False
    return all(sum(row[b : b + m]) <= n for row in rows for b in range(0, len(row), m))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (1, 2), (4, 8), (0, 4), (2, 3)])
def test_is_nm_sparse_by_hand(n: int, m: int) -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert is_nm_sparse(weight, n, m) == _nm_oracle(weight, n, m)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"m": 0}, ValueError, r"n=2, m=0: an N:M pattern needs m >= 1"),
        ({"m": -4}, ValueError, r"n=2, m=-4"),
        ({"n": -1}, ValueError, r"n=-1, m=4"),
        ({"n": 5}, ValueError, r"n=5, m=4"),
        ({"n": 2.5}, TypeError, r"n must be an int, got 2.5"),
        ({"m": True}, TypeError, r"m must be an int, got True"),
        ({"dim": 3}, ValueError, r"dim=3 is out of range for a tensor with 2 dimensions"),
    ],
)
def test_is_nm_sparse_refuses_bad_arguments_by_name(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        is_nm_sparse(torch.ones(2, 8), **kwargs)
    with pytest.raises(ValueError, match="weight is a scalar"):
        is_nm_sparse(torch.tensor(1.0))


@pytest.mark.parametrize("bias", [True, False])
def test_a_csr_model_deep_copies_into_independent_tensors(seed: int, bias: bool) -> None:
    shared = nn.Linear(16, 16, bias=bias)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.Flatten(), shared, nn.ReLU(), shared)
    bip_unstructured(model[0], "weight", amount=0.9)
    bip_unstructured(shared, "weight", amount=0.9)
    csr = to_sparse_csr(model, min_sparsity=0.5, include_conv=True)
    twin = copy.deepcopy(csr)
    assert twin[4] is twin[2]  # one layer at two places, as in csr
    assert twin[2] is not csr[2]
    for layer, copied in ((csr[0], twin[0]), (csr[2], twin[2])):
        assert copied.weight.layout == torch.sparse_csr
        assert torch.equal(copied.weight.to_dense(), layer.weight.to_dense())
        for part in ("crow_indices", "col_indices", "values"):
            assert getattr(copied.weight, part)().data_ptr() != getattr(layer.weight, part)().data_ptr()
        assert (copied.bias is None) is not bias
        if bias:
            assert copied.bias.data_ptr() != layer.bias.data_ptr()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)
        twin[0].weight.values().zero_()  # the copy's values are its own
        torch.testing.assert_close(csr(x), want, rtol=1e-5, atol=1e-5)
        again = to_sparse_csr(csr, min_sparsity=0.5, include_conv=True)  # copies the model first
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)


def _masked(module: nn.Module, name: str) -> torch.Tensor | None:
    """``<name>_orig * <name>_mask`` computed here, or the plain tensor."""
    if hasattr(module, name + "_orig"):
        return (getattr(module, name + "_orig") * getattr(module, name + "_mask")).detach()
    value = getattr(module, name)
    return None if value is None else value.detach()


@pytest.mark.parametrize("prune_bias", [False, True], ids=["weight", "weight-and-bias"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_from_dense_takes_the_masked_values_of_now_not_of_the_last_forward(
    seed: int, kind: str, prune_bias: bool
) -> None:
    """torch's pruning hook writes ``module.weight`` only in a forward pass: after an optimizer
    step with none since, the attribute is stale. The CSR layer holds ``weight_orig * weight_mask``
    (and the same for a pruned bias) as they are when converting."""
    layer: nn.Module = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(4, 16) if kind == "linear" else torch.randn(2, 8, 7, 7)
    bip_semi_structured(layer, "weight", dim=1)
    if prune_bias:
        prune.l1_unstructured(layer, "bias", amount=0.5)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).square().sum().backward()
    optimizer.step()  # moves weight_orig and bias(_orig); no forward pass since
    weight, bias = _masked(layer, "weight"), _masked(layer, "bias")
    assert weight is not None
    assert not torch.equal(layer.weight.detach(), weight)  # (the attribute is stale)
    if kind == "linear":
        assert isinstance(layer, nn.Linear)
        csr: nn.Module = SparseCSRLinear.from_dense(layer)
        want = torch.nn.functional.linear(x, weight, bias)
    else:
        assert isinstance(layer, nn.Conv2d)
        csr = SparseCSRConv2d.from_dense(layer)
        want = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    assert torch.equal(csr.weight.to_dense().reshape(weight.shape), weight)
    torch.testing.assert_close(csr(x), want, rtol=1e-5, atol=1e-5)  # (summation order: im2col)


def test_from_dense_after_a_bip_step_takes_the_new_masks(seed: int) -> None:
    import torchbip

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = torchbip.BiP(model, 0.5, layout="2:4", steps=5, upper_lr=1.0)
    for _ in range(5):
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()  # new masks, no forward pass since
    first = model[0]
    assert isinstance(first, nn.Linear)
    weight = _masked(first, "weight")
    assert weight is not None
    assert torch.equal(SparseCSRLinear.from_dense(first).weight.to_dense(), weight)
    pruner.finish()
