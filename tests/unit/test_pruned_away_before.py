"""The "pruned every entry" warning names only the tensors that BiP's or a baseline's ranking
pruned whole, not one that an earlier pruning had already zeroed entirely."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.baselines import imp, omp_finetune, random_finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def make_data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]


def pruned_every_entry(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "pruned every entry" in str(w.message)]


def test_bip_does_not_blame_itself_for_a_tensor_pruned_whole_before() -> None:
    model = make_model()
    prune.l1_unstructured(model[2], "weight", amount=1.0)  # the user's own earlier round
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = torchbip.BiP(model, 0.01, min_keep=0.5).finish()
    assert pruned_every_entry(caught) == []
    assert report.tensors["2.weight"].zeros == 64  # still all pruned, and reported so
    assert report.pruned_away == ["2.weight"]


def test_bip_still_names_a_tensor_it_pruned_whole_itself() -> None:
    model = make_model()
    prune.l1_unstructured(model[0], "weight", amount=1.0)  # pruned whole before BiP
    with torch.no_grad():
        model[4].weight.mul_(1e-6)  # the smallest magnitudes: the first 24 entries BiP's ranking drops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = torchbip.BiP(model, 24).finish()  # 24 of the 64 + 24 entries left
    assert report.pruned_away == ["0.weight", "4.weight"]
    (message,) = pruned_every_entry(caught)
    assert "'4.weight'" in message
    assert "'0.weight'" not in message


@pytest.mark.parametrize("run", ["omp", "random", "imp"])
def test_baselines_do_not_blame_the_ranking_for_a_tensor_pruned_whole_before(run: str) -> None:
    model = make_model()
    prune.l1_unstructured(model[2], "weight", amount=1.0)
    data = make_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if run == "omp":
            omp_finetune(model, 0.25, data, 0)
        elif run == "random":
            random_finetune(model, 0.25, data, 0)
        else:
            imp(model, 0.25, data, epochs_per_round=0.5, lr=0.0)
    assert pruned_every_entry(caught) == []
    assert not bool(model[2].weight_mask.any())
