"""Distributed ranks that disagree, or of which one fails, raise on every rank instead of hanging.

Two gloo processes on the CPU run one case after another in the same process group (which also
shows that the group stays usable after each failure). Before the first step the ranks agree on
the run (steps, tensors, kept entries) or all raise; every step's all-reduce carries a status
entry, so a rank that fails mid-run (its loader, model or loss raising) makes the others raise at
the same step instead of waiting for the 30-minute collective timeout. The process group is
created with a short timeout, so a hang fails this test quickly.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from process_group import run_then_destroy
from torch import Tensor, nn

import torchbip

OPTIONS: dict[str, Any] = {"seed": 0, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0}


def make_model(hidden: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def batches(n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        out.append((x, x[:, :3].argmax(1)))
    return out


class FailingAt:
    """A loader that raises at its ``at``-th batch."""

    def __init__(self, data: list[tuple[Tensor, Tensor]], at: int) -> None:
        self.data, self.at = data, at

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i, batch in enumerate(self.data):
            if i == self.at:
                raise OSError("disk read failed")
            yield batch


class InterruptedAt(FailingAt):
    """A loader that raises ``KeyboardInterrupt`` (Ctrl-C on that rank) at its ``at``-th batch."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i, batch in enumerate(self.data):
            if i == self.at:
                raise KeyboardInterrupt
            yield batch


def nan_loss(out: Tensor, y: Tensor) -> Tensor:
    zero = out - out.detach()
    return F.cross_entropy(out, y) + torch.where(out > 1e9, zero.log(), torch.zeros_like(out)).sum()


def model_of(rank: int, dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    """``make_model()``, on rank 1 in ``dtype`` and with or without the first layer's bias."""
    model = make_model()
    if rank == 1:
        model = model.to(dtype)
        if not bias:
            first = model.get_submodule("0")
            del first.bias
            first.register_parameter("bias", None)
    return model


# Whether a case left its model exactly as it was (parameters, buffers and their values).
UNCHANGED: dict[str, bool] = {}


def unchanged_after(name: str, model: nn.Module, call: Callable[[nn.Module], Any]) -> Any:
    """``call(model)``, recording in ``UNCHANGED[name]`` whether it left ``model`` as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    try:
        return call(model)
    finally:
        after = model.state_dict()
        UNCHANGED[name] = (
            list(model.parameters()) == params
            and after.keys() == before.keys()
            and all(torch.equal(after[k], v) for k, v in before.items())
        )


def bip_step_after_converting(rank: int, data: list[tuple[Tensor, Tensor]]) -> Any:
    """``BiP`` in a loop whose rank 1 converts the model after building it: its step refuses."""
    model = make_model()
    pruner = torchbip.BiP(model, 0.5, steps=2)
    if rank == 1:
        model.double()
    x, y = data[0]
    F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
    pruner.step()
    return pruner.finish()


def bip_on_a_group_without_this_rank(rank: int, data: list[tuple[Tensor, Tensor]]) -> Any:
    """A group of rank 0 only, passed on both ranks: rank 1 refuses it, rank 0 prunes alone."""
    group = dist.new_group([0])  # (every rank calls new_group; rank 1 gets NON_GROUP_MEMBER)
    model = make_model()
    pruner = torchbip.BiP(model, 0.5, steps=1, process_group=group)
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()
    pruner.step()
    return pruner.finish()


def resume_with_a_checkpoint_on_rank_0_only(rank: int, data: list[tuple[Tensor, Tensor]]) -> Any:
    """Each rank names its own folder: only rank 0's holds the checkpoint rank 0 wrote."""
    path = Path(tempfile.mkdtemp(), "bip.pt")
    torchbip.global_prune(make_model(), 0.5, data, steps=5, checkpoint_path=str(path), **OPTIONS)
    return torchbip.global_prune(
        make_model(), 0.5, data, steps=5, checkpoint_path=str(path), resume=True, **OPTIONS
    )


def checkpoints_written_by_rank_0_only(rank: int, data: list[tuple[Tensor, Tensor]]) -> Any:
    """Rank 0 names a checkpoint file, rank 1 none (only rank 0 writes checkpoints): both run."""
    path = Path(tempfile.mkdtemp(), "bip.pt")
    own = {"checkpoint_path": str(path), "checkpoint_every": 1} if rank == 0 else {}
    report = torchbip.global_prune(make_model(), 0.5, data, steps=3, **own, **OPTIONS)
    if path.exists() != (rank == 0):
        raise AssertionError(f"rank {rank}: checkpoint written: {path.exists()}")
    return report


def cases(rank: int) -> list[tuple[str, Callable[[], Any]]]:
    """``(name, call)`` per case; each call runs ``global_prune`` or ``BiP`` on this rank's inputs."""
    own = batches(6, seed=10 + rank)
    return [
        (
            "uneven-shards",
            lambda: torchbip.global_prune(make_model(), 0.5, own[: 3 + rank], epochs=1, **OPTIONS),
        ),
        ("uneven-steps", lambda: torchbip.global_prune(make_model(), 0.5, own, steps=4 + rank, **OPTIONS)),
        (
            "bad-amount-on-one-rank",
            lambda: torchbip.global_prune(make_model(), 0.5 if rank == 0 else 1.5, own, steps=3, **OPTIONS),
        ),
        (
            "another-model",
            lambda: torchbip.global_prune(make_model(12 + 4 * rank), 0.5, own, steps=3, **OPTIONS),
        ),
        (
            "loader-fails-on-one-rank",
            lambda: torchbip.global_prune(
                make_model(), 0.5, FailingAt(own, 2) if rank == 1 else own, steps=5, **OPTIONS
            ),
        ),
        (
            "interrupted-on-one-rank",
            lambda: torchbip.global_prune(
                make_model(), 0.5, InterruptedAt(own, 2) if rank == 1 else own, steps=5, **OPTIONS
            ),
        ),
        (
            "one-shot-iterator-runs-out",
            lambda: torchbip.global_prune(make_model(), 0.5, iter(own[: 6 - 3 * rank]), steps=5, **OPTIONS),
        ),
        (
            "model-fails-on-one-rank",
            lambda: torchbip.global_prune(
                make_model(), 0.5, [(x[:, : 6 - rank], y) for x, y in own], steps=3, **OPTIONS
            ),
        ),
        (
            "nan-gradients-on-one-rank",
            lambda: torchbip.global_prune(
                make_model(), 0.5, own, steps=3, loss_fn=nan_loss if rank == 1 else F.cross_entropy, **OPTIONS
            ),
        ),
        (
            "another-lower-lr",
            lambda: torchbip.global_prune(
                make_model(), 0.5, own, steps=3, **{**OPTIONS, "lower_lr": 0.1 + rank}
            ),
        ),
        (
            "another-amount",
            lambda: torchbip.global_prune(make_model(), [0.5, 54][rank], own, steps=3, **OPTIONS),
        ),
        (
            "another-dtype",
            lambda: unchanged_after(
                "another-dtype",
                model_of(rank, torch.float64),
                lambda m: torchbip.global_prune(
                    m, 0.5, [(x.to(next(m.parameters()).dtype), y) for x, y in own], steps=3, **OPTIONS
                ),
            ),
        ),
        (
            "another-unpruned-parameter",
            lambda: unchanged_after(
                "another-unpruned-parameter",
                model_of(rank, bias=False),
                lambda m: torchbip.global_prune(m, 0.5, own, steps=3, **OPTIONS),
            ),
        ),
        (
            "bip-another-dtype",
            lambda: unchanged_after(
                "bip-another-dtype", model_of(rank, torch.float64), lambda m: torchbip.BiP(m, 0.5).finish()
            ),
        ),
        ("checkpoint-on-rank-0-only", lambda: resume_with_a_checkpoint_on_rank_0_only(rank, own)),
        ("checkpoint-path-on-rank-0-only", lambda: checkpoints_written_by_rank_0_only(rank, own)),
        ("bip-step-after-converting-on-one-rank", lambda: bip_step_after_converting(rank, own)),
        ("bip-on-a-group-without-this-rank", lambda: bip_on_a_group_without_this_rank(rank, own)),
        (
            "a-seed-per-rank-is-fine",
            lambda: torchbip.global_prune(make_model(), 0.5, own, steps=3, **{**OPTIONS, "seed": rank}),
        ),
        ("healthy-run-afterwards", lambda: torchbip.global_prune(make_model(), 0.5, own, steps=3, **OPTIONS)),
    ]


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    run_then_destroy(lambda: run_cases(rank, out_dir))


def run_cases(rank: int, out_dir: str) -> None:
    results = {}
    try:
        for name, call in cases(rank):
            try:
                report = call()
                results[name] = {"ok": True, "sparsity": report.global_sparsity}
            except BaseException as err:  # recorded for the test to check (KeyboardInterrupt too)
                results[name] = {"ok": False, "type": type(err).__name__, "message": str(err)}
            if name in UNCHANGED:
                results[name]["unchanged"] = UNCHANGED[name]
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


EXPECTED = [
    ("uneven-shards", ["ValueError", "ValueError"], r"disagree on the steps \(rank 0: 3, rank 1: 4\)"),
    ("uneven-steps", ["ValueError", "ValueError"], r"disagree on the steps \(rank 0: 4, rank 1: 5\)"),
    (
        "bad-amount-on-one-rank",
        ["RuntimeError", "ValueError"],
        r"amount=1\.5|rank 1: ValueError: amount=1\.5",
    ),
    ("another-model", ["ValueError", "ValueError"], r"disagree on the tensors to prune"),
    ("loader-fails-on-one-rank", ["RuntimeError", "OSError"], r"failed at step 2|disk read failed"),
    # Ctrl-C on one rank: the other learns of it at the same step instead of waiting
    ("interrupted-on-one-rank", ["RuntimeError", "KeyboardInterrupt"], r"failed at step 2|^$"),
    ("one-shot-iterator-runs-out", ["RuntimeError", "ValueError"], r"failed at step 3|yielded no batch"),
    ("model-fails-on-one-rank", ["RuntimeError", "ValueError"], r"failed at step 0|failed on a batch"),
    (
        "nan-gradients-on-one-rank",
        ["FloatingPointError", "FloatingPointError"],
        r"non-finite gradients at step 0",
    ),
    (
        "another-lower-lr",
        ["ValueError", "ValueError"],
        r"disagree on the settings \['lower_lr'\] \(lower_lr: rank 0: 0\.1, rank 1: 1\.1\)",
    ),
    ("another-amount", ["ValueError", "ValueError"], r"disagree on the amount \(rank 0: 0\.5, rank 1: 54\)"),
    # rank 0's weights are broadcast to tensors of another dtype or number: refused, not aborted
    (
        "another-dtype",
        ["ValueError", "ValueError"],
        r"hold different models.*\(rank 1: '0\.weight' float64 \(12, 6\) where rank 0 has float32 \(12, 6\)",
    ),
    (
        "another-unpruned-parameter",
        ["ValueError", "ValueError"],
        r"hold different models.*\(rank 1: no '0\.bias'",
    ),
    ("bip-another-dtype", ["ValueError", "ValueError"], r"hold different models.*float64"),
    (
        "checkpoint-on-rank-0-only",
        ["ValueError", "ValueError"],
        r"disagree on the step to resume from .*\(rank 0: 5, rank 1: None\); checkpoint_path must name",
    ),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("case", "types", "match"), [pytest.param(*e, id=e[0]) for e in EXPECTED])
def test_every_rank_raises(outcomes: list[dict[str, Any]], case: str, types: list[str], match: str) -> None:
    got = [outcomes[rank][case] for rank in range(2)]
    assert [g.get("type") for g in got] == types, got
    for g in got:
        assert not g["ok"]
        assert __import__("re").search(match, g["message"]), g["message"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["another-dtype", "another-unpruned-parameter", "bip-another-dtype"])
def test_a_refused_model_is_left_unchanged_on_every_rank(outcomes: list[dict[str, Any]], case: str) -> None:
    assert [outcomes[rank][case].get("unchanged") for rank in range(2)] == [True, True]


@pytest.mark.timeout(300)
def test_a_group_without_this_rank_is_refused_on_that_rank(outcomes: list[dict[str, Any]]) -> None:
    rank0, rank1 = (outcomes[rank]["bip-on-a-group-without-this-rank"] for rank in range(2))
    assert rank0 == {"ok": True, "sparsity": 0.5}  # rank 0 pruned alone, in its one-rank group
    assert rank1["type"] == "TypeError", rank1
    assert "not a member of" in rank1["message"], rank1


@pytest.mark.timeout(300)
def test_a_step_refused_on_one_rank_makes_the_other_raise(outcomes: list[dict[str, Any]]) -> None:
    """Rank 1 converted its model after building BiP: its step refuses, rank 0's learns so."""
    rank0, rank1 = (outcomes[rank]["bip-step-after-converting-on-one-rank"] for rank in range(2))
    assert rank0["type"] == rank1["type"] == "RuntimeError", (rank0, rank1)
    assert "1 other rank(s) of the process group failed in BiP.step()" in rank0["message"], rank0
    assert "the mask buffer '0.weight_mask' was replaced" in rank1["message"], rank1


@pytest.mark.timeout(300)
def test_the_group_still_works_after_the_failures(outcomes: list[dict[str, Any]]) -> None:
    for case in ("a-seed-per-rank-is-fine", "checkpoint-path-on-rank-0-only", "healthy-run-afterwards"):
        got = [outcomes[rank][case] for rank in range(2)]
        assert got == [{"ok": True, "sparsity": 0.5}, {"ok": True, "sparsity": 0.5}], case
