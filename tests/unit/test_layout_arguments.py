"""The layout objects' arguments: ``Groups(dim=...)`` takes the ints 0 and 1 only, and every layout
holds plain Python types (a NumPy int, a ``numpy.str_`` or an ``enum.StrEnum`` member as given
would end up in ``describe()``, in ``BiP.state_dict()`` and in checkpoints).

Oracles: the input channels that BiP keeps at the start, ranked here by a sort of their L1 norms
(the ``"magnitude"`` scores of the groups); equality with the layout built from plain values; and
``torch.load(weights_only=True)``, which reads back plain types only.

Also the arguments that leave tensors out: the tied-weights error advises the options the caller
takes (``parameters=`` for :func:`torchbip.global_prune`, also ``exclude=`` for
:class:`torchbip.BiP`), and the ``exclude`` pattern BiP's docstring shows matches a top-level
``lm_head.weight``.
"""

from __future__ import annotations

import enum
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from torchbip import BiP, Groups, global_prune
from torchbip._func import resolve_targets
from torchbip.layouts import NM, GroupLayout


class Budget(enum.StrEnum):
    GLOBAL = "global"
    LAYER = "layer"


def mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def weights_only_round_trip(state: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "dim",
    [
        0.0, 1.0, np.float64(1.0), np.float32(0.0), np.bool_(True), np.bool_(False), True, False, "0",
        None, 2, -1, np.int64(2),
    ],
)  # fmt: skip
def test_groups_refuses_a_dim_that_is_not_the_int_0_or_1(dim: object) -> None:
    """A float or a bool (of either kind) used to pass and fail later ("tuple indices must be
    integers"); the message names dim, its value and its type."""
    pattern = (
        rf"^Groups\(dim={re.escape(repr(dim))}\): dim must be 0 \(filters\) or 1 \(input channels\), "
        rf"an int \(not a float or a bool\), got {re.escape(repr(dim))} of type {type(dim).__name__}$"
    )
    with pytest.raises(ValueError, match=pattern):
        Groups(dim)  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [np.int64(1), np.int32(1), np.uint8(1)])
def test_groups_stores_a_numpy_int_dim_as_a_plain_int_that_bip_uses(dim: Any) -> None:
    layout = Groups(dim)
    assert type(layout.dim) is int
    assert layout == Groups(1)
    assert hash(layout) == hash(Groups(1))
    assert repr(layout) == "Groups(dim=1, budget='layer')"
    model = mlp()
    norms = model[2].weight.detach().abs().sum(dim=0)  # one L1 norm per input channel
    kept = set(torch.argsort(norms, descending=True)[:8].tolist())
    pruner = BiP(model, amount=0.5, layout=layout, parameters=[(model[2], "weight")])
    mask = model[2].weight_mask
    assert {c for c in range(16) if bool(mask[:, c].all())} == kept
    assert {c for c in range(16) if not bool(mask[:, c].any())} == set(range(16)) - kept
    assert pruner.layout.describe()["dim"] == 1
    assert type(pruner.layout.describe()["dim"]) is int


@pytest.mark.parametrize("budget", [np.str_("global"), Budget.GLOBAL])
@pytest.mark.parametrize("via", ["object", "shorthand"])
def test_a_str_subclass_budget_is_stored_as_a_plain_str_and_the_state_loads(budget: str, via: str) -> None:
    if via == "object":
        layout = Groups(0, budget)
        assert type(layout.budget) is str
        assert layout == Groups(0, "global")
        assert repr(layout) == "Groups(dim=0, budget='global')"
        options: dict[str, Any] = {"layout": layout}
    else:
        options = {"layout": np.str_("filter"), "budget": budget}
    pruner = BiP(mlp(), amount=0.5, **options)
    described = pruner.layout.describe()
    assert described["budget"] == "global"
    assert type(described["budget"]) is str
    state = weights_only_round_trip(pruner.state_dict())  # (an UnpicklingError before)
    oracle = BiP(mlp(), amount=0.5, layout=Groups(0, "global"))
    oracle.load_state_dict(state)
    assert torch.equal(oracle.flat_scores, pruner.flat_scores)


def test_a_bound_group_layout_built_directly_holds_a_plain_str_budget() -> None:
    model = mlp()
    targets = resolve_targets(model, [(model[0], "weight")])
    bound = GroupLayout(targets, 0, 0.5, Budget.LAYER, [None])
    assert type(bound.budget) is str
    assert weights_only_round_trip(bound.describe()) == bound.describe()


def test_nm_stores_numpy_ints_as_plain_ints() -> None:
    layout = NM(np.int64(2), np.int64(4))
    assert (type(layout.n), type(layout.m)) == (int, int)
    assert layout == NM(2, 4)


def test_a_global_prune_checkpoint_with_a_str_subclass_budget_loads_with_weights_only(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    batches: list[tuple[Tensor, Tensor]] = [
        (torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)
    ]
    path = tmp_path / "bip.ckpt"
    global_prune(
        mlp(), 0.5, batches, structured=Groups(np.int64(1), Budget.GLOBAL), steps=2, progress=False,
        checkpoint_path=path,
    )  # fmt: skip
    saved = torch.load(path, weights_only=True)
    assert saved["run"]["budget"] == "global"
    assert type(saved["run"]["budget"]) is str
    assert saved["run"]["structured"] == "channel"


class TiedLM(nn.Module):
    """A language model whose top-level ``lm_head`` holds the embedding's Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 12, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(torch.relu(self.body(self.emb(x))))


def test_the_tied_weights_advice_of_global_prune_names_parameters_not_exclude() -> None:
    tokens = torch.randint(0, 12, (16,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"'lm_head\.weight', which is tied to") as info:
        global_prune(TiedLM(), 0.5, [(tokens, tokens)], steps=1, progress=False)
    assert str(info.value).endswith("untie the weights or leave them out with parameters=...")
    assert "exclude" not in str(info.value)  # global_prune takes no exclude=
    with pytest.raises(ValueError, match=r"leave them out with parameters=\.\.\.$"):
        resolve_targets(TiedLM(), None)


def test_the_tied_weights_advice_of_bip_names_exclude_too() -> None:
    with pytest.raises(
        ValueError, match=r"'lm_head\.weight', which is tied to .*\(exclude=\.\.\. or parameters=\.\.\.\)$"
    ):
        BiP(TiedLM(), 0.5)


@pytest.mark.parametrize("nested", [False, True])
def test_the_documented_exclude_pattern_leaves_out_a_tied_lm_head(nested: bool) -> None:
    """BiP's docstring shows ``exclude=["*lm_head*"]``: it matches ``lm_head.weight`` at the top
    level and inside a wrapper (``model.lm_head.weight``)."""
    model: nn.Module = TiedLM()
    if nested:
        wrapper = nn.Module()
        wrapper.model = model
        model = wrapper
    pruner = BiP(model, 0.5, exclude=["*lm_head*"])
    assert pruner.names == (["model.body.weight"] if nested else ["body.weight"])
    pruner.finish()
