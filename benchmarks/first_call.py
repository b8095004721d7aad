"""Start-up cost of torchbip: ``import torchbip`` and the first ``global_prune`` call in a fresh process.

Each repeat starts a new interpreter (``sys.executable -c ...``) that times ``import torchbip``
(torch's own import included), then two ``global_prune`` calls on LeNet-300-100 with random
MNIST-shaped batches (``steps=5, progress=False, seed=0``), each on a fresh model. The first call
pays for whatever torch loads lazily on first use; the second shows the steady cost. Run:

    python benchmarks/first_call.py              # 3 fresh processes, medians
    python benchmarks/first_call.py --repeats 5
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
KEYS = ("import_s", "first_call_s", "second_call_s")

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
    torchbip.global_prune(model, 0.9, data, steps=5, progress=False, seed=0)
    return time.perf_counter() - start

first = timed_call()
second = timed_call()
print(json.dumps({"import_s": t1 - t0, "first_call_s": first, "second_call_s": second}))
"""


def run_once() -> dict[str, float]:
    """Time the import and two calls in one fresh interpreter, on this checkout's torchbip."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the timing process failed ({proc.returncode}):\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: float(row[key]) for key in KEYS}


def measure(repeats: int = 3) -> dict[str, float]:
    """Medians over ``repeats`` fresh processes of the import, first-call and second-call times.

    Args:
        repeats: number of fresh interpreters to start (at least 1).

    Returns:
        ``{"import_s": ..., "first_call_s": ..., "second_call_s": ...}`` in seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rows = [run_once() for _ in range(repeats)]
    return {key: statistics.median(row[key] for row in rows) for key in KEYS}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command line: print the medians as JSON and return them."""
    parser = argparse.ArgumentParser(description="Start-up cost of torchbip in a fresh process.")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes to start (default 3)")
    parser.add_argument("--quick", action="store_true", help="one process only")
    args = parser.parse_args(argv)
    result = measure(1 if args.quick else args.repeats)
    print(json.dumps({key: round(value, 4) for key, value in result.items()}))
    return result


if __name__ == "__main__":
    main()
