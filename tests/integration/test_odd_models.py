"""``global_prune`` on odd but valid models: other layer types, norms, dtypes, layouts, modes.

Each model is checked for: the exact global sparsity, binary masks of the weight's dtype, no
revived earlier zeros, training flags restored, finite outputs, and the same outputs before and
after :func:`torch.nn.utils.prune.remove` (also in a fresh, never-pruned model that loads the
state dict strictly).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.nn.utils import spectral_norm as legacy_spectral_norm
from torch.nn.utils import weight_norm as legacy_weight_norm

import torchbip
from torchbip.masks import count_from_amount

Batches = list[tuple[Tensor, Tensor]]


# Tiny models: one intra-op thread is faster and makes float reductions reproducible.
pytestmark = pytest.mark.usefixtures("one_thread")


RUN: dict[str, Any] = {"steps": 4, "progress": False, "seed": 0, "lower_lr": 0.05, "upper_lr": 1.0}


def batches(shape: tuple[int, ...], n_classes: int = 3, n: int = 3, seed: int = 1) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, *shape, generator=gen), torch.randint(n_classes, (8,), generator=gen))
        for _ in range(n)
    ]


@dataclass
class Case:
    """A model factory (the same weights on every call), its data and how to prune it."""

    build: Callable[[], nn.Module]
    data: Batches
    amount: int | float = 0.6
    parameters: Callable[[nn.Module], list[tuple[nn.Module, str]]] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build()

    return make


def targets_of(model: nn.Module, case: Case) -> list[tuple[nn.Module, str]]:
    if case.parameters is not None:
        return case.parameters(model)
    return [
        (m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]


def prune_and_check(case: Case, model: nn.Module | None = None) -> nn.Module:
    """Run ``global_prune`` on the case's model and check everything the module docstring lists."""
    model = case.build() if model is None else model
    targets = targets_of(model, case)
    earlier = [
        getattr(m, n + "_mask") == 0
        if hasattr(m, n + "_mask")
        else torch.zeros_like(getattr(m, n), dtype=torch.bool)
        for m, n in targets
    ]
    remaining = sum(int((~e).sum()) for e in earlier)
    modes = [m.training for m in model.modules()]
    dtypes = [getattr(m, n).dtype for m, n in targets]
    parameters = None if case.parameters is None else targets

    report = torchbip.global_prune(
        model, case.amount, case.data, parameters=parameters, **{**RUN, **case.options}
    )

    assert [m.training for m in model.modules()] == modes
    expected = sum(int(e.sum()) for e in earlier) + count_from_amount(case.amount, remaining)
    masks = [getattr(m, n + "_mask") for m, n in targets]
    assert sum(int((mask == 0).sum()) for mask in masks) == expected
    assert report.sparsity.zeros == expected
    for mask, old_zeros, dtype, (module, name) in zip(masks, earlier, dtypes, targets, strict=True):
        assert mask.dtype == dtype
        assert bool(((mask == 0) | (mask == 1)).all())
        assert bool((mask[old_zeros] == 0).all()), "an earlier zero was revived"
        assert prune.is_pruned(module)
        assert not hasattr(module, name + "_scores")

    x = case.data[0][0]
    model.eval()
    with torch.no_grad():
        pruned_out = model(x)
    assert torch.isfinite(pruned_out.float()).all()
    state_before_remove = copy.deepcopy(model.state_dict())
    for module, name in targets:
        prune.remove(module, name)
    for module in model.modules():  # tensors pruned before, outside the targets
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    assert not prune.is_pruned(model)
    with torch.no_grad():
        assert torch.equal(model(x), pruned_out)

    fresh = case.build()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned_out)
    assert all(k.endswith(("_orig", "_mask")) for k in set(state_before_remove) - set(model.state_dict()))
    for module, training in zip(model.modules(), modes, strict=True):
        module.training = training
    return model


# --- layer types -----------------------------------------------------------------------------------


CASES = {
    "conv1d": Case(
        seeded(
            lambda: nn.Sequential(
                nn.Conv1d(3, 6, 3),
                nn.ReLU(),
                nn.Conv1d(6, 4, 3, padding=1, bias=False),
                nn.Flatten(),
                nn.Linear(4 * 8, 3),
            )
        ),
        batches((3, 10)),
    ),
    "conv3d": Case(
        seeded(lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 27, 3))),
        batches((2, 4, 4, 4)),
    ),
    "grouped-conv": Case(
        seeded(
            lambda: nn.Sequential(
                nn.Conv2d(4, 8, 3, groups=2),
                nn.ReLU(),
                nn.Conv2d(8, 8, 1, groups=4),
                nn.Flatten(),
                nn.Linear(8 * 16, 3),
            )
        ),
        batches((4, 6, 6)),
    ),
    "depthwise-conv": Case(
        seeded(
            lambda: nn.Sequential(
                nn.Conv2d(4, 4, 3, groups=4, padding=1),
                nn.Conv2d(4, 8, 1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(8 * 25, 3),
            )
        ),
        batches((4, 5, 5)),
    ),
    "linear-without-bias": Case(
        seeded(lambda: nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 3, bias=False))),
        batches((8,)),
        amount=100,
    ),
    "embedding": Case(
        seeded(lambda: nn.Sequential(nn.Embedding(20, 6, padding_idx=0), nn.Flatten(), nn.Linear(6 * 5, 3))),
        [
            (torch.randint(20, (8, 5), generator=torch.Generator().manual_seed(i)), torch.arange(8) % 3)
            for i in range(3)
        ],
        parameters=lambda m: [(m[0], "weight")],
    ),
    "embedding-and-linear": Case(
        seeded(lambda: nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(6 * 5, 3))),
        [
            (torch.randint(20, (8, 5), generator=torch.Generator().manual_seed(i)), torch.arange(8) % 3)
            for i in range(3)
        ],
        parameters=lambda m: [(m[0], "weight"), (m[2], "weight")],
        amount=0.8,
    ),
    "batchnorm": Case(
        seeded(
            lambda: nn.Sequential(
                nn.Conv2d(3, 6, 3),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(6 * 16, 8),
                nn.BatchNorm1d(8),
                nn.Linear(8, 3),
            )
        ),
        batches((3, 6, 6)),
    ),
    "layernorm": Case(
        seeded(lambda: nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))),
        batches((8,)),
        amount=0.9,
    ),
    "float64": Case(
        seeded(
            lambda: nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).double()
        ),
        [(x.double(), y) for x, y in batches((8,))],
    ),
    "bfloat16": Case(
        seeded(
            lambda: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).to(
                torch.bfloat16
            )
        ),
        [(x.bfloat16(), y) for x, y in batches((8,))],
    ),
    "bfloat16-conv": Case(
        seeded(
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).to(
                torch.bfloat16
            )
        ),
        [(x.bfloat16(), y) for x, y in batches((3, 6, 6))],
        amount=0.37,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_odd_model(name: str) -> None:
    prune_and_check(CASES[name])


PARAMETRIZATIONS = {
    "weight_norm": lambda m: parametrizations.weight_norm(m),
    "spectral_norm": lambda m: parametrizations.spectral_norm(m),
    "orthogonal": lambda m: parametrizations.orthogonal(m),
    "legacy-weight_norm": lambda m: legacy_weight_norm(m),
    "legacy-spectral_norm": lambda m: legacy_spectral_norm(m),
}


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("wrap", list(PARAMETRIZATIONS))
def test_computed_weights_are_left_out_of_the_defaults(wrap: str) -> None:
    """A weight_norm / spectral_norm layer holds no weight Parameter a mask could go on: by default
    the other layers are pruned, and the computed one keeps its parametrization, unmasked."""
    torch.manual_seed(0)
    plain = [nn.Linear(8, 16), nn.Linear(16, 16)]
    computed = PARAMETRIZATIONS[wrap](nn.Linear(16, 16))
    model = nn.Sequential(plain[0], nn.ReLU(), computed, nn.ReLU(), plain[1], nn.Linear(16, 3))
    plain.append(model[5])
    hooks_before = list(computed._forward_pre_hooks.values())
    report = torchbip.global_prune(model, 0.5, batches((8,)), **RUN)
    assert set(report.sparsity.tensors) == {"0.weight", "4.weight", "5.weight"}
    assert report.sparsity.zeros == count_from_amount(0.5, sum(m.weight.numel() for m in plain))
    assert all(prune.is_pruned(m) for m in plain)
    assert not hasattr(computed, "weight_mask")
    assert list(computed._forward_pre_hooks.values()) == hooks_before
    assert parametrize.is_parametrized(computed, "weight") == (not wrap.startswith("legacy"))
    with torch.no_grad():
        assert torch.isfinite(model(batches((8,))[0][0])).all()
    # BiP in a training loop picks the same tensors
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 4), PARAMETRIZATIONS[wrap](nn.Linear(4, 4)), nn.Linear(4, 3))
    assert torchbip.BiP(fresh, 0.5).names == ["0.weight", "2.weight"]


def test_sparse_embedding() -> None:
    """``nn.Embedding(sparse=True)`` yields sparse gradients; BiP densifies them for masks and scores."""
    case = Case(
        seeded(lambda: nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Flatten(), nn.Linear(6 * 5, 3))),
        CASES["embedding"].data,
        parameters=lambda m: [(m[0], "weight")],
    )
    prune_and_check(case)


def test_bfloat16_masks_are_exact_with_many_tied_scores() -> None:
    """bfloat16 holds 8 significant bits: many scores tie; the count must stay exact."""
    case = Case(
        seeded(lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3)).to(torch.bfloat16)),
        [(x.bfloat16(), y) for x, y in batches((32,))],
        amount=0.73,
        options={"score_init": "magnitude"},
    )
    model = case.build()
    scores = torch.cat([m.weight.detach().abs().reshape(-1) for m in (model[0], model[2])])
    assert scores.unique().numel() < scores.numel() // 2  # ties are common indeed
    prune_and_check(case, model)


# --- models in an unusual state --------------------------------------------------------------------


def _layers() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _pre_pruned() -> nn.Module:
    model = seeded(_layers)()
    prune.ln_structured(model[0], "weight", amount=2, n=2, dim=0)  # two whole filters
    prune.l1_unstructured(model[3], "weight", amount=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        prune.random_unstructured(model[5], "weight", amount=10)
    prune.l1_unstructured(model[5], "bias", amount=1)  # pruned, but not a target
    return model


def test_model_already_pruned_by_torch() -> None:
    case = Case(seeded(_layers), batches((3, 6, 6)), amount=0.5)
    model = _pre_pruned()
    bias_zero = model[5].bias_mask == 0
    filters = model[0].weight_mask.flatten(1).sum(1) == 0
    assert int(filters.sum()) == 2
    model = prune_and_check(case, model)
    assert bool((model[0].weight[filters] == 0).all()), "the filters torch pruned stay pruned"
    assert bool((model[5].bias[bias_zero] == 0).all()), "a pruned non-target keeps its zero"


def test_model_in_eval_mode_keeps_its_modes() -> None:
    """``global_prune`` trains in train mode and gives every module its own flag back."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3)
        )

    case = Case(seeded(build), batches((8,)))
    model = case.build().eval()
    model[2].train()  # mixed flags, restored one by one
    modes = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    prune_and_check(case, model)
    assert [m.training for m in model.modules()] == modes
    assert not torch.equal(model[1].running_mean, stats), "BiP trains in train mode"


def test_channels_last_weights_and_inputs() -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 4, 3),
            nn.Flatten(),
            nn.Linear(4 * 16, 3),
        ).to(memory_format=torch.channels_last)

    data = [(x.to(memory_format=torch.channels_last), y) for x, y in batches((3, 8, 8))]
    case = Case(seeded(build), data)
    model = case.build()
    reference = case.build()
    reference_case = Case(seeded(build), [(x.contiguous(), y) for x, y in data])
    cl = torch.channels_last
    original = {id(m): m.weight for m in (model[0], model[3])}

    torchbip.global_prune(model, case.amount, case.data, **RUN)
    torchbip.global_prune(
        reference.to(memory_format=torch.contiguous_format), 0.6, reference_case.data, **RUN
    )

    for conv in (model[0], model[3]):
        assert conv.weight_orig is original[id(conv)]
        assert conv.weight_orig.is_contiguous(memory_format=cl)
        assert conv.weight_mask.is_contiguous(memory_format=cl)
        conv(torch.zeros(1, conv.in_channels, 8, 8).to(memory_format=cl))
        assert conv.weight.is_contiguous(memory_format=cl)
    # the layout changes nothing but the layout: same masks as a contiguous twin
    for conv, twin in zip(
        (model[0], model[3], model[5]), (reference[0], reference[3], reference[5]), strict=True
    ):
        assert torch.equal(conv.weight_mask, twin.weight_mask)
        torch.testing.assert_close(conv.weight_orig, twin.weight_orig, rtol=1e-5, atol=1e-6)
    prune_and_check(case)
