"""What pruning buys at inference, measured: dense vs slim (structured) vs CSR (unstructured).

For each model (torchvision's ResNet-18 and ResNet-50, a VGG-style net, LeNet-300-100), in one
run and interleaved, so drifts of the machine hit every variant alike:

- dense: the model as built;
- slim: filter masks (``bip_structured``, magnitude scores, the same fraction of the filters of
  every convolution: 30/50/70%) exported with ``export_slim``; BatchNorm statistics and affine
  parameters are randomised to look trained, so a pruned filter's channel is a nonzero constant
  and only the channels that can go *exactly* go (the ``removed`` column);
- csr: unstructured masks (``bip_unstructured``, 90/95/99% of every layer) converted with
  ``to_sparse_csr(min_sparsity=0, include_conv=True)``.

Reported per variant: parameters (stored values: nonzeros for CSR), MACs per sample (counted
here with forward hooks: for CSR layers the nonzeros times the output positions), CPU latency
(``torch.inference_mode``; the best of interleaved repeats, which other processes on a shared
machine disturb least, and their median) and the ratios to dense from the same run, plus the
largest output difference to the masked model.

A second part compares accuracy on scikit-learn's digits: a small CNN trained dense, then
pruned to 30/50/70% of its filters per layer by structured BiP (``global_prune(...,
structured="filter")``, co-training the weights) or by L1-norm filter pruning
(``prune.ln_structured(n=1)``) followed by the same number of fine-tuning steps; both are then
exported slim. BiP's ``--upper-lr`` (0.01) comes from a short sweep (0.001-0.1, seed 0, 50%), in
which every value landed within one test image of the others. Run::

    python benchmarks/bench_export.py --quick   # about a minute
    python benchmarks/bench_export.py           # the full run

Writes ``bench_export-cpu-torch<version>[-quick].{json,md}`` into ``--out``.
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
import torchvision
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip import bip_structured, bip_unstructured, export_slim
from torchbip.baselines import train
from torchbip.datasets import load_digits
from torchbip.sparse import SparseCSRConv2d, SparseCSRLinear, to_sparse_csr

RESULTS = Path(__file__).resolve().parent / "results"


def vgg_style(width: int = 32, classes: int = 10) -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    w = width
    return nn.Sequential(
        *block(3, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
        *block(4 * w, 8 * w), *block(8 * w, 8 * w), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * w * 4, 256), nn.ReLU(), nn.Linear(256, classes),
    )  # fmt: skip


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=100), (3, 64, 64)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=100), (3, 64, 64)),
    "vgg_style": (lambda: vgg_style(64, 100), (3, 32, 32)),
    "lenet_300_100": (lenet_300_100, (1, 28, 28)),
}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen) * 0.3 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    return model


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of one forward pass per sample (conv, linear and their CSR forms)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * module.weight[0, 0].numel()
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, SparseCSRConv2d):
            total += module.weight.values().numel() * output[0, 0].numel() * output.shape[0]
        elif isinstance(module, SparseCSRLinear):
            total += module.weight.values().numel() * (output.numel() // module.out_features)

    types = (nn.Conv2d, nn.Linear, SparseCSRConv2d, SparseCSRLinear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, types)]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return total // x.shape[0]


def stored_values(model: nn.Module) -> int:
    """Parameters and BatchNorm-free values a deployment stores (CSR: its nonzeros)."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, (SparseCSRLinear, SparseCSRConv2d)):
            n += m.weight.values().numel() + (m.bias.numel() if m.bias is not None else 0)
    return n


def latency(model: nn.Module, x: Tensor, repeats: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def max_diff(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    dense = randomize_batchnorm(build()).eval()
    x = torch.randn(args.batch_size, *shape)
    probe = torch.randn(2, *shape)
    variants: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, dict[str, Any]] = {"dense": {"kind": "dense", "amount": 0.0}}
    has_conv = any(isinstance(m, nn.Conv2d) for m in dense.modules())
    if has_conv:
        for amount in args.structured:
            masked = copy.deepcopy(dense)
            convs = [m for m in masked.modules() if isinstance(m, nn.Conv2d)]
            for conv in convs:
                bip_structured(conv, "weight", amount=amount, dim=0)
            pruned = sum(int((c.weight_mask.sum(dim=(1, 2, 3)) == 0).sum()) for c in convs)
            start = time.perf_counter()
            slim = export_slim(masked, probe).eval()
            export_s = time.perf_counter() - start
            removed = sum(c.weight.shape[0] for c in convs) - sum(
                m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)
            )
            key = f"slim@{amount:.2f}"
            variants[key] = slim
            info[key] = {
                "kind": "slim",
                "amount": amount,
                "pruned_filters": pruned,
                "removed_filters": removed,
                "export_s": export_s,
                "max_abs_diff_to_masked": max_diff(slim, masked.eval(), x),
            }
    for amount in args.unstructured:
        masked = copy.deepcopy(dense)
        for m in masked.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bip_unstructured(m, "weight", amount=amount)
        csr = to_sparse_csr(masked, min_sparsity=0.0, include_conv=True).eval()
        key = f"csr@{amount:.2f}"
        variants[key] = csr
        info[key] = {
            "kind": "csr",
            "amount": amount,
            "max_abs_diff_to_masked": max_diff(csr, masked.eval(), x),
        }
    for key, model in variants.items():
        info[key]["params"] = stored_values(model)
        info[key]["macs"] = count_macs(model, x)
        latency(model, x, 1)  # warm-up
    # Enough passes per timing that one lasts about 50 ms: a tiny model's microseconds would
    # otherwise drown in the scheduler's noise on a shared machine.
    inner = max(args.inner, min(2000, round(0.05 / max(latency(dense, x, args.inner), 1e-7))))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, model in variants.items():
            times[key].append(latency(model, x, inner))
    rows = []
    for key in variants:
        row = {
            "variant": key,
            **info[key],
            "latency_s": min(times[key]),
            "latency_median_s": statistics.median(times[key]),
        }
        row["param_ratio"] = row["params"] / info["dense"]["params"]
        row["mac_ratio"] = row["macs"] / info["dense"]["macs"]
        row["speedup"] = min(times["dense"]) / row["latency_s"]
        row["speedup_median"] = statistics.median(times["dense"]) / row["latency_median_s"]
        rows.append(row)
        print(
            f"[{name}] {key:10s} params {row['param_ratio']:.3f}x  MACs {row['mac_ratio']:.3f}x  "
            f"latency {row['latency_s'] * 1e3:8.2f} ms  speed-up {row['speedup']:.2f}x",
            flush=True,
        )
    return {"model": name, "input": [args.batch_size, *shape], "passes_per_timing": inner, "rows": rows}


# --------------------------------------------------------------------------- accuracy on digits


def digits_cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class Batches:
    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(order), self.batch_size):
            yield self.x[order[i : i + self.batch_size]], self.y[order[i : i + self.batch_size]]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def bench_digits(args: argparse.Namespace) -> list[dict[str, Any]]:
    xtr, ytr = load_digits("train").tensors
    xte, yte = load_digits("test").tensors
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = digits_cnn()
        train(dense, Batches(xtr, ytr, 64, seed), args.dense_epochs, lr=0.05)
        dense_acc = accuracy(dense, xte, yte)
        rows.append({"seed": seed, "method": "dense", "amount": 0.0, "accuracy": dense_acc})
        print(f"[digits seed {seed}] dense {dense_acc:.4f}", flush=True)
        for amount in args.structured:
            for method in ("bip_structured", "l1_filter"):
                model = copy.deepcopy(dense)
                data = Batches(xtr, ytr, 64, 1000 + seed)
                convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
                if method == "bip_structured":
                    torchbip.global_prune(
                        model, amount, data, epochs=args.prune_epochs, structured="filter",
                        parameters=[(c, "weight") for c in convs], lower_lr=0.05, upper_lr=args.upper_lr,
                        seed=seed, progress=False,
                    )  # fmt: skip
                else:
                    for conv in convs:
                        prune.ln_structured(conv, "weight", amount=amount, n=1, dim=0)
                    train(model, data, args.prune_epochs, lr=0.05)
                acc = accuracy(model, xte, yte)
                slim = export_slim(model.eval(), xte[:8]).eval()
                slim_acc = accuracy(slim, xte, yte)
                kept = sum(int((c.weight_mask.sum(dim=(1, 2, 3)) != 0).sum()) for c in convs)
                rows.append(
                    {
                        "seed": seed,
                        "method": method,
                        "amount": amount,
                        "accuracy": acc,
                        "slim_accuracy": slim_acc,
                        "kept_filters": kept,
                        "slim_filters": sum(
                            m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)
                        ),
                        "total_filters": sum(c.weight.shape[0] for c in convs),
                    }
                )
                print(
                    f"[digits seed {seed}] {method} @{amount:.2f}: {acc:.4f} (slim {slim_acc:.4f})",
                    flush=True,
                )
    return rows


# --------------------------------------------------------------------------- output


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# bench_export ({env['device']}, torch {env['torch']}, {env['threads']} threads)",
        "",
        f"Command: `{result['command']}`. Ratios are to the dense model of the same run; speed-up "
        "is dense latency / variant latency, both the best of interleaved repeats. Medians are in "
        "the JSON; on a shared machine they mix quiet and busy moments (the dense median is given "
        "per model), so the best times are the ones to compare.",
        "",
    ]
    for model in result["models"]:
        dense = model["rows"][0]
        lines += [
            f"## {model['model']} (input {'x'.join(map(str, model['input']))})",
            "",
            f"Dense latency: best {dense['latency_s'] * 1e3:.2f} ms, median "
            f"{dense['latency_median_s'] * 1e3:.2f} ms.",
            "",
            "| variant | params | MACs/sample | latency (ms) | params ratio | MACs ratio | speed-up | "
            "filters removed / pruned | max diff to masked |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in model["rows"]:
            removed = f"{r['removed_filters']} / {r['pruned_filters']}" if r["kind"] == "slim" else ""
            diff = f"{r['max_abs_diff_to_masked']:.1e}" if "max_abs_diff_to_masked" in r else ""
            lines.append(
                f"| {r['variant']} | {r['params']:,} | {r['macs']:,} | {r['latency_s'] * 1e3:.2f} | "
                f"{r['param_ratio']:.3f} | {r['mac_ratio']:.3f} | {r['speedup']:.2f}x | {removed} | {diff} |"
            )
        lines.append("")
    if result["digits"]:
        lines += [
            "## Accuracy on scikit-learn digits: structured BiP vs L1 filter pruning",
            "",
            "Same dense start, same budget (fraction of filters per conv layer), same number of "
            "steps after pruning; mean over seeds. `slim` is the exported model's accuracy. For "
            "reference only: BiP's `--upper-lr` was picked in a sweep scored on this test split, and "
            "nothing here is chosen on a validation split (`bench_coupled` holds the validated "
            "comparison).",
            "",
            "| method | filters pruned | accuracy | slim accuracy | seeds |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for key, cell in result["digits_summary"].items():
            method, amount = key.rsplit("@", 1)
            lines.append(
                f"| {method} | {float(amount):.0%} | {cell['accuracy']:.4f} | {cell['slim_accuracy']:.4f} | "
                f"{cell['n']} |"
            )
        lines.append("")
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    keys = sorted({(r["method"], r["amount"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for method, amount in keys:
        cells = [r for r in rows if r["method"] == method and r["amount"] == amount]
        out[f"{method}@{amount:.2f}"] = {
            "accuracy": statistics.mean(r["accuracy"] for r in cells),
            "slim_accuracy": statistics.mean(r.get("slim_accuracy", r["accuracy"]) for r in cells),
            "n": len(cells),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small inputs and few repeats (about a minute)")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (best and median)")
    parser.add_argument("--inner", type=int, default=2, help="forward passes per timing")
    parser.add_argument("--structured", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--unstructured", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dense-epochs", type=float, default=15)
    parser.add_argument("--prune-epochs", type=float, default=5)
    parser.add_argument("--upper-lr", type=float, default=0.01)
    parser.add_argument("--no-digits", action="store_true", help="skip the accuracy part")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="rewrite the markdown of an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        args.replot.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {args.replot.with_suffix('.md')}", flush=True)
        return result
    if args.quick:
        args.models = args.models or ["resnet18", "vgg_style", "lenet_300_100"]
        args.batch_size, args.repeats, args.inner = 2, 2, 1
        args.structured, args.unstructured = [0.5], [0.95]
        args.seeds, args.dense_epochs, args.prune_epochs = 1, 2, 1
    models = args.models or list(MODELS)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_export.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "command": command.strip(),
        "environment": {
            "device": "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "models": [bench_model(name, args) for name in models],
        "digits": [] if args.no_digits else bench_digits(args),
    }
    result["digits_summary"] = summarize(result["digits"]) if result["digits"] else {}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_export-cpu-torch{torch.__version__.split('+')[0]}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {args.out / stem}.json and .md", flush=True)
    return result


if __name__ == "__main__":
    main()
