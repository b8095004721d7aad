"""A tensor pruned before with a non-binary mask (``prune.custom_from_mask`` with 0.5 entries).

Torch's own pruning on top of such a mask keeps the 0.5 entries as they are and counts only the
entries whose mask is exactly 1 as remaining. BiP learns a binary mask over every entry not yet
zeroed, so it would write 0 or 1 over the 0.5 entries, and the baselines' global ranking
(``prune.global_unstructured``) would square them: every such entry point refuses the tensor with
a ``ValueError`` that names it, before it changes anything. A binary earlier mask is still pruned
on top of.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_state import assert_unchanged, capture
from torch import nn
from torch.nn.utils import prune

import torchbip
from torchbip import baselines

pytestmark = pytest.mark.usefixtures("one_thread")

# column 0 scaled by 0.5, column 3 pruned: 8 entries are exactly 1
SOFT = torch.tensor([[0.5, 1.0, 1.0, 0.0]] * 4)
BINARY = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 4)


def _model(mask: torch.Tensor) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    prune.custom_from_mask(model[2], "weight", mask)
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=generator), torch.randint(0, 2, (8,), generator=generator))]


def _bip(layout: object) -> Callable[[nn.Module], object]:
    return lambda model: torchbip.BiP(model, amount=0.5, layout=layout, parameters=[(model[2], "weight")])


def _global_prune(structured: str | None) -> Callable[[nn.Module], object]:
    return lambda model: torchbip.global_prune(
        model, 0.5, _data(), parameters=[(model[2], "weight")], steps=1, structured=structured, progress=False
    )


RUNS = {
    "BiP-unstructured": _bip("unstructured"),
    "BiP-filter": _bip("filter"),
    "BiP-channel": _bip("channel"),
    "BiP-1:2": _bip("1:2"),
    "BiP-defaults": lambda model: torchbip.BiP(model, amount=0.5),
    "global_prune": _global_prune(None),
    "global_prune-filter": _global_prune("filter"),
    "global_prune-1:2": _global_prune("1:2"),
    "global_prune-filter-defaults": lambda model: torchbip.global_prune(
        model, 0.5, _data(), steps=1, structured="filter", progress=False
    ),
    "global_prune-defaults": lambda model: torchbip.global_prune(
        model, 0.5, _data(), steps=1, progress=False
    ),
    "score_prune": lambda model: baselines.score_prune(model, 0.5, _data(), steps=1, progress=False),
    "omp_finetune": lambda model: baselines.omp_finetune(model, 0.5, _data(), epochs=0),
    "random_finetune": lambda model: baselines.random_finetune(model, 0.5, _data(), epochs=0),
    "imp": lambda model: baselines.imp(model, 0.5, _data(), rate=0.5),
}


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_soft_earlier_mask_is_refused_unchanged(run: Callable[[nn.Module], object]) -> None:
    model = _model(SOFT)
    before = capture(model)
    with pytest.raises(ValueError, match=r"'2\.weight'.*other than 0 and 1.*prune\.remove") as info:
        run(model)
    assert "0.5" in str(info.value)
    assert_unchanged(before, model)
    assert torch.equal(model[2].weight_mask, SOFT)


def test_soft_earlier_mask_is_refused_by_coupled() -> None:
    model = _model(SOFT)
    before = capture(model)
    with pytest.raises(ValueError, match=r"2\.weight"):
        torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(torch.randn(2, 4)))
    assert_unchanged(before, model)


def test_excluded_soft_tensor_is_left_alone() -> None:
    """Only the tensors BiP prunes are checked: one left out keeps its 0.5 entries."""
    model = _model(SOFT)
    torchbip.BiP(model, amount=0.5, exclude=["2.weight"]).finish()
    assert torch.equal(model[2].weight_mask, SOFT)
    # 16 + 8 entries of the other two weights, half pruned
    assert int((model[0].weight_mask == 0).sum()) + int((model[4].weight_mask == 0).sum()) == 12


@pytest.mark.parametrize("run", [RUNS["BiP-unstructured"], RUNS["global_prune"], RUNS["omp_finetune"]])
def test_binary_earlier_mask_is_pruned_on_top(run: Callable[[nn.Module], object]) -> None:
    """A 0/1 earlier mask: its 4 zeros stay, and half of its 12 remaining entries are pruned."""
    model = _model(BINARY)
    pruner = run(model)
    if isinstance(pruner, torchbip.BiP):
        pruner.finish()
    mask = model[2].weight_mask
    assert torch.equal(mask[:, 3], torch.zeros(4))
    assert int((mask == 0).sum()) == 4 + 6
    assert set(mask.unique().tolist()) == {0.0, 1.0}
