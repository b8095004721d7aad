"""Accuracy vs sparsity on MNIST: BiP against IMP, OMP, a random mask and BiP without its
implicit term, with the wall time each method needs to reach each sparsity.

Every method starts from the same seeded initialisation and gets a documented budget:

- dense: ``--dense-epochs`` of SGD from the initialisation (shared by BiP, OMP, random, score);
- BiP and BiP without the implicit term: ``--prune-epochs`` of BiP from the dense model;
- OMP and random: one-shot mask, then ``--prune-epochs`` of fine-tuning;
- IMP: rounds of ``--dense-epochs`` each (the dense training is its round 0), 20% of the
  remaining weights pruned per round, weights rewound to the initialisation, rounds clipped to hit
  every requested sparsity exactly.

Time to a sparsity: dense time + method time for the one-shot methods; the cumulative time of
its rounds for IMP. Run::

    python benchmarks/bench_accuracy.py --quick   # a few minutes
    python benchmarks/bench_accuracy.py           # the full run (about an hour on 2 CPU cores)

Writes ``bench_accuracy-<device>-torch<version>[-quick].{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import torchbip
from torchbip.baselines import imp, omp_finetune, random_finetune, score_prune, train
from torchbip.datasets import load_mnist

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("bip", "imp", "omp", "random", "bip_no_implicit")


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
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


MODELS: dict[str, Callable[[], nn.Module]] = {"lenet_300_100": lenet_300_100, "small_cnn": small_cnn}


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


def run_seed(name: str, seed: int, args: argparse.Namespace, data: dict[str, torch.Tensor]) -> list[dict]:
    rows: list[dict] = []
    lr = args.lr
    torch.manual_seed(seed)
    init = MODELS[name]()
    xtr, ytr, xte, yte = data["xtr"], data["ytr"], data["xte"], data["yte"]

    def batches(offset: int) -> Batches:
        return Batches(xtr, ytr, args.batch_size, seed * 1000 + offset)

    dense = copy.deepcopy(init)
    start = time.perf_counter()
    train(dense, batches(0), args.dense_epochs, lr=lr)
    dense_time = time.perf_counter() - start
    dense_acc = accuracy(dense, xte, yte)
    rows.append(
        {
            "model": name,
            "seed": seed,
            "method": "dense",
            "sparsity": 0.0,
            "accuracy": dense_acc,
            "time_s": dense_time,
        }
    )
    print(f"[{name} seed {seed}] dense {dense_acc:.4f} in {dense_time:.1f}s", flush=True)

    for sparsity in args.sparsities:
        for method in ("bip", "bip_no_implicit", "omp", "random"):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if method in ("bip", "bip_no_implicit"):
                fn = torchbip.global_prune if method == "bip" else score_prune
                fn(
                    model,
                    sparsity,
                    batches(1),
                    epochs=args.prune_epochs,
                    lower_lr=lr,
                    seed=seed,
                    progress=False,
                    **({"implicit_coef": args.implicit_coef} if method == "bip" else {}),
                )
            elif method == "omp":
                omp_finetune(model, sparsity, batches(1), args.prune_epochs, lr=lr)
            else:
                random_finetune(model, sparsity, batches(1), args.prune_epochs, lr=lr, seed=seed)
            elapsed = time.perf_counter() - start
            acc = accuracy(model, xte, yte)
            real = torchbip.sparsity_report(model).global_sparsity
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "method": method,
                    "sparsity": sparsity,
                    "measured_sparsity": real,
                    "accuracy": acc,
                    "time_s": dense_time + elapsed,
                    "method_time_s": elapsed,
                }
            )
            print(f"[{name} seed {seed}] {method} @{sparsity:.2f}: {acc:.4f} in {elapsed:.1f}s", flush=True)

    model = copy.deepcopy(init)
    targets = set(args.sparsities)
    # An IMP round that stops at a target sparsity keeps exactly the count that the target
    # rounds to, so its measured sparsity is within half an entry of the target.
    prunable = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))

    def on_round(record: Any, m: nn.Module) -> None:
        hit = [s for s in targets if abs(record.sparsity - s) <= 0.5 / prunable + 1e-12]
        if hit:
            acc = accuracy(m, xte, yte)
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "method": "imp",
                    "sparsity": hit[0],
                    "measured_sparsity": record.sparsity,
                    "accuracy": acc,
                    "time_s": record.wall_time_s,
                    "round": record.round,
                }
            )
            print(
                f"[{name} seed {seed}] imp @{hit[0]:.2f} (round {record.round}): "
                f"{acc:.4f} at {record.wall_time_s:.1f}s",
                flush=True,
            )

    imp(
        model,
        max(args.sparsities),
        batches(0),
        args.dense_epochs,
        rate=0.2,
        milestones=args.sparsities,
        on_round=on_round,
        lr=lr,
    )
    return rows


def summarise(rows: list[dict], sparsities: list[float]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for model in sorted({r["model"] for r in rows}):
        table[model] = {}
        for method in ("dense", *METHODS):
            for s in [0.0] if method == "dense" else sparsities:
                sel = [
                    r for r in rows if r["model"] == model and r["method"] == method and r["sparsity"] == s
                ]
                if not sel:
                    continue
                accs = [r["accuracy"] for r in sel]
                times = [r["time_s"] for r in sel]
                table[model].setdefault(method, {})[f"{s:.2f}"] = {
                    "accuracy_mean": statistics.mean(accs),
                    "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "time_mean_s": statistics.mean(times),
                    "n": len(accs),
                }
    return table


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# bench_accuracy ({result['device']}, torch {result['torch']}"
        f"{', quick' if result['quick'] else ''})",
        "",
    ]
    lines.append("Budgets: " + ", ".join(f"{k}={v}" for k, v in result["budget"].items()))
    for model, methods in result["summary"].items():
        sparsities = sorted({s for m in methods.values() for s in m if s != "0.00"}, key=float)
        dense = methods.get("dense", {}).get("0.00")
        lines += ["", f"## {model}" + (f" (dense {dense['accuracy_mean']:.2%})" if dense else ""), ""]
        lines.append("Test accuracy, mean ± std over seeds (time to reach the sparsity, s):")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{float(s):.0%}" for s in sparsities) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in sparsities) + " |")
        for method in METHODS:
            cells = []
            for s in sparsities:
                c = methods.get(method, {}).get(s)
                cells.append(
                    ""
                    if c is None
                    else f"{c['accuracy_mean']:.2%} ± {c['accuracy_std']:.2%} ({c['time_mean_s']:.0f}s)"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if "0.90" in methods.get("imp", {}) and "0.90" in methods.get("bip", {}):
            ratio = methods["imp"]["0.90"]["time_mean_s"] / methods["bip"]["0.90"]["time_mean_s"]
            lines += ["", f"Time to a 90%-sparse ticket, IMP / BiP: **{ratio:.2f}x**"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Per model: accuracy vs sparsity (zoomed on the methods that keep accuracy; a random mask
    far below is marked at the bottom edge) and the wall time each method needs to get there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["summary"])
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for (ax, tax), model in zip(axes, models, strict=True):
        methods = result["summary"][model]
        dense = methods.get("dense", {}).get("0.00")
        kept = [
            100 * c["accuracy_mean"] for m in METHODS if m != "random" for c in methods.get(m, {}).values()
        ]
        low = min(kept + ([100 * dense["accuracy_mean"]] if dense else [])) - 1.0
        high = max(kept + ([100 * dense["accuracy_mean"]] if dense else [])) + 0.5
        for method in METHODS:
            if method not in methods:
                continue
            pts = sorted((float(s), c) for s, c in methods[method].items())
            xs = [100 * s for s, _ in pts]
            ys = [100 * c["accuracy_mean"] for _, c in pts]
            ax.errorbar(
                xs,
                [max(y, low) for y in ys],
                yerr=[0.0 if y < low else 100 * c["accuracy_std"] for y, (_, c) in zip(ys, pts, strict=True)],
                marker="o",
                capsize=3,
                color=colors[method],
                label=method,
            )
            for x, y in zip(xs, ys, strict=True):
                if y < low:
                    ax.annotate(f"{y:.0f}%", (x, low), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=7, color=colors[method])  # fmt: skip
            tax.plot(xs, [c["time_mean_s"] for _, c in pts], marker="o", color=colors[method], label=method)
        if dense:
            ax.axhline(100 * dense["accuracy_mean"], color="gray", ls="--", label="dense")
        ax.set_ylim(low - 0.2, high)
        ax.set_title(f"{model}: test accuracy")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%), mean ± std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        tax.set_title(f"{model}: wall time to reach the sparsity")
        tax.set_xlabel("sparsity (%)")
        tax.set_ylabel("seconds (dense training included)")
        tax.grid(alpha=0.3)
        tax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path, stem: str) -> None:
    """``<stem>.json``, ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small data, one seed, LeNet only")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument(
        "--train-size", type=int, default=None, help="training images per model (default: all)"
    )
    parser.add_argument("--dense-epochs", type=float, default=None)
    parser.add_argument("--prune-epochs", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--implicit-coef",
        type=float,
        default=None,
        help="BiP's implicit coefficient (default: library default)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="rewrite the markdown and PNG of an earlier run's JSON (nothing is trained)",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        result["summary"] = summarise(result["rows"], sorted({r["sparsity"] for r in result["rows"]} - {0.0}))
        write_outputs(result, args.replot.parent, args.replot.stem)
        print(markdown(result))
        return result
    if args.quick:
        args.models = args.models or ["lenet_300_100"]
        args.seeds = args.seeds or [0]
        args.train_size = args.train_size or 4000
        args.dense_epochs = args.dense_epochs or 1
        args.prune_epochs = args.prune_epochs or 1
        args.sparsities = (
            [0.5, 0.9] if args.sparsities == parser.get_default("sparsities") else args.sparsities
        )
    else:
        args.models = args.models or ["lenet_300_100", "small_cnn"]
        args.seeds = args.seeds or [0, 1, 2]
        args.dense_epochs = args.dense_epochs or 2
        args.prune_epochs = args.prune_epochs or 2
    if args.implicit_coef is None:
        args.implicit_coef = torchbip.BiPConfig().implicit_coef
    train_set, test_set = load_mnist(split="train"), load_mnist(split="test")
    xtr_all, ytr_all = tensors(train_set)
    xte, yte = tensors(test_set)
    rows: list[dict] = []
    torch.manual_seed(0)
    for name in args.models:
        size = args.train_size or len(xtr_all)
        idx = torch.randperm(len(xtr_all), generator=torch.Generator().manual_seed(123))[:size]
        data = {"xtr": xtr_all[idx], "ytr": ytr_all[idx], "xte": xte, "yte": yte}
        for seed in args.seeds:
            rows += run_seed(name, seed, args, data)
    result = {
        "device": f"cpu-{platform.machine()}-{torch.get_num_threads()}threads",
        "torch": torch.__version__.split("+")[0],
        "quick": args.quick,
        "budget": {
            "train_size": args.train_size or len(xtr_all),
            "dense_epochs": args.dense_epochs,
            "prune_epochs": args.prune_epochs,
            "imp_epochs_per_round": args.dense_epochs,
            "imp_rate": 0.2,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "implicit_coef": args.implicit_coef,
            "seeds": args.seeds,
        },
        "rows": rows,
        "summary": summarise(rows, args.sparsities),
    }
    stem = f"bench_accuracy-{result['device']}-torch{result['torch']}" + ("-quick" if args.quick else "")
    stem += f"-{args.tag}" if args.tag else ""
    write_outputs(result, args.out, stem)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
