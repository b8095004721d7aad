"""Resume: the uninterrupted run bitwise, or a refusal that names the difference; safe checkpoint writes.

The oracle of every resume test is the uninterrupted run: the same call without a checkpoint.
A run is interrupted by a ``KeyboardInterrupt`` from its ``loss_fn`` (the loader stays the
user's own object, generators included), then continued with ``resume=True``; masks, weights,
buffers, recorded losses and the loaders' generators must then equal the oracle's exactly.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

import torchbip
from torchbip._checkpoint import check_checkpoint_path
from torchbip.api import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

_gen = torch.Generator().manual_seed(1)
X = torch.randn(96, 8, generator=_gen)
Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
DATA = TensorDataset(X, Y)  # batches of 16: 6 per epoch
BATCHES = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 96, 8)]  # 12 batches for one-shot iterators
OPTIONS: dict[str, Any] = {"steps": 10, "seed": 3, "progress": False, "lower_lr": 0.05, "upper_lr": 1.0}

Data = dict[str, Any]  # the loader arguments of one call: {"loader": ..., "upper_loader": ...}


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def shuffled(seed: int = 5, **kwargs: Any) -> DataLoader:
    return DataLoader(
        DATA, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed), **kwargs
    )


class StopAt:
    """A ``loss_fn`` (cross-entropy) that raises ``KeyboardInterrupt`` at its ``n``-th call."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return F.cross_entropy(out, y)


def outcome(model: nn.Module, report: torchbip.PruneReport) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "losses": list(report.losses),
        "final_loss": report.final_loss,
        "steps": report.steps,
    }


def assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got["state"]) == list(want["state"])
    for key, value in want["state"].items():
        assert torch.equal(got["state"][key], value), key
    assert got["losses"] == want["losses"]
    assert got["final_loss"] == want["final_loss"]
    assert got["steps"] == want["steps"]


def generators(data: Data) -> list[Tensor]:
    """States of the generators the loaders hold (the user's objects), each once."""
    found: list[torch.Generator] = []
    for loader in data.values():
        for holder in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            for obj in (holder, getattr(holder, "sampler", None)):
                gen = getattr(obj, "generator", None)
                if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                    found.append(gen)
    return [g.get_state() for g in found]


def reference(make_data: Callable[[], Data], amount: float = 0.8, **options: Any) -> tuple[dict, Data]:
    data = make_data()
    model = make_model()
    report = torchbip.global_prune(model, amount, **data, **{**OPTIONS, **options})
    return outcome(model, report), data


def interrupted_then_resumed(
    tmp_path: Path,
    make_data: Callable[[], Data],
    *,
    stop_at: int,
    every: int = 2,
    amount: float = 0.8,
    same_objects: bool = False,
    **options: Any,
) -> tuple[dict[str, Any], Data, dict[str, Any]]:
    """Interrupt a run at the ``stop_at``-th loss, then resume it; (outcome, data, checkpoint)."""
    path = tmp_path / "bip.pt"
    model = make_model()
    before = capture(model)
    data = make_data()
    with pytest.raises(KeyboardInterrupt):
        torchbip.global_prune(
            model, amount, **data, loss_fn=StopAt(stop_at), checkpoint_path=str(path),
            checkpoint_every=every, **{**OPTIONS, **options},
        )  # fmt: skip
    assert_unchanged(before, model)
    saved = torch.load(path, weights_only=True)
    again = data if same_objects else make_data()
    report = torchbip.global_prune(
        model, amount, **again, checkpoint_path=str(path), resume=True, **{**OPTIONS, **options}
    )
    return outcome(model, report), again, saved


# -- resumes that must equal the uninterrupted run -------------------------------------------


@pytest.mark.parametrize("same_objects", [False, True], ids=["new-loader", "same-loader"])
@pytest.mark.parametrize(("stop_at", "saved_step"), [(5, 4), (9, 8)], ids=["epoch-0", "epoch-1"])
def test_dataloader_shuffled_by_its_generator(
    tmp_path: Path, same_objects: bool, stop_at: int, saved_step: int
) -> None:
    """PyTorch's reproducibility recipe: ``DataLoader(shuffle=True, generator=g)``; ``g`` ends as
    in the uninterrupted run, also when the interrupted call's loader (``g`` advanced) is reused."""
    make = lambda: {"loader": shuffled()}  # noqa: E731
    want, ref_data = reference(make)
    got, data, saved = interrupted_then_resumed(tmp_path, make, stop_at=stop_at, same_objects=same_objects)
    assert saved["step"] == saved_step
    assert_same_run(got, want)
    after, expected = generators(data), generators(ref_data)
    assert len(after) == len(expected) == 1
    assert torch.equal(after[0], expected[0])


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda: DataLoader(
            DATA, batch_size=16, sampler=RandomSampler(DATA, generator=torch.Generator().manual_seed(7))
        ),
        lambda: DataLoader(
            DATA,
            batch_sampler=BatchSampler(
                RandomSampler(DATA, generator=torch.Generator().manual_seed(7)), 16, False
            ),
        ),
        lambda: DataLoader(
            DATA,
            batch_size=16,
            sampler=RandomSampler(
                DATA, replacement=True, num_samples=96, generator=torch.Generator().manual_seed(7)
            ),
        ),
    ],
    ids=["random-sampler", "batch-sampler", "sampler-with-replacement"],
)
def test_sampler_with_its_own_generator(tmp_path: Path, make_loader: Callable[[], DataLoader]) -> None:
    make = lambda: {"loader": make_loader()}  # noqa: E731
    want, ref_data = reference(make)
    got, data, saved = interrupted_then_resumed(tmp_path, make, stop_at=9)
    assert saved["lower_stream"]["epoch"] == 1
    assert_same_run(got, want)
    assert [torch.equal(a, b) for a, b in zip(generators(data), generators(ref_data), strict=True)] == [True]


def test_shuffling_loader_without_generator_or_seed(tmp_path: Path) -> None:
    """The order comes from torch's global RNG; the resumed call starts from another RNG state."""
    make = lambda: {"loader": DataLoader(DATA, batch_size=16, shuffle=True)}  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        want, _ = reference(make, seed=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        path = tmp_path / "bip.pt"
        model = make_model()
        with pytest.raises(KeyboardInterrupt):
            torchbip.global_prune(
                model, 0.8, **make(), loss_fn=StopAt(9), checkpoint_path=str(path), checkpoint_every=2,
                **{**OPTIONS, "seed": None},
            )  # fmt: skip
        torch.manual_seed(99)
        report = torchbip.global_prune(
            model, 0.8, **make(), checkpoint_path=str(path), resume=True, **{**OPTIONS, "seed": None}
        )
    assert_same_run(outcome(model, report), want)


@pytest.mark.parametrize(
    "make_iterator",
    [lambda: iter(BATCHES), lambda: ((x, y) for x, y in BATCHES)],
    ids=["iter-of-list", "generator-expression"],
)
@pytest.mark.parametrize("stop_at", [2, 5, 10], ids=["after-1", "after-4", "after-9"])
def test_one_shot_iterator_passed_again_from_its_start(
    tmp_path: Path, make_iterator: Callable[[], Iterator[Any]], stop_at: int
) -> None:
    """``iter(loader) is loader``: a new one from its start continues exactly (none ahead)."""
    make = lambda: {"loader": make_iterator()}  # noqa: E731
    want, _ = reference(make)
    got, _, saved = interrupted_then_resumed(tmp_path, make, stop_at=stop_at, every=1)
    assert saved["step"] == stop_at - 1
    assert_same_run(got, want)


@pytest.mark.parametrize("upper", [False, True], ids=["upper-from-loader", "own-upper-loader"])
def test_two_batch_mode(tmp_path: Path, upper: bool) -> None:
    def make() -> Data:
        data = {"loader": shuffled(5)}
        if upper:
            data["upper_loader"] = shuffled(6)
        return data

    want, ref_data = reference(make, mode="two_batch")
    # two losses per step: the 11th is in step 6, after the checkpoint of step 4
    got, data, saved = interrupted_then_resumed(tmp_path, make, stop_at=11, mode="two_batch")
    assert saved["step"] == 4
    assert_same_run(got, want)
    after, expected = generators(data), generators(ref_data)
    assert len(after) == len(expected) == 1 + upper
    assert all(torch.equal(a, b) for a, b in zip(after, expected, strict=True))


def test_loader_and_upper_loader_sharing_one_generator(tmp_path: Path) -> None:
    """Two streams draw from one generator, each epoch at its own time: at the checkpoint (step 9)
    loader started its epoch 1 at step 7, after upper_loader's epoch 0 (12 batches)."""

    def make() -> Data:
        g = torch.Generator().manual_seed(8)
        return {
            "loader": DataLoader(DATA, batch_size=16, shuffle=True, generator=g),
            "upper_loader": DataLoader(DATA, batch_size=8, shuffle=True, generator=g),
        }

    want, ref_data = reference(make, mode="two_batch")
    got, data, _ = interrupted_then_resumed(tmp_path, make, stop_at=19, mode="two_batch", every=3)
    assert_same_run(got, want)
    assert torch.equal(generators(data)[0], generators(ref_data)[0])


def test_structured_filter_run(tmp_path: Path) -> None:
    make = lambda: {"loader": shuffled()}  # noqa: E731
    want, _ = reference(make, amount=0.5, structured="filter")
    got, _, saved = interrupted_then_resumed(tmp_path, make, stop_at=7, amount=0.5, structured="filter")
    assert saved["run"]["structured"] == "filter"
    assert_same_run(got, want)


def test_checkpoint_at_the_last_batch_of_an_epoch(tmp_path: Path) -> None:
    """Saved at position 6 of 6: the resumed stream must start the next epoch, not replay one."""
    make = lambda: {"loader": shuffled()}  # noqa: E731
    want, ref_data = reference(make)
    got, data, saved = interrupted_then_resumed(tmp_path, make, stop_at=8, every=3)
    assert (saved["step"], saved["lower_stream"]["epoch"], saved["lower_stream"]["position"]) == (6, 0, 6)
    assert_same_run(got, want)
    assert torch.equal(generators(data)[0], generators(ref_data)[0])


def test_run_across_two_epoch_boundaries(tmp_path: Path) -> None:
    make = lambda: {"loader": shuffled()}  # noqa: E731
    want, ref_data = reference(make, steps=16)
    got, data, saved = interrupted_then_resumed(tmp_path, make, stop_at=14, every=5, steps=16)
    assert (saved["step"], saved["lower_stream"]["epoch"]) == (10, 1)
    assert_same_run(got, want)
    assert torch.equal(generators(data)[0], generators(ref_data)[0])


def test_a_failed_periodic_save_keeps_the_last_checkpoint_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = lambda: {"loader": shuffled()}  # noqa: E731
    want, _ = reference(make)
    path = tmp_path / "bip.pt"
    model = make_model()
    with monkeypatch.context() as patch:
        patch.setattr(
            torch, "save", failing_save(OSError(errno.ENOSPC, "No space left on device"), fail_on=2)
        )
        with pytest.raises(OSError, match="step 4"):
            torchbip.global_prune(
                model, 0.8, **make(), checkpoint_path=str(path), checkpoint_every=2, **OPTIONS
            )
    assert torch.load(path, weights_only=True)["step"] == 2
    report = torchbip.global_prune(model, 0.8, **make(), checkpoint_path=str(path), resume=True, **OPTIONS)
    assert_same_run(outcome(model, report), want)


# -- resumes that cannot be exact are refused, the model untouched ----------------------------


def refused_resume(
    tmp_path: Path,
    first: dict[str, Any],
    second: dict[str, Any],
    match: str,
    make_data: Callable[[], Data] = lambda: {"loader": shuffled()},
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Write a checkpoint with ``first`` (call arguments), resume with ``second``: ValueError."""
    path = tmp_path / "bip.pt"
    args = {"amount": 0.8, **OPTIONS, "steps": 4}
    torchbip.global_prune(make_model(), **{**args, **first}, **make_data(), checkpoint_path=str(path))
    if edit is not None:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    model = make_model()
    kwargs = {**args, **second}
    if "parameters" in kwargs:
        kwargs["parameters"] = kwargs["parameters"](model)
    before = capture(model)
    calls = {"n": 0}

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        calls["n"] += 1
        return F.cross_entropy(out, y)

    with pytest.raises(ValueError, match=match) as info:
        torchbip.global_prune(
            model, **kwargs, **make_data(), loss_fn=loss_fn, checkpoint_path=str(path), resume=True
        )
    assert f"checkpoint_path={str(path)!r}" in str(info.value)
    assert calls["n"] == 0  # refused before any work
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lower_lr": 0.01}, r"was written with lower_lr=0\.05, this call has lower_lr=0\.01"),
        ({"mode": "two_batch"}, r"was written with mode='fused', this call has mode='two_batch'"),
        ({"amount": 0.7}, r"was written with amount=0\.8, this call has amount=0\.7"),
        ({"gamma": 1e-3}, r"was written with gamma=0\.0005, this call has gamma=0\.001"),
        ({"implicit_coef": 0.0}, r"was written with implicit_coef=1\.0, this call has implicit_coef=0\.0"),
        ({"implicit_coef": None}, r"was written with implicit_coef=1\.0, this call has implicit_coef=None"),
        ({"seed": 4}, r"was written with seed=3, this call has seed=4"),
        ({"seed": None}, r"was written with seed=3, this call has seed=None"),
        ({"upper_lr": 2.0}, r"was written with upper_lr=1\.0, this call has upper_lr=2\.0"),
        ({"lower_schedule": "constant"}, r"lower_schedule='cosine', this call has lower_schedule='constant'"),
        (
            {"score_init": "scaled_magnitude"},
            r"score_init='magnitude', this call has score_init='scaled_magnitude'",
        ),
        ({"min_keep": 0.1}, r"was written with min_keep=None, this call has min_keep=0\.1"),
        ({"amp": "bfloat16"}, r"was written with amp=None, this call has amp='bfloat16'"),
        ({"steps": 6}, r"was written with steps=4, this call has steps=6"),
        (
            {"parameters": lambda m: [(m[0], "weight")]},
            r"parameters=\['0\.weight Tensor\[32, 8\] float32', '3\.weight Tensor\[3, 32\] float32'\], "
            r"this call has parameters=\['0\.weight Tensor\[32, 8\] float32'\]",
        ),
        (
            {"lower_lr": 0.01, "mode": "two_batch"},
            r"was written with mode='fused', this call has mode='two_batch'; "
            r"and with lower_lr=0\.05, this call has lower_lr=0\.01\. A resume continues the same run",
        ),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_changed_setting_is_refused(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    refused_resume(tmp_path, {}, change, match)


def test_changed_amount_type_is_refused(tmp_path: Path) -> None:
    """``amount=1`` (a count) is not ``amount=1.0`` (everything)."""
    refused_resume(tmp_path, {"amount": 1}, {"amount": 1.0}, r"amount=1, this call has amount=1\.0")


def test_unstructured_checkpoint_into_n_m_run(tmp_path: Path) -> None:
    # the same tensors and the same count kept: only the layout differs
    refused_resume(
        tmp_path, {"amount": 0.5}, {"amount": 0.5, "structured": "2:4"},
        r"was written with structured=None, this call has structured='2:4'",
    )  # fmt: skip


def test_filter_checkpoint_into_channel_run(tmp_path: Path) -> None:
    both = lambda m: [(m[0], "weight"), (m[3], "weight")]  # noqa: E731
    path = tmp_path / "bip.pt"
    torchbip.global_prune(
        (model := make_model()), 0.5, shuffled(), parameters=both(model), structured="filter",
        checkpoint_path=str(path), **{**OPTIONS, "steps": 4},
    )  # fmt: skip
    model = make_model()
    before = capture(model)
    with pytest.raises(ValueError, match=r"structured='filter', this call has structured='channel'"):
        torchbip.global_prune(
            model, 0.5, shuffled(), parameters=both(model), structured="channel", checkpoint_path=str(path),
            resume=True, **{**OPTIONS, "steps": 4},
        )  # fmt: skip
    assert_unchanged(before, model)


def test_changed_budget_is_refused(tmp_path: Path) -> None:
    refused_resume(
        tmp_path, {"amount": 0.5, "structured": "filter"},
        {"amount": 0.5, "structured": "filter", "budget": "global"},
        r"was written with budget='layer', this call has budget='global'",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("device", "cuda", r"was written with device='cuda', this call has device='cpu'"),
        ("world_size", 2, r"was written with world_size=2, this call has world_size=1"),
    ],
)
def test_checkpoint_of_another_device_or_world_size(tmp_path: Path, key: str, value: Any, match: str) -> None:
    refused_resume(tmp_path, {}, {}, match, edit=lambda state: state["run"].__setitem__(key, value))


def test_loader_with_another_batch_size(tmp_path: Path) -> None:
    loaders = iter([shuffled(), DataLoader(DATA, batch_size=12, shuffle=True, generator=torch.Generator())])
    refused_resume(
        tmp_path, {}, {}, r"was written with loader\.batches=6, this call has loader\.batches=8",
        make_data=lambda: {"loader": next(loaders)},
    )  # fmt: skip


def test_loader_that_lost_its_generator(tmp_path: Path) -> None:
    """Without ``generator`` the order comes from torch's RNG: the saved generator state is no use."""
    loaders = iter([shuffled(), DataLoader(DATA, batch_size=16, shuffle=True)])
    refused_resume(
        tmp_path, {}, {}, r"was written with loader\.generators=1, this call has loader\.generators=0",
        make_data=lambda: {"loader": next(loaders)},
    )  # fmt: skip


def test_upper_loader_added_on_resume(tmp_path: Path) -> None:
    datas = iter([{"loader": shuffled()}, {"loader": shuffled(), "upper_loader": shuffled(6)}])
    refused_resume(
        tmp_path, {"mode": "two_batch"}, {"mode": "two_batch"},
        r"was written with upper_loader=False, this call has upper_loader=True",
        make_data=lambda: next(datas),
    )  # fmt: skip


def _refused_after_interruption(tmp_path: Path, first: Data, second: Data, match: str, stop_at: int) -> None:
    """Interrupt at the ``stop_at``-th loss (checkpoints every 2 steps), resume with ``second``: refused."""
    path = tmp_path / "bip.pt"
    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        torchbip.global_prune(
            model, 0.8, **first, loss_fn=StopAt(stop_at), checkpoint_path=str(path), checkpoint_every=2,
            **OPTIONS,
        )  # fmt: skip
    before = capture(model)
    with pytest.raises(ValueError, match=match):
        torchbip.global_prune(model, 0.8, **second, checkpoint_path=str(path), resume=True, **OPTIONS)
    assert_unchanged(before, model)


class PythonShuffled:
    """A re-iterable loader whose order comes from Python's ``random`` (not seen by torchbip)."""

    def __init__(self, seed: int, labels: Tensor = Y) -> None:
        self.rng, self.labels = random.Random(seed), labels

    def __len__(self) -> int:
        return 6

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = list(range(96))
        self.rng.shuffle(order)
        for i in range(0, 96, 16):
            idx = torch.tensor(order[i : i + 16])
            yield X[idx], self.labels[idx]


def test_order_from_an_rng_torchbip_cannot_see(tmp_path: Path) -> None:
    """Recreated with the same seed, it shuffles once at construction: the replay gets the 2nd order."""
    _refused_after_interruption(
        tmp_path, {"loader": PythonShuffled(0)}, {"loader": PythonShuffled(0)},
        r"after batch 4 of epoch 0 of loader, and loader now yields another batch there", stop_at=5,
    )  # fmt: skip


def test_other_data(tmp_path: Path) -> None:
    _refused_after_interruption(
        tmp_path, {"loader": shuffled()},
        {"loader": DataLoader(TensorDataset(X, (Y + 1) % 3), 16, shuffle=True, generator=torch.Generator())},
        r"after batch 2 of epoch 1 of loader, and loader now yields another batch there \(other targets\)",
        stop_at=9,
    )  # fmt: skip


def test_one_shot_iterator_passed_on_from_where_it_stopped(tmp_path: Path) -> None:
    stream = iter(BATCHES)
    path = tmp_path / "bip.pt"
    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        torchbip.global_prune(
            model, 0.8, stream, loss_fn=StopAt(5), checkpoint_path=str(path), checkpoint_every=2, **OPTIONS
        )
    before = capture(model)
    with pytest.raises(
        ValueError, match=r"after batch 4 of epoch 0 of loader, and loader now yields another"
    ):
        torchbip.global_prune(model, 0.8, stream, checkpoint_path=str(path), resume=True, **OPTIONS)
    assert_unchanged(before, model)


def test_one_shot_iterator_shorter_than_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "bip.pt"
    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        torchbip.global_prune(
            model,
            0.8,
            iter(BATCHES),
            loss_fn=StopAt(8),
            checkpoint_path=str(path),
            checkpoint_every=3,
            **OPTIONS,
        )
    before = capture(model)
    with pytest.raises(
        ValueError, match=r"after batch 6 of epoch 0 of loader, but loader ends after 3 batches"
    ):
        torchbip.global_prune(
            model, 0.8, iter(BATCHES[:3]), checkpoint_path=str(path), resume=True, **OPTIONS
        )
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda s: s.update(format="torchbip.bip-loop/1") or s.pop("run"),
            r"written by another torchbip version \(checkpoint format 'torchbip\.bip-loop/1'; this version "
            r"reads 'torchbip\.bip-loop/3'",
        ),
        (lambda s: s.pop("run"), r"has no run description"),
        (
            lambda s: s.clear() or s.update(weights=torch.zeros(1)),
            r"is not a torchbip BiP checkpoint \(format None",
        ),
    ],
    ids=["old-format", "no-run-description", "foreign-dict"],
)
def test_checkpoint_of_another_format(tmp_path: Path, edit: Callable[[dict], Any], match: str) -> None:
    refused_resume(tmp_path, {}, {}, match, edit=edit)


def _long_momentum(state: dict[str, Any]) -> None:
    """One bias's momentum one entry longer (torch's fused step reads it without a check)."""
    entries = state["lower_opt"]["state"]
    key = next(k for k in entries if entries[k]["momentum_buffer"].dim() == 1)
    entries[key]["momentum_buffer"] = torch.zeros(entries[key]["momentum_buffer"].numel() + 1)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_long_momentum, r"checkpoint_path=.*weight optimizer's state: momentum_buffer of parameter \d+ "
                         r"has shape \(\d+,\), expected"),
        (lambda s: s["lower_opt"]["param_groups"][0].update(lr=float("nan")),
         r"checkpoint_path=.*weight optimizer's state: lr=nan of parameter group 0 is not finite"),
        (lambda s: s["lower_opt"]["param_groups"].append({"params": []}),
         r"checkpoint_path=.*weight optimizer's state has 3 parameter groups, expected 2"),
    ],
    ids=["momentum-shape", "lr-nan", "groups"],
)  # fmt: skip
def test_a_damaged_weight_optimizer_state_is_refused(
    tmp_path: Path, edit: Callable[[dict], Any], match: str
) -> None:
    refused_resume(tmp_path, {}, {}, match, edit=edit)


# -- checkpoint_path that no checkpoint could be saved to ------------------------------------


def assert_refused_before_any_work(path: str | Path, match: str) -> None:
    """global_prune refuses ``checkpoint_path=path`` before its first step, the model unchanged."""
    model = make_model()
    before = capture(model)
    calls = StopAt(0)
    with pytest.raises(ValueError, match=match):
        torchbip.global_prune(model, 0.8, shuffled(), loss_fn=calls, checkpoint_path=path, **OPTIONS)
    assert calls.calls == 0
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    ("make_path", "match"),
    [
        (lambda tmp: str(tmp), r"is a directory; pass a file path such as '.*bip\.ckpt'"),
        (lambda tmp: str(tmp / "new") + os.sep, r"/new/' is a directory"),
        (lambda tmp: str(tmp / "file.txt" / "bip.pt"), r"cannot be created: '.*file\.txt' is a file"),
        (lambda tmp: str(tmp / "file.txt" / "sub" / "bip.pt"), r"cannot be created: '.*file\.txt' is a file"),
    ],
    ids=["existing-directory", "trailing-separator", "parent-is-a-file", "ancestor-is-a-file"],
)
def test_unusable_checkpoint_path(tmp_path: Path, make_path: Callable[[Path], str], match: str) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    path = make_path(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        check_checkpoint_path(path)
    assert str(info.value).startswith(f"checkpoint_path={path!r} ")
    # global_prune refuses it before its first step
    assert_refused_before_any_work(path, match)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("path", r"' is a FIFO \(named pipe\), not a regular file; a checkpoint replaces"),
        ("link", r"' is a FIFO \(named pipe\), not a regular file; a checkpoint replaces"),
        ("scratch", r"\.tmp', where a checkpoint is written .* is a FIFO \(named pipe\)"),
    ],
    ids=["fifo", "link-to-fifo", "fifo-at-the-temporary-file"],
)
def test_checkpoint_path_that_is_not_a_regular_file(tmp_path: Path, where: str, match: str) -> None:
    """A special file at checkpoint_path (or where the save writes first) is refused before any
    work and left as it was; a save would have replaced it with a regular file (or blocked)."""
    fifo = tmp_path / ("bip.ckpt.tmp" if where == "scratch" else "pipe")
    os.mkfifo(fifo)
    path = tmp_path / "bip.ckpt" if where != "path" else fifo
    if where == "link":
        path.symlink_to(fifo)
    with pytest.raises(ValueError, match=match) as info:
        check_checkpoint_path(str(path))
    assert str(info.value).startswith(f"checkpoint_path={str(path)!r}")
    assert_refused_before_any_work(path, match)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    left = {fifo.name, path.name} if where == "link" else {fifo.name}  # nothing written
    assert {p.name for p in tmp_path.iterdir()} == left


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_save_leaves_a_special_file_that_appeared_during_the_run(tmp_path: Path) -> None:
    path = tmp_path / "bip.ckpt"
    os.mkfifo(path)
    with pytest.raises(OSError, match=r"was not written: '.*bip\.ckpt' is a FIFO") as info:
        save_checkpoint({"step": 3}, path)
    assert info.value.errno == errno.EINVAL
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["bip.ckpt"]


def test_empty_checkpoint_path() -> None:
    with pytest.raises(ValueError, match=r"checkpoint_path='' is empty"):
        check_checkpoint_path("")
    model = make_model()
    before = capture(model)
    with pytest.raises(ValueError, match=r"checkpoint_path='' is empty"):
        torchbip.global_prune(model, 0.8, shuffled(), checkpoint_path="", **OPTIONS)
    assert_unchanged(before, model)


def test_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # simulated: os.access says no (a real chmod does not stop root)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(ValueError, match=r"cannot be written: the directory '.*' is read-only"):
        check_checkpoint_path(str(tmp_path / "sub" / "bip.pt"))


def test_usable_checkpoint_paths_create_nothing(tmp_path: Path) -> None:
    for path in (tmp_path / "bip.pt", tmp_path / "a" / "b" / "bip.pt", Path("relative.pt")):
        check_checkpoint_path(str(path))
        check_checkpoint_path(path)
    assert list(tmp_path.iterdir()) == []
    assert not Path("relative.pt").exists()


# -- a save that fails (a full disk) -----------------------------------------------------------


def failing_save(error: BaseException, fail_on: int = 1, written: int = 64) -> Callable[..., None]:
    """A ``torch.save`` whose ``fail_on``-th call writes ``written`` bytes, then raises ``error``."""
    real = torch.save
    calls = {"n": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] < fail_on:
            return real(obj, f, *args, **kwargs)
        if hasattr(f, "write"):
            f.write(b"\0" * written)
        else:
            Path(f).write_bytes(b"\0" * written)
        raise error

    return save


TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
OS_FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error", [TORCH_FULL, OS_FULL], ids=["torch-enforce-fail", "enospc"])
def test_failed_periodic_save_raises_and_restores_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    path = tmp_path / "bip.pt"
    model = make_model()
    before = capture(model)
    monkeypatch.setattr(torch, "save", failing_save(error))
    with pytest.raises(OSError, match=r"could not be written") as info:
        torchbip.global_prune(
            model, 0.8, shuffled(), checkpoint_path=str(path), checkpoint_every=2, **OPTIONS
        )
    message = str(info.value)
    assert f"checkpoint_path={str(path)!r}" in message
    assert "the checkpoint of step 2" in message
    assert str(error) in message
    assert "the disk or quota is probably full; no file was written" in message
    assert isinstance(info.value.__cause__, type(error))
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary file
    assert_unchanged(before, model)


def test_failed_final_save_warns_and_returns_the_pruned_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = lambda: {"loader": shuffled()}  # noqa: E731
    want, _ = reference(make)
    path = tmp_path / "bip.pt"
    model = make_model()
    monkeypatch.setattr(torch, "save", failing_save(OS_FULL))
    with pytest.warns(RuntimeWarning, match=r"checkpoint_path='.*bip\.pt'.*step 10.*No space left on device"):
        report = torchbip.global_prune(model, 0.8, **make(), checkpoint_path=str(path), **OPTIONS)
    assert_same_run(outcome(model, report), want)
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bip.pt"
    save_checkpoint({"step": 1, "x": torch.ones(3)}, path)
    data = path.read_bytes()
    monkeypatch.setattr(torch, "save", failing_save(OS_FULL))
    with pytest.raises(
        OSError, match=r"step 2 could not be written.*earlier checkpoint in that file is unchanged"
    ):
        save_checkpoint({"step": 2, "x": torch.zeros(3)}, path)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bip.pt"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))


@pytest.mark.parametrize("error", [OS_FULL, KeyboardInterrupt()], ids=["enospc", "interrupt"])
def test_failed_first_save_removes_the_directories_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    (tmp_path / "kept").mkdir()  # an existing directory stays
    path = tmp_path / "kept" / "runs" / "a" / "bip.pt"
    model = make_model()
    before = capture(model)
    monkeypatch.setattr(torch, "save", failing_save(error))
    with pytest.raises(type(error)):
        torchbip.global_prune(
            model, 0.8, shuffled(), checkpoint_path=str(path), checkpoint_every=2, **OPTIONS
        )
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["kept"]
    assert_unchanged(before, model)


def test_save_checkpoint_keeps_the_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", failing_save(OS_FULL))
    with pytest.raises(OSError, match=r"the checkpoint of step 3 could not be written") as info:
        save_checkpoint({"step": 3}, tmp_path / "bip.pt")
    assert info.value.errno == errno.ENOSPC


def test_interrupted_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", failing_save(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 3}, tmp_path / "bip.pt")
    assert list(tmp_path.iterdir()) == []
