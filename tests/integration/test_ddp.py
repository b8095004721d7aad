"""Distributed data parallel on CPU: 2 processes with the gloo backend.

Both ranks must end with identical scores (seen through the masks) and weights, equal to one
process that saw the combined batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from process_group import run_then_destroy
from torch import nn

import torchbip

STEPS = 6
OPTIONS = {"steps": STEPS, "seed": 0, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3)).double()


def full_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        x = torch.randn(32, 6, generator=g, dtype=torch.float64)
        out.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()))
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    run_then_destroy(lambda: prune_shard(rank, world, out_dir))


def prune_shard(rank: int, world: int, out_dir: str) -> None:
    model = make_model()
    if rank == 1:  # a different start on rank 1: global_prune must broadcast rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    shard = [(x[rank::world], y[rank::world]) for x, y in full_batches()]
    torchbip.global_prune(model, 0.7, shard, **OPTIONS)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.timeout(300)
def test_two_gloo_ranks_agree_with_each_other_and_with_one_process(tmp_path: Path) -> None:
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = make_model()
    torchbip.global_prune(single, 0.7, full_batches(), **OPTIONS)
    want = single.state_dict()
    assert rank0.keys() == rank1.keys() == want.keys()
    for key in want:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
        if key.endswith("_mask"):
            assert torch.equal(rank0[key], want[key]), f"mask {key} differs from one process"
        else:
            torch.testing.assert_close(rank0[key], want[key], rtol=1e-10, atol=1e-12)


# Run in a fresh interpreter: prints how many references to the default process group remain
# after destroy_process_group(), besides the script's own (0: the group is freed there).
def _run_python(script: str) -> str:
    """Runs ``script`` in a fresh interpreter, asserts it exits cleanly, returns its stdout."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    return done.stdout


LEFT_AFTER_DESTROY = """
import sys
import torch
import torch.distributed as dist
{import_line}
dist.init_process_group("gloo", init_method="file://{init}", rank=0, world_size=1)
group = dist.distributed_c10d._get_default_group()
torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)  # the process's first optimizer
dist.destroy_process_group()
print(sys.getrefcount(group) - 2)  # less `group` and getrefcount's argument
"""


@pytest.mark.timeout(120)
def test_destroy_process_group_frees_the_group_when_torchbip_is_imported(tmp_path: Path) -> None:
    """A group that outlives destroy_process_group() is destroyed at exit, which can abort the process."""

    def left(import_line: str, name: str) -> int:
        script = LEFT_AFTER_DESTROY.format(import_line=import_line, init=tmp_path / name)
        return int(_run_python(script).split()[-1])

    # torch alone: the first optimizer imports torch._dynamo, which keeps references to the group
    assert left("", "init-torch") > 0, "torch frees the group by itself now: torchbip's import can go"
    assert left("import torchbip", "init-torchbip") == 0


STEP_AFTER_DESTROY = """
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import torchbip
dist.init_process_group("gloo", init_method="file://{init}", rank=0, world_size=1)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
pruner = torchbip.BiP(model, 0.5, process_group=dist.group.WORLD)
F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
dist.destroy_process_group()
try:
    pruner.step()
except RuntimeError as err:
    print("REFUSED:", err, "| steps:", pruner.step_count)
"""


@pytest.mark.timeout(120)
def test_a_step_after_the_default_group_was_destroyed_is_refused(tmp_path: Path) -> None:
    """BiP looks the default group up at every step: once it is destroyed, a step says so."""
    script = STEP_AFTER_DESTROY.format(init=tmp_path / "init")
    out = _run_python(script)
    assert "REFUSED: the default process group that BiP averages over was destroyed" in out
    assert "| steps: 0" in out
