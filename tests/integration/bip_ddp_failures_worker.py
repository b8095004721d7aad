"""Ranks that disagree or fail with ``torchbip.BiP``, launched by ``torchrun`` from ``test_bip_in_loop.py``.

Each case runs on both ranks in turn; rank ``r`` writes ``OUT/rank<r>.json``, the outcome of
every case: ``ok <digest>`` or the exception's type and message. A rank left waiting in a
collective would hit the process group's 60 s timeout instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from process_group import run_then_destroy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import torchbip


class Routed(nn.Module):
    """A model whose middle layer a batch may skip (data-dependent routing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor, skip: bool = False) -> Tensor:
        h = torch.tanh(self.a(x))
        if not skip:
            h = torch.tanh(self.b(h))
        return self.c(h)


def batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def digest(model: nn.Module, pruner: torchbip.BiP) -> str:
    data = b"".join(v.detach().reshape(-1).numpy().tobytes() for v in model.state_dict().values())
    return hashlib.sha256(data + pruner.flat_scores.detach().numpy().tobytes()).hexdigest()[:16]


def build(rank: int, **kwargs: object) -> tuple[nn.Module, torchbip.BiP]:
    model = Routed().double()
    return model, torchbip.BiP(model, **{"amount": 0.8, "steps": 4, **kwargs})  # type: ignore[arg-type]


def case_amount(rank: int) -> str:
    build(rank, amount=0.8 if rank == 0 else 0.7)
    return "built"


def case_steps(rank: int) -> str:
    build(rank, steps=4 if rank == 0 else 12)
    return "built"


def case_refused(rank: int) -> str:
    build(rank, amount=0.8 if rank == 0 else 1.5)
    return "built"


def case_unused(rank: int) -> str:
    """Rank 1's first batch skips layer b: DDP(find_unused_parameters=True) averages what ran."""
    model, pruner = build(rank)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(4):
        x, y = batch(step, rank)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x, skip=(step == 0 and rank == 1)), y).backward()
        optimizer.step()
        pruner.step()
    return f"ok {digest(model, pruner)}"


def case_no_backward(rank: int) -> str:
    """Rank 1 steps without a backward pass: it raises, rank 0 learns so in the same collective."""
    model, pruner = build(rank)
    x, y = batch(0, rank)
    if rank == 0:
        F.cross_entropy(model(x), y).backward()
    pruner.step()
    return "stepped"


def case_hold_pruned(rank: int) -> str:
    build(rank, hold_pruned=rank == 0)
    return "built"


def _one_step(rank: int, **step: object) -> tuple[nn.Module, torchbip.BiP]:
    model, pruner = build(rank)
    x, y = batch(0, rank)
    F.cross_entropy(model(x), y).backward()
    pruner.step(**step)  # type: ignore[arg-type]
    return model, pruner


def case_skip_alone(rank: int) -> str:
    """Rank 1 skips a step that rank 0 takes: both raise (neither waits)."""
    _one_step(rank, skip=rank == 1)
    return "stepped"


def case_skip_together(rank: int) -> str:
    model, pruner = _one_step(rank, skip=True)
    return f"ok {pruner.skipped_steps} {digest(model, pruner)}"


def case_bad_scale(rank: int) -> str:
    """Rank 1's step is refused before the collective: rank 0 learns so in it."""
    _one_step(rank, scale=2.0 if rank == 0 else -1.0)
    return "stepped"


def case_load_refused_on_one_rank(rank: int) -> str:
    """Rank 0's copy of a state holds a NaN learning rate: every rank refuses it, none loads it."""
    model, pruner = build(rank)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = batch(0, rank)
    F.cross_entropy(ddp(x), y).backward()
    optimizer.step()
    pruner.step()
    state = pruner.state_dict()
    if rank == 0:
        state["optimizer"]["param_groups"][0]["lr"] = float("nan")
    scores = pruner.flat_scores.clone()
    try:
        pruner.load_state_dict(state)
    finally:
        assert torch.equal(pruner.flat_scores, scores)
    return "loaded"


def case_resume_refused_on_one_rank(rank: int) -> str:
    """Rank 0's checkpoint holds a weight-optimizer state of the wrong shape: both ranks raise at
    once (not at the process group's timeout) and keep their models."""
    folder = Path(sys.argv[1])
    data = [batch(step, rank) for step in range(4)]
    options = {"steps": 4, "progress": False, "seed": 0, "checkpoint_every": 2}
    torchbip.global_prune(Routed().double(), 0.8, data, checkpoint_path=folder / "run.pt", **options)
    dist.barrier()
    path = folder / "run.pt"
    if rank == 0:
        state = torch.load(path, weights_only=True)
        entries = state["lower_opt"]["state"]
        key = next(iter(entries))
        entries[key]["momentum_buffer"] = torch.zeros(entries[key]["momentum_buffer"].numel() + 1)
        path = folder / "damaged.pt"
        torch.save(state, path)
    dist.barrier()
    model = Routed().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        torchbip.global_prune(model, 0.8, data, checkpoint_path=path, resume=True, **options)
    finally:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return "resumed"


def main() -> None:
    rank = dist.get_rank()
    outcomes = {}
    for name in sys.argv[2:]:
        try:
            outcomes[name] = globals()[f"case_{name}"](rank)
        except Exception as err:  # the outcome under test
            outcomes[name] = f"{type(err).__name__}: {err}"
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(outcomes))


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    run_then_destroy(main)
