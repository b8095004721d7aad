"""N:M does not compound: a round keeps the top ``n`` remaining entries of every block of ``m``.

A second ``2:4`` round (or ``2:4`` after a round that left every block with two entries or
fewer) would prune nothing, where ``docs/howto/iterative.rst``'s rule for a second round at ``p``
(``1 - (1 - p)^2``) holds for the other layouts: it is refused, naming the tensor, before
anything changes. Where only some blocks are full the round prunes the others down to ``n``.

Oracles: masks written by hand (``prune.custom_from_mask``) and counts per block of 4.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.layouts import NM

torch.set_num_threads(1)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    return [(x[i : i + 16], x[i : i + 16, :4].argmax(1)) for i in (0, 16)]


def _per_block(mask: Tensor) -> Tensor:
    """The number of kept entries of each block of 4 inputs of a Linear weight's mask."""
    return (mask != 0).reshape(mask.shape[0], -1, 4).sum(-1)


def _snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[int]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [len(m._forward_pre_hooks) for m in model.modules()]


def _same(model: nn.Module, snapshot: tuple[dict[str, Tensor], list[int]]) -> bool:
    state, hooks = snapshot
    now = model.state_dict()
    return (
        now.keys() == state.keys()
        and all(torch.equal(now[k], v) for k, v in state.items())
        and [len(m._forward_pre_hooks) for m in model.modules()] == hooks
    )


def test_a_second_global_prune_round_of_2_4_is_refused_and_changes_nothing() -> None:
    model = _model()
    run = {"steps": 2, "progress": False, "seed": 0}
    first = torchbip.global_prune(model, 0.5, _batches(), structured="2:4", **run)
    assert first.global_sparsity == 0.5
    snapshot = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"parameters names '0\.weight', pruned before so that every block of 4"
    ):
        torchbip.global_prune(model, 0.5, _batches(), structured="2:4", **run)
    assert _same(model, snapshot)


def test_a_second_bip_round_of_2_4_is_refused_naming_the_tensor() -> None:
    model = _model()
    torchbip.BiP(model, amount=0.5, layout="2:4").finish()
    snapshot = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"'0\.weight'.* would prune none of this tensor \(N:M does not compound"
    ):
        torchbip.BiP(model, amount=0.5, layout=NM(2, 4))
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        torchbip.BiP.check(model, amount=0.5, layout="2:4")
    assert _same(model, snapshot)


def test_2_4_after_a_round_that_left_at_most_two_per_block_is_refused() -> None:
    model = _model()
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1]] * 8)  # 2 and 1 per block: nothing to choose
    prune.custom_from_mask(model[0], "weight", mask)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        torchbip.BiP(model, amount=0.5, layout="2:4", parameters=[(model[0], "weight")])
    assert _same(model, snapshot)


def test_2_4_prunes_the_blocks_that_still_hold_more_than_two_entries() -> None:
    """Rows of blocks (4 kept, 3 kept, 2 kept, 1 kept) alternate with full rows; 2:4 brings every
    block down to at most 2, keeps the blocks with 2 or fewer as they are, revives nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    row = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0])
    mask = torch.stack([row, torch.ones(16, dtype=torch.long), row, row])
    prune.custom_from_mask(model[0], "weight", mask)
    before = model[0].weight_mask.clone()
    bip = torchbip.BiP(model, amount=0.5, layout="2:4", parameters=[(model[0], "weight")])
    after = model[0].weight_mask
    assert not bool(((after != 0) & (before == 0)).any())
    kept = _per_block(after)
    expected = torch.minimum(_per_block(before), torch.tensor(2))
    assert torch.equal(kept, expected)
    assert bip.n_keep == int(expected.sum())
    bip.finish()


def test_an_n_equal_to_m_pattern_is_still_a_no_op_not_an_error() -> None:
    """4:4 (amount 0.0) keeps everything on purpose, pruned before or not."""
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    torchbip.BiP(model, amount=0.0, layout="4:4", parameters=[(model[0], "weight")]).finish()
    assert int(model[0].weight_mask.sum()) == 32


def test_the_amount_message_says_what_the_pattern_keeps() -> None:
    with pytest.raises(
        ValueError, match=r"amount=0\.3 but the layout 2:4 keeps the top 2 entries of every block of 4"
    ) as info:
        torchbip.BiP(_model(), amount=0.3, layout="2:4")
    message = str(info.value)
    assert "1 - n/m = 0.5" in message
    assert "pass amount=0.5" in message
    assert "exactly" not in message
