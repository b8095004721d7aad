"""BiP's pruning methods called through torch's own entry points prune by magnitude.

Torch hands ``compute_mask`` either the weight itself or the user's ``importance_scores``
(``prune.global_unstructured``, ``method.prune(t)``, ``Method.apply``); every torch method ranks
``|t|`` there. So do :class:`~torchbip.BiPPruningMethod` (the oracle: torch's ``L1Unstructured``,
equal when no magnitudes tie, or an explicit argsort of ``|t|`` that keeps the lower index on
ties), :class:`~torchbip.BiPStructured` (torch's ``ln_structured`` with ``n=1``) and
:class:`~torchbip.semistructured.BiPSemiStructured` (an argsort of ``|t|`` per block). The
tensors hold many negative entries, so a ranking of signed values would prune the most negative
weights instead. The learned scores of ``global_prune`` are non-negative when they reach these
methods (its own top-k selects the masks), which the last tests check.
"""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip import BiPPruningMethod, BiPStructured, bip_structured, bip_unstructured
from torchbip.semistructured import BiPSemiStructured, bip_semi_structured
from torchbip.testing.strategies import amounts, default_masks, score_tensors, shapes

pytestmark = pytest.mark.usefixtures("one_thread")


# --- oracles and models ---------------------------------------------------------------------------


def n_pruned(amount: int | float, remaining: int) -> int:
    """torch's count: an int is a count, a float ``round(amount * remaining)``."""
    return amount if isinstance(amount, int) else round(amount * remaining)


def magnitude_oracle(t: Tensor, default_mask: Tensor, amount: int | float) -> Tensor:
    """Keep the allowed entries of largest ``|t|`` (ties: the lower flat index), by a sort."""
    values = t.detach().double().abs().reshape(-1).tolist()
    allowed = (default_mask != 0).reshape(-1).tolist()
    ranked = sorted((i for i in range(len(values)) if allowed[i]), key=lambda i: (-values[i], i))
    keep = torch.zeros(len(values))
    keep[ranked[: len(ranked) - n_pruned(amount, len(ranked))]] = 1.0
    return keep.view(t.shape)


def nm_oracle(t: Tensor, default_mask: Tensor, n: int, m: int, dim: int) -> Tensor:
    """Keep the ``n`` allowed entries of largest ``|t|`` in every block of ``m`` along ``dim``."""
    values = t.detach().double().abs().movedim(dim, -1)
    allowed = (default_mask != 0).movedim(dim, -1)
    keep = torch.zeros(values.shape, dtype=torch.float64)
    flat_v, flat_a, flat_k = values.reshape(-1, m), allowed.reshape(-1, m), keep.view(-1, m)
    for block in range(flat_v.shape[0]):
        v, a = flat_v[block].tolist(), flat_a[block].tolist()
        for i in sorted((i for i in range(m) if a[i]), key=lambda i: (-v[i], i))[:n]:
            flat_k[block, i] = 1.0
    return keep.movedim(-1, dim).float()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def params(model: nn.Sequential) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model if isinstance(m, nn.Linear)]


def masks(model: nn.Sequential) -> list[Tensor]:
    return [m.weight_mask.clone() for m, _ in params(model)]


def pruned_weights(model: nn.Sequential) -> Tensor:
    return torch.cat([m.weight_orig.detach()[m.weight_mask == 0] for m, _ in params(model)])


def signed(shape: tuple[int, ...], seed: int) -> Tensor:
    """Distinct magnitudes, random signs: half the entries negative."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    magnitudes = (torch.randperm(n, generator=gen) + 1).float() / n
    signs = torch.randint(2, (n,), generator=gen).float() * 2 - 1
    return (magnitudes * signs).view(shape)


# --- prune.global_unstructured -------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.5, 0.8, 100], ids=["float-0.5", "float-0.8", "int-100"])
def test_global_unstructured_prunes_the_smallest_magnitudes(amount: int | float) -> None:
    ours, theirs = mlp(), mlp()
    prune.global_unstructured(params(ours), pruning_method=BiPPruningMethod, amount=amount)
    prune.global_unstructured(params(theirs), pruning_method=prune.L1Unstructured, amount=amount)
    for got, want in zip(masks(ours), masks(theirs), strict=True):
        assert torch.equal(got, want)
    n_total = sum(m.weight.numel() for m, _ in params(ours))
    assert sum(int((m == 0).sum()) for m in masks(ours)) == n_pruned(amount, n_total)
    # the pruned entries are the smallest in magnitude, of both signs (not the most negative)
    gone = pruned_weights(ours)
    kept = torch.cat([m.weight_orig.detach()[m.weight_mask != 0] for m, _ in params(ours)])
    assert float(gone.abs().max()) < float(kept.abs().min())
    assert 0.3 < float((gone < 0).float().mean()) < 0.7


def test_global_unstructured_with_negative_importance_scores() -> None:
    ours, theirs = mlp(), mlp()
    scores = {p: signed(tuple(p[0].weight.shape), seed=i) for i, p in enumerate(params(ours))}
    their_scores = {(t, "weight"): scores[p] for p, (t, _) in zip(params(ours), params(theirs), strict=True)}
    prune.global_unstructured(
        params(ours), pruning_method=BiPPruningMethod, importance_scores=scores, amount=0.6
    )
    prune.global_unstructured(
        params(theirs), pruning_method=prune.L1Unstructured, importance_scores=their_scores, amount=0.6
    )
    for got, want in zip(masks(ours), masks(theirs), strict=True):
        assert torch.equal(got, want)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    got = torch.cat([m.reshape(-1) for m in masks(ours)])
    assert torch.equal(got, magnitude_oracle(flat, torch.ones_like(flat), 0.6))


def test_global_unstructured_on_top_of_earlier_pruning_never_revives() -> None:
    ours, theirs = mlp(), mlp()
    for model in (ours, theirs):
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.l1_unstructured(model[2], "weight", amount=40)
    earlier = [getattr(m, "weight_mask", torch.ones_like(m.weight)).clone() for m, _ in params(ours)]
    prune.global_unstructured(params(ours), pruning_method=BiPPruningMethod, amount=0.5)
    prune.global_unstructured(params(theirs), pruning_method=prune.L1Unstructured, amount=0.5)
    for got, want in zip(masks(ours), masks(theirs), strict=True):
        assert torch.equal(got, want)
    for got, before in zip(masks(ours), earlier, strict=True):
        assert bool((got <= before).all())


# --- method.prune(t), compute_mask and apply -------------------------------------------------------


@pytest.mark.parametrize("amount", [2, 5, 0.25, 0.5, 1.0])
def test_prune_of_a_tensor_equals_l1(amount: int | float) -> None:
    t = signed((3, 4), seed=1)
    got = BiPPruningMethod(amount).prune(t)
    want = prune.L1Unstructured(amount).prune(t)
    assert torch.equal(got, want)
    assert torch.equal(got, t * magnitude_oracle(t, torch.ones_like(t), amount))


def test_prune_with_importance_scores_and_default_mask() -> None:
    t = signed((4, 5), seed=2)
    scores = -t.abs()  # every score negative: the most negative is the most important
    default = (torch.arange(20) % 3 != 0).float().view(4, 5)
    got = BiPPruningMethod(0.5).prune(t, default_mask=default, importance_scores=scores)
    keep = magnitude_oracle(scores, default, 0.5)
    assert torch.equal(got, t * keep)
    assert bool((keep <= default).all())


def test_compute_mask_ties_keep_the_lower_index_by_magnitude() -> None:
    t = torch.tensor([-1.0, 1.0, -1.0, 2.0, -2.0, 0.5])
    # magnitudes 1, 1, 1, 2, 2, 0.5; keep 3: both 2s and the first 1
    assert BiPPruningMethod(3).compute_mask(t, torch.ones(6)).tolist() == [1, 0, 0, 1, 1, 0]


def test_compute_mask_never_revives_the_largest_magnitudes() -> None:
    t = torch.tensor([[-9.0, 0.1, 8.0], [-0.2, 0.3, -0.4]])
    default = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    got = BiPPruningMethod(2).compute_mask(t, default)
    assert got.tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


@pytest.mark.parametrize("scores_from", ["default", "the-weight", "signed-scores"])
@pytest.mark.parametrize("amount", [0.4, 7])
def test_apply_equals_l1_unstructured_apply(scores_from: str, amount: int | float) -> None:
    torch.manual_seed(3)
    ours = nn.Linear(6, 5)
    theirs = copy.deepcopy(ours)
    scores = {
        "default": None,
        "the-weight": ours.weight.detach().clone(),  # what torch passes when none are given
        "signed-scores": signed((5, 6), seed=4),
    }[scores_from]
    BiPPruningMethod.apply(ours, "weight", amount=amount, importance_scores=scores)
    prune.L1Unstructured.apply(theirs, "weight", amount=amount, importance_scores=scores)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    basis = scores if scores is not None else ours.weight_orig
    assert torch.equal(ours.weight_mask, magnitude_oracle(basis, torch.ones(5, 6), amount))


def test_bip_unstructured_with_negative_scores_keeps_them_in_the_buffer() -> None:
    layer = nn.Linear(4, 3)
    scores = signed((3, 4), seed=5)
    bip_unstructured(layer, "weight", amount=0.5, importance_scores=scores)
    assert torch.equal(layer.weight_mask, magnitude_oracle(scores, torch.ones(3, 4), 0.5))
    assert torch.equal(layer.weight_scores, scores)  # the scores as given, the mask by |scores|


def test_bip_unstructured_twice_and_on_top_of_l1_by_magnitude() -> None:
    torch.manual_seed(6)
    ours = nn.Linear(8, 6)
    with torch.no_grad():
        ours.weight.copy_(signed((6, 8), seed=7))
    theirs = copy.deepcopy(ours)
    prune.l1_unstructured(ours, "weight", amount=0.25)
    prune.l1_unstructured(theirs, "weight", amount=0.25)
    first = ours.weight_mask.clone()
    bip_unstructured(ours, "weight", amount=0.5, importance_scores=ours.weight.detach())  # signed
    prune.l1_unstructured(theirs, "weight", amount=0.5)
    bip_unstructured(ours, "weight", amount=3)
    prune.l1_unstructured(theirs, "weight", amount=3)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert bool((ours.weight_mask <= first).all())


@given(shape=shapes(max_numel=512), data=st.data())
def test_compute_mask_equals_l1_and_the_magnitude_oracle(shape: tuple[int, ...], data: Any) -> None:
    scores = data.draw(score_tensors(shape, ties=None))
    default = data.draw(default_masks(shape))
    amount = data.draw(amounts(int(default.count_nonzero())))
    got = BiPPruningMethod(amount).compute_mask(scores, default)
    assert torch.equal(got, magnitude_oracle(scores, default, amount))
    assert bool((got <= default).all())
    flips = torch.where(torch.arange(scores.numel()).view(shape) % 2 == 0, -1.0, 1.0)
    assert torch.equal(BiPPruningMethod(amount).compute_mask(scores * flips, default), got)
    if bool((default == 1).all()) and scores.abs().unique().numel() == scores.numel():
        assert torch.equal(got, prune.L1Unstructured(amount).compute_mask(scores, default))


# --- structured: BiPStructured against ln_structured(n=1) ----------------------------------------


def conv_with_negative_filters() -> nn.Conv2d:
    """Filters 0 and 3 hold large negative weights, filters 1 and 2 small positive ones, ..."""
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 6, kernel_size=2)
    with torch.no_grad():
        conv.weight.copy_(signed(tuple(conv.weight.shape), seed=9) * 0.1)
        conv.weight[0] = -3.0 - conv.weight[0].abs()
        conv.weight[3] = -2.0 - conv.weight[3].abs()
        conv.weight[1] = 0.01 + conv.weight[1].abs() * 0.01
        conv.weight[2] = 0.02 + conv.weight[2].abs() * 0.01
    return conv


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("amount", [0.5, 2])
def test_structured_compute_mask_equals_ln_structured(dim: int, amount: int | float) -> None:
    t = signed((6, 4, 4), seed=10)
    groups = t.movedim(dim, 0)  # a view: the first half of the groups get large negative entries
    groups[: groups.shape[0] // 2] = -3.0 * groups[: groups.shape[0] // 2].abs()
    default = torch.ones_like(t)
    got = BiPStructured(amount, dim=dim).compute_mask(t, default)
    want = prune.LnStructured(amount, n=1, dim=dim).compute_mask(t, default)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dim", [0, 1])
def test_bip_structured_equals_ln_structured_on_a_conv(dim: int) -> None:
    ours = conv_with_negative_filters()
    theirs = copy.deepcopy(ours)
    bip_structured(ours, "weight", amount=0.5, dim=dim)
    prune.ln_structured(theirs, "weight", amount=0.5, n=1, dim=dim)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    weight = ours.weight_orig.detach()
    want = prune.LnStructured(0.5, n=1, dim=dim).prune(weight)
    assert torch.equal(BiPStructured(0.5, dim=dim).prune(weight), want)  # the signed weight as scores
    if dim == 0:  # the large negative filters stay, the small positive ones go
        kept = ours.weight_mask.sum(dim=(1, 2, 3)) > 0
        assert kept[[0, 3]].all()
        assert not kept[[1, 2]].any()


def test_bip_structured_with_negative_importance_scores_equals_ln_structured() -> None:
    ours = conv_with_negative_filters()
    theirs = copy.deepcopy(ours)
    scores = signed(tuple(ours.weight.shape), seed=11)
    scores[4] = -5.0  # the filter of most negative scores has the largest L1 norm
    BiPStructured.apply(ours, "weight", amount=3, dim=0, importance_scores=scores)
    prune.LnStructured.apply(theirs, "weight", amount=3, n=1, dim=0, importance_scores=scores)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert bool(ours.weight_mask[4].all())
    norms = scores.abs().sum(dim=(1, 2, 3))
    assert torch.allclose(ours.weight_scores, norms)  # the buffer holds the ranked group norms


def test_bip_structured_one_score_per_group_by_magnitude() -> None:
    layer = nn.Linear(3, 5)
    group_scores = torch.tensor([-4.0, 1.0, -0.5, 3.0, 0.25])
    bip_structured(layer, "weight", amount=2, dim=0, importance_scores=group_scores)
    assert layer.weight_mask[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert torch.equal(layer.weight_scores, group_scores)


def test_bip_structured_on_top_of_earlier_pruning_never_revives() -> None:
    ours = conv_with_negative_filters()
    theirs = copy.deepcopy(ours)
    for module in (ours, theirs):
        prune.ln_structured(module, "weight", amount=1, n=1, dim=0)  # a container follows
    earlier = ours.weight_mask.clone()
    bip_structured(ours, "weight", amount=0.4, dim=0)
    prune.ln_structured(theirs, "weight", amount=0.4, n=1, dim=0)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert bool((ours.weight_mask <= earlier).all())
    # compute_mask directly on a default mask that dropped the largest filter: it stays dropped
    t = ours.weight_orig.detach()
    default = torch.ones_like(t)
    default[0] = 0
    got = BiPStructured(2, dim=0).compute_mask(t, default)
    kept = (got.sum(dim=(1, 2, 3)) > 0).tolist()
    assert kept == [False, False, False, True, True, True]  # 0 stays out; 1 and 2 have the lowest norms


# --- N:M: BiPSemiStructured against a per-block argsort of |t| -----------------------------------


@pytest.mark.parametrize(("n", "m", "dim"), [(2, 4, -1), (1, 4, -1), (2, 4, 0), (3, 8, 1)])
def test_semi_structured_compute_mask_by_magnitude(n: int, m: int, dim: int) -> None:
    t = signed((8, 8), seed=12)
    default = (torch.arange(64) % 5 != 0).float().view(8, 8)
    for mask in (torch.ones_like(t), default):
        got = BiPSemiStructured(n, m, dim).compute_mask(t, mask)
        assert torch.equal(got, nm_oracle(t, mask, n, m, dim))
        assert bool((got <= mask).all())


def test_bip_semi_structured_keeps_large_negative_weights() -> None:
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-5.0, 0.1, -4.0, 0.2, 0.3, -0.1, 6.0, -7.0]] * 2))
    weight = layer.weight.detach().clone()
    bip_semi_structured(layer, "weight", n=2, m=4)
    assert layer.weight_mask[0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert torch.equal(BiPSemiStructured(2, 4).prune(weight), weight * layer.weight_mask)


def test_bip_semi_structured_with_negative_scores_and_on_top_of_l1() -> None:
    torch.manual_seed(13)
    layer = nn.Linear(8, 4)
    prune.l1_unstructured(layer, "weight", amount=0.25)
    earlier = layer.weight_mask.clone()
    scores = signed((4, 8), seed=14)
    bip_semi_structured(layer, "weight", n=2, m=4, importance_scores=scores)
    assert torch.equal(layer.weight_mask, nm_oracle(scores, earlier, 2, 4, -1))
    assert bool((layer.weight_mask <= earlier).all())


# --- global_prune hands these methods non-negative scores only -------------------------------------


def data() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(32, 12, generator=gen)
    return [(x[:16], x[:16, :3].argmax(1)), (x[16:], x[16:, :3].argmax(1))]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        pytest.param(BiPPruningMethod, {}, id="unstructured"),
        pytest.param(BiPStructured, {"structured": "filter"}, id="filter"),
        pytest.param(BiPSemiStructured, {"structured": "2:4"}, id="2:4"),
    ],
)
def test_global_prune_applies_non_negative_scores_only(
    method: type[prune.BasePruningMethod], options: dict[str, Any]
) -> None:
    """Its initial scores are magnitudes: the signed/magnitude question never reaches its masks."""
    model = mlp()
    calls: list[Tensor] = []
    original = method.apply.__func__  # type: ignore[attr-defined]

    def spy(cls: type, module: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["importance_scores"].detach().clone())
        return original(cls, module, name, *args, **kwargs)

    with mock.patch.object(method, "apply", classmethod(spy)):
        torchbip.global_prune(model, 0.5, data(), steps=2, progress=False, seed=0, **options)
    assert calls
    assert all(bool((s >= 0).all()) for s in calls)


# --- a failed apply leaves the module as it was ----------------------------------------------------


def module_state(module: nn.Module) -> tuple[list[tuple[str, Any]], ...]:
    """The module's parameters, buffers and hooks (objects, in order) and its containers' methods."""
    containers = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.PruningContainer)]
    return (
        list(module._parameters.items()),
        list(module._buffers.items()),
        list(module._forward_pre_hooks.items()),
        [(type(c).__name__, tuple(c)) for c in containers],
    )


def assert_same_state(module: nn.Module, before: tuple[list[tuple[str, Any]], ...]) -> None:
    after = module_state(module)
    for got, want in zip(after[:3], before[:3], strict=True):
        assert [k for k, _ in got] == [k for k, _ in want]
        assert all(a is b for (_, a), (_, b) in zip(got, want, strict=True))
    assert after[3] == before[3]  # the same methods (compared by identity) in every container


def pruned_before(before: str) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    if before in ("l1", "container"):
        prune.l1_unstructured(layer, "weight", amount=4)
    if before == "container":
        prune.random_unstructured(layer, "weight", amount=4)
    if before == "bip":
        bip_unstructured(layer, "weight", amount=4)
    return layer


@pytest.mark.parametrize("before", ["none", "l1", "bip"])
@pytest.mark.parametrize("where", ["weight", "importance_scores"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_semi_structured_non_finite_scores_leave_the_module_as_it_was(
    before: str, where: str, bad: float
) -> None:
    layer = pruned_before(before)
    scores = None
    if where == "weight":
        with torch.no_grad():
            weight = layer.weight_orig if before != "none" else layer.weight
            weight[(layer.weight != 0).nonzero()[0].tolist()] = bad  # an entry not pruned yet
            layer(torch.zeros(1, 8))  # the pruning hook recomputes layer.weight
    else:
        scores = signed((4, 8), seed=6)
        scores[2, 3] = bad
    state = module_state(layer)
    named = "importance_scores" if where == "importance_scores" else "the values of 'weight'"
    with pytest.raises(ValueError, match=f"^{named}.* contain NaN or infinite values"):
        bip_semi_structured(layer, "weight", importance_scores=scores)
    assert_same_state(layer, state)
    assert prune.is_pruned(layer) == (before != "none")


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [(BiPPruningMethod, {"amount": 2}), (BiPStructured, {"amount": 1}), (BiPSemiStructured, {})],
    ids=["unstructured", "structured", "semi-structured"],
)
@pytest.mark.parametrize("before", ["none", "l1", "container", "bip"])
def test_a_failing_mask_computation_leaves_the_module_as_it_was(
    method: type[prune.BasePruningMethod], kwargs: dict[str, int], before: str
) -> None:
    layer = pruned_before(before)
    state = module_state(layer)
    with (
        mock.patch.object(method, "compute_mask", side_effect=RuntimeError("no mask")),
        pytest.raises(RuntimeError, match="no mask"),
    ):
        method.apply(layer, "weight", **kwargs)
    assert_same_state(layer, state)
    # and it prunes as before
    method.apply(layer, "weight", **kwargs)
    assert prune.is_pruned(layer)


def test_an_int_amount_counts_the_entries_a_torch_container_hands_on() -> None:
    # torch's container hands an unstructured method the entries whose mask is exactly 1
    layer = nn.Linear(4, 2)
    mask = torch.tensor([[2.0, 2.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    prune.custom_from_mask(layer, "weight", mask)
    state = module_state(layer)
    with pytest.raises(ValueError, match=r"amount=6 is larger than the number of unpruned entries \(5\)"):
        bip_unstructured(layer, "weight", amount=6)
    assert_same_state(layer, state)
    theirs = nn.Linear(4, 2)
    theirs.load_state_dict({"weight": layer.weight_orig, "bias": layer.bias})
    prune.custom_from_mask(theirs, "weight", mask)
    bip_unstructured(layer, "weight", amount=5)
    prune.l1_unstructured(theirs, "weight", amount=5)
    assert torch.equal(layer.weight_mask, theirs.weight_mask)
    assert layer.weight_mask.tolist() == [[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


# --- meta tensors: masks of the right shape, as torch's own methods give ---------------------------


@pytest.mark.parametrize(
    "apply",
    [
        lambda m: bip_unstructured(m, "weight", amount=0.5),
        lambda m: bip_unstructured(m, "weight", amount=3),
        lambda m: bip_structured(m, "weight", amount=1, dim=0),
        lambda m: bip_structured(m, "weight", amount=0.5, dim=1),
        lambda m: bip_semi_structured(m, "weight"),
    ],
    ids=["fraction", "count", "filters", "channels", "2:4"],
)
def test_meta_tensors_are_pruned_as_torch_prunes_them(apply: Any) -> None:
    torch.manual_seed(0)
    real = nn.Linear(8, 4)
    theirs = nn.Linear(8, 4, device="meta")
    prune.l1_unstructured(theirs, "weight", amount=0.5)
    ours = nn.Linear(8, 4, device="meta")
    apply(ours)
    apply(real)
    assert ours.weight_mask.is_meta
    assert (ours.weight_mask.shape, ours.weight_mask.dtype) == (
        theirs.weight_mask.shape,
        theirs.weight_mask.dtype,
    )
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    # materialised and loaded, it computes what the real module computes
    ours.to_empty(device="cpu")
    ours.load_state_dict(real.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(ours(x), real(x))


def test_an_int_amount_larger_than_a_meta_tensor_is_refused() -> None:
    layer = nn.Linear(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"amount=5 is larger than the number of unpruned entries \(4\)"):
        bip_unstructured(layer, "weight", amount=5)
    with pytest.raises(ValueError, match=r"amount=3 is larger than the number of unpruned filters \(2\)"):
        bip_structured(layer, "weight", amount=3, dim=0)
    assert not prune.is_pruned(layer)
    assert list(layer._parameters) == ["weight", "bias"]
