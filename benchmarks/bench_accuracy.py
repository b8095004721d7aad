"""BiP against IMP and one-shot magnitude pruning on MNIST, at budgets where IMP reaches its
lottery-ticket quality, with a validation split for every choice and the wall time each method
needs to reach each accuracy.

The protocol:

- Data: the 60,000 MNIST training images are split once (a fixed seed) into 55,000 for training
  and 5,000 for validation, as in the lottery-ticket paper (Frankle & Carbin, ICLR 2019); the
  10,000 test images are read once per final model, for the report only.
- Every method starts from the same seeded initialisation. ``E`` (``--epochs``, per model) is one
  training budget: the dense model trains ``E`` epochs (SGD, momentum 0.9, cosine schedule);
  each IMP round trains ``E`` epochs from the rewound initialisation (20% of the remaining
  weights pruned per round, rounds clipped to hit each sparsity exactly), so IMP's final ticket
  trains as long as the dense model; OMP+FT prunes the dense model by magnitude in one shot and
  fine-tunes it ``E`` epochs; BiP starts from the dense model and runs ``1x``, ``2x`` and ``4x``
  its base epochs (``--bip-epochs``). The dense training and IMP share one learning rate:
  ``--lr``, by default the one ``--sweep-baselines`` chose on validation for the model (``LR``:
  0.2 for LeNet-300-100, 0.05 for LeNet-5). OMP+FT fine-tunes at its own rate: ``--omp-ft-lr``,
  by default the one ``--sweep-omp-ft`` chose on validation (``OMP_FT_LR``: 0.2 for both). IMP's
  pruning rate (20%) and rewinding point (the initialisation) are the lottery-ticket paper's,
  not tuned.
- Time to a ticket: dense time + method time for BiP and OMP+FT; for IMP, the cumulative time of
  round 0 and of as many rounds as a run aimed at that sparsity alone needs (one IMP run serves
  every sparsity, and its rounds that stop at the lower ones are not charged). The targets per
  sparsity: BiP level with IMP on test accuracy (mean at least IMP's, or within one standard
  deviation of either), at no more than a quarter of IMP's time and, from 95% on, ahead of
  OMP+FT by more than one standard deviation. The verdict per sparsity picks BiP's budget on
  validation (the smallest that meets every target on validation accuracy, else the smallest
  level with IMP there) and reports that budget's test accuracy, time ratio and targets; it also
  lists, per fixed budget, where every target holds, and (labelled as read after the fact on
  test) the smallest budget level with IMP on test and the smallest meeting every target.
- ``--sweep`` chooses BiP's settings on the validation split only: one factor at a time around
  the library's defaults (upper learning rate, its schedule, the implicit coefficient, the lower
  learning rate, the score initialisation, the mode, a short fine-tuning after BiP), two seeds,
  three sparsities; the test split is never read.
- ``--sweep-baselines`` chooses the learning rate of the baselines' shared SGD recipe (dense
  training, IMP, OMP+FT; ``--lrs``) on the validation split only: the protocol's IMP and OMP+FT
  runs at three sparsities, two seeds; the test split is never read.
- ``--sweep-omp-ft`` chooses OMP+FT's own fine-tuning learning rate (``--lrs``) on the
  validation split only: the protocol's dense model, pruned at three sparsities and fine-tuned
  at each rate, two seeds; the test split is never read.

Run::

    python benchmarks/bench_accuracy.py --quick            # a smoke test (a minute)
    python benchmarks/bench_accuracy.py --sweep            # choose BiP's settings on validation
    python benchmarks/bench_accuracy.py --sweep-baselines  # the baselines' learning rate, likewise
    python benchmarks/bench_accuracy.py --sweep-omp-ft     # OMP+FT's fine-tuning rate, likewise
    python benchmarks/bench_accuracy.py --models lenet_300_100 --bip lower_lr=0.2 finetune_epochs=1
    python benchmarks/bench_accuracy.py --models lenet5 --train-size 20000 --bip finetune_epochs=1

The last two are the headline runs in ``results/`` (three seeds each, their learning rates from
``LR`` and ``OMP_FT_LR``).

Writes ``bench_accuracy-<device>-torch<version>-<model>[-quick].{json,md,png}`` (and
``bench_accuracy_sweep-...`` for ``--sweep``, ``bench_accuracy_baselines-<device>-torch<version>
[-quick][-tag]...`` for ``--sweep-baselines``, ``bench_accuracy_omp_ft-...`` for
``--sweep-omp-ft``) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import torchbip
from torchbip.baselines import imp, omp_finetune, train
from torchbip.datasets import load_mnist

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.8, 0.9, 0.95, 0.964, 0.98, 0.99)
IMP_RATE = 0.2  # the fraction of the remaining weights each IMP round prunes
METHODS = ("bip", "omp_ft", "imp")
BUDGETS = (1, 2, 4)
VAL_SIZE = 5000
SPLIT_SEED = 0
# Accuracy that IMP's LeNet-300-100 tickets reach in the lottery-ticket paper (Frankle & Carbin,
# ICLR 2019, figure 3, early-stopping test accuracy): about 98.0% dense, winning tickets at or
# above it down to 3.6% of the weights (96.4% sparsity).
LOTTERY_REFERENCE = {"lenet_300_100": {"dense": 0.980, "0.964": 0.980}}


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet5() -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
    "small_cnn": small_cnn,
}
# Training epochs per phase and IMP round (E), per model.
EPOCHS = {"lenet_300_100": 10.0, "lenet5": 5.0, "small_cnn": 5.0}
# BiP's base epochs (the 1x budget), per model.
BIP_EPOCHS = {"lenet_300_100": 2.5, "lenet5": 1.25, "small_cnn": 1.25}
# The learning rate of the baselines' shared SGD recipe (dense training, IMP's rounds, OMP+FT's
# fine-tuning), per model, unless ``--lr`` is given: the rate ``--sweep-baselines`` chose on
# validation, as the committed headline runs in results/ record it (their budget's "lr"), so that
# the documented commands reproduce them. small_cnn has no headline run: 0.05, the rate every
# model had before the sweep.
LR = {"lenet_300_100": 0.2, "lenet5": 0.05, "small_cnn": 0.05}
# OMP+FT's own fine-tuning learning rate, per model, unless ``--omp-ft-lr`` is given: the rate
# ``--sweep-omp-ft`` chose on validation (the dense model at ``LR``, pruned and fine-tuned at each
# rate). A model without one fine-tunes at ``LR``.
OMP_FT_LR: dict[str, float] = {"lenet_300_100": 0.2, "lenet5": 0.2}
# The fine-tuning learning rates that ``--sweep-omp-ft`` compares.
OMP_FT_LRS = (0.05, 0.1, 0.2, 0.4, 0.8)

# One factor at a time around a center setting (``--sweep``; the center: the defaults and ``--bip``).
SWEEP: dict[str, list[Any]] = {
    "upper_lr": [1.0, 3.0, 10.0, 30.0, 100.0],
    "upper_schedule": ["step", "cosine", "constant"],
    "implicit_coef": [0.0, 0.5, 1.0, 2.0],
    "lower_lr": [0.02, 0.05, 0.1, 0.2, 0.4],
    "lower_schedule": ["cosine", "step", "constant"],
    "score_init": ["scaled_magnitude", "magnitude"],
    "mode": ["fused", "two_batch"],
    "finetune_epochs": [0.0, 1.0],
}
SWEEP_SPARSITIES = (0.9, 0.964, 0.98)
# The learning rates of the baselines' shared SGD recipe that ``--sweep-baselines`` compares.
BASELINE_LRS = (0.02, 0.05, 0.1)
# The BiPConfig settings a run records and a sweep may vary (besides ``finetune_epochs``).
BIP_KEYS = ("upper_lr", "upper_schedule", "implicit_coef", "lower_lr", "lower_schedule", "score_init", "mode")


class Batches:
    """Re-iterable, seeded, in-memory batches (a fresh shuffle each epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + 2000]).argmax(1) == y[i : i + 2000]).sum()) for i in range(0, len(x), 2000)
        )
    model.train()
    return correct / len(x)


def tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(dataset, batch_size=len(dataset))
    x, y = next(iter(loader))
    return x, y


def split(train_size: int | None, val_size: int) -> dict[str, torch.Tensor]:
    """The fixed training/validation split of MNIST's training images, and the test images."""
    x, y = tensors(load_mnist(split="train"))
    xte, yte = tensors(load_mnist(split="test"))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, rest = order[:val_size], order[val_size:]
    if train_size is not None:
        rest = rest[:train_size]
    return {"xtr": x[rest], "ytr": y[rest], "xval": x[val], "yval": y[val], "xte": xte, "yte": yte}


def baseline_lr(name: str, args: argparse.Namespace) -> float:
    """The learning rate of the baselines' recipe for model ``name``: ``--lr``, else ``LR[name]``."""
    return float(args.lr) if args.lr is not None else LR[name]


def omp_ft_lr(name: str, args: argparse.Namespace) -> float:
    """OMP+FT's fine-tuning learning rate for model ``name``: ``--omp-ft-lr``, else ``OMP_FT_LR``'s
    validated rate, else the baselines' recipe's."""
    if getattr(args, "omp_ft_lr", None) is not None:
        return float(args.omp_ft_lr)
    return OMP_FT_LR.get(name, baseline_lr(name, args))


def bip_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The BiP settings of a run: the library's defaults, with ``overrides`` (and a fine-tuning)."""
    defaults = torchbip.BiPConfig()
    settings = {k: getattr(defaults, k) for k in BIP_KEYS}
    settings["finetune_epochs"] = 0.0
    settings.update(overrides or {})
    return settings


def run_bip(
    model: nn.Module, sparsity: float, loader: Batches, epochs: float, settings: dict[str, Any], seed: int
) -> None:
    """BiP (``settings``) for ``epochs``, then the optional fine-tuning; in place."""
    options = {k: v for k, v in settings.items() if k != "finetune_epochs"}
    torchbip.global_prune(model, sparsity, loader, epochs=epochs, seed=seed, progress=False, **options)
    if settings["finetune_epochs"] > 0:
        train(model, loader, settings["finetune_epochs"], lr=settings["lower_lr"])


class Seed:
    """One model, one seed: the shared initialisation, the dense model and the batch streams."""

    def __init__(self, name: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> None:
        self.name, self.seed, self.args, self.data = name, seed, args, data
        torch.manual_seed(seed)
        self.init = MODELS[name]()
        self.epochs = args.epochs or EPOCHS[name]
        self.lr = baseline_lr(name, args)
        self.omp_ft_lr = omp_ft_lr(name, args)
        self._dense: nn.Module | None = None
        self.dense_time = 0.0

    @property
    def dense(self) -> nn.Module:
        """The dense model, trained ``E`` epochs from the initialisation on first use."""
        if self._dense is None:
            self._dense = copy.deepcopy(self.init)
            start = time.perf_counter()
            train(self._dense, self.batches(0), self.epochs, lr=self.lr)
            self.dense_time = time.perf_counter() - start
        return self._dense

    def batches(self, offset: int) -> Batches:
        return Batches(self.data["xtr"], self.data["ytr"], self.args.batch_size, self.seed * 1000 + offset)

    def val(self, model: nn.Module) -> float:
        return accuracy(model, self.data["xval"], self.data["yval"])

    def test(self, model: nn.Module) -> float:
        return accuracy(model, self.data["xte"], self.data["yte"])

    def row(
        self, method: str, sparsity: float, model: nn.Module | None, seconds: float, **extra: Any
    ) -> dict:
        out = {"model": self.name, "seed": self.seed, "method": method, "sparsity": sparsity}
        if model is not None:
            out["measured_sparsity"] = torchbip.sparsity_report(model).global_sparsity if sparsity else 0.0
            out["val_accuracy"] = self.val(model)
            out["test_accuracy"] = self.test(model)
        out["time_s"] = seconds
        out.update(extra)
        tag = f" x{extra['budget']}" if "budget" in extra else ""
        print(
            f"[{self.name} seed {self.seed}] {method}{tag} @{sparsity:.3f}: val {out['val_accuracy']:.4f} "
            f"test {out['test_accuracy']:.4f} at {seconds:.1f}s",
            flush=True,
        )
        return out


def rounds_alone(prunable: int, kept: int, rate: float = IMP_RATE) -> int:
    """The rounds an IMP run aimed at ``kept`` entries alone needs: each prunes ``rate`` of the
    remaining entries (rounded down, at least one), the last one clipped at ``kept``.

    >>> rounds_alone(100, 20), rounds_alone(100, 10)  # 80, 64, 52, 42, 34, 28, 23, 20; ... 13, 11, 10
    (8, 12)
    """
    cut = Fraction(rate).limit_denominator()
    rounds, remaining = 0, prunable
    while remaining > kept:
        remaining = max(kept, remaining - max(1, remaining * cut.numerator // cut.denominator))
        rounds += 1
    return rounds


def run_imp(
    s: Seed, sparsities: list[float], record: Callable[[float, nn.Module, Any, int, float], None]
) -> None:
    """IMP from the seed's initialisation to the largest sparsity, at the seed's learning rate;
    ``record(sparsity, model, round_record, rounds, seconds)`` at each round that stops at one of
    ``sparsities``.

    One run serves every sparsity: its rounds also stop at the lower ones, so it reaches a sparsity
    in more rounds than an IMP run aimed at that sparsity alone (18 against 15 at 96.4%). The time
    charged to the ticket (``seconds``) is therefore that of the rounds a run aimed at it alone
    needs (``rounds``, :func:`rounds_alone`): the cumulative time of round 0 and this run's first rounds up to
    that count (every round trains the same epochs), not the time of the rounds that the other
    sparsities added. ``imp``'s clock leaves out the seconds ``record`` spends (the evaluation of
    the ticket), so IMP's time counts its training and pruning only, as BiP's and OMP+FT's
    times do."""
    model = copy.deepcopy(s.init)
    prunable = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    elapsed: dict[int, float] = {}  # the cumulative time after each round

    def on_round(round_record: Any, m: nn.Module) -> None:
        elapsed[round_record.round] = round_record.wall_time_s
        # an IMP round that stops at a target keeps exactly the count the target rounds to
        hit = [t for t in sparsities if abs(round_record.sparsity - t) <= 0.5 / prunable + 1e-12]
        if hit:
            kept = round((1 - round_record.sparsity) * prunable)
            alone = rounds_alone(prunable, kept)
            record(hit[0], m, round_record, alone, elapsed[alone])

    imp(model, max(sparsities), s.batches(0), s.epochs, rate=IMP_RATE, milestones=sparsities,
        on_round=on_round, lr=s.lr)  # fmt: skip


def run_seed(name: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> list[dict]:
    """Dense, BiP at each budget, OMP+FT and IMP (those of ``--methods``) for one model and seed."""
    s = Seed(name, seed, args, data)
    rows = [s.row("dense", 0.0, s.dense, s.dense_time)] if {"bip", "omp_ft"} & set(args.methods) else []
    base = args.bip_epochs or BIP_EPOCHS[name]
    settings = bip_settings(args.bip)
    for sparsity in args.sparsities:
        for budget in args.budgets if "bip" in args.methods else ():
            model = copy.deepcopy(s.dense)
            start = time.perf_counter()
            run_bip(model, sparsity, s.batches(1), base * budget, settings, seed)
            elapsed = time.perf_counter() - start
            rows.append(
                s.row("bip", sparsity, model, s.dense_time + elapsed, budget=budget, method_time_s=elapsed)
            )
        if "omp_ft" not in args.methods:
            continue
        model = copy.deepcopy(s.dense)
        start = time.perf_counter()
        omp_finetune(model, sparsity, s.batches(1), s.epochs, lr=s.omp_ft_lr)
        elapsed = time.perf_counter() - start
        rows.append(s.row("omp_ft", sparsity, model, s.dense_time + elapsed, method_time_s=elapsed))

    if "imp" not in args.methods:
        return rows
    run_imp(s, args.sparsities, lambda sparsity, m, record, rounds, seconds: rows.append(
        s.row("imp", sparsity, m, seconds, round=record.round, rounds_charged=rounds,
              run_time_s=record.wall_time_s)
    ))  # fmt: skip
    return rows


def sweep_seed(name: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> list[dict]:
    """BiP at the center setting (the library's defaults with ``--bip``), then under each other
    value of the swept factors (``--factors``), one factor at a time; validation accuracy only."""
    s = Seed(name, seed, args, data)
    base = args.bip_epochs or BIP_EPOCHS[name]
    rows = []
    center = bip_settings(args.bip)
    runs = [("center", None, None, center)]
    for factor in args.factors:
        runs += [
            (f"{factor}={v}", factor, v, {**center, factor: v}) for v in SWEEP[factor] if v != center[factor]
        ]
    for label, factor, value, settings in runs:
        for sparsity in args.sparsities:
            model = copy.deepcopy(s.dense)
            start = time.perf_counter()
            run_bip(model, sparsity, s.batches(1), base, settings, seed)
            elapsed = time.perf_counter() - start
            val = s.val(model)
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "setting": label,
                    "factor": factor,
                    "value": value,
                    "sparsity": sparsity,
                    "val_accuracy": val,
                    "time_s": elapsed,
                }
            )
            print(f"[sweep {name} seed {seed}] {label} @{sparsity:.3f}: val {val:.4f}", flush=True)
    return rows


def sweep_baselines_seed(
    name: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]
) -> list[dict]:
    """Dense, OMP+FT (at each sparsity) and IMP (to the largest, its rounds stopping at each) under
    each learning rate of ``--lrs``: the protocol's runs of the baselines, validation accuracy only."""
    rows: list[dict] = []

    def row(s: Seed, method: str, sparsity: float, model: nn.Module, seconds: float, **extra: Any) -> dict:
        out = {"model": name, "seed": seed, "method": method, "lr": s.lr, "sparsity": sparsity}
        out["measured_sparsity"] = torchbip.sparsity_report(model).global_sparsity if sparsity else 0.0
        out["val_accuracy"] = s.val(model)
        out["time_s"] = seconds
        out.update(extra)
        print(
            f"[baselines {name} seed {seed} lr {s.lr:g}] {method} @{sparsity:.3f}: "
            f"val {out['val_accuracy']:.4f} at {seconds:.1f}s",
            flush=True,
        )
        return out

    for lr in args.lrs:
        s = Seed(name, seed, argparse.Namespace(**{**vars(args), "lr": lr}), data)
        rows.append(row(s, "dense", 0.0, s.dense, s.dense_time))
        for sparsity in args.sparsities:
            model = copy.deepcopy(s.dense)
            start = time.perf_counter()
            omp_finetune(model, sparsity, s.batches(1), s.epochs, lr=lr)
            elapsed = time.perf_counter() - start
            rows.append(row(s, "omp_ft", sparsity, model, s.dense_time + elapsed, method_time_s=elapsed))
        run_imp(s, args.sparsities, lambda sparsity, m, record, rounds, seconds, s=s: rows.append(
            row(s, "imp", sparsity, m, seconds, round=record.round, rounds_charged=rounds,
                run_time_s=record.wall_time_s)
        ))  # fmt: skip
    return rows


def sweep_omp_ft_seed(
    name: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]
) -> list[dict]:
    """OMP+FT's own fine-tuning learning rate: the dense model (trained at the baselines' rate, as
    in the protocol), pruned in one shot at each sparsity and fine-tuned at each rate of ``--lrs``;
    validation accuracy only."""
    s = Seed(name, seed, args, data)
    rows = [
        {
            "model": name, "seed": seed, "method": "dense", "lr": s.lr, "sparsity": 0.0,
            "measured_sparsity": 0.0, "val_accuracy": s.val(s.dense), "time_s": s.dense_time,
        }
    ]  # fmt: skip
    for lr in args.lrs:
        for sparsity in args.sparsities:
            model = copy.deepcopy(s.dense)
            start = time.perf_counter()
            omp_finetune(model, sparsity, s.batches(1), s.epochs, lr=lr)
            elapsed = time.perf_counter() - start
            rows.append(
                {
                    "model": name, "seed": seed, "method": "omp_ft", "lr": lr, "dense_lr": s.lr,
                    "sparsity": sparsity,
                    "measured_sparsity": torchbip.sparsity_report(model).global_sparsity,
                    "val_accuracy": s.val(model), "time_s": s.dense_time + elapsed, "method_time_s": elapsed,
                }
            )  # fmt: skip
            print(
                f"[omp_ft {name} seed {seed} lr {lr:g}] @{sparsity:.3f}: val {rows[-1]['val_accuracy']:.4f}",
                flush=True,
            )
    return rows


def baselines_summary(rows: list[dict]) -> dict[str, Any]:
    """Per model, method and learning rate: validation accuracy per sparsity (mean and std over
    seeds) and averaged over the sparsities (per seed, then mean and std over seeds); the chosen
    learning rate per method (the best mean), and the learning rates level with it."""
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in rows}):
        out[model] = {}
        mine = [r for r in rows if r["model"] == model]
        for method in ("dense", "imp", "omp_ft"):
            cells: dict[str, Any] = {}
            for lr in sorted({r["lr"] for r in mine if r["method"] == method}):
                rs = [r for r in mine if r["method"] == method and r["lr"] == lr]
                seeds = sorted({r["seed"] for r in rs})
                cells[f"{lr:g}"] = {
                    "per_sparsity": {
                        f"{s:.3f}": stats([r["val_accuracy"] for r in rs if r["sparsity"] == s])
                        for s in sorted({r["sparsity"] for r in rs})
                    },
                    "mean": stats(
                        [
                            statistics.mean(r["val_accuracy"] for r in rs if r["seed"] == seed)
                            for seed in seeds
                        ]
                    ),
                    "time_s": statistics.mean(r["time_s"] for r in rs),
                }
            if not cells:
                continue
            chosen = max(cells, key=lambda lr: cells[lr]["mean"]["mean"])
            out[model][method] = {
                "lrs": cells,
                "chosen_lr": float(chosen),
                "level_with_chosen": [
                    float(lr) for lr, c in cells.items() if level(c["mean"], cells[chosen]["mean"])
                ],
            }
    return out


def baselines_markdown(result: dict[str, Any]) -> str:
    if result.get("sweep") == "omp_ft":
        head = [
            f"# bench_accuracy OMP+FT's fine-tuning learning rate ({result['device']}, torch "
            f"{result['torch']}{', quick' if result['quick'] else ''})",
            "",
            "OMP+FT's own fine-tuning learning rate: the protocol's dense model (trained at the "
            "baselines' learning rate, the dense row), pruned by magnitude in one shot at each sparsity "
            "and fine-tuned as long as the dense training at each learning rate (SGD, momentum 0.9, "
            "weight decay 5e-4, cosine schedule, batch 128). Validation accuracy (%), mean ± std over "
            f"seeds {result['seeds']}; the test split is not read. The mean column averages the "
            "sparsities per seed, then over seeds; the chosen learning rate is the best mean.",
            "",
        ]
        return "\n".join(head + _baselines_tables(result))
    lines = [
        f"# bench_accuracy baselines' learning rate ({result['device']}, torch {result['torch']}"
        f"{', quick' if result['quick'] else ''})",
        "",
        "The shared SGD recipe of dense training, IMP and OMP+FT (momentum 0.9, weight decay 5e-4, "
        "cosine schedule, batch 128) under each learning rate; the protocol's epochs (IMP: 20% per "
        "round, rewinding to the initialisation, every round as long as the dense training, to the "
        "largest sparsity; OMP+FT: the dense model at the same learning rate, pruned in one shot and "
        f"fine-tuned as long). Validation accuracy (%), mean ± std over seeds {result['seeds']}; the "
        "test split is not read. The mean column averages the sparsities per seed, then over seeds; "
        "the chosen learning rate is the best mean.",
        "",
    ]
    return "\n".join(lines + _baselines_tables(result))


def _baselines_tables(result: dict[str, Any]) -> list[str]:
    """The per-model tables and choices of a learning-rate sweep (its markdown after the header)."""
    lines: list[str] = []
    for name, budget in result["budget"].items():
        lines += [f"{name}: " + ", ".join(f"{k}={v}" for k, v in budget.items()), ""]
    for model, methods in result["summary"].items():
        sparsities = sorted(
            {
                s
                for m in ("imp", "omp_ft")
                if m in methods
                for c in methods[m]["lrs"].values()
                for s in c["per_sparsity"]
            },
            key=float,
        )
        lines += [f"## {model}", ""]
        lines.append(
            "| method | lr | "
            + " | ".join(f"{100 * float(s):g}%" for s in sparsities)
            + " | mean | s / run |"
        )
        lines.append("| --- | ---: | " + " | ".join("---:" for _ in sparsities) + " | ---: | ---: |")
        for method in ("dense", "imp", "omp_ft"):
            if method not in methods:
                continue
            for lr, c in methods[method]["lrs"].items():
                cells = [pct(c["per_sparsity"][s]) if s in c["per_sparsity"] else "" for s in sparsities]
                if method == "dense":
                    cells = [""] * len(sparsities)
                mean = pct(c["mean"])
                if float(lr) == methods[method]["chosen_lr"]:
                    mean = f"**{mean}**"
                label = {"dense": "dense", "imp": "IMP", "omp_ft": "OMP+FT"}[method]
                lines.append(f"| {label} | {lr} | " + " | ".join(cells) + f" | {mean} | {c['time_s']:.0f} |")
        lines.append("")
        for method in ("dense", "imp", "omp_ft"):
            if method in methods:
                m = methods[method]
                level_with = ", ".join(f"{lr:g}" for lr in m["level_with_chosen"])
                lines.append(
                    f"- {model}, {method}: chosen lr {m['chosen_lr']:g}; level with it (within one std "
                    f"of the per-seed means): {level_with}"
                )
        lines.append("")
    return lines


def _plain_log_x(ax: Any) -> None:
    """A log-scaled x axis whose tick labels read as plain numbers (0.05, 2, 500)."""
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def baselines_plot(result: dict[str, Any], path: Path) -> None:
    """Validation accuracy against the learning rate: per model, IMP and OMP+FT at each sparsity
    (thin) and averaged over the sparsities (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(result["summary"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        methods = result["summary"][model]
        for i, method in enumerate(m for m in ("imp", "omp_ft", "dense") if m in methods):
            cells = methods[method]["lrs"]
            lrs = [float(lr) for lr in cells]
            ax.errorbar(
                lrs,
                [100 * c["mean"]["mean"] for c in cells.values()],
                yerr=[100 * c["mean"]["std"] for c in cells.values()],
                color=f"C{i}",
                lw=2,
                marker="o",
                capsize=3,
                label={"dense": "dense", "imp": "IMP, mean", "omp_ft": "OMP+FT, mean"}[method],
            )
            if method == "dense":
                continue
            sparsities = sorted({s for c in cells.values() for s in c["per_sparsity"]}, key=float)
            for s, ls in zip(sparsities, (":", "--", "-.", (0, (1, 3))), strict=False):
                ax.plot(
                    lrs,
                    [
                        100 * c["per_sparsity"][s]["mean"] if s in c["per_sparsity"] else float("nan")
                        for c in cells.values()
                    ],
                    color=f"C{i}",
                    lw=0.8,
                    ls=ls,
                    label=f"{method_label(method, 0)} {100 * float(s):g}%",
                )
        _plain_log_x(ax)
        ax.set_xticks(sorted({float(lr) for m in methods.values() for lr in m["lrs"]}))
        ax.set(
            title=f"{model}: baselines' learning rate",
            xlabel="SGD learning rate",
            ylabel="validation accuracy (%)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_baselines(result: dict[str, Any], target: Path) -> None:
    """``target`` (JSON, written first), its ``.md`` and ``.png``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2))
    target.with_suffix(".md").write_text(baselines_markdown(result))
    baselines_plot(result, target.with_suffix(".png"))
    print(baselines_markdown(result))


def stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Per model: mean and std of test and validation accuracy and of the time, per cell."""
    table: dict[str, Any] = {}
    for row in rows:
        method = row["method"] + (f"_x{row['budget']}" if "budget" in row else "")
        cell = (
            table.setdefault(row["model"], {}).setdefault(method, {}).setdefault(f"{row['sparsity']:.3f}", [])
        )
        cell.append(row)
    out: dict[str, Any] = {}
    for model, methods in table.items():
        out[model] = {}
        for method, cells in methods.items():
            out[model][method] = {
                s: {
                    "test": stats([r["test_accuracy"] for r in rs]),
                    "val": stats([r["val_accuracy"] for r in rs]),
                    "time_s": stats([r["time_s"] for r in rs]),
                }
                for s, rs in cells.items()
            }
        out[model]["verdict"] = verdicts(out[model])
    return out


def level(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether mean ``a`` is at least mean ``b`` or within one standard deviation of either."""
    return a["mean"] >= b["mean"] - max(a["std"], b["std"])


OMP_TARGET_FROM = 0.95  # BiP should beat one-shot magnitude pruning with fine-tuning from here on
PER_BUDGET_UP_TO = 0.98  # the per-budget lines: the sparsities up to here


def ahead(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether mean ``a`` exceeds mean ``b`` by more than the larger standard deviation."""
    return a["mean"] - b["mean"] > max(a["std"], b["std"])


def meets_targets(
    bip: dict[str, Any],
    imp_cell: dict[str, Any],
    omp: dict[str, Any] | None,
    sparsity: str,
    split: str = "test",
) -> bool:
    """BiP's cell against the three targets, on ``split`` accuracy: level with IMP, at most 1/4 of
    IMP's time, and from 95% on ahead of OMP+FT by more than one standard deviation."""
    return (
        level(bip[split], imp_cell[split])
        and imp_cell["time_s"]["mean"] >= 4 * bip["time_s"]["mean"]
        and (float(sparsity) < OMP_TARGET_FROM or (omp is not None and ahead(bip[split], omp[split])))
    )


def verdicts(methods: dict[str, Any]) -> dict[str, Any]:
    """Per sparsity: the BiP budget chosen on validation (the smallest that meets every target on
    validation, else the smallest level with IMP there) and its test accuracy, time ratio and
    targets; the budgets that
    meet every target on test; and, read after the fact on test, the smallest budget level with
    IMP's test accuracy and the smallest meeting every target."""
    out = {}
    budgets = sorted(int(m.split("_x")[1]) for m in methods if m.startswith("bip_x"))
    for s in sorted(methods.get("imp", {}), key=float):
        imp_cell = methods["imp"][s]
        cells = {b: methods[f"bip_x{b}"][s] for b in budgets if s in methods[f"bip_x{b}"]}
        reached = next((b for b, c in cells.items() if level(c["test"], imp_cell["test"])), None)
        base = cells.get(budgets[0]) if budgets else None
        omp = methods.get("omp_ft", {}).get(s)
        entry: dict[str, Any] = {"bip_budget_at_imp_accuracy": reached}
        if reached is not None:
            entry["time_ratio_imp_over_bip"] = imp_cell["time_s"]["mean"] / cells[reached]["time_s"]["mean"]
        if base is not None:
            entry["bip_level_with_imp"] = level(base["test"], imp_cell["test"])
            entry["bip_base_time_ratio"] = imp_cell["time_s"]["mean"] / base["time_s"]["mean"]
            if omp is not None:
                entry["bip_ahead_of_omp_ft"] = ahead(base["test"], omp["test"])
        if omp is not None:
            meeting = [b for b, c in cells.items() if meets_targets(c, imp_cell, omp, s)]
            entry["bip_budgets_meeting_all_targets"] = meeting
            entry["bip_budget_meeting_all_targets"] = meeting[0] if meeting else None
        # The budget chosen on validation accuracy, as a user would choose it: the smallest that
        # meets every target on validation; else the smallest level with IMP there. Its test
        # accuracy is read once, for the report.
        chosen = next((b for b, c in cells.items() if meets_targets(c, imp_cell, omp, s, "val")), None)
        entry["bip_budget_validated_rule"] = "all targets on validation"
        if chosen is None:
            chosen = next((b for b, c in cells.items() if level(c["val"], imp_cell["val"])), None)
            entry["bip_budget_validated_rule"] = "level with IMP on validation"
        entry["bip_budget_validated"] = chosen
        if chosen is not None:
            cell = cells[chosen]
            entry["validated_level_with_imp"] = level(cell["test"], imp_cell["test"])
            entry["validated_time_ratio"] = imp_cell["time_s"]["mean"] / cell["time_s"]["mean"]
            if omp is not None:
                entry["validated_ahead_of_omp_ft"] = ahead(cell["test"], omp["test"])
                entry["validated_meets_all_targets"] = meets_targets(cell, imp_cell, omp, s)
        out[s] = entry
    return out


def budget_label(verdict: dict[str, Any], key: str) -> str:
    if key not in verdict:
        return ""
    return "**none**" if verdict[key] is None else f"{verdict[key]}x"


def pct(cell: dict[str, float]) -> str:
    return f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}"


def method_label(method: str, base: float) -> str:
    if method.startswith("bip_x"):
        b = int(method.split("_x")[1])
        return f"BiP {b}x ({b * base:g} ep)"
    return {"imp": "IMP", "omp_ft": "OMP+FT", "dense": "dense"}[method]


def markdown(result: dict[str, Any], model: str) -> str:
    summary = result["summary"][model]
    budget = result["budget"][model]
    methods = [m for m in summary if m not in ("dense", "verdict")]
    methods.sort(key=lambda m: (m != "imp", m != "omp_ft", m))
    sparsities = sorted({s for m in methods for s in summary[m]}, key=float)
    dense = summary.get("dense", {}).get("0.000")
    lines = [
        f"# bench_accuracy: {model} ({result['device']}, torch {result['torch']}"
        f"{', quick' if result['quick'] else ''})",
        "",
        "Budgets: " + ", ".join(f"{k}={v}" for k, v in budget.items()),
        "",
        "BiP settings (chosen on the validation split, see the sweep): "
        + ", ".join(f"{k}={v}" for k, v in result["bip_settings"].items()),
        "",
    ]
    if dense:
        seconds = dense["time_s"]["mean"]
        lines.append(f"Dense: test {pct(dense['test'])}%, validation {pct(dense['val'])}%, {seconds:.0f} s.")
        lines.append("")
    ref = LOTTERY_REFERENCE.get(model)
    if ref:
        lines.append(
            f"Lottery-ticket reference (Frankle & Carbin 2019): about {100 * ref['dense']:.1f}% dense and "
            f"{100 * ref['0.964']:.1f}% for IMP's ticket at 96.4% sparsity."
        )
        lines.append("")
    imp_rows = [r for r in result["rows"] if r["model"] == model and r["method"] == "imp"]
    if all("rounds_charged" in r for r in imp_rows):
        imp_time = (
            "IMP: round 0 and as many rounds as a run aimed at that sparsity alone needs, since its one "
            "run also stops at the lower sparsities and those extra rounds are not charged"
        )
    else:  # a run from before the rounds were counted
        imp_time = (
            "IMP: the cumulative time of its one run, whose rounds also stop at the lower sparsities, so "
            "more rounds than a run aimed at that sparsity alone needs"
        )
    lines.append(
        f"Test accuracy (%), mean ± std over seeds; wall time to the ticket (s, dense training included; "
        f"{imp_time}):"
    )
    lines.append("")
    lines.append("| method | " + " | ".join(f"{100 * float(s):g}%" for s in sparsities) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in sparsities) + " |")
    for method in methods:
        cells = []
        for s in sparsities:
            c = summary[method].get(s)
            cells.append("" if c is None else f"{pct(c['test'])} ({c['time_s']['mean']:.0f}s)")
        lines.append(f"| {method_label(method, budget['bip_epochs'])} | " + " | ".join(cells) + " |")
    yes = {True: "yes", False: "**no**", None: ""}
    verdict = summary["verdict"]
    lines += [
        "",
        "The targets: BiP level with IMP on test accuracy (mean at least IMP's, or within one std of "
        "either), at most 1/4 of IMP's wall time, and from 95% on ahead of OMP+FT by more than one std.",
        "",
        "Budget chosen on validation, per sparsity: the smallest BiP budget that meets every target on "
        "validation accuracy (the same rules), else the smallest level with IMP's validation accuracy; "
        "its test accuracy, read once for the report, against the targets.",
        "",
        "| sparsity | budget (on validation) | BiP val | IMP val | BiP test | IMP test | level with IMP "
        "on test | IMP time / BiP time | ahead of OMP+FT by > 1 std | all targets |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | :---: | :---: |",
    ]
    for s, v in verdict.items():
        chosen = v.get("bip_budget_validated")
        imp_cell = summary["imp"][s]
        if chosen is None:
            best = max(
                (m for m in methods if m.startswith("bip_x") and s in summary[m]), key=lambda m: int(m[5:])
            )
            lines.append(
                f"| {100 * float(s):g}% | **none** ({best[5:]}x shown) | {pct(summary[best][s]['val'])} "
                f"| {pct(imp_cell['val'])} | {pct(summary[best][s]['test'])} | {pct(imp_cell['test'])} "
                "| | | | **no** |"
            )
            continue
        cell = summary[f"bip_x{chosen}"][s]
        omp_target = v.get("validated_ahead_of_omp_ft")
        omp_text = yes[omp_target]
        if float(s) < OMP_TARGET_FROM and omp_target is not None:
            omp_text = f"({omp_text})"
        lines.append(
            f"| {100 * float(s):g}% | {chosen}x | {pct(cell['val'])} | {pct(imp_cell['val'])} "
            f"| {pct(cell['test'])} | {pct(imp_cell['test'])} | {yes[v['validated_level_with_imp']]} "
            f"| {v['validated_time_ratio']:.1f}x "
            f"| {omp_text} "
            f"| {yes[v.get('validated_meets_all_targets')]} |"
        )
    lines += [
        "",
        "(Below 95% the OMP+FT column is shown in brackets: it is not a target there.)",
        "",
        f"Each fixed budget against all three targets (test accuracy), sparsities up to "
        f"{100 * PER_BUDGET_UP_TO:g}%:",
        "",
    ]
    lines += [f"- {line}" for line in budget_lines(summary)]
    lines += [
        "",
        "Read after the fact on test accuracy (a selection on the test split, not a validated "
        "choice): the smallest BiP budget level with IMP on test and IMP's time over BiP's there, "
        "the targets at BiP's base budget, and the smallest budget meeting all three targets on test.",
        "",
        "| sparsity | budget level with IMP on test (after the fact) | IMP time / BiP time | BiP 1x level "
        "with IMP | IMP time / BiP 1x time | BiP 1x ahead of OMP+FT by > 1 std | budget meeting all "
        "targets on test (after the fact) |",
        "| ---: | ---: | ---: | :---: | ---: | :---: | ---: |",
    ]
    for s, v in verdict.items():
        ratio = v.get("time_ratio_imp_over_bip")
        reached = v["bip_budget_at_imp_accuracy"]
        lines.append(
            f"| {100 * float(s):g}% | {'not reached' if reached is None else f'{reached}x'} "
            f"| {'' if ratio is None else f'{ratio:.1f}x'} | {yes[v.get('bip_level_with_imp')]} "
            f"| {v.get('bip_base_time_ratio', 0):.1f}x | {yes[v.get('bip_ahead_of_omp_ft')]} "
            f"| {budget_label(v, 'bip_budget_meeting_all_targets')} |"
        )
    return "\n".join(lines) + "\n"


def budget_lines(summary: dict[str, Any]) -> list[str]:
    """Per fixed BiP budget: the sparsities up to ``PER_BUDGET_UP_TO`` where it meets all targets."""
    verdict = summary["verdict"]
    sparsities = [s for s in verdict if float(s) <= PER_BUDGET_UP_TO + 1e-9]
    budgets = sorted(int(m[5:]) for m in summary if m.startswith("bip_x"))
    out = []
    for b in budgets:
        met = [s for s in sparsities if b in verdict[s].get("bip_budgets_meeting_all_targets", [])]
        missed = [s for s in sparsities if s not in met]
        text = ", ".join(f"{100 * float(s):g}%" for s in met) or "none"
        if missed:
            text += " (not at " + ", ".join(f"{100 * float(s):g}%" for s in missed) + ")"
        else:
            text = f"every sparsity ({text})"
        out.append(f"BiP {b}x: all targets hold at {text}")
    return out


def plot(result: dict[str, Any], model: str, path: Path) -> None:
    """Test accuracy against sparsity, and against wall time (one marker per method and sparsity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = result["summary"][model]
    base = result["budget"][model]["bip_epochs"]
    methods = [m for m in summary if m not in ("dense", "verdict")]
    methods.sort(key=lambda m: (m != "imp", m != "omp_ft", m))
    fig, (ax, tax) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    dense = summary.get("dense", {}).get("0.000")
    sparsities = sorted({s for m in methods for s in summary[m]}, key=float)
    markers = dict(zip(sparsities, "osD^vP*X", strict=False))
    for method in methods:
        pts = sorted((float(s), c) for s, c in summary[method].items())
        ax.errorbar(
            [100 * s for s, _ in pts],
            [100 * c["test"]["mean"] for _, c in pts],
            yerr=[100 * c["test"]["std"] for _, c in pts],
            marker="o",
            capsize=3,
            color=colors[method],
            label=method_label(method, base),
        )
        for s, c in summary[method].items():
            tax.errorbar(
                c["time_s"]["mean"],
                100 * c["test"]["mean"],
                yerr=100 * c["test"]["std"],
                marker=markers[s],
                color=colors[method],
                capsize=2,
                ls="none",
            )
    for s in sparsities:  # BiP's budgets at one sparsity, joined
        bips = sorted(
            (summary[m][s]["time_s"]["mean"], summary[m][s]["test"]["mean"])
            for m in methods
            if m.startswith("bip_x") and s in summary[m]
        )
        if bips:
            tax.plot([t for t, _ in bips], [100 * a for _, a in bips], color="gray", lw=0.8, alpha=0.6)
    if dense:
        for a in (ax, tax):
            a.axhline(100 * dense["test"]["mean"], color="gray", ls="--", lw=1)
    handles = [
        plt.Line2D([], [], color=colors[m], marker="o", ls="none", label=method_label(m, base))
        for m in methods
    ]
    handles += [
        plt.Line2D([], [], color="black", marker=markers[s], ls="none", label=f"{100 * float(s):g}% sparse")
        for s in sparsities
    ]
    ax.set(
        title=f"{model}: test accuracy against sparsity",
        xlabel="sparsity (%)",
        ylabel="test accuracy (%), mean ± std",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _plain_log_x(tax)
    tax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    tax.set(
        title=f"{model}: test accuracy against wall time",
        xlabel="seconds to the ticket (log)",
        ylabel="test accuracy (%)",
    )
    tax.grid(alpha=0.3)
    tax.legend(handles=handles, fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_summary(rows: list[dict], center: dict[str, Any]) -> dict[str, Any]:
    """Mean validation accuracy per setting (over seeds and sparsities); the best value per factor."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    settings = {
        label: {
            "factor": rs[0]["factor"] if label != "center" else None,
            "value": rs[0]["value"] if label != "center" else None,
            "val_mean": statistics.mean(r["val_accuracy"] for r in rs),
            "per_sparsity": {
                f"{s:.3f}": stats([r["val_accuracy"] for r in rs if r["sparsity"] == s])
                for s in sorted({r["sparsity"] for r in rs})
            },
        }
        for label, rs in by.items()
    }
    best: dict[str, Any] = {}
    for factor in (f for f in SWEEP if f in center):
        candidates = {center[factor]: settings["center"]["val_mean"]} if "center" in settings else {}
        for v in settings.values():
            if v["factor"] == factor:
                candidates[v["value"]] = v["val_mean"]
        if candidates:
            best[factor] = max(candidates, key=lambda value: candidates[value])
    return {"center": center, "settings": settings, "best": best}


def sweep_markdown(result: dict[str, Any]) -> str:
    center = ", ".join(f"{k}={v}" for k, v in result["summary"]["center"].items())
    lines = [
        f"# bench_accuracy sweep ({result['device']}, torch {result['torch']})",
        "",
        f"BiP settings one factor at a time around the center setting ({center}); validation accuracy (%), "
        f"mean ± std over seeds {result['seeds']}; models {result['models']}; BiP's base epochs. The test "
        "split is not read.",
        "",
    ]
    for name, budget in result.get("budget", {}).items():
        lines += [f"{name}: " + ", ".join(f"{k}={v}" for k, v in budget.items()), ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}.", ""]
    sparsities = sorted(
        {s for v in result["summary"]["settings"].values() for s in v["per_sparsity"]}, key=float
    )
    lines.append("| setting | " + " | ".join(f"{100 * float(s):g}%" for s in sparsities) + " | mean |")
    lines.append("| --- | " + " | ".join("---:" for _ in sparsities) + " | ---: |")
    for label, v in sorted(result["summary"]["settings"].items(), key=lambda kv: -kv[1]["val_mean"]):
        cells = [pct(v["per_sparsity"][s]) if s in v["per_sparsity"] else "" for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * v['val_mean']:.2f} |")
    top, cell = max(result["summary"]["settings"].items(), key=lambda kv: kv[1]["val_mean"])
    lines += ["", f"Best measured setting: {top} ({100 * cell['val_mean']:.2f}% mean validation accuracy)."]
    best = ", ".join(f"{k}={v}" for k, v in result["summary"]["best"].items())
    lines += ["", f"Best value per factor (each measured with the others at the center): {best}"]
    return "\n".join(lines) + "\n"


def sweep_plot(result: dict[str, Any], path: Path) -> None:
    """Mean validation accuracy per value of each swept factor (the center's value in black);
    nothing for a sweep of the center alone."""
    summary = result["summary"]
    center, settings = summary["center"], summary["settings"]
    factors = [f for f in SWEEP if any(v["factor"] == f for v in settings.values())]
    if not factors:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(factors), figsize=(2.3 * len(factors) + 1, 3.6), sharey=True)
    axes = list(axes) if len(factors) > 1 else [axes]
    means = [100 * v["val_mean"] for v in settings.values()]
    low, high = max(min(means), max(means) - 3) - 0.2, max(means) + 0.3
    for ax, factor in zip(axes, factors, strict=False):
        points = {str(v["value"]): v["val_mean"] for v in settings.values() if v["factor"] == factor}
        if "center" in settings:
            points[str(center[factor])] = settings["center"]["val_mean"]
        labels = [str(v) for v in SWEEP[factor] if str(v) in points]
        heights = [100 * points[label] for label in labels]
        colors = ["black" if label == str(center[factor]) else "C0" for label in labels]
        ax.bar(range(len(labels)), heights, color=colors)
        for i, h in enumerate(heights):  # the value, also of a bar below the axis (a collapse)
            ax.text(i, max(h, low) + 0.05, f"{h:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
        ax.set_title(factor, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(low, high)
    axes[0].set_ylabel("validation accuracy (%), mean")
    fig.suptitle(f"{', '.join(result['models'])}: one factor at a time (black: the center)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _data_budget(name: str, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict[str, int]:
    """What every result records of a model's data budget: images and dense epochs."""
    return {
        "train_images": len(data["xtr"]),
        "val_images": len(data["xval"]),
        "epochs": args.epochs or EPOCHS[name],
    }


def protocol_budget(name: str, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a protocol run records of model ``name``'s budget (its JSON's ``budget[name]``)."""
    return {
        **_data_budget(name, args, data),
        "bip_epochs": args.bip_epochs or BIP_EPOCHS[name],
        "bip_budgets": args.budgets,
        "imp_rate": IMP_RATE,
        "lr": baseline_lr(name, args),
        "omp_ft_lr": omp_ft_lr(name, args),
        "batch_size": args.batch_size,
        "seeds": args.seeds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: small data, one seed, LeNet")
    parser.add_argument("--sweep", action="store_true", help="choose BiP's settings on the validation split")
    parser.add_argument(
        "--sweep-baselines",
        action="store_true",
        help="choose the learning rate of dense training, IMP and OMP+FT on the validation split",
    )
    parser.add_argument(
        "--sweep-omp-ft",
        action="store_true",
        help="choose OMP+FT's own fine-tuning learning rate on the validation split",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="with --sweep-baselines or --sweep-omp-ft: the learning rates to compare (default: "
        + ", ".join(map(str, BASELINE_LRS))
        + " and "
        + ", ".join(map(str, OMP_FT_LRS))
        + ")",
    )
    parser.add_argument(
        "--omp-ft-lr",
        type=float,
        default=None,
        help="OMP+FT's fine-tuning learning rate (default: per model, the validated one, else --lr's)",
    )
    parser.add_argument(
        "--factors",
        nargs="*",
        default=None,
        choices=sorted(SWEEP),
        help="with --sweep: the factors to vary (default: all; none: the center alone)",
    )
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="the methods to run (split a run over processes; merge with --replot)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=None)
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=list(BUDGETS), help="BiP budgets, x base epochs"
    )
    parser.add_argument("--train-size", type=int, default=None, help="training images (default: all 55,000)")
    parser.add_argument("--epochs", type=float, default=None, help="E: dense epochs, IMP epochs per round")
    parser.add_argument("--bip-epochs", type=float, default=None, help="BiP's base epochs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="SGD learning rate of dense, IMP and OMP+FT (default: per model, the validated one: "
        + ", ".join(f"{k} {v:g}" for k, v in LR.items())
        + ")",
    )
    parser.add_argument(
        "--bip",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="BiP settings other than the library's defaults, e.g. upper_lr=30",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument(
        "--replot",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="rewrite the markdown and PNG of earlier runs' JSON (nothing is trained); several files of "
        "one model (or several sweeps) are merged, e.g. seeds run in parallel processes",
    )
    parser.add_argument("--merged", type=Path, default=None, help="with --replot: the merged JSON to write")
    args = parser.parse_args(argv)
    if args.sweep + args.sweep_baselines + args.sweep_omp_ft > 1:
        parser.error("--sweep, --sweep-baselines and --sweep-omp-ft: one at a time")
    if args.lrs is None:
        args.lrs = list(OMP_FT_LRS if args.sweep_omp_ft else BASELINE_LRS)
    if args.replot is not None:
        return replot(args.replot, args.merged)
    args.bip = {k: value(v) for k, v in (item.split("=", 1) for item in args.bip)}
    args.factors = list(SWEEP) if args.factors is None else args.factors
    known = sorted((*BIP_KEYS, "finetune_epochs"))
    for key in args.bip:
        if key not in known:
            parser.error(f"--bip {key}=...: not a BiP setting of this benchmark; one of {known}")
    if args.quick:
        args.models = args.models or ["lenet_300_100"]
        args.seeds = args.seeds or [0]
        args.train_size = args.train_size or 3000
        args.epochs = args.epochs or 1.0
        args.bip_epochs = args.bip_epochs or 0.5
        args.sparsities = args.sparsities or [0.5, 0.9]
        args.budgets = [1, 2] if args.budgets == list(BUDGETS) else args.budgets
        val_size = 500
    else:
        args.models = args.models or ["lenet_300_100", "lenet5"]
        sweeping = args.sweep or args.sweep_baselines or args.sweep_omp_ft
        args.seeds = args.seeds or ([0, 1] if sweeping else [0, 1, 2])
        args.sparsities = args.sparsities or list(SWEEP_SPARSITIES if sweeping else SPARSITIES)
        val_size = VAL_SIZE
    data = split(args.train_size, val_size)
    device = f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    meta = {"device": device, "torch": torch.__version__.split("+")[0], "quick": args.quick}
    stem = f"bench_accuracy{'_sweep' if args.sweep else ''}-{device}-torch{meta['torch']}"
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    if args.sweep_baselines or args.sweep_omp_ft:
        kind = "omp_ft" if args.sweep_omp_ft else "baselines"
        stem_kind = "bench_accuracy_omp_ft" if args.sweep_omp_ft else "bench_accuracy_baselines"
        target = args.out / f"{stem_kind}-{device}-torch{meta['torch']}{suffix}.json"
        sweep_one = sweep_omp_ft_seed if args.sweep_omp_ft else sweep_baselines_seed
        result = {
            **meta,
            "sweep": kind,
            "models": args.models,
            "seeds": args.seeds,
            "lrs": args.lrs,
            "budget": {
                name: {
                    **_data_budget(name, args, data),
                    **({"lr": baseline_lr(name, args)} if args.sweep_omp_ft else {"imp_rate": IMP_RATE}),
                    "batch_size": args.batch_size,
                    "sparsities": args.sparsities,
                }
                for name in args.models
            },
            "rows": [],
        }
        for name in args.models:
            for seed in args.seeds:  # the outputs are rewritten after each seed
                result["rows"] += sweep_one(name, seed, args, data)
                result["summary"] = baselines_summary(result["rows"])
                write_baselines(result, target)
        return result
    if args.sweep:
        rows = [r for name in args.models for seed in args.seeds for r in sweep_seed(name, seed, args, data)]
        result = {
            **meta,
            "models": args.models,
            "seeds": args.seeds,
            "budget": {
                name: {
                    **_data_budget(name, args, data),
                    "bip_epochs": args.bip_epochs or BIP_EPOCHS[name],
                    "lr": baseline_lr(name, args),
                    "batch_size": args.batch_size,
                }
                for name in args.models
            },
            "rows": rows,
            "summary": sweep_summary(rows, bip_settings(args.bip)),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}{suffix}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{stem}{suffix}.md").write_text(sweep_markdown(result))
        sweep_plot(result, args.out / f"{stem}{suffix}.png")
        print(sweep_markdown(result))
        return result
    result = {**meta, "bip_settings": bip_settings(args.bip), "budget": {}, "rows": []}
    for name in args.models:
        result["budget"][name] = protocol_budget(name, args, data)
        rows: list[dict] = []
        for seed in args.seeds:  # the outputs are rewritten after each seed
            rows += run_seed(name, seed, args, data)
            single = {
                **result,
                "budget": {name: result["budget"][name]},
                "rows": rows,
                "summary": summarise(rows),
            }
            write_outputs(single, name, args.out, f"{stem}-{name}{suffix}")
        result["rows"] += rows
    result["summary"] = summarise(result["rows"])
    return result


def replot(paths: list[Path], merged: Path | None = None) -> dict[str, Any]:
    """Rebuild the summaries, markdown and plots from run JSONs; several are merged (rows joined)."""
    results = [json.loads(p.read_text()) for p in paths]
    result = results[0]
    result["rows"] = [r for res in results for r in res["rows"]]
    target = merged or paths[0]
    if result.get("sweep") in ("baselines", "omp_ft"):
        for res in results[1:]:
            result["budget"].update(res["budget"])
        result["models"] = list(result["budget"])
        result["seeds"] = sorted({r["seed"] for r in result["rows"]})
        result["lrs"] = sorted({r["lr"] for r in result["rows"]})
        result["summary"] = baselines_summary(result["rows"])
        write_baselines(result, target)
        return result
    if "bip_settings" not in result:  # a sweep
        for res in results[1:]:
            if res["summary"]["center"] != result["summary"]["center"] or res.get("budget") != result.get(
                "budget"
            ):
                raise SystemExit(f"--replot: the sweeps differ in their center or budget: {paths}")
        result["seeds"] = sorted({r["seed"] for r in result["rows"]})
        result["summary"] = sweep_summary(result["rows"], result["summary"]["center"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2))
        target.with_suffix(".md").write_text(sweep_markdown(result))
        sweep_plot(result, target.with_suffix(".png"))
        print(sweep_markdown(result))
        return result

    def without_seeds(budget: dict[str, Any]) -> dict[str, Any]:
        return {model: {k: v for k, v in b.items() if k != "seeds"} for model, b in budget.items()}

    for res in results[1:]:
        mine, theirs = result["bip_settings"], res["bip_settings"]
        if any(mine[k] != theirs[k] for k in mine.keys() & theirs.keys()) or without_seeds(
            res["budget"]
        ) != without_seeds(result["budget"]):
            raise SystemExit(f"--replot: the runs differ in their settings, models or budgets: {paths}")
    (model,) = result["budget"]
    result["budget"][model]["seeds"] = sorted({r["seed"] for r in result["rows"]})
    result["summary"] = summarise(result["rows"])
    write_outputs(result, model, target.parent, target.stem)
    return result


def write_outputs(result: dict[str, Any], model: str, out: Path, stem: str) -> None:
    """``<stem>.json``, ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result, model))
    plot(result, model, out / f"{stem}.png")
    print(markdown(result, model))


if __name__ == "__main__":
    main()
