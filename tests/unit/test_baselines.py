"""The baselines: exact sparsity against torch's own pruning, IMP's schedule, bad input.

Oracles: :func:`torch.nn.utils.prune.global_unstructured` on a copy of the model (OMP's mask),
the k smallest magnitudes of ``weight_orig * weight_mask`` among the unpruned entries, picked by
a sort here (the magnitude ranking of an already-pruned model), the documented IMP round rule in
integer arithmetic (prune ``floor(rate * kept)`` entries, at least one, clipped at milestones
and the final sparsity), the tensors a call was given (its report), and the model state
captured before a call that must fail or that has nothing to do.
"""

from __future__ import annotations

import collections
import copy
import itertools
import math
import re
import signal
import warnings
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip.baselines import _round_cut, imp, omp_finetune, random_finetune, train
from torchbip.masks import exact_fraction
from torchbip.report import SparsityReport


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def make_data(n: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        out.append((x, x[:, :3].argmax(1)))
    return out


def masks(model: nn.Sequential) -> list[Tensor]:
    return [model[i].weight_mask for i in (0, 2)]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A baseline that loops forever fails the test after 60 s instead of hanging the suite."""

    def fail(*_: object) -> None:
        raise TimeoutError("the call did not return within 60 s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("amount", [0.5, 0.73, 17])
def test_omp_without_fine_tuning_is_torch_global_magnitude_pruning(amount: float) -> None:
    model, oracle = make_model(), make_model()
    report = omp_finetune(model, amount, make_data(), epochs=0)
    prune.global_unstructured(
        [(oracle[0], "weight"), (oracle[2], "weight")], pruning_method=prune.L1Unstructured, amount=amount
    )
    for a, b in zip(masks(model), masks(oracle), strict=True):
        assert torch.equal(a, b)
    zeros = sum(int((m == 0).sum()) for m in masks(model))
    assert zeros == report.zeros == (amount if isinstance(amount, int) else round(amount * 144))


def test_random_masks_are_exact_and_seeded() -> None:
    a, b, c = make_model(), make_model(), make_model()
    for model, seed in ((a, 3), (b, 3), (c, 4)):
        random_finetune(model, 0.6, make_data(), epochs=0, seed=seed)
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(masks(a), masks(c), strict=True))
    assert sum(int((m == 0).sum()) for m in masks(a)) == round(0.6 * 144)


def test_imp_rounds_follow_the_rate_and_hit_milestones_and_the_end_exactly() -> None:
    seen: list[float] = []
    result = imp(
        make_model(), 0.7, make_data(), epochs_per_round=0.5, milestones=[0.5],
        on_round=lambda r, m: seen.append(r.sparsity),
    )  # fmt: skip
    kept, expected = 144, []
    for stop in (72, round(0.3 * 144)):  # the milestone, then the end
        while kept > stop:
            kept = max(stop, kept - max(1, kept // 5))
            expected.append(1 - kept / 144)
    assert [r.sparsity for r in result.rounds] == pytest.approx(expected)
    assert seen == [r.sparsity for r in result.rounds]
    assert 0.5 in [round(s, 10) for s in seen]


@pytest.mark.parametrize("amount", [1.0, 0.99, 144, 142])
def test_imp_reaches_targets_that_keep_fewer_entries_than_one_over_the_rate(amount: float) -> None:
    """The last entries: ``floor(0.2 * kept)`` is 0 below 5 entries; each round still prunes one,
    so IMP reaches the end (it looped forever before)."""
    model = make_model()
    result = imp(model, amount, make_data(1), epochs_per_round=0.25)
    final = 144 - (round(amount * 144) if isinstance(amount, float) else amount)
    kept, expected = 144, []
    while kept > final:
        kept = max(final, kept - max(1, kept // 5))
        expected.append(1 - kept / 144)
    assert [r.sparsity for r in result.rounds] == pytest.approx(expected)
    assert sum(int(m.sum()) for m in masks(model)) == final


def test_imp_rewinds_the_unpruned_weights_to_the_start() -> None:
    model = make_model()
    start = [model[i].weight.detach().clone() for i in (0, 2)]
    rewound: list[list[Tensor]] = []

    def before_training(module: nn.Module, args: object) -> None:
        if prune.is_pruned(model) and len(rewound) < 1:
            rewound.append([model[i].weight_orig.detach().clone() for i in (0, 2)])

    handle = model.register_forward_pre_hook(before_training)
    imp(model, 0.5, make_data(), epochs_per_round=1)
    handle.remove()
    # the first forward after the first pruning sees the initial weights again
    assert all(torch.equal(a, b) for a, b in zip(rewound[0], start, strict=True))


class OneShot:
    """A loader with a len() whose iteration runs only once (a generator in disguise)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.it = batches, iter(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self.it


def failing_loss(after: int):
    calls = {"n": 0}

    def loss(out: Tensor, y: Tensor) -> Tensor:
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("the loss failed")
        return F.cross_entropy(out, y)

    return loss


BAD = [
    pytest.param(omp_finetune, {"loader": []}, ValueError, "loader is empty", id="omp-empty"),
    pytest.param(imp, {"loader": []}, ValueError, "loader is empty", id="imp-empty"),
    pytest.param(random_finetune, {"loader": iter(make_data())}, TypeError, "len\\(\\)", id="random-no-len"),
    pytest.param(
        omp_finetune, {"epochs": -1}, ValueError, r"epochs must be a finite number >= 0, got -1", id="omp-neg"
    ),
    pytest.param(
        imp, {"epochs_per_round": 0}, ValueError, r"^epochs_per_round must be .* > 0, got 0", id="imp-zero"
    ),
    pytest.param(
        omp_finetune, {"schedule": "cosin"}, ValueError, r"schedule must be .*'cosin'", id="schedule"
    ),
    pytest.param(random_finetune, {"bogus": 1}, TypeError, r"train_options: .*bogus", id="unknown-option"),
    pytest.param(
        omp_finetune, {"lr": -1.0}, ValueError, r"^lr must be a finite number >= 0 .*got -1\.0$", id="lr"
    ),
    pytest.param(
        imp, {"milestones": [0.8]}, ValueError, r"milestones \[0\.8\] lie beyond the final", id="milestone"
    ),
    pytest.param(imp, {"rate": "a"}, ValueError, r"rate must be a number in \(0, 1\), got 'a'", id="rate"),
    pytest.param(omp_finetune, {"loss_fn": failing_loss(2)}, RuntimeError, "the loss failed", id="omp-loss"),
    pytest.param(imp, {"loss_fn": failing_loss(5)}, RuntimeError, "the loss failed", id="imp-loss"),
    pytest.param(
        omp_finetune,
        {"loader": [{"x": x, "y": y} for x, y in make_data()]},
        ValueError,
        r"loader must yield \(inputs, targets\) pairs, got "
        r"dict\(x=Tensor\[16, 6\] float32, y=Tensor\[16\] int64\)",
        id="omp-dict-batches",
    ),
    pytest.param(
        imp,
        {"loader": [(x, y, y) for x, y in make_data()]},
        ValueError,
        r"loader must yield \(inputs, targets\) pairs, got tuple\(Tensor\[16, 6\] float32, Tensor",
        id="imp-triples",
    ),
    pytest.param(
        omp_finetune,
        {"loader": [(torch.full_like(x, math.nan), y) for x, y in make_data()]},
        FloatingPointError,
        r"fine-tune: loss_fn returned a non-finite loss \(nan\) at step 0",
        id="omp-nan-loss",
    ),
    pytest.param(
        imp,
        {"loader": [(x * math.inf, y) for x, y in make_data()]},
        FloatingPointError,
        r"loss_fn returned a non-finite loss \(nan\) at step 0",
        id="imp-inf-inputs",
    ),
    pytest.param(
        omp_finetune,
        {"loss_fn": lambda out, y: F.cross_entropy(out, y, reduction="none")},
        ValueError,
        r"OMP fine-tune: loss_fn must return a scalar tensor, got \(16,\)",
        id="omp-loss-not-scalar",
    ),
    pytest.param(
        omp_finetune,
        {"loader": OneShot(make_data()), "epochs": 2},
        ValueError,
        "yielded no batch",
        id="one-shot",
    ),
    *(
        pytest.param(
            fn, {"loss_fn": loss}, ValueError, f"{label}: loss_fn {words} {dtype}", id=f"{name}-{kind}"
        )
        for fn, name, label in ((omp_finetune, "omp", "OMP fine-tune"), (imp, "imp", "IMP round 0"))
        for kind, loss, words, dtype in (
            (
                "int-loss",
                lambda out, y: torch.tensor(3),
                r"must return a real floating-point loss \(got dtype",
                "torch.int64",
            ),
            (
                "complex-loss",
                lambda out, y: F.cross_entropy(out, y).to(torch.complex64),
                r"must return a real floating-point loss \(got dtype",
                "torch.complex64",
            ),
            (
                "detached-loss",
                lambda out, y: F.cross_entropy(out, y).detach(),
                r"returned a loss without an autograd graph \(dtype",
                "torch.float32",
            ),
        )
    ),
]


@pytest.mark.parametrize(("fn", "kwargs", "error", "match"), BAD)
def test_bad_input_and_failures_leave_the_model_as_it_was(fn, kwargs, error, match) -> None:
    model = make_model()
    before = capture(model)
    kwargs = {"loader": make_data(), **kwargs}
    loader = kwargs.pop("loader")
    with pytest.raises(error, match=match):
        fn(model, 0.5, loader, **kwargs)
    assert_unchanged(before, model)
    assert not prune.is_pruned(model)


Views = collections.namedtuple("Views", "left right")


class Recorder(nn.Module):
    """Takes ``(left, right)`` or one ``Views``; records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.calls: list[str] = []

    def forward(self, left: Tensor | Views, right: Tensor | None = None) -> Tensor:
        if right is None:
            assert isinstance(left, Views)
            self.calls.append("one Views")
            left, right = left
        else:
            self.calls.append("two tensors")
        return self.a(left) + self.b(right)


@pytest.mark.parametrize(
    ("pack", "call"),
    [(lambda x: (x[:, :3], x[:, 3:]), "two tensors"), (lambda x: Views(x[:, :3], x[:, 3:]), "one Views")],
    ids=["tuple", "namedtuple"],
)
def test_train_passes_inputs_as_global_prune_does(pack: Callable[[Tensor], Any], call: str) -> None:
    """A plain tuple of inputs is unpacked into positional arguments, a namedtuple is one argument
    (torchbip.global_prune's convention, so that one loader serves BiP and the baselines)."""
    torch.manual_seed(0)
    model = Recorder()
    loss = train(model, [(pack(x), y) for x, y in make_data()], epochs=1)
    assert math.isfinite(loss)
    assert model.calls == [call] * 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, r"epochs must be a finite number > 0, got 0"),
        ({"epochs": float("nan")}, ValueError, r"got nan"),
        ({"schedule": "linear"}, ValueError, "schedule must be"),
    ],
)
def test_train_checks_its_arguments_before_training(kwargs, error, match) -> None:
    model = make_model()
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        train(model, make_data(), **kwargs)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("run", ["omp", "imp"])
def test_baselines_warn_when_the_global_ranking_prunes_a_whole_tensor(run: str) -> None:
    model = make_model()
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    call = (
        (lambda: omp_finetune(model, 0.5, make_data(), 0))
        if run == "omp"
        else (lambda: imp(model, 0.5, make_data(), epochs_per_round=0.25, lr=0.0))
    )
    with pytest.warns(UserWarning, match=r"the global ranking pruned every entry of '2\.weight'"):
        call()
    assert not bool(model[2].weight_mask.any())


# -- ranking on the current weights, reports, IMP's per-round count, amount=0 -------------------


def smallest_alive(values: Tensor, alive: Tensor, k: int) -> Tensor:
    """Oracle: a mask of the ``k`` entries of smallest ``|values|`` among ``alive``, by a sort."""
    order = sorted((abs(float(v)), i) for i, v in enumerate(values.tolist()) if alive[i])
    chosen = torch.zeros_like(alive)
    chosen[[i for _, i in order[:k]]] = True
    return chosen


def trained_after_pruning(lr: float = 0.5) -> nn.Sequential:
    """A model pruned to 50%, then trained for one SGD step of the user's own loop: its ``weight``
    attributes are stale.

    torch's pruning hook computes ``weight`` in the forward pass, before the optimizer's step, so
    afterwards ``weight`` lags ``weight_orig * weight_mask`` by that step. (:func:`train` leaves
    them fresh; a plain loop does not.)
    """
    model = make_model()
    prune.global_unstructured(
        [(model[0], "weight"), (model[2], "weight")], pruning_method=prune.L1Unstructured, amount=0.5
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    ((x, y),) = make_data(1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model


def flat(model: nn.Sequential, what: str) -> Tensor:
    """The concatenated ``weight_orig * weight_mask`` (``"current"``), ``weight`` or mask."""
    parts = {
        "current": lambda m: (m.weight_orig * m.weight_mask).detach(),
        "stale": lambda m: m.weight.detach(),
        "mask": lambda m: m.weight_mask.bool(),
    }[what]
    return torch.cat([parts(model[i]).flatten() for i in (0, 2)])


def test_omp_on_a_pruned_trained_model_ranks_the_current_weights_not_the_stale_ones() -> None:
    """OMP on a pruned model prunes the smallest ``|weight_orig * weight_mask|`` of the unpruned
    entries, not the smallest of ``weight`` as the last forward pass left it."""
    model = trained_after_pruning()
    current, stale, alive = flat(model, "current"), flat(model, "stale"), flat(model, "mask")
    k = round(0.4 * int(alive.sum()))
    expected = smallest_alive(current, alive, k)
    assert not torch.equal(expected, smallest_alive(stale, alive, k))  # the test can tell them apart
    omp_finetune(model, 0.4, make_data(), epochs=0)
    newly = alive & ~flat(model, "mask")
    assert torch.equal(newly, expected)


def test_imp_ranks_each_round_on_the_trained_weights_of_the_round_before() -> None:
    """``on_round`` sees the trained model just before the next round prunes: the entries that
    round prunes are the smallest of those weights among the unpruned ones, not of what the
    ``weight`` attributes hold (here a decoy that ``on_round`` sets, as a stale attribute would
    be: ``train`` itself leaves them fresh)."""
    model = make_model()
    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    gen = torch.Generator().manual_seed(0)

    def record(_: object, m: nn.Module) -> None:
        for i in (0, 2):  # the weights' values, rescaled at random: another order of magnitudes
            layer = model[i]
            decoy = (layer.weight_orig * layer.weight_mask).detach()
            layer.weight = decoy * torch.rand(decoy.shape, generator=gen)
        current, stale, mask = (flat(model, what).clone() for what in ("current", "stale", "mask"))
        seen.append((current, stale, mask))

    imp(model, 0.7, make_data(1), epochs_per_round=1, lr=0.3, on_round=record)
    assert len(seen) >= 4
    differs = 0
    for (current, stale, alive), (_, _, after) in itertools.pairwise(seen):
        newly = alive & ~after
        k = int(newly.sum())
        assert torch.equal(newly, smallest_alive(current, alive, k))
        differs += not torch.equal(newly, smallest_alive(stale, alive, k))
    assert differs  # the stale weights would have chosen other entries


class WithRootTensor(nn.Module):
    """A root-level parameter and two Linear layers, for what a report may name."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 6))
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x * self.scale)))


@pytest.mark.parametrize("run", [omp_finetune, random_finetune])
def test_the_report_names_exactly_the_tensors_the_call_pruned(run: Callable[..., SparsityReport]) -> None:
    """Tensors pruned before the call (a root-level one, a bias of a chosen module) stay out."""
    torch.manual_seed(0)
    model = WithRootTensor()
    prune.l1_unstructured(model, "scale", 2)  # pruned before, not by the call
    prune.l1_unstructured(model.a, "bias", 3)
    report = run(model, 0.5, make_data(), epochs=0, parameters=[(model.a, "weight")])
    assert {k: (t.numel, t.zeros) for k, t in report.tensors.items()} == {"a.weight": (48, 24)}
    assert report.global_sparsity == 0.5

    torch.manual_seed(0)
    model = WithRootTensor()
    prune.l1_unstructured(model.a, "bias", 3)
    report = run(model, 10, make_data(), epochs=0, parameters=[(model.b, "weight"), (model, "scale")])
    assert list(report.tensors) == ["scale", "b.weight"]  # in model order: the root module comes first
    assert report.numel == 24 + 6
    assert report.zeros == 10


def test_imp_rate_rule_is_exact_for_every_rate_in_hundredths_and_thousandths() -> None:
    """``floor(rate * kept)`` entries per round (at least one), in integer arithmetic: ``1 - rate``
    in floats gave one entry fewer for 27 of the 99 rates i/100 (0.45 of 100 pruned 44)."""
    remaining = [*range(1, 202), *range(250, 10_001, 250), 266_200, 10**6 + 1]
    for den in (100, 1000):
        for i in range(1, den):
            rate = exact_fraction(i / den)
            assert rate == Fraction(i, den)
            for n in remaining:
                assert _round_cut(n, rate) == max(1, n * i // den), (i / den, n)


@pytest.mark.parametrize(
    ("rate", "exact"),
    [
        (np.float32(0.45), Fraction(9, 20)),
        (np.float64(0.41), Fraction(41, 100)),
        (Fraction(1, 3), Fraction(1, 3)),
    ],
    ids=["float32", "float64", "Fraction"],
)
def test_imp_rate_is_taken_as_written_for_numpy_scalars_and_fractions(rate: object, exact: Fraction) -> None:
    """A NumPy scalar counts as the decimal it prints as; a fraction as itself."""
    assert exact_fraction(rate) == exact  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [0.45, 0.41, 0.7, 0.57])
def test_imp_prunes_rate_of_the_remaining_entries_rounded_down(rate: float) -> None:
    """End to end on 100 weights, for rates that the float rule rounded one entry short."""
    torch.manual_seed(0)
    model = nn.Linear(10, 10)  # 100 weights
    data = [(torch.randn(8, 10), torch.randint(0, 10, (8,)))]
    result = imp(model, 0.95, data, epochs_per_round=1, rate=rate)
    percent = round(rate * 100)  # the rate in whole percent, an int
    kept, expected = 100, []
    while kept > 5:
        kept = max(5, kept - max(1, kept * percent // 100))
        expected.append(kept)
    assert [round((1 - r.sparsity) * 100) for r in result.rounds] == expected
    assert int(model.get_buffer("weight_mask").sum()) == 5


@pytest.mark.parametrize("amount", [0, 0.0, 0.003], ids=["int", "float", "rounds-to-none"])
def test_imp_with_nothing_to_prune_runs_no_round_and_leaves_the_model_untouched(amount: float) -> None:
    """No training (no loss computed, not even the rewind point's), no round, nothing changed."""
    model = make_model()
    before = capture(model)
    calls: list[object] = []

    def counting_loss(out: Tensor, y: Tensor) -> Tensor:
        calls.append(None)
        return F.cross_entropy(out, y)

    result = imp(
        model, amount, make_data(), epochs_per_round=2, rewind_epochs=1, milestones=[0.0],
        loss_fn=counting_loss, on_round=lambda r, m: calls.append(r),
    )  # fmt: skip
    assert result.rounds == []
    assert result.wall_time_s == 0.0
    assert calls == []  # no training step, no round reported
    assert_unchanged(before, model)
    assert not prune.is_pruned(model)


def test_imp_reports_each_round_at_exactly_the_fraction_of_entries_its_masks_prune() -> None:
    """``IMPRound.sparsity`` is zeros / entries of the masks, not ``1 - kept / entries`` (which
    is off in the last bit for most counts, e.g. 1 - 116/144)."""
    counted: list[tuple[float, float]] = []

    def count(r: Any, model: nn.Module) -> None:
        counted.append((r.sparsity, int((model.get_buffer("weight_mask") == 0).sum()) / 144))

    torch.manual_seed(0)
    data = [(torch.randn(8, 12), torch.randint(0, 12, (8,)))]
    imp(nn.Linear(12, 12), 0.9, data, epochs_per_round=0.25, on_round=count)  # 144 weights
    assert len(counted) > 5
    assert [reported for reported, _ in counted] == [exact for _, exact in counted]


@pytest.mark.parametrize("run", ["omp", "random"])
def test_omp_and_random_prune_the_count_of_a_numpy_float32_amount_as_global_prune_does(run: str) -> None:
    """float32(0.0173611...) * 144 is 2.50000012: 3 entries (as ``count_from_amount`` and
    ``global_prune`` count), not the 2 that torch's float32 product, exactly 2.5, rounds to."""
    amount = np.float32(0.0173611119389534)
    expected = round(float(amount) * 144)
    assert expected == 3
    model = make_model()
    fn = omp_finetune if run == "omp" else random_finetune
    report = fn(model, amount, make_data(), epochs=0)
    zeros = sum(int((m == 0).sum()) for m in masks(model))
    assert zeros == report.zeros == expected


def test_imp_wall_time_leaves_out_the_on_round_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each training pass takes 2 s and each ``on_round`` (an evaluation) 5 s; the
    rounds' cumulative times count the training only."""
    from types import SimpleNamespace

    import torchbip.baselines as baselines

    clock = [0.0]
    monkeypatch.setattr(baselines, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def two_seconds(*args: Any, **kwargs: Any) -> float:
        clock[0] += 2.0
        return 0.0

    monkeypatch.setattr(baselines, "_train", two_seconds)

    def evaluate(record: Any, model: nn.Module) -> None:
        clock[0] += 5.0

    result = imp(make_model(), 0.5, make_data(), epochs_per_round=1, rate=0.2, on_round=evaluate)
    rounds = len(result.rounds)
    assert rounds >= 3
    # round 0 trains before the first cut, then one training per round
    assert [r.wall_time_s for r in result.rounds] == [2.0 * (i + 1) for i in range(1, rounds + 1)]


# -- every argument checked before any work, the message naming it and its value ------------------


def counting_loss() -> tuple[Callable[[Tensor, Tensor], Tensor], list[int]]:
    """``F.cross_entropy``, counting its calls (0 calls: nothing was trained)."""
    calls = [0]

    def loss(out: Tensor, y: Tensor) -> Tensor:
        calls[0] += 1
        return F.cross_entropy(out, y)

    return loss, calls


#: A CUDA device this machine lacks (its index past the last device; none without CUDA).
ABSENT_DEVICE = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
_LR = r"must be a finite number >= 0 \(at most the largest float32, 3\.403e\+38\), got "
BAD_OPTIONS = [  # refused by train and by every baseline that passes them to it
    pytest.param({"lr": "a"}, ValueError, rf"^lr {_LR}'a'$", id="lr-str"),
    pytest.param({"lr": math.nan}, ValueError, rf"^lr {_LR}nan$", id="lr-nan"),
    pytest.param({"lr": -math.inf}, ValueError, rf"^lr {_LR}-inf$", id="lr-inf"),
    pytest.param({"lr": 1e39}, ValueError, rf"^lr {_LR}1e\+39$", id="lr-float32-overflow"),
    pytest.param({"lr": True}, ValueError, rf"^lr {_LR}True$", id="lr-bool"),
    pytest.param({"weight_decay": -1e-4}, ValueError, rf"^weight_decay {_LR}-0\.0001$", id="wd-neg"),
    pytest.param({"weight_decay": math.nan}, ValueError, rf"^weight_decay {_LR}nan$", id="wd-nan"),
    pytest.param(
        {"momentum": math.nan}, ValueError, r"^momentum must be a number in \[0, 1\), got nan$", id="mom-nan"
    ),
    pytest.param(
        {"momentum": 1.0}, ValueError, r"^momentum must be a number in \[0, 1\), got 1\.0$", id="mom-one"
    ),
    pytest.param(
        {"momentum": -0.1}, ValueError, r"^momentum must be a number in \[0, 1\), got -0\.1$", id="mom-neg"
    ),
    pytest.param(
        {"momentum": np.bool_(False)}, ValueError, r"^momentum must be .*, got np\.False_$", id="mom-np-bool"
    ),
    pytest.param({"loss_fn": None}, TypeError, r"^loss_fn must be callable .*, got None$", id="loss-none"),
    pytest.param({"loss_fn": "ce"}, TypeError, r"^loss_fn must be callable .*, got 'ce'$", id="loss-str"),
    pytest.param(
        {"device": ABSENT_DEVICE},
        ValueError,
        rf"^device='{ABSENT_DEVICE}' is not available here",
        id="device-absent",
    ),
    pytest.param({"device": "foo"}, ValueError, r"^device='foo' is not a torch device", id="device-bad"),
    pytest.param({"device": 0}, TypeError, r"^device must be a str .*, got 0$", id="device-int"),
]


@pytest.mark.parametrize("fn", [omp_finetune, random_finetune, imp])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        *BAD_OPTIONS,
        pytest.param({"desc": "mine"}, TypeError, r"^train_options: desc='mine' cannot be passed", id="desc"),
    ],
)
def test_baselines_refuse_bad_training_options_before_any_work(fn, kwargs, error, match) -> None:
    """Refused before the model is pruned or trained (the loss never called), the model as it was."""
    model = make_model()
    before = capture(model)
    loss, calls = counting_loss()
    with pytest.raises(error, match=match):
        fn(model, 0.5, make_data(), 1, **{"loss_fn": loss, **kwargs})
    assert calls[0] == 0, "the baseline trained before it refused the argument"
    assert_unchanged(before, model)
    assert not prune.is_pruned(model)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_OPTIONS)
def test_train_refuses_bad_options_before_the_first_batch(kwargs, error, match) -> None:
    model = make_model()
    before = capture(model)
    loss, calls = counting_loss()
    with pytest.raises(error, match=match):
        train(model, make_data(), 1, **{"loss_fn": loss, **kwargs})
    assert calls[0] == 0
    assert_unchanged(before, model)


def test_train_takes_numpy_options_and_zero_momentum_as_torch_sgd_does() -> None:
    """Oracle: a hand-written loop of torch.optim.SGD at the same (constant) learning rate."""
    model, oracle = make_model(), make_model()
    train(
        model, make_data(), 1, lr=np.float32(0.1), momentum=np.float64(0.0), weight_decay=np.float32(0.0),
        schedule="constant",
    )  # fmt: skip
    opt = torch.optim.SGD(oracle.parameters(), lr=float(np.float32(0.1)), momentum=0.0, weight_decay=0.0)
    for x, y in make_data():
        opt.zero_grad()
        F.cross_entropy(oracle(x), y).backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), oracle.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"epochs_per_round": 0}, ValueError, r"^epochs_per_round must be a finite number > 0, got 0$"
        ),
        pytest.param(
            {"epochs_per_round": math.nan}, ValueError, r"^epochs_per_round must be .* > 0, got nan$"
        ),
        pytest.param(
            {"rewind_epochs": -1}, ValueError, r"^rewind_epochs must be a finite number >= 0, got -1$"
        ),
        pytest.param({"rewind_epochs": "1"}, ValueError, r"^rewind_epochs must be .* >= 0, got '1'$"),
        pytest.param({"rewind_epochs": True}, ValueError, r"^rewind_epochs must be .* >= 0, got True$"),
        pytest.param(
            {"rewind_epochs": 1}, ValueError, r"^rewind_epochs=1 must be below epochs_per_round=1: the rewind"
        ),
        pytest.param({"on_round": 3}, TypeError, r"^on_round must be callable .*, or None, got 3$"),
        pytest.param(
            {"milestones": 0.2}, TypeError, r"^milestones must be an iterable of amounts .*, got 0\.2$"
        ),
        pytest.param({"milestones": "0.2"}, TypeError, r"^milestones must be .*, got '0\.2'$", id="str"),
        pytest.param({"milestones": {0.2: 1}}, TypeError, r"^milestones must be .*, got \{0\.2: 1\}$"),
        pytest.param({"milestones": np.array(0.2)}, TypeError, r"^milestones must be .*, got array\(0\.2\)$"),
        pytest.param(
            {"milestones": [0.2, 1.5]}, ValueError, r"^milestones\[1\]=1\.5 is a float outside \[0, 1\]"
        ),
        pytest.param({"milestones": [None]}, TypeError, r"^milestones\[0\] must be an int .*, got None"),
        pytest.param(
            {"milestones": [1000]},
            ValueError,
            r"^milestones\[0\]=1000 is larger than the number of unpruned entries \(144\)$",
        ),
    ],
)
def test_imp_refuses_bad_arguments_before_any_work(kwargs, error, match) -> None:
    model = make_model()
    before = capture(model)
    loss, calls = counting_loss()
    rounds: list[Any] = []
    kwargs = {"epochs_per_round": 1, "on_round": lambda r, m: rounds.append(r), **kwargs}
    with pytest.raises(error, match=match):
        imp(model, 0.5, make_data(), kwargs.pop("epochs_per_round"), loss_fn=loss, **kwargs)
    assert calls[0] == 0, "imp trained before it refused the argument"
    assert rounds == []
    assert_unchanged(before, model)
    assert not prune.is_pruned(model)


def test_imp_takes_milestones_from_any_iterable_as_from_a_list() -> None:
    """A generator is read once (it was read twice: a bare zip error); a NumPy array works too.
    Oracle: the documented round rule in integer arithmetic, through the stops 108, 72, 43."""
    kept, expected = 144, []
    for stop in (144 - 36, 144 - 72, 144 - round(0.7 * 144)):
        while kept > stop:
            kept = max(stop, kept - max(1, kept // 5))
            expected.append(1 - kept / 144)
    runs = []
    for milestones in ([0.5, 0.25], (m for m in [0.5, 0.25]), np.array([0.5, 0.25])):
        model = make_model()
        result = imp(model, 0.7, make_data(), epochs_per_round=0.5, milestones=milestones)  # type: ignore[arg-type]
        assert [r.sparsity for r in result.rounds] == pytest.approx(expected)
        runs.append(masks(model))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))


@pytest.mark.parametrize("seed", [None, 1.5, "3", True, np.bool_(True), np.float64(3.0), 2**64, -(2**63) - 1])
def test_random_finetune_refuses_a_seed_torch_cannot_take_before_any_work(seed: object) -> None:
    model = make_model()
    before = capture(model)
    loss, calls = counting_loss()
    match = r"^seed must be an int in \[-2\*\*63, 2\*\*64 - 1\] \(the range torch\.manual_seed takes\), got "
    with pytest.raises(ValueError, match=match + re.escape(repr(seed)) + "$"):
        random_finetune(model, 0.5, make_data(), 1, seed=seed, loss_fn=loss)  # type: ignore[arg-type]
    assert calls[0] == 0
    assert_unchanged(before, model)
    assert not prune.is_pruned(model)


@pytest.mark.parametrize(
    ("seed", "torch_seed"), [(np.int64(7), 7), (-1, 2**64 - 1), (2**64 - 1, 2**64 - 1), (-(2**63), 2**63)]
)
def test_random_finetune_takes_every_seed_torch_takes(seed: int, torch_seed: int) -> None:
    """Oracle: torch's own global ranking of uniform scores drawn, layer by layer, from a generator
    seeded with the seed as torch reads it (a negative seed wraps modulo 2**64)."""
    model, oracle = make_model(), make_model()
    random_finetune(model, 0.6, make_data(), epochs=0, seed=seed)
    gen = torch.Generator().manual_seed(torch_seed)
    scores = {(oracle[i], "weight"): torch.rand(oracle[i].weight.shape, generator=gen) for i in (0, 2)}
    prune.global_unstructured(
        list(scores), pruning_method=prune.L1Unstructured, importance_scores=scores, amount=0.6
    )
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(oracle), strict=True))


def test_imp_progress_bar_counts_every_round(capsys: pytest.CaptureFixture[str]) -> None:
    """48 weights at rate 0.2 to 50%: 39, 32, 26, then 24 kept, four rounds (by hand), and no
    milestone: the bar reads i/4 after round i."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
    shown: list[str] = []

    def read_bar(r: Any, _: nn.Module) -> None:
        shown.append(re.findall(r"IMP: +\d+%\|[^|]*\| (\d+/\d+)", capsys.readouterr().err)[-1])

    result = imp(model, 0.5, data, epochs_per_round=0.5, lr=0.0, on_round=read_bar, progress=True)
    assert [round(r.sparsity * 48) for r in result.rounds] == [9, 16, 22, 24]
    assert shown == ["1/4", "2/4", "3/4", "4/4"]


def test_imp_round_sparsity_counts_the_zeros_of_an_earlier_pruning() -> None:
    """On a model pruned to 50% before (72 of 144 weights), amount=0.25 prunes 18 more of the 72
    left: the last round reports 90 / 144 = 0.625, every round the zeros of its masks, as
    omp_finetune's report counts them."""
    model = make_model()
    prune.global_unstructured(
        [(model[0], "weight"), (model[2], "weight")], pruning_method=prune.L1Unstructured, amount=72
    )
    counted: list[tuple[float, float]] = []

    def count(r: Any, m: nn.Module) -> None:
        counted.append((r.sparsity, sum(int((mask == 0).sum()) for mask in masks(model)) / 144))

    result = imp(model, 0.25, make_data(), epochs_per_round=0.5, lr=0.0, on_round=count)
    assert result.rounds[-1].sparsity == 0.625
    assert len(counted) > 1
    assert [reported for reported, _ in counted] == [exact for _, exact in counted]


class _Gated(nn.Module):
    """A model with its own learnable ``gate_mask`` parameter and ``scale_mask`` buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.gate_mask = nn.Parameter(torch.ones(10))
        self.register_buffer("scale_mask", torch.ones(10))
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.scale_mask.mul_(0.9)  # (a running buffer of the model's own)
        return self.fc2(torch.relu(self.fc1(x)) * self.gate_mask * self.scale_mask)


@pytest.mark.parametrize("pruned_before", [False, True], ids=["dense", "pruned-before"])
def test_imp_rewinds_the_models_own_tensors_named_like_a_mask(pruned_before: bool) -> None:
    """Only the pruning masks stay out of the rewind: a parameter or buffer of the model's own
    named ``*_mask`` starts every round from its initial value, as every other tensor does."""
    torch.manual_seed(0)
    model = _Gated()
    if pruned_before:
        prune.random_unstructured(model.fc2, "weight", amount=0.25)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    starts: list[dict[str, Tensor]] = []

    def record(module: nn.Module, args: object) -> None:
        starts.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    hook = model.register_forward_pre_hook(record)
    data = make_data(3)
    result = imp(model, 0.5, data, epochs_per_round=1, lr=0.5)
    hook.remove()
    assert len(result.rounds) >= 2
    for round_index in range(1, len(result.rounds) + 1):
        first = starts[round_index * len(data)]  # the first forward pass of that round
        for key in ("gate_mask", "scale_mask", "fc1.bias"):
            assert torch.equal(first[key], init[key]), (round_index, key)
    assert not torch.equal(model.gate_mask.detach(), init["gate_mask"])  # (it trains)
    if pruned_before:  # the earlier pruning mask is not rewound to its initial ones
        assert bool((model.fc2.weight_mask <= init["fc2.weight_mask"]).all())
        assert int((model.fc2.weight_mask == 0).sum()) > int((init["fc2.weight_mask"] == 0).sum())


BASELINE_CALLS: dict[str, Callable[[nn.Module], object]] = {
    "omp_finetune": lambda m: omp_finetune(m, 0.99, make_data(), epochs=1),
    "random_finetune": lambda m: random_finetune(m, 0.99, make_data(), epochs=1, seed=0),
    "imp": lambda m: imp(m, 0.99, make_data(), epochs_per_round=0.34, rate=0.9),
}


@pytest.mark.parametrize("call", BASELINE_CALLS.values(), ids=BASELINE_CALLS.keys())
def test_a_warning_turned_into_an_error_restores_the_model(call: Callable[[nn.Module], object]) -> None:
    """The warning that a whole tensor was pruned away, raised as an error (``-W error``): the
    model is restored like after any other failure of the call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1), nn.ReLU(), nn.Linear(1, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # the smallest magnitudes: pruned away at 99%
    before = capture(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"pruned every entry of .*'2\.weight'"):
            call(model)
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    "call",
    [
        *BASELINE_CALLS.values(),
        lambda m: omp_finetune(m, 0.5, make_data(), epochs=0),
        lambda m: random_finetune(m, 0.5, make_data(), epochs=0),
        lambda m: train(m, make_data(), epochs=1),
    ],
    ids=[*BASELINE_CALLS.keys(), "omp_finetune-epochs0", "random_finetune-epochs0", "train"],
)
def test_under_inference_mode_a_baseline_is_refused(call: Callable[[nn.Module], object]) -> None:
    """Masks created under ``torch.inference_mode()`` could never be trained (even with ``epochs=0``,
    the next training would fail): refused up front, the model unchanged."""
    model = make_model()
    before = capture(model)
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match=r"cannot run under torch\.inference_mode\(\)"),
    ):
        call(model)
    assert_unchanged(before, model)
    assert not model[0].weight.is_inference()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("pruned_before", [False, True], ids=["dense", "pruned-before"])
@pytest.mark.parametrize(
    "call",
    [
        lambda m: omp_finetune(m, 0.5, make_data(), epochs=0),
        lambda m: omp_finetune(m, 0.5, make_data(), epochs=1),
        lambda m: imp(m, 0.5, make_data(), epochs_per_round=1),
    ],
    ids=["omp_finetune-epochs0", "omp_finetune", "imp"],
)
def test_magnitude_baselines_refuse_weights_that_are_not_finite(
    call: Callable[[nn.Module], object], pruned_before: bool, bad: float
) -> None:
    """A NaN or an infinity has no magnitude to rank: refused, naming the tensor; the model unchanged."""
    model = make_model()
    if pruned_before:
        prune.l1_unstructured(model[0], "weight", amount=0.25)
        keep = model[0].weight_mask.nonzero()[0]
        with torch.no_grad():
            model[0].weight_orig[tuple(keep)] = bad
    else:
        with torch.no_grad():
            model[0].weight[1, 2] = bad
    before = capture(model)
    with pytest.raises(
        ValueError, match=r"^parameters names '0\.weight', which holds NaN or infinite values"
    ):
        call(model)
    assert_unchanged(before, model)


def test_a_non_finite_entry_pruned_before_is_not_ranked() -> None:
    """An infinity in an entry an earlier pruning removed is masked out: its value is not ranked."""
    model = make_model()
    prune.l1_unstructured(model[0], "weight", amount=0.25)
    gone = (model[0].weight_mask == 0).nonzero()[0]
    with torch.no_grad():
        model[0].weight_orig[tuple(gone)] = math.inf
    report = omp_finetune(model, 0.5, make_data(), epochs=0)
    assert report.zeros == int(sum((m == 0).sum() for m in masks(model)))
