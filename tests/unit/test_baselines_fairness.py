"""The baselines compare like with like: BiP's training recipe, IMP's rewind point, a clean model.

Oracles: :class:`torchbip.BiPConfig`'s documented defaults (the recipe of BiP's lower level); a
hand-written SGD loop with a hand-written cosine learning rate (the documented recipe of
:func:`torchbip.baselines.train`); a hand-written IMP (the lottery-ticket recipe with late
rewinding: one first training of ``epochs_per_round`` epochs, the checkpoint after
``rewind_epochs`` of it, torch's own ``prune.global_unstructured`` for each cut); torch's pruned
form, in which ``weight`` is ``weight_orig * weight_mask``; and the source of
``docs/snippets/baselines.py``, read as a syntax tree.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.baselines import imp, omp_finetune, random_finetune, train

ROOT = Path(__file__).resolve().parents[2]
BIP = torchbip.BiPConfig()


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def make_data(n: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()))
    return out


LAYERS = (0, 2, 4)


def layers(model: nn.Sequential) -> list[nn.Linear]:
    return [model[i] for i in LAYERS]  # type: ignore[misc]


def sgd_loop(
    model: nn.Module,
    loader: list[tuple[Tensor, Tensor]],
    epochs: float,
    *,
    lr: float = BIP.lower_lr,
    at_step: tuple[int, Callable[[], None]] | None = None,
) -> None:
    """The documented recipe by hand: SGD (BiP's momentum, weight decay gamma), the learning rate
    set each step to ``lr * (1 + cos(pi t / T)) / 2``; ``at_step``: ``(k, fn)`` runs ``fn`` after
    ``k`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=BIP.momentum, weight_decay=BIP.gamma)
    total, t = max(1, round(epochs * len(loader))), 0
    while t < total:
        for x, y in loader:
            if at_step is not None and t == at_step[0]:
                at_step[1]()
            for group in opt.param_groups:
                group["lr"] = lr * (0.5 * (1 + math.cos(math.pi * t / total)))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            t += 1
            if t >= total:
                break


# -- 1. the baselines' defaults are BiP's lower level ----------------------------------------------


def test_train_defaults_are_the_recipe_of_bips_lower_level() -> None:
    """``lr`` is BiP's ``lower_lr`` (0.05 since the validation sweep; it was 0.01, a fifth of it),
    ``momentum`` and ``weight_decay`` BiP's ``momentum`` and ``gamma``, the schedule cosine."""
    params = inspect.signature(train).parameters
    assert params["lr"].default == BIP.lower_lr == 0.05
    assert params["momentum"].default == BIP.momentum
    assert params["weight_decay"].default == BIP.gamma
    assert params["schedule"].default == BIP.lower_schedule == "cosine"


@pytest.mark.parametrize("baseline", ["omp", "random"])
def test_one_shot_baselines_fine_tune_at_bips_learning_rate_by_default(baseline: str) -> None:
    """With no training option, the fine-tuning is the hand-written loop at ``BiPConfig().lower_lr``."""
    model, oracle, data = make_model(), make_model(), make_data()
    if baseline == "omp":
        omp_finetune(model, 0.5, data, 1)
        omp_finetune(oracle, 0.5, data, 0)
    else:
        random_finetune(model, 0.5, data, 1, seed=3)
        random_finetune(oracle, 0.5, data, 0, seed=3)
    sgd_loop(oracle, data, 1)
    for a, b in zip(layers(model), layers(oracle), strict=True):
        assert torch.equal(a.weight_mask, b.weight_mask)
        torch.testing.assert_close(a.weight_orig, b.weight_orig)
        torch.testing.assert_close(a.bias, b.bias)


def _learning_rates(path: Path) -> dict[str, float]:
    """The learning rate with which each pruning method of the snippet trains the weights after
    the dense model: BiP's ``lower_lr`` (from its options dict, else BiP's default), and the
    ``lr`` passed to each baseline (else :func:`train`'s default)."""
    tree = ast.parse(path.read_text())
    train_default = inspect.signature(train).parameters["lr"].default
    lrs: dict[str, float] = {"bip": BIP.lower_lr}
    for node in ast.walk(tree):
        bip_options = (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(isinstance(t, ast.Name) and t.id == "bip" for t in node.targets)
        )
        if bip_options:  # the `bip = {...}` options dict
            for key, value in zip(node.value.keys, node.value.values, strict=True):  # type: ignore[attr-defined]
                if isinstance(key, ast.Constant) and key.value == "lower_lr":
                    lrs["bip"] = ast.literal_eval(value)
        name = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
        if isinstance(node, ast.Call) and name in ("omp_finetune", "random_finetune"):
            keywords = {k.arg: k.value for k in node.keywords}
            lrs[name] = ast.literal_eval(keywords["lr"]) if "lr" in keywords else train_default
    return lrs


def test_the_snippet_fine_tunes_every_one_shot_method_at_bips_learning_rate() -> None:
    """docs/snippets/baselines.py compares the methods "at the same pruning budget": the printed
    gap must come from the method, not from a learning rate five times smaller."""
    lrs = _learning_rates(ROOT / "docs/snippets/baselines.py")
    assert set(lrs) == {"bip", "omp_finetune", "random_finetune"}
    assert lrs["omp_finetune"] == lrs["random_finetune"] == lrs["bip"], lrs


# -- 3. IMP rewinds to a point of its first training -----------------------------------------------


def oracle_imp(
    model: nn.Sequential, amount: float, loader: list, epochs: float, rewind_epochs: float, lr: float
) -> list[float]:
    """IMP by hand: one first training of ``epochs``, the checkpoint after ``rewind_epochs`` of it
    (every parameter), then per round: cut 20% of the remaining weights (at least one) by global
    magnitude of ``weight_orig * weight_mask``, rewind, train ``epochs``. Returns the sparsities."""
    n = sum(m.weight.numel() for m in layers(model))
    final_keep = n - round(amount * n)
    checkpoint: dict[str, Tensor] = {}

    def take() -> None:
        checkpoint.update({k: v.detach().clone() for k, v in model.named_parameters()})

    step = round(rewind_epochs * len(loader))
    if step == 0:
        take()
    sgd_loop(model, loader, epochs, lr=lr, at_step=(step, take) if step else None)
    assert checkpoint, "the oracle's first training ended before its checkpoint"
    kept, sparsities = n, []
    while kept > final_keep:
        cut = min(kept - final_keep, max(1, kept // 5))
        current = {
            (m, "weight"): ((m.weight_orig * m.weight_mask) if prune.is_pruned(m) else m.weight).detach()
            for m in layers(model)
        }
        prune.global_unstructured(
            list(current), pruning_method=prune.L1Unstructured, importance_scores=current, amount=cut
        )
        kept -= cut
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(checkpoint[name.removesuffix("_orig")])
        sgd_loop(model, loader, epochs, lr=lr)
        sparsities.append((n - kept) / n)
    return sparsities


@pytest.mark.parametrize(
    ("epochs", "rewind_epochs", "lr"),
    [(2.0, 1.0, BIP.lower_lr), (1.0, 0.5, 0.1), (1.5, 0.25, BIP.lower_lr), (1.0, 0.0, BIP.lower_lr)],
    ids=["E2-k1", "E1-k0.5", "E1.5-k0.25", "E1-k0"],
)
def test_imp_rewinds_to_the_checkpoint_after_rewind_epochs_of_the_first_training(
    epochs: float, rewind_epochs: float, lr: float
) -> None:
    """The rewind point is a point of round 0's training (its schedule, its momentum), not the
    end of a separate ``rewind_epochs`` training run before it; round 0 trains ``epochs``."""
    loader = make_data()
    model, oracle = make_model(), make_model()
    options = {} if lr == BIP.lower_lr else {"lr": lr}  # the default is BiP's lower_lr too
    result = imp(model, 0.5, loader, epochs, rewind_epochs=rewind_epochs, **options)
    expected = oracle_imp(oracle, 0.5, loader, epochs, rewind_epochs, lr)
    assert [r.sparsity for r in result.rounds] == expected
    for a, b in zip(layers(model), layers(oracle), strict=True):
        assert torch.equal(a.weight_mask, b.weight_mask)
        torch.testing.assert_close(a.weight_orig, b.weight_orig)
        torch.testing.assert_close(a.bias, b.bias)


def test_imp_sees_the_rewind_point_at_the_start_of_round_one() -> None:
    """The first forward pass after the first cut sees the oracle's checkpoint, and the first
    training runs ``epochs_per_round`` epochs (8 steps), not ``rewind_epochs`` more."""
    loader, epochs, rewind_epochs = make_data(), 2.0, 1.0
    model = make_model()
    steps_before_cut: list[int] = []
    rewound: list[dict[str, Tensor]] = []

    def before_forward(module: nn.Module, args: object) -> None:
        if not prune.is_pruned(model):
            steps_before_cut.append(1)
        elif not rewound:
            rewound.append({k: v.detach().clone() for k, v in model.named_parameters()})

    model.register_forward_pre_hook(before_forward)
    imp(model, 0.2, loader, epochs, rewind_epochs=rewind_epochs)

    oracle = make_model()
    checkpoint: dict[str, Tensor] = {}
    sgd_loop(
        oracle, loader, epochs,
        at_step=(4, lambda: checkpoint.update({k: v.detach().clone() for k, v in oracle.named_parameters()})),
    )  # fmt: skip
    assert len(steps_before_cut) == round(epochs * len(loader)) == 8
    for name, value in checkpoint.items():
        key = name + "_orig" if name + "_orig" in rewound[0] else name
        torch.testing.assert_close(rewound[0][key], value)


@pytest.mark.parametrize(
    ("epochs_per_round", "rewind_epochs", "match"),
    [
        (1, 1, r"^rewind_epochs=1 must be below epochs_per_round=1: the rewind checkpoint is taken inside"),
        (1.0, 2.5, r"^rewind_epochs=2\.5 must be below epochs_per_round=1\.0: "),
        (0.1, 0.2, r"^rewind_epochs=0\.2 must be below epochs_per_round=0\.1: "),
        (
            1,
            0.9,
            r"^rewind_epochs=0\.9 with epochs_per_round=1 and 4 batches per epoch is step 4 of the first "
            r"round's 4 steps: the rewind checkpoint must come before the round's last step",
        ),
    ],
)
def test_imp_refuses_a_rewind_point_beyond_the_first_training_before_any_work(
    epochs_per_round: float, rewind_epochs: float, match: str
) -> None:
    model = make_model()
    before = capture(model)
    calls: list[None] = []

    def loss(out: Tensor, y: Tensor) -> Tensor:
        calls.append(None)
        return F.cross_entropy(out, y)

    with pytest.raises(ValueError, match=match):
        imp(model, 0.5, make_data(), epochs_per_round, rewind_epochs=rewind_epochs, loss_fn=loss)
    assert calls == []
    assert_unchanged(before, model)
    assert not prune.is_pruned(model)


# -- 4. a fresh, graph-free weight after every baseline ----------------------------------------------


def assert_torchs_pruned_form(model: nn.Module) -> None:
    """Every pruned tensor is ``orig * mask`` (bitwise), a tensor without a graph; the model deep-copies."""
    pruned = torchbip.pruned.pruned_tensors(model)
    assert pruned
    for fqn, module, hook in pruned:
        name = hook._tensor_name
        value, orig, mask = (getattr(module, name + suffix) for suffix in ("", "_orig", "_mask"))
        assert value.grad_fn is None, fqn
        assert not value.requires_grad, fqn
        assert torch.equal(value, orig.detach() * mask), fqn
    twin = copy.deepcopy(model)
    x = make_data(1)[0][0]
    assert torch.equal(twin(x), model(x))


def pruned_before(model: nn.Sequential) -> nn.Sequential:
    """``model`` with the last layer's bias pruned, a tensor the baselines below do not prune."""
    prune.l1_unstructured(model[4], "bias", 1)
    return model


BASELINES: dict[str, Callable[[nn.Sequential, list], Any]] = {
    "omp": lambda m, data: omp_finetune(m, 0.5, data, 1, parameters=[(m[0], "weight"), (m[2], "weight")]),
    "omp-no-fine-tuning": lambda m, data: omp_finetune(m, 0.5, data, 0),
    "random": lambda m, data: random_finetune(m, 0.5, data, 1, parameters=[(m[0], "weight")]),
    "random-no-fine-tuning": lambda m, data: random_finetune(m, 0.5, data, 0),
    "imp": lambda m, data: imp(m, 0.5, data, 1, parameters=[(m[0], "weight"), (m[2], "weight")]),
    "imp-rewind": lambda m, data: imp(m, 0.5, data, 1, rewind_epochs=0.5),
    "train": lambda m, data: train(
        m, data, 1.5, lr=0.1
    ),  # on a model pruned before (the bias, see pruned_before)
}


@pytest.mark.parametrize("run", list(BASELINES))
def test_the_baselines_leave_every_pruned_tensor_fresh_and_the_model_deep_copyable(run: str) -> None:
    """``weight`` held the values from before the last optimizer step, with that step's graph, so
    ``copy.deepcopy`` raised; torch's pruning left a graph too (no fine-tuning). Also the tensors
    pruned before the call (the bias) are refreshed."""
    model = pruned_before(make_model())
    BASELINES[run](model, make_data())
    assert_torchs_pruned_form(model)


def test_train_leaves_the_pruned_tensors_fresh_when_it_fails() -> None:
    """A non-finite loss at the third step: the first two steps stay (train restores nothing), and
    the pruned tensors hold their values."""
    model = pruned_before(make_model())
    prune.l1_unstructured(model[0], "weight", 20)
    data = make_data()
    data[2] = (data[2][0] * math.inf, data[2][1])
    with pytest.raises(FloatingPointError, match="at step 2"):
        train(model, data, 1)
    assert_torchs_pruned_form(model)


def test_a_failed_baseline_restores_the_tensors_pruned_before_it() -> None:
    """The snapshot keeps the ``module.<name>`` of the tensors pruned before the call too."""
    model = pruned_before(make_model())
    before = capture(model)
    data = make_data()
    data[3] = (data[3][0] * math.inf, data[3][1])
    with pytest.raises(FloatingPointError):
        omp_finetune(model, 0.5, data, 1)
    assert_unchanged(before, model)
