"""Start-up cost of torchbip: ``import torchbip`` and the first pruning run in a fresh process.

Each repeat starts a new interpreter (``sys.executable -c ...``) that times ``import torchbip``
(torch's own import included), then two runs on LeNet-300-100 with random MNIST-shaped batches,
each on a fresh model: ``global_prune(steps=5, progress=False, seed=0)`` (driver
``global_prune``), five steps of a plain SGD loop with :class:`torchbip.BiP` built before it
(driver ``in_loop``), or the same loop without BiP (driver ``dense``, the reference). The first
run pays for whatever torch loads lazily on first use; the second shows the steady cost. The
largest one-time cost is torch's ``torch._dynamo``, which the first ``torch.optim`` optimizer of
a process imports (about 1 s on a 2-core CPU) and ``import torchbip`` imports at once (see the
distributed how-to), so the import column holds it and the first runs no longer pay it. Run:

    python benchmarks/first_call.py              # 3 fresh processes, medians
    python benchmarks/first_call.py --repeats 5 --driver in_loop
    python benchmarks/first_call.py --quick      # 1 process

Prints ``{"import_s": ..., "first_call_s": ..., "second_call_s": ...}`` (medians, seconds).
Other code can call :func:`measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("import_s", "first_call_s", "second_call_s", "first_call_warm_torch_s")
DRIVERS = ("dense", "global_prune", "in_loop")

# Runs in the fresh interpreter; prints one JSON line with the three timings.
CHILD = """
import json, time
t0 = time.perf_counter()
import torchbip
t1 = time.perf_counter()
import torch
from torch import nn

def lenet_300_100():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )

def timed_call():
    torch.manual_seed(0)
    model = lenet_300_100()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
        for _ in range(5)
    ]
    start = time.perf_counter()
    if DRIVER == "global_prune":
        torchbip.global_prune(model, 0.9, data, steps=5, progress=False, seed=0)
    else:
        pruner = torchbip.BiP(model, amount=0.9, steps=5) if DRIVER == "in_loop" else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for x, y in data:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if pruner is not None:
                pruner.step()
        if pruner is not None:
            pruner.finish()
    return time.perf_counter() - start

if WARM_TORCH:  # torch's own one-time cost, paid before the clock: the first optimizer of a process
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
first = timed_call()
second = timed_call()
print(json.dumps({"import_s": t1 - t0, "first_call_s": first, "second_call_s": second}))
"""


def run_once(driver: str = "global_prune", warm_torch: bool = False) -> dict[str, float]:
    """Time the import and two runs in one fresh interpreter, on this checkout's torchbip.

    With ``warm_torch``, the process builds one ``torch.optim`` optimizer before the first run.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-c", f"DRIVER, WARM_TORCH = {driver!r}, {warm_torch!r}\n{CHILD}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the timing process failed ({proc.returncode}):\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: float(row[key]) for key in KEYS[:3]}


def measure(repeats: int = 3, driver: str = "global_prune") -> dict[str, float]:
    """Medians over ``repeats`` fresh processes of the import, first-call and second-call times.

    Args:
        repeats: number of fresh interpreters to start (at least 1).
        driver: ``"global_prune"``, ``"in_loop"`` (a plain loop with :class:`torchbip.BiP`) or
            ``"dense"`` (the same loop without BiP).

    Returns:
        ``{"import_s": ..., "first_call_s": ..., "second_call_s": ..., "first_call_warm_torch_s": ...}``
        in seconds; the last is the first run in processes that built a ``torch.optim`` optimizer
        before it (what the run itself costs once, without torch's one-time import).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
    rows = [run_once(driver) for _ in range(repeats)]
    warm = [run_once(driver, warm_torch=True)["first_call_s"] for _ in range(repeats)]
    result = {key: statistics.median(row[key] for row in rows) for key in KEYS[:3]}
    return result | {"first_call_warm_torch_s": statistics.median(warm)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command line: print the medians as JSON and return them."""
    parser = argparse.ArgumentParser(description="Start-up cost of torchbip in a fresh process.")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes to start (default 3)")
    parser.add_argument("--quick", action="store_true", help="one process only")
    parser.add_argument("--driver", choices=DRIVERS, default="global_prune", help="what the runs call")
    args = parser.parse_args(argv)
    result = measure(1 if args.quick else args.repeats, args.driver)
    print(json.dumps({key: round(value, 4) for key, value in result.items()}))
    return result


if __name__ == "__main__":
    main()
