"""Ablation of BiP's settings on MNIST: the implicit-term coefficient, the upper learning rate,
and fused vs two-batch steps, with OMP + fine-tuning as a reference line.

Each variant prunes the same dense LeNet-300-100 (per seed) with the same number of BiP epochs;
test accuracy and wall time are reported as mean ± std over seeds. The figures are for
reference: they are test accuracies, so nothing is chosen by them. ``global_prune``'s defaults
come from ``bench_accuracy.py --sweep``, which chooses on a validation split held out of the
training images. Run::

    python benchmarks/bench_ablation.py --quick   # about a minute
    python benchmarks/bench_ablation.py           # the full run (about half an hour on 2 CPU cores)

Writes ``bench_ablation-<device>-torch<version>[-quick].{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_accuracy import Batches, accuracy, lenet_300_100, tensors

import torchbip
from torchbip.baselines import omp_finetune, train
from torchbip.datasets import load_mnist

RESULTS = Path(__file__).resolve().parent / "results"


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy of every variant (mean ± std over seeds), one panel per sparsity; OMP + FT dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    sparsities = sorted({s for cells in summary.values() for s in cells}, key=float)
    variants = [v for v in summary if v != "omp+finetune"]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(6.5 * len(sparsities), 0.45 * len(variants) + 1.6))
    axes = [axes] if len(sparsities) == 1 else list(axes)
    for ax, sparsity in zip(axes, sparsities, strict=True):
        cells = [summary[v].get(sparsity) for v in variants]
        ys = range(len(variants))
        ax.barh(
            list(ys),
            [100 * c["accuracy_mean"] if c else 0.0 for c in cells],
            xerr=[100 * c["accuracy_std"] if c else 0.0 for c in cells],
            color=["C0" if "fused" in v else "C1" for v in variants],
            capsize=2,
        )
        base = summary.get("omp+finetune", {}).get(sparsity)
        if base:
            ax.axvline(100 * base["accuracy_mean"], color="gray", ls="--", label="OMP + fine-tuning")
            ax.legend(fontsize=8, loc="lower right")
        low = min(100 * c["accuracy_mean"] for c in cells if c) - 1.0
        ax.set_xlim(low, max(100 * c["accuracy_mean"] for c in cells if c) + 0.5)
        ax.set_yticks(list(ys), variants if ax is axes[0] else [""] * len(variants), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%); blue: fused, orange: two-batch")
        ax.set_title(f"{float(sparsity):.0%} sparsity")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--replot", type=Path, default=None, metavar="JSON", help="redraw the PNG of an earlier run's JSON"
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"))
        return result
    if args.quick:
        seeds, train_size, dense_epochs, prune_epochs = [0], 6000, 2, 1
        sparsities, coefs, upper_lrs, modes = [0.98], [0.0, 1.0, None], [0.1, 10.0], ["fused", "two_batch"]
    else:
        seeds, train_size, dense_epochs, prune_epochs = [0, 1], 10000, 3, 2
        sparsities = [0.9, 0.98]
        coefs, upper_lrs, modes = [0.0, 1.0, None], [0.1, 10.0], ["fused", "two_batch"]
    xtr, ytr = tensors(load_mnist(split="train"))
    xte, yte = tensors(load_mnist(split="test"))
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(123))[:train_size]
    xtr, ytr = xtr[idx], ytr[idx]
    gamma = torchbip.BiPConfig().gamma
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        torch.manual_seed(seed)
        dense = lenet_300_100()
        train(dense, Batches(xtr, ytr, 128, seed), dense_epochs, lr=0.05)
        for sparsity in sparsities:
            omp = copy.deepcopy(dense)
            start = time.perf_counter()
            omp_finetune(omp, sparsity, Batches(xtr, ytr, 128, seed + 1), prune_epochs, lr=0.05)
            rows.append({
                "seed": seed, "sparsity": sparsity, "variant": "omp+finetune",
                "accuracy": accuracy(omp, xte, yte), "time_s": time.perf_counter() - start,
            })  # fmt: skip
            for coef, upper_lr, mode in itertools.product(coefs, upper_lrs, modes):
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                torchbip.global_prune(
                    model, sparsity, Batches(xtr, ytr, 128, seed + 1), epochs=prune_epochs,
                    implicit_coef=coef, upper_lr=upper_lr, mode=mode, lower_lr=0.05, seed=seed,
                    progress=False,
                )  # fmt: skip
                coef_name = f"1/gamma={1 / gamma:g}" if coef is None else f"{coef:g}"
                rows.append({
                    "seed": seed, "sparsity": sparsity,
                    "variant": f"implicit_coef={coef_name}, upper_lr={upper_lr:g}, {mode}",
                    "accuracy": accuracy(model, xte, yte), "time_s": time.perf_counter() - start,
                })  # fmt: skip
                print(rows[-1], flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        cell = summary.setdefault(row["variant"], {}).setdefault(
            f"{row['sparsity']:.2f}", {"acc": [], "time": []}
        )
        cell["acc"].append(row["accuracy"])
        cell["time"].append(row["time_s"])
    result = {
        "device": f"cpu-{platform.machine()}-{torch.get_num_threads()}threads",
        "torch": torch.__version__.split("+")[0],
        "quick": args.quick,
        "budget": {
            "seeds": seeds,
            "train_size": train_size,
            "dense_epochs": dense_epochs,
            "prune_epochs": prune_epochs,
            "lower_lr": 0.05,
            "gamma": gamma,
        },
        "rows": rows,
        "summary": {
            v: {
                s: {
                    "accuracy_mean": statistics.mean(c["acc"]),
                    "accuracy_std": statistics.stdev(c["acc"]) if len(c["acc"]) > 1 else 0.0,
                    "time_mean_s": statistics.mean(c["time"]),
                }
                for s, c in cells.items()
            }
            for v, cells in summary.items()
        },
    }
    lines = [
        f"# bench_ablation ({result['device']}, torch {result['torch']}{', quick' if args.quick else ''})",
        "",
        "LeNet-300-100 on MNIST; budget: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()),
        "",
        "| variant | "
        + " | ".join(f"{float(s):.0%} sparsity" for s in map(str, sparsities))
        + " | time (s) |",
        "| --- | " + " | ".join("---:" for _ in sparsities) + " | ---: |",
    ]
    for variant, cells in result["summary"].items():
        accs = [cells.get(f"{s:.2f}") for s in sparsities]
        cols = [f"{c['accuracy_mean']:.2%} ± {c['accuracy_std']:.2%}" if c else "" for c in accs]
        t = statistics.mean(c["time_mean_s"] for c in accs if c)
        lines.append(f"| {variant} | " + " | ".join(cols) + f" | {t:.1f} |")
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_ablation-{result['device']}-torch{result['torch']}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(md)
    plot(result, args.out / f"{stem}.png")
    print(md)
    return result


if __name__ == "__main__":
    main()
