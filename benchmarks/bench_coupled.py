"""Structured BiP over coupled channels (``torchbip.Coupled``): what the slim model gains, and
how accurate it is against Torch-Pruning's own criteria.

Part 1, structure (one run, interleaved timings). For torchvision's resnet18, resnet50 and
mobilenet_v2 (224x224 inputs) and a small VisionTransformer (224x224, 6 layers, width 192; its
attention heads and MLP hidden neurons are the groups), at 30/50/70% of each group's channels
(``budget="layer"``): parameters, MACs per image (counted with forward hooks), CPU latency of the slim model
(``export_slim``) against the dense one, the fraction of pruned channels the export removed, and
the largest output difference to the masked model. The scores are the initial ones (weight
magnitudes): the structure and the speed do not depend on what was learned. A ``macs`` row per
model asks ``budget="macs"`` for 50% of the MACs.

Part 2, accuracy on real data: scikit-learn's digits and MNIST (a 3,000-image training subset,
the full test split), a four-conv CNN (20-20-40-40 channels, so every budget is a whole number
of channels per group and all methods land on the same MACs). The same dense start (trained
``--dense-epochs``) is pruned at 30/50/70% of each group's channels by

- ``bip``: ``torchbip.BiP`` with ``torchbip.Coupled`` in a plain SGD loop for ``--bip-epochs``
  (library defaults for the upper level), then ``--finetune-epochs`` with the mask fixed;
- ``tp_l1`` and ``tp_taylor``: Torch-Pruning's ``MetaPruner`` with ``MagnitudeImportance(p=1)``
  or ``TaylorImportance`` (gradients of 4 batches) at the same ratio, then
  ``--bip-epochs + --finetune-epochs`` of fine-tuning, the same number of training steps.

Every model is exported slim and evaluated once on the test split (no choice is made on it);
the table gives the mean and standard deviation over ``--seeds``. The settings are chosen on a
validation split held out of the training images: ``--sweep`` scores structured BiP's settings
one factor at a time (``--bip key=value`` sets the center), and with ``--sweep-baselines`` also
Torch-Pruning's criteria at several fine-tuning learning rates (``--tp-lr`` then sets theirs).
Run::

    python benchmarks/bench_coupled.py --quick   # about a minute
    python benchmarks/bench_coupled.py           # the full run

Writes ``bench_coupled-cpu-<machine>-<threads>threads-torch<version>[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from bench_export import Batches, accuracy, latency
from torch import Tensor, nn

import torchbip
from torchbip.baselines import train
from torchbip.datasets import load_digits, load_mnist

RESULTS = Path(__file__).resolve().parent / "results"


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=224,
        patch_size=16,
        num_layers=6,
        num_heads=3,
        hidden_dim=192,
        mlp_dim=768,
        num_classes=1000,
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "resnet50": lambda: torchvision.models.resnet50(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "vit_small": small_vit,
}


# --------------------------------------------------------------------------- part 1: structure


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates per sample: convolutions, linear layers and attention modules.

    An attention module (``nn.MultiheadAttention`` or the slim one) counts its query, key and
    value projections, the two attention products and its output projection, per head.
    """
    total = 0.0
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inner = {id(a.out_proj) for a in attentions}

    def layer(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * module.weight[0, 0].numel()
        elif isinstance(module, nn.Linear) and id(module) not in inner:
            total += output.numel() * module.in_features

    def attention(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        assert isinstance(module, nn.MultiheadAttention)
        query, key = inputs[0], inputs[1]
        n = query.shape[0] if module.batch_first else query.shape[1]
        length, source = query.numel() // (n * module.embed_dim), key.numel() // (n * module.kdim)
        width = module.num_heads * module.head_dim  # the kept heads' inner width
        projections = (
            n * (length + 2 * source) * module.embed_dim * width + n * length * width * module.embed_dim
        )
        total += projections + 2 * n * length * source * width

    handles = [
        m.register_forward_hook(layer) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    handles += [m.register_forward_hook(attention) for m in attentions]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return round(total / x.shape[0])


def _channels(module: nn.Module) -> int:
    """What a group's root has left: its heads (attention) or output channels."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.shape[0]


def bench_structure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    dense = MODELS[name]().eval()
    x = torch.randn(2, 3, args.image_size, args.image_size)  # two samples: export_slim needs them
    variants: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, dict[str, Any]] = {"dense": {"budget": None, "amount": 0.0}}
    budgets = [("layer", a) for a in args.amounts] + ([("macs", 0.5)] if args.macs_row else [])
    for budget, amount in budgets:
        masked = copy.deepcopy(dense)
        pruner = torchbip.BiP(masked, amount=amount, layout=torchbip.Coupled(x, budget=budget))
        keeps = [pruner.layout.select(pruner.score_views)[o] for o in pruner.layout.owners]
        pruner.finish()
        start = time.perf_counter()
        slim = torchbip.export_slim(masked.eval(), x).eval()
        export_s = time.perf_counter() - start
        modules = dict(slim.named_modules())
        pruned = sum(g.size - int(k.sum()) for g, k in zip(pruner.layout.groups, keeps, strict=True))
        removed = sum(g.size - _channels(modules[g.root]) for g in pruner.layout.groups)
        with torch.inference_mode():
            diff = float((slim(x) - masked(x)).abs().max())
        key = f"{budget}@{amount:.2f}"
        variants[key] = slim
        info[key] = {
            "budget": budget,
            "amount": amount,
            "groups": len(pruner.layout.groups),
            "pruned_channels": pruned,
            "removed_channels": removed,
            "removed_fraction": removed / pruned if pruned else 1.0,
            "export_s": export_s,
            "max_abs_diff_to_masked": diff,
        }
    for key, model in variants.items():
        info[key]["params"] = sum(p.numel() for p in model.parameters())
        info[key]["macs"] = count_macs(model, x)
        latency(model, x, 1)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, model in variants.items():
            times[key].append(latency(model, x, args.inner))
    rows = []
    for key in variants:
        row = {"variant": key, **info[key], "latency_s": min(times[key])}
        row["latency_median_s"] = statistics.median(times[key])
        row["param_ratio"] = row["params"] / info["dense"]["params"]
        row["mac_ratio"] = row["macs"] / info["dense"]["macs"]
        row["speedup"] = min(times["dense"]) / row["latency_s"]
        rows.append(row)
        print(
            f"[{name}] {key:12s} params {row['param_ratio']:.3f}x MACs {row['mac_ratio']:.3f}x "
            f"latency {row['latency_s'] * 1e3:8.2f} ms speed-up {row['speedup']:.2f}x "
            f"removed {row.get('removed_fraction', 1.0):.3f}",
            flush=True,
        )
    return {"model": name, "input": list(x.shape), "rows": rows}


# --------------------------------------------------------------------------- part 2: accuracy


def cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 20), *block(20, 20), nn.MaxPool2d(2), *block(20, 40), *block(40, 40),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10),
    )  # fmt: skip


def _data(name: str, args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and evaluation images: the test split, or with ``--sweep`` a validation split.

    The validation images come from the training split and never from the test split: for MNIST
    the ``--val-per-class`` images of each digit that follow the ``--mnist-per-class`` training
    ones (the training subset stays the same); for digits every fifth image of each class of the
    training split (the others train).
    """
    if name == "digits":
        xtr, ytr = load_digits("train").tensors
        if not args.sweep:
            return xtr, ytr, *load_digits("test").tensors
        held = torch.zeros(len(ytr), dtype=torch.bool)
        for label in ytr.unique():
            held[torch.nonzero(ytr == label).flatten()[::5]] = True
        return xtr[~held], ytr[~held], xtr[held], ytr[held]
    if not args.sweep:
        xtr, ytr = load_mnist(split="train", per_class=args.mnist_per_class).tensors
        return xtr, ytr, *load_mnist(split="test").tensors
    x, y = load_mnist(split="train", per_class=args.mnist_per_class + args.val_per_class).tensors
    held = torch.zeros(len(y), dtype=torch.bool)
    for label in y.unique():
        held[torch.nonzero(y == label).flatten()[args.mnist_per_class :]] = True
    return x[~held], y[~held], x[held], y[held]


# BiP's settings in part 2: the library's upper-level defaults, the run's epochs (``--bip-epochs``
# and ``--finetune-epochs``, the same total for every method) and the fine-tuning's learning rate
# as a fraction of ``--lr``. ``--bip key=value`` changes them; ``--sweep`` tries each factor below
# on its own around them, on a validation split.
BIP_SETTINGS: dict[str, Any] = {
    "lr": 0.05,  # the weights' learning rate, BiP and fine-tuning (the dense training: --lr)
    "upper_lr": torchbip.BiPConfig.upper_lr,
    "upper_schedule": torchbip.BiPConfig.upper_schedule,
    "implicit_coef": 1.0,
    "score_init": torchbip.BiPConfig.score_init,
    "finetune_lr_factor": 0.1,
}
SWEEP: dict[str, list[Any]] = {
    "lr": [0.02, 0.05, 0.1],
    "upper_lr": [0.3, 1.0, 3.0, 10.0, 30.0],
    "upper_schedule": ["constant", "cosine"],
    "implicit_coef": [0.0, 1.0, 2.0, 4.0],
    "score_init": ["magnitude", "scaled_magnitude"],
    "finetune_lr_factor": [0.1, 1.0],
    "epochs": ["4+0", "3+1", "2+2", "1+3"],  # BiP epochs + fine-tuning epochs, the same total
}
QUICK_SWEEP: dict[str, list[Any]] = {"upper_lr": [1.0]}
# Torch-Pruning's criteria are tuned on the same validation split: their fine-tuning learning rate
TP_LRS = [0.02, 0.05, 0.1]


def _bip_settings(pairs: list[str]) -> dict[str, Any]:
    """``BIP_SETTINGS`` with ``key=value`` overrides (numbers parsed, the rest kept as strings)."""
    settings = dict(BIP_SETTINGS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in BIP_SETTINGS:
            raise SystemExit(f"--bip: expected key=value with key in {sorted(BIP_SETTINGS)}, got {pair!r}")
        settings[key] = type(BIP_SETTINGS[key])(value)
    return settings


def _bip(
    model: nn.Module, data: Batches, amount: float, example: Tensor, args: argparse.Namespace,
    settings: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    settings = dict(args.bip_settings if settings is None else settings)
    bip_epochs, finetune_epochs = settings.pop("epochs", (args.bip_epochs, args.finetune_epochs))
    lr_factor = settings.pop("finetune_lr_factor")
    lr = settings.pop("lr")
    steps = round(bip_epochs * len(data))
    pruner = torchbip.BiP(model, amount=amount, layout=torchbip.Coupled(example), steps=steps, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    done = 0
    while done < steps:
        for images, labels in data:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            pruner.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    pruner.finish()
    if finetune_epochs:
        train(model, data, finetune_epochs, lr=lr * lr_factor)


def _tp(
    model: nn.Module, data: Batches, amount: float, example: Tensor, method: str, args: argparse.Namespace,
    lr: float | None = None,
) -> None:  # fmt: skip
    if method == "tp_taylor":
        importance: Any = tp.importance.TaylorImportance()
        model.zero_grad()
        for i, (images, labels) in enumerate(data):
            F.cross_entropy(model(images), labels).backward()
            if i == 3:
                break
    else:
        importance = tp.importance.MagnitudeImportance(p=1)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    tp.pruner.MetaPruner(
        model, example, importance=importance, pruning_ratio=amount, ignored_layers=[head]
    ).step()
    model.zero_grad(set_to_none=True)
    train(model, data, args.bip_epochs + args.finetune_epochs, lr=args.tp_lr[method] if lr is None else lr)


def _dense(x: Tensor, y: Tensor, seed: int, args: argparse.Namespace) -> nn.Module:
    """The dense start of one seed: the CNN trained ``--dense-epochs`` at ``--lr``."""
    torch.manual_seed(seed)
    dense = cnn()
    train(dense, Batches(x, y, 64, seed), args.dense_epochs, lr=args.lr)
    return dense


def _pruning_start(dense: nn.Module, x: Tensor, y: Tensor, seed: int) -> tuple[nn.Module, Batches]:
    """What every pruning run of one seed starts from: a copy of the dense model and its batches,
    with torch's RNG seeded alike (every method and setting sees the same draws)."""
    torch.manual_seed(1000 + seed)
    return copy.deepcopy(dense).train(), Batches(x, y, 64, 1000 + seed)


def bench_accuracy(dataset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    xtr, ytr, xte, yte = _data(dataset, args)
    example = xtr[:2]  # tracing and MACs only; the test split is read once per final model
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        dense = _dense(xtr, ytr, seed, args)
        dense_macs = count_macs(dense.eval(), example)
        rows.append({"dataset": dataset, "seed": seed, "method": "dense", "amount": 0.0,
                     "accuracy": accuracy(dense, xte, yte), "mac_ratio": 1.0, "wall_s": 0.0})  # fmt: skip
        for amount in args.amounts:
            for method in ("bip", "tp_l1", "tp_taylor"):
                model, data = _pruning_start(dense, xtr, ytr, seed)
                start = time.perf_counter()
                if method == "bip":
                    _bip(model, data, amount, example, args)
                    model = torchbip.export_slim(model.eval(), example)
                else:
                    _tp(model, data, amount, example, method, args)
                wall = time.perf_counter() - start
                row = {
                    "dataset": dataset, "seed": seed, "method": method, "amount": amount,
                    "accuracy": accuracy(model, xte, yte), "wall_s": wall,
                    "mac_ratio": count_macs(model.eval(), example) / dense_macs,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"[{dataset} seed {seed}] {method:9s} @{amount:.2f}: accuracy {row['accuracy']:.4f} "
                    f"MACs {row['mac_ratio']:.3f}x ({wall:.1f} s)",
                    flush=True,
                )
    return rows


def sweep_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The center (``--bip`` settings) and one variant per value of each swept factor."""
    center = dict(args.bip_settings)
    out = [("center", center)]
    total = args.bip_epochs + args.finetune_epochs
    factors = QUICK_SWEEP if args.quick else SWEEP
    if args.factors is not None:
        factors = {k: v for k, v in factors.items() if k in args.factors}
    if args.variants:  # explicit variants instead of the factor table
        factors = {}
        for pair in args.variants:
            key, _, text = pair.partition("=")
            factors.setdefault(key, []).append(text if key == "epochs" else _bip_settings([pair])[key])
    for factor, values in factors.items():
        for value in values:
            if factor == "epochs":
                bip, finetune = (float(v) * total / 4 for v in value.split("+"))
                if (bip, finetune) == (args.bip_epochs, args.finetune_epochs):
                    continue
                out.append((f"epochs={bip:g}+{finetune:g}", center | {"epochs": (bip, finetune)}))
            elif center[factor] != value:
                out.append((f"{factor}={value}", center | {factor: value}))
    return out


def bench_sweep(dataset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Structured BiP's settings one factor at a time, scored on a validation split only."""
    xtr, ytr, xval, yval = _data(dataset, args)
    example = xtr[:2]
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        dense = _dense(xtr, ytr, seed, args)
        for amount in args.amounts:
            for name, settings in sweep_variants(args):
                model, data = _pruning_start(dense, xtr, ytr, seed)
                _bip(model, data, amount, example, args, settings)
                model = torchbip.export_slim(model.eval(), example)
                rows.append({"dataset": dataset, "seed": seed, "amount": amount, "setting": name,
                             "val_accuracy": accuracy(model, xval, yval)})  # fmt: skip
                print(f"[sweep {dataset} seed {seed}] @{amount:.2f} {name}: {rows[-1]['val_accuracy']:.4f}",
                      flush=True)  # fmt: skip
            for method in ("tp_l1", "tp_taylor") if args.sweep_baselines else ():
                for lr in args.tp_lrs:
                    model, data = _pruning_start(dense, xtr, ytr, seed)
                    _tp(model, data, amount, example, method, args, lr)
                    name = f"{method} lr={lr:g}"
                    rows.append({"dataset": dataset, "seed": seed, "amount": amount, "setting": name,
                                 "val_accuracy": accuracy(model.eval(), xval, yval)})  # fmt: skip
                    print(f"[sweep {dataset} seed {seed}] @{amount:.2f} {name}: "
                          f"{rows[-1]['val_accuracy']:.4f}", flush=True)  # fmt: skip
    return rows


def sweep_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and setting: the mean validation accuracy per amount and over the amounts."""
    out = []
    for dataset, setting in sorted({(r["dataset"], r["setting"]) for r in rows}):
        cells = [r for r in rows if (r["dataset"], r["setting"]) == (dataset, setting)]
        amounts = sorted({r["amount"] for r in cells})
        per = {
            f"{a:.2f}": statistics.mean(r["val_accuracy"] for r in cells if r["amount"] == a) for a in amounts
        }
        out.append(
            {"dataset": dataset, "setting": setting, "per_amount": per, "mean": statistics.mean(per.values())}
        )
    return out


def sweep_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    summary = result["sweep_summary"]
    amounts = sorted({a for c in summary for a in c["per_amount"]}, key=float)
    lines = [
        f"# bench_coupled sweep ({env['device']} {env['machine']}, torch {env['torch']}, "
        f"{env['threads']} threads)",
        "",
        f"Command: `{result['command']}`. Structured BiP (`torchbip.Coupled`) with one setting changed "
        f"at a time around the center ({', '.join(f'{k}={v}' for k, v in result['center'].items())}, "
        f"{result['settings']['bip_epochs']:g} BiP + {result['settings']['finetune_epochs']:g} "
        "fine-tuning epochs); validation accuracy of the slim model, mean over "
        f"{result['settings']['seeds']} seeds. Validation images come from the training split (MNIST: "
        f"{result['settings']['val_per_class']} per digit after the {result['settings']['mnist_per_class']} "
        "training ones; digits: every fifth training image); the test split is not read.",
        "",
    ]
    for dataset in sorted({c["dataset"] for c in summary}):
        cells = sorted((c for c in summary if c["dataset"] == dataset), key=lambda c: -c["mean"])
        lines += [
            f"## {dataset}",
            "",
            "| setting | " + " | ".join(f"{float(a):.0%}" for a in amounts) + " | mean |",
            "| --- | " + " | ".join("---:" for _ in amounts) + " | ---: |",
        ]
        for c in cells:
            lines.append(
                f"| {c['setting']} | "
                + " | ".join(f"{100 * c['per_amount'][a]:.2f}" for a in amounts)
                + f" | {100 * c['mean']:.2f} |"
            )
        lines.append("")
    means: dict[str, list[float]] = {}
    for c in summary:
        means.setdefault(c["setting"], []).append(c["mean"])
    for prefix, label in (("", "BiP"), ("tp_l1 ", "TP L1"), ("tp_taylor ", "TP Taylor")):
        own = [k for k in means if (k.startswith(prefix) if prefix else not k.startswith("tp_"))]
        if not own:
            continue
        best = max(own, key=lambda k: statistics.mean(means[k]))
        lines.append(
            f"- {label}: best over the datasets (mean of their means) {best} "
            f"({100 * statistics.mean(means[best]):.2f}%)."
        )
    return "\n".join(lines) + "\n"


def _settings_lines(result: dict[str, Any]) -> list[str]:
    """What every method ran with, per dataset (older results: one line from the run's options)."""
    per = result.get("accuracy_settings") or {
        d: {
            "bip": result.get("bip_settings"),
            "bip_epochs": result["settings"]["bip_epochs"],
            "finetune_epochs": result["settings"]["finetune_epochs"],
            "tp_lr": result["settings"].get("tp_lr"),
        }
        for d in result["settings"]["datasets"]
    }
    lines = []
    for dataset, cfg in per.items():
        bip = (
            ", ".join(f"{k}={v}" for k, v in cfg["bip"].items()) if cfg["bip"] else "the defaults of the time"
        )
        total = cfg["bip_epochs"] + cfg["finetune_epochs"]
        tp = (
            "L1 {tp_l1:g}, Taylor {tp_taylor:g}".format(**cfg["tp_lr"])
            if isinstance(cfg["tp_lr"], dict)
            else f"{result['settings']['lr']:g}"
        )
        lines.append(
            f"- {dataset}: structured BiP with {bip}; {cfg['bip_epochs']:g} BiP epochs, then "
            f"{cfg['finetune_epochs']:g} of fine-tuning. Torch-Pruning's criteria: {total:g} epochs of "
            f"fine-tuning at learning rate {tp}."
        )
    chosen = (
        "Every setting was chosen on a validation split held out of the training images (`--sweep`, "
        "`--sweep-baselines`); the test split is read once per final model."
        if "accuracy_settings" in result
        else "The test split is read once per final model."
    )
    return [*lines, "", chosen, ""]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["dataset"], r["amount"], r["method"]) for r in rows})
    for dataset, amount, method in keys:
        cells = [r for r in rows if (r["dataset"], r["amount"], r["method"]) == (dataset, amount, method)]
        accs = [r["accuracy"] for r in cells]
        out.append({
            "dataset": dataset, "amount": amount, "method": method, "n": len(cells),
            "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "mac_ratio": statistics.mean(r["mac_ratio"] for r in cells),
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- output


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# bench_coupled ({env['device']} {env['machine']}, torch {env['torch']}, {env['threads']} threads)",
        "",
        f"Command: `{result['command']}`. Ratios are to the dense model of the same run; speed-up is "
        "dense latency / slim latency, the best of interleaved repeats (batch 1).",
        "",
    ]
    for model in result["models"]:
        lines += [
            f"## {model['model']} (input {'x'.join(map(str, model['input']))})",
            "",
            "| variant | params | MACs/image | latency (ms) | params ratio | MACs ratio | speed-up | "
            "channels removed / pruned | max diff to masked |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in model["rows"]:
            removed = f"{r['removed_channels']} / {r['pruned_channels']}" if r["budget"] else ""
            diff = f"{r['max_abs_diff_to_masked']:.1e}" if r["budget"] else ""
            lines.append(
                f"| {r['variant']} | {r['params']:,} | {r['macs']:,} | {r['latency_s'] * 1e3:.2f} | "
                f"{r['param_ratio']:.3f} | {r['mac_ratio']:.3f} | {r['speedup']:.2f}x | {removed} | {diff} |"
            )
        lines.append("")
    if result["accuracy_summary"]:
        lines += [
            "## Accuracy: structured BiP against Torch-Pruning's L1 and Taylor importance",
            "",
            "Test accuracy of the slim models, mean ± std over seeds; the same dense start, the same "
            "channels per group (so the same MACs, the `MACs` column) and the same number of training "
            "steps after the dense phase. `BiP ahead`: BiP's mean minus the better of L1 and Taylor. "
            f"MNIST: a {result['settings']['mnist_per_class'] * 10:,}-image training subset, the full "
            "test split.",
            "",
            *_settings_lines(result),
            "| data | channels pruned | MACs | BiP | TP L1 | TP Taylor | BiP ahead |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        cells = {(c["dataset"], c["amount"], c["method"]): c for c in result["accuracy_summary"]}
        for dataset, amount in sorted({(c["dataset"], c["amount"]) for c in result["accuracy_summary"]}):
            if amount == 0.0:
                dense = cells[(dataset, 0.0, "dense")]
                lines.append(
                    f"| {dataset} | dense | 1.000 | {dense['mean']:.4f} ± {dense['std']:.4f} | | | |"
                )
                continue
            got = {m: cells[(dataset, amount, m)] for m in ("bip", "tp_l1", "tp_taylor")}
            best = max(got["tp_l1"]["mean"], got["tp_taylor"]["mean"])
            lines.append(
                f"| {dataset} | {amount:.0%} | {got['bip']['mac_ratio']:.3f} | "
                + " | ".join(
                    f"{got[m]['mean']:.4f} ± {got[m]['std']:.4f}" for m in ("bip", "tp_l1", "tp_taylor")
                )
                + f" | {got['bip']['mean'] - best:+.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c["dataset"] for c in result["accuracy_summary"]})
    panels = 1 + len(datasets)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), layout="constrained", squeeze=False)
    ax = axes[0][0]
    for model in result["models"]:
        rows = [r for r in model["rows"] if r["budget"] == "layer"]
        ax.plot([r["mac_ratio"] for r in rows], [r["speedup"] for r in rows], "o-", label=model["model"])
    ax.set(xlabel="MACs of the slim model / dense", ylabel="CPU speed-up (batch 1)", title="slim models")
    ax.legend()
    for ax, dataset in zip(axes[0][1:], datasets, strict=True):
        for method in ("bip", "tp_l1", "tp_taylor"):
            cells = sorted(
                (c for c in result["accuracy_summary"] if c["dataset"] == dataset and c["method"] == method),
                key=lambda c: c["amount"],
            )
            ax.errorbar([c["amount"] for c in cells], [c["mean"] for c in cells], [c["std"] for c in cells],
                        marker="o", capsize=3, label=method)  # fmt: skip
        ax.set(xlabel="fraction of channels pruned", ylabel="test accuracy", title=dataset)
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_plot(result: dict[str, Any], path: Path) -> None:
    """Validation accuracy (mean over the amounts) per setting and dataset; the center in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["sweep_summary"]
    datasets = sorted({c["dataset"] for c in summary})
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(6 * len(datasets), 4), layout="constrained", squeeze=False
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        cells = sorted((c for c in summary if c["dataset"] == dataset), key=lambda c: c["mean"])
        values = [100 * c["mean"] for c in cells]
        colors = ["black" if c["setting"] == "center" else "tab:blue" for c in cells]
        ax.barh([c["setting"] for c in cells], values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlim(min(values) - 1.0, max(values) + 0.8)
        ax.set(
            xlabel="validation accuracy (%), mean over amounts and seeds", title=f"structured BiP: {dataset}"
        )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about a minute)")
    parser.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    parser.add_argument("--datasets", nargs="*", default=["digits", "mnist"], choices=["digits", "mnist"])
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--inner", type=int, default=2, help="forward passes per timing")
    parser.add_argument("--no-macs-row", dest="macs_row", action="store_false")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mnist-per-class", type=int, default=300)
    parser.add_argument("--dense-epochs", type=float, default=6)
    parser.add_argument("--bip-epochs", type=float, default=3)
    parser.add_argument("--finetune-epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=0.05, help="the dense training's learning rate")
    parser.add_argument(
        "--tp-lr", type=float, nargs="+", default=None,
        help="Torch-Pruning's fine-tuning learning rate: one for both criteria or two (L1, Taylor); "
        "default: --lr",
    )  # fmt: skip
    parser.add_argument(
        "--factors", nargs="*", default=None, choices=sorted(SWEEP),
        help="with --sweep: the factors to vary (default: all; none: the center alone)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="*", default=None, metavar="KEY=VALUE",
        help="with --sweep: exactly these one-factor variants of the center (e.g. upper_lr=1 epochs=4+0)",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-baselines", action="store_true",
        help="with --sweep: also Torch-Pruning's L1 and Taylor criteria at the learning rates --tp-lrs",
    )  # fmt: skip
    parser.add_argument(
        "--tp-lrs", type=float, nargs="+", default=list(TP_LRS),
        help=f"with --sweep-baselines: Torch-Pruning's fine-tuning learning rates (default {TP_LRS}; "
        "widen the grid when the best is at its edge)",
    )  # fmt: skip
    parser.add_argument(
        "--bip", nargs="*", default=[], metavar="KEY=VALUE",
        help=f"structured BiP's settings in the accuracy part (keys: {', '.join(BIP_SETTINGS)})",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", action="store_true",
        help="only the accuracy part, BiP's settings one factor at a time, on a validation split",
    )  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument(
        "--val-per-class", type=int, default=100, help="with --sweep: MNIST validation images"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, metavar="JSON",
        help="write one result from earlier runs' JSON: the structure part of the first, the accuracy "
        "rows of the others (e.g. one run per dataset); nothing is trained",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args)
    if args.quick:
        args.models = ["resnet18"] if args.models is None else args.models
        args.datasets = args.datasets[:1]
        args.image_size, args.repeats, args.inner, args.amounts = 64, 2, 1, [0.5]
        args.seeds, args.mnist_per_class = 1, 50
        args.dense_epochs, args.bip_epochs, args.finetune_epochs = 1, 0.5, 0.5
    args.bip_settings = _bip_settings(args.bip)
    rates = [args.lr] if args.tp_lr is None else args.tp_lr
    if len(rates) not in (1, 2):
        parser.error(f"--tp-lr takes one learning rate (both criteria) or two (L1, Taylor), got {rates}")
    args.tp_lr = {"tp_l1": rates[0], "tp_taylor": rates[-1]}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep_main(args, argv)
    models = list(MODELS) if args.models is None else args.models
    result: dict[str, Any] = {
        "command": (
            "python benchmarks/bench_coupled.py " + " ".join(sys.argv[1:] if argv is None else argv)
        ).strip(),
        "environment": _environment(),
        "settings": _settings(args),
        "bip_settings": args.bip_settings,
        "models": [bench_structure(name, args) for name in models],
    }
    accuracy_rows = [row for dataset in args.datasets for row in bench_accuracy(dataset, args)]
    result["accuracy"] = accuracy_rows
    result["accuracy_summary"] = summarize(accuracy_rows) if accuracy_rows else []
    result["accuracy_settings"] = {
        dataset: {
            "bip": args.bip_settings,
            "bip_epochs": args.bip_epochs,
            "finetune_epochs": args.finetune_epochs,
            "tp_lr": args.tp_lr,
            "seeds": args.seeds,
            "command": result["command"],
        }
        for dataset in args.datasets
    }
    write(result, "bench_coupled", args, markdown, plot)
    return result


def merge(paths: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """One result from several runs: the structure part of the first, the accuracy part of the
    others (e.g. one run per dataset, each with its validated settings)."""
    first, *others = [json.loads(p.read_text()) for p in paths]
    if not others:
        raise SystemExit("--merge: pass the run with the structure part, then the runs with accuracy rows")
    result = dict(first)
    result["command"] = " && ".join(r["command"] for r in [first, *others])
    result["accuracy"] = [row for r in others for row in r.get("accuracy", [])]
    result["accuracy_summary"] = summarize(result["accuracy"]) if result["accuracy"] else []
    result["accuracy_settings"] = {k: v for r in others for k, v in r.get("accuracy_settings", {}).items()}
    result["merged_from"] = [p.name for p in paths]
    write(result, "bench_coupled", args, markdown, plot)
    return result


def _environment() -> dict[str, Any]:
    return {
        "device": "cpu",
        "machine": platform.machine(),
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
        "torch_pruning": tp.__version__,
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "bip_settings"}


def sweep_main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    rows = [row for dataset in args.datasets for row in bench_sweep(dataset, args)]
    result: dict[str, Any] = {
        "command": (
            "python benchmarks/bench_coupled.py " + " ".join(sys.argv[1:] if argv is None else argv)
        ).strip(),
        "environment": _environment(),
        "settings": _settings(args),
        "center": args.bip_settings,
        "sweep": rows,
        "sweep_summary": sweep_summary(rows),
    }
    write(result, "bench_coupled_sweep", args, sweep_markdown, sweep_plot)
    return result


def write(
    result: dict[str, Any], name: str, args: argparse.Namespace,
    to_markdown: Callable[[dict[str, Any]], str], to_plot: Callable[[dict[str, Any], Path], None],
) -> None:  # fmt: skip
    env = result["environment"]
    stem = f"{name}-cpu-{env['machine']}-{env['threads']}threads-torch{env['torch']}"
    stem += f"-{args.tag}" if args.tag else ""
    stem += "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    try:
        to_plot(result, args.out / f"{stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
    print(f"wrote {args.out / stem}.json, .md and .png", flush=True)


if __name__ == "__main__":
    main()
