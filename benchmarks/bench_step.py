"""Cost of one BiP step against one dense SGD step, and of the forward pass under BiP hooks.

Everything is measured side by side in one run, on the same model, batch and machine, and
reported as ratios. Run:

    python benchmarks/bench_step.py            # full (a few minutes on a 2-core CPU)
    python benchmarks/bench_step.py --quick    # seconds

Writes ``bench_step-<device>-torch<version>[-quick].{json,md,png}`` into ``--out`` (default
``benchmarks/results/``).
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

import torch
import torch.nn.functional as F
from bench_accuracy import lenet_300_100
from first_call import DRIVERS
from first_call import measure as first_call
from torch import nn
from torch.nn.utils import prune

import torchbip
from torchbip.bilevel import tensor_sums
from torchbip.export import make_permanent
from torchbip.masks import GlobalTopK

RESULTS = Path(__file__).resolve().parent / "results"


def small_cnn_bn() -> nn.Module:
    """A small CNN with BatchNorm (not the BatchNorm-free ``small_cnn`` of bench_accuracy)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def resnet18_cifar() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet_300_100": (lenet_300_100, (1, 28, 28)),
    "small_cnn_bn": (small_cnn_bn, (1, 28, 28)),
    "resnet18_32px": (resnet18_cifar, (3, 32, 32)),
}


def batches(shape: tuple[int, ...], batch_size: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch_size, *shape, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
        for _ in range(n)
    ]


def sgd_steps(model: nn.Module, data: list, bip: bool = False, torch_pruned: bool = False) -> float:
    """Seconds of SGD steps over ``data``; with ``bip``, the same loop with :class:`torchbip.BiP` in it.

    With ``bip`` (the in-loop mode): hooked forward, backward, the same SGD step, then
    ``pruner.step()``, what a user's own loop pays for BiP; the pruner is built before the clock.
    With ``torch_pruned``: the model pruned by torch's own ``prune.global_unstructured`` (fixed
    masks, torch's forward pre-hooks): what a training step costs in torch's pruned form alone,
    the floor of any method that keeps that form.
    """
    if torch_pruned:
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.9)
    pruner = torchbip.BiP(model, amount=0.9, steps=len(data)) if bip else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if pruner is not None:
            pruner.step()
    return time.perf_counter() - start


def bip_run(model: nn.Module, data: list, mode: str) -> float:
    start = time.perf_counter()
    torchbip.global_prune(model, 0.9, data, steps=len(data), mode=mode, progress=False)
    return time.perf_counter() - start


def per_step(fn: Callable[[int], float], short: int, long: int) -> float:
    """Seconds per step as the difference of two runs (removes set-up cost)."""
    return (fn(long) - fn(short)) / (long - short)


def forward_time(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    model.eval()
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - start) / reps


def bench_model(name: str, batch_size: int, short: int, long: int, repeats: int) -> dict:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    base = make()
    data = batches(shape, batch_size, long if long % 2 == 0 else long + 1)
    # one-batch-per-step modes consume `long` batches; two_batch consumes 2 per step
    rows: dict[str, list[float]] = {
        "dense": [],
        "torch_pruned": [],
        "in_loop": [],
        "fused": [],
        "two_batch": [],
    }
    for _ in range(repeats):  # interleaved, so drifts of the machine hit every variant alike
        for key, bip, pruned in (
            ("dense", False, False),
            ("torch_pruned", False, True),
            ("in_loop", True, False),
        ):
            rows[key].append(
                per_step(
                    lambda n, b=bip, t=pruned: sgd_steps(copy.deepcopy(base), data[:n], b, t), short, long
                )
            )
        for mode in ("fused", "two_batch"):
            rows[mode].append(
                per_step(lambda n, m=mode: bip_run(copy.deepcopy(base), data[:n], m), short, long)
            )
    med = {k: statistics.median(v) for k, v in rows.items()}
    # Each repeat's ratio to the dense step of the same repeat (measured minutes apart at most,
    # so a slow phase of the machine hits both); the reported ratio is their median.
    per_repeat = {
        k: [a / d for a, d in zip(v, rows["dense"], strict=True)] for k, v in rows.items() if k != "dense"
    }
    ratio = {k: statistics.median(v) for k, v in per_repeat.items()}
    spread = {k: [min(v), max(v)] for k, v in per_repeat.items()}
    # forward cost: dense, under BiP hooks, after prune.remove
    x = data[0][0]
    hooked = copy.deepcopy(base)
    torchbip.global_prune(hooked, 0.9, data[:2], steps=1, progress=False)
    removed = make_permanent(copy.deepcopy(hooked))
    fwd = {"dense": [], "hooked": [], "removed": []}
    for _ in range(repeats):
        fwd["dense"].append(forward_time(base, x, 20))
        fwd["hooked"].append(forward_time(hooked, x, 20))
        fwd["removed"].append(forward_time(removed, x, 20))
    fmed = {k: statistics.median(v) for k, v in fwd.items()}
    check = statistics.median(check_time(base, 20) for _ in range(repeats))
    n_prunable = sum(m.weight.numel() for m in base.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return {
        "model": name,
        "batch_size": batch_size,
        "prunable_weights": n_prunable,
        "step_s": med,
        "step_ratio_torch_pruned": ratio["torch_pruned"],
        "step_ratio_in_loop": ratio["in_loop"],
        "step_ratio_fused": ratio["fused"],
        "step_ratio_two_batch": ratio["two_batch"],
        "step_ratio_range": spread,
        "repeats": repeats,
        "forward_s": fmed,
        "forward_ratio_hooked": fmed["hooked"] / fmed["dense"],
        "forward_ratio_removed": fmed["removed"] / fmed["dense"],
        "check_s": check,
        "check_ratio": check / med["dense"],
    }


def check_time(model: nn.Module, reps: int) -> float:
    """Seconds of the per-step finiteness check that BiP runs on what it applies.

    The loop sums each target's score gradient (one entry per prunable weight) and each other
    trainable tensor's gradient, and reads whether all sums are finite with the loss (one host
    sync); the sums also record which targets got a gradient.
    Timed here on tensors of those sizes, minus reading the loss alone (which a step does anyway).
    """
    prunable = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ids = {id(w) for w in prunable}
    others = [torch.randn_like(p) for p in model.parameters() if id(p) not in ids]
    flat = torch.randn(sum(w.numel() for w in prunable))
    views = list(flat.split([w.numel() for w in prunable]))  # one score-gradient view per target
    loss = torch.tensor(1.0, dtype=torch.float64)
    checked = [*views, *others]

    def run() -> None:
        sums = tensor_sums(checked)
        seen = sums[: len(views)] != 0  # which targets got a gradient (kept on the device)
        torch.stack([loss, torch.isfinite(sums).all().double(), seen.all().double()]).tolist()

    run()
    start = time.perf_counter()
    for _ in range(reps):
        run()
    with_check = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):
        float(loss)
    return max(with_check - (time.perf_counter() - start) / reps, 0.0)


def bench_topk(n: int, repeats: int) -> dict:
    """``torch.kthvalue`` (threshold only) vs :class:`GlobalTopK` (the whole mask)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(n, generator=g)
    n_keep = n // 10
    times_full, times_banded = [], []
    selector = GlobalTopK(n_keep)
    selector([scores])
    for _ in range(repeats):
        scores.add_(torch.randn(n, generator=g), alpha=1e-5)  # a small upper step
        start = time.perf_counter()
        torch.kthvalue(scores, n - n_keep + 1)
        times_full.append(time.perf_counter() - start)
        start = time.perf_counter()
        masks = selector([scores])
        times_banded.append(time.perf_counter() - start)
        assert int(masks[0].sum()) == n_keep
    return {
        "numel": n,
        "kthvalue_s": statistics.median(times_full),
        "global_topk_s": statistics.median(times_banded),
    }


def markdown(result: dict) -> str:
    lines = [
        f"# bench_step ({result['device']}, torch {result['torch']})",
        "",
        "Seconds per step (median of interleaved repeats, set-up cost removed) and ratios to a "
        "dense SGD step of the same model and batch (the median of each repeat's ratio to the dense "
        "step of the same repeat). In-loop: the same SGD step in a plain loop "
        "with `torchbip.BiP` (hooked forward, backward, `optimizer.step()`, `pruner.step()`); fused "
        "and two-batch: `global_prune`'s own loop. Targets: in-loop and fused <= 1.3x, two-batch <= 2.3x, "
        "forward under hooks <= 1.1x, after `prune.remove` 1.0x. The finite check is the part of each "
        "step that verifies the gradients it applies (included in the fused and two-batch times). "
        "Torch-pruned: the same SGD step on the model pruned by torch's own "
        "`prune.global_unstructured` (fixed masks, torch's forward pre-hooks), the cost of torch's "
        "pruned form alone.",
        "",
        "| model | batch | prunable | dense step | torch-pruned | in-loop | fused | two-batch | "
        "torch-pruned / dense | in-loop / dense | fused / dense | two-batch / dense | fwd hooked / dense | "
        "fwd removed / dense | finite check | check / dense |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in result["models"]:
        s = r["step_s"]
        pruned = s.get("torch_pruned")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['prunable_weights']:,} | {s['dense'] * 1e3:.2f} ms | "
            + (f"{pruned * 1e3:.2f} ms | " if pruned is not None else "| ")
            + f"{s['in_loop'] * 1e3:.2f} ms | {s['fused'] * 1e3:.2f} ms | {s['two_batch'] * 1e3:.2f} ms | "
            + (f"{r['step_ratio_torch_pruned']:.2f}x | " if pruned is not None else "| ")
            + f"{r['step_ratio_in_loop']:.2f}x | "
            f"{r['step_ratio_fused']:.2f}x | {r['step_ratio_two_batch']:.2f}x | "
            f"{r['forward_ratio_hooked']:.2f}x | {r['forward_ratio_removed']:.2f}x | "
            f"{r['check_s'] * 1e3:.3f} ms | {r['check_ratio']:.1%} |"
        )
    lines += [
        "",
        "The ratios of the single repeats (each to the dense step of its own repeat), lowest to "
        "highest: how much the machine's speed moved them during the run (the tables above give "
        "their medians).",
        "",
        "| model | repeats | torch-pruned | in-loop | fused | two-batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["models"]:
        if "step_ratio_range" not in r:
            continue
        ranges = " | ".join(
            "{:.2f}-{:.2f}x".format(*r["step_ratio_range"][k])
            for k in ("torch_pruned", "in_loop", "fused", "two_batch")
        )
        lines.append(f"| {r['model']} | {r['repeats']} | {ranges} |")
    lines += [
        "",
        "Global top-k over n scores after a small score update: `torch.kthvalue` (the threshold "
        "only) vs `GlobalTopK` (the whole exact mask: `np.partition` on CPUs, with a band around "
        "the last threshold from 64k scores on CPUs).",
        "",
        "| scores | kthvalue | GlobalTopK | speed-up |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in result["topk"]:
        lines.append(
            f"| {r['numel']:,} | {r['kthvalue_s'] * 1e3:.2f} ms | {r['global_topk_s'] * 1e3:.2f} ms | "
            f"{r['kthvalue_s'] / r['global_topk_s']:.1f}x |"
        )
    if "first_call" in result:
        lines += [
            "",
            "One-time cost in a fresh process (`benchmarks/first_call.py`, medians): `import torchbip` "
            "(torch's import included), then two runs of 5 steps on LeNet-300-100, each on a new model: "
            "a plain SGD loop (dense), `global_prune`, or the plain loop with `torchbip.BiP`. The first "
            "run pays for what torch loads on first use; `torch._dynamo`, which the first `torch.optim` "
            "optimizer of a process imports, is imported by `import torchbip` (its column). The last "
            "columns are the first run in processes that built one `torch.optim` optimizer before it: "
            "the one-time cost of the run itself.",
            "",
            "| driver | import torchbip | first run | second run | first - second | first run, torch warm | "
            "its excess over the second |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for driver, r in result["first_call"].items():
            warm = r.get("first_call_warm_torch_s", float("nan"))
            lines.append(
                f"| {driver} | {r['import_s']:.2f} s | {r['first_call_s'] * 1e3:.0f} ms | "
                f"{r['second_call_s'] * 1e3:.0f} ms | "
                f"{(r['first_call_s'] - r['second_call_s']) * 1e3:.0f} ms | {warm * 1e3:.0f} ms | "
                f"{(warm - r['second_call_s']) * 1e3:.0f} ms |"
            )
    return "\n".join(lines) + "\n"


TARGETS = {"in-loop": 1.3, "fused": 1.3, "two-batch": 2.3, "forward hooked": 1.1, "forward removed": 1.0}


def plot(result: dict, path: Path) -> None:
    """Ratios to the dense model per model, each bar against its target (a black tick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {
        "torch-pruned": "step_ratio_torch_pruned",
        "in-loop": "step_ratio_in_loop",
        "fused": "step_ratio_fused",
        "two-batch": "step_ratio_two_batch",
        "forward hooked": "forward_ratio_hooked",
        "forward removed": "forward_ratio_removed",
    }
    models = result["models"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(keys)
    for j, (label, key) in enumerate(keys.items()):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, [m.get(key, 0.0) for m in models], width, label=label, color=f"C{j}")
        if label in TARGETS:
            ax.hlines([TARGETS[label]] * len(xs), [x - width / 2 for x in xs], [x + width / 2 for x in xs],
                      colors="black", linewidth=2)  # fmt: skip
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(models)), [m["model"] for m in models])
    ax.set_ylabel("time / dense time (black: target)")
    ax.set_title(f"BiP step and forward cost vs dense ({result['device']}, torch {result['torch']})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON, markdown and PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--replot", type=Path, default=None, metavar="JSON", help="redraw the PNG of an earlier run's JSON"
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        plan = [("lenet_300_100", 128, 4, 12, 2), ("small_cnn_bn", 64, 2, 6, 2)]
        topk_sizes, topk_reps = [266_610], 5
    else:
        plan = [
            ("lenet_300_100", 128, 10, 60, 15),
            ("small_cnn_bn", 128, 5, 25, 7),
            ("resnet18_32px", 64, 3, 11, 5),
        ]
        topk_sizes, topk_reps = [266_610, 11_000_000, 25_500_000], 9
    result = {
        "device": f"cpu-{platform.machine()}-{torch.get_num_threads()}threads",
        "torch": torch.__version__.split("+")[0],
        "quick": args.quick,
        "models": [bench_model(*p) for p in plan],
        "topk": [bench_topk(n, topk_reps) for n in topk_sizes],
        # fresh processes, after the timings above (their children compete with nothing)
        "first_call": {d: first_call(1 if args.quick else 3, d) for d in DRIVERS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_step-{result['device']}-torch{result['torch']}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
