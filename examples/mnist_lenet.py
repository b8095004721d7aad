"""BiP against magnitude pruning on LeNet-300-100 and the real MNIST split, in about a minute.

What it demonstrates: ``torchbip.global_prune`` on a small fully-connected network trained on
the MNIST split in torchbip's repository (no download), compared at the same sparsity (90% of the
weights of the three ``nn.Linear`` layers by default) with torch's own magnitude pruning:
``prune.l1_unstructured`` layer by layer and ``prune.global_unstructured`` (global magnitude),
each without retraining and after the same number of fine-tuning steps as BiP runs. BiP
co-trains the weights while it learns the mask, so "magnitude + fine-tuning" is the fair
comparison at equal training budget.

Commands::

    python examples/mnist_lenet.py                  # CPU, well under a minute of compute
    python examples/mnist_lenet.py --amount 0.98 --bip-epochs 2
    python examples/mnist_lenet.py --smoke --out /tmp/lenet-smoke   # seconds (tests)
    python examples/mnist_lenet.py -c my.yaml       # YAML option defaults, command line wins

Outputs: a short report on stdout (accuracy of each method and the per-layer sparsity of BiP's
mask) and, in ``--out`` (default ``runs/mnist_lenet``), ``report.json`` and ``config.yaml``.
"""

# %%
# Imports
# -------
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import script_utils
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

import torchbip
from torchbip.datasets import load_mnist, mnist_path

# %%
# Command line
# ------------

SMOKE_PRESET: dict[str, Any] = {
    "train_per_class": 50,
    "test_per_class": 20,
    "dense_epochs": 1,
    "bip_epochs": 0.2,
    "batch_size": 64,
}
RANGES = {
    "amount": (0.0, 1.0),
    "bip_epochs": (1e-9, math.inf),
    **dict.fromkeys(("dense_lr", "lower_lr", "upper_lr", "gamma", "finetune_lr"), (0.0, math.inf)),
}


def build_parser() -> argparse.ArgumentParser:
    """All options, grouped, with explicit defaults."""
    parser = argparse.ArgumentParser(
        description="BiP vs magnitude pruning on LeNet-300-100 / MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-c", "--config", default=None, metavar="FILE", help="YAML file of option defaults")
    data = parser.add_argument_group("data (the MNIST split in the repository, data/mnist.npz)")
    data.add_argument(
        "--mnist",
        type=Path,
        default=None,
        help="another mnist.npz (default: TORCHBIP_MNIST, else the repository's data/mnist.npz)",
    )
    data.add_argument(
        "--train-per-class", type=int, default=None, help="training images per digit (none: all 60,000)"
    )
    data.add_argument(
        "--test-per-class", type=int, default=None, help="test images per digit (none: all 10,000)"
    )
    data.add_argument("--batch-size", type=int, default=128, help="minibatch size")

    dense = parser.add_argument_group("dense training")
    dense.add_argument("--dense-epochs", type=int, default=3, help="epochs of dense training")
    dense.add_argument("--dense-lr", type=float, default=0.1, help="learning rate (SGD, cosine)")

    bip = parser.add_argument_group("pruning")
    bip.add_argument("--amount", type=float, default=0.9, help="fraction of the weights to prune")
    bip.add_argument("--bip-epochs", type=float, default=1.0, help="BiP passes over the training set")
    bip.add_argument("--lower-lr", type=float, default=0.01, help="BiP weights' learning rate (cosine)")
    bip.add_argument("--upper-lr", type=float, default=0.1, help="BiP scores' learning rate (step decay)")
    bip.add_argument("--gamma", type=float, default=5e-4, help="BiP lower-level L2 coefficient")
    bip.add_argument(
        "--finetune-lr", type=float, default=0.01,
        help="learning rate of the magnitude baselines' fine-tuning (as many steps as BiP)",
    )  # fmt: skip

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("runs/mnist_lenet"), help="output folder")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    run.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (for tests)")
    return parser


def presets(probe: argparse.Namespace) -> dict[str, Any]:
    """The smoke preset with ``--smoke``."""
    return SMOKE_PRESET if probe.smoke else {}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--smoke`` preset < ``-c`` YAML < command line (the file's values checked like the command line's)."""
    parser = build_parser()
    args = script_utils.parse_with_config(parser, sys.argv[1:] if argv is None else argv, presets)
    script_utils.check_ranges(parser, args, RANGES)
    if args.amount == 1.0:
        parser.error("--amount must lie in [0, 1), got 1.0")
    for name in ("lower_lr", "upper_lr"):  # BiP's learning rates (a step of 0 would change nothing)
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name, low in (("batch_size", 1), ("dense_epochs", 0), ("train_per_class", 1), ("test_per_class", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')}: must be an integer >= {low}, got {value}")
    script_utils.check_seed(parser, args.seed)
    script_utils.check_folder(parser, "--out", args.out)  # refused now, not after the training
    try:
        mnist_path(args.mnist)
    except FileNotFoundError as err:
        parser.error(f"--mnist: {err}")
    return args


# %%
# Data and model
# --------------


class Batches:
    """Re-iterable minibatches of in-memory tensors, reshuffled at every pass."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int) -> None:
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.y), generator=self.generator) if self.shuffle else None
        for start in range(0, len(self.y), self.batch_size):
            idx = (
                slice(start, start + self.batch_size)
                if order is None
                else order[start : start + self.batch_size]
            )
            yield self.x[idx], self.y[idx]


def lenet_300_100() -> nn.Sequential:
    """LeNet-300-100: 784-300-100-10, ReLU (266,610 parameters)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def train(model: nn.Module, batches: Batches, steps: int, lr: float, desc: str, progress: bool) -> float:
    """``steps`` SGD steps (momentum 0.9, cosine schedule); returns the last loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    step, loss = 0, torch.tensor(float("nan"))
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        while step < steps:
            for x, y in batches:
                if step >= steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / len(batches.y)


def linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


# %%
# The comparison
# --------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, prune three ways at one sparsity, print and save the comparison."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_set = load_mnist(args.mnist, "train", per_class=args.train_per_class)
    test_set = load_mnist(args.mnist, "test", per_class=args.test_per_class)
    train_batches = Batches(*train_set.tensors, args.batch_size, shuffle=True, seed=args.seed)
    test_batches = Batches(*test_set.tensors, 1000, shuffle=False, seed=args.seed)

    # 1. Dense training.
    dense = lenet_300_100()
    t0 = time.perf_counter()
    train(dense, train_batches, args.dense_epochs * len(train_batches), args.dense_lr, "dense", args.progress)
    results: list[dict[str, Any]] = []

    def record(name: str, model: nn.Module, seconds: float) -> None:
        report = torchbip.sparsity_report(model, include_dense=True)
        results.append(
            {"method": name, "accuracy": accuracy(model, test_batches), "sparsity": report.global_sparsity,
             "seconds": round(seconds, 2)}
        )  # fmt: skip

    record("dense", dense, time.perf_counter() - t0)

    # 2. BiP: the mask at the target sparsity from the first step, weights co-trained.
    bip_model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    bip = torchbip.global_prune(
        bip_model, amount=args.amount, loader=train_batches, epochs=args.bip_epochs,
        lower_lr=args.lower_lr, upper_lr=args.upper_lr, gamma=args.gamma, seed=args.seed,
        progress=args.progress,
    )  # fmt: skip
    steps = bip.steps

    # 3. Magnitude baselines at the same sparsity, one-shot and after `steps` fine-tuning steps.
    baselines = {}
    for name in ("l1_unstructured (per layer)", "global magnitude"):
        model = copy.deepcopy(dense)
        t1 = time.perf_counter()
        if name.startswith("l1"):
            for module, tensor in linears(model):
                prune.l1_unstructured(module, tensor, amount=args.amount)
        else:
            prune.global_unstructured(linears(model), pruning_method=prune.L1Unstructured, amount=args.amount)
        baselines[name] = (model, time.perf_counter() - t1)
        record(f"{name}, no retraining", model, time.perf_counter() - t1)
    for name, (model, seconds) in baselines.items():
        t1 = time.perf_counter()
        train(model, train_batches, steps, args.finetune_lr, "fine-tune", args.progress)
        record(f"{name} + {steps} fine-tuning steps", model, seconds + time.perf_counter() - t1)
    record(f"BiP ({steps} steps)", bip_model, bip.wall_time_s)

    report = {
        "example": "mnist_lenet",
        "amount": args.amount,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "bip_steps": steps,
        "results": results,
        "bip": bip.to_dict(),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "config"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(args.out / "config.yaml", "w") as f:
        yaml.safe_dump(report["config"], f, sort_keys=False)

    print(f"\nLeNet-300-100 on MNIST ({len(train_set)} train / {len(test_set)} test images), "
          f"{args.amount:.0%} of the weights pruned\n")  # fmt: skip
    print(f"| {'method':<52} | test acc | sparsity | seconds |")
    print(f"| {'-' * 52} | -------: | -------: | ------: |")
    for row in results:
        acc, sparsity, seconds = row["accuracy"], row["sparsity"], row["seconds"]
        print(f"| {row['method']:<52} | {acc:7.2%} | {sparsity:7.2%} | {seconds:7.2f} |")
    print("\nBiP mask, per layer:\n")
    print(bip.sparsity.to_markdown())
    print(f"\n{report['wall_time_s']:.1f} s in all; report in {args.out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
