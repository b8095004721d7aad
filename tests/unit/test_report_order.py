"""Reports list their tensors in the order of ``model.named_modules()``, whatever order
``parameters=`` names them in (BiP, global_prune and the baselines alike)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.baselines import omp_finetune, random_finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3)
    )


def make_data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]


def reversed_pairs(model: nn.Sequential) -> list[tuple[nn.Module, str]]:
    """The pruned tensors named against model order (and bias before weight within a module)."""
    return [(model[3], "weight"), (model[2][0], "weight"), (model[0], "weight"), (model[0], "bias")]


# named_modules() visits 0, 1, 2, 2.0, 2.1, 3; within module 0, by name: bias before weight.
MODEL_ORDER = ["0.bias", "0.weight", "2.0.weight", "3.weight"]


def test_bip_report_and_finish_follow_model_order() -> None:
    model = make_model()
    pruner = torchbip.BiP(model, 0.5, parameters=reversed_pairs(model))
    assert list(pruner.report().tensors) == MODEL_ORDER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert list(pruner.finish().tensors) == MODEL_ORDER
    assert list(pruner.report().tensors) == MODEL_ORDER  # after the end too


def test_global_prune_report_follows_model_order() -> None:
    model = make_model()
    report = torchbip.global_prune(
        model, 0.5, make_data(), parameters=reversed_pairs(model)[:3], steps=1, progress=False
    )
    assert list(report.sparsity.tensors) == ["0.weight", "2.0.weight", "3.weight"]


@pytest.mark.parametrize("run", [omp_finetune, random_finetune])
def test_baseline_reports_follow_model_order(run) -> None:
    model = make_model()
    report = run(model, 0.5, make_data(), 0, parameters=reversed_pairs(model))
    assert list(report.tensors) == MODEL_ORDER
    assert report.zeros == int(0.5 * (6 * 8 + 8 + 8 * 8 + 8 * 3))  # the global count, by hand


def test_sparsity_report_orders_tensors_of_one_module_by_name() -> None:
    """Pruned weight first, bias second: listed by name within the module, as BiP's report does."""
    model = make_model()
    prune.l1_unstructured(model[3], "weight", amount=2)
    prune.l1_unstructured(model[0], "weight", amount=3)
    prune.l1_unstructured(model[0], "bias", amount=1)
    report = torchbip.sparsity_report(model, include_dense=True)
    assert list(report.tensors) == MODEL_ORDER
    assert [(t.numel, t.zeros) for t in report.tensors.values()] == [(8, 1), (48, 3), (64, 0), (24, 2)]
