"""Checkpoint/resume of the whole bi-level state, AMP and torch.compile of a pruned model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

import torchbip


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def make_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # 6 batches per epoch


class Interrupting:
    """Yields the loader's batches and raises KeyboardInterrupt at the ``stop_at``-th batch."""

    def __init__(self, loader: DataLoader, stop_at: int) -> None:
        self.loader, self.stop_at, self.count = loader, stop_at, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.loader:
            self.count += 1
            if self.count == self.stop_at:
                raise KeyboardInterrupt
            yield batch


OPTIONS = {"steps": 14, "seed": 3, "progress": False, "lower_lr": 0.05, "upper_lr": 1.0}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path: Path, mode: str) -> None:
    reference = make_model()
    torchbip.global_prune(reference, 0.8, make_loader(), mode=mode, **OPTIONS)

    model = make_model()
    before = state(model)
    path = tmp_path / "bip.pt"
    with pytest.raises(KeyboardInterrupt):
        torchbip.global_prune(
            model, 0.8, Interrupting(make_loader(), stop_at=11), mode=mode,
            checkpoint_path=str(path), checkpoint_every=4, **OPTIONS,
        )  # fmt: skip
    # the interrupted call left the model as it was, and a checkpoint on disk
    assert state(model).keys() == before.keys()
    assert all(torch.equal(state(model)[k], before[k]) for k in before)
    saved = torch.load(path, weights_only=True)
    assert saved["step"] in (4, 8)

    report = torchbip.global_prune(
        model, 0.8, make_loader(), mode=mode, checkpoint_path=path, resume=True, **OPTIONS
    )
    assert report.steps == 14
    got, want = state(model), state(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_checkpoint_of_a_finished_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    path = tmp_path / "done.pt"
    first = make_model()
    torchbip.global_prune(first, 0.5, make_loader(), checkpoint_path=str(path), **OPTIONS)
    again = make_model()
    torchbip.global_prune(again, 0.5, make_loader(), checkpoint_path=str(path), resume=True, **OPTIONS)
    for key, value in state(first).items():
        assert torch.equal(state(again)[key], value), key


def test_truncated_checkpoint_is_rejected_and_model_kept(tmp_path: Path) -> None:
    path = tmp_path / "bip.pt"
    torchbip.global_prune(make_model(), 0.5, make_loader(), checkpoint_path=str(path), **OPTIONS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = make_model()
    before = state(model)
    with pytest.raises(ValueError, match=r"checkpoint_path='.*bip.pt' cannot be read"):
        torchbip.global_prune(model, 0.5, make_loader(), checkpoint_path=str(path), resume=True, **OPTIONS)
    assert not prune.is_pruned(model)
    assert all(torch.equal(state(model)[k], v) for k, v in before.items())


def test_checkpoint_of_another_model_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bip.pt"
    torchbip.global_prune(make_model(), 0.5, make_loader(), checkpoint_path=str(path), **OPTIONS)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    match = (
        r"was written with parameters\[0\]='0.weight Tensor\[32, 8\] float32', "
        r"this call has parameters\[0\]='0.weight Tensor\[16, 8\] float32'"
    )
    with pytest.raises(ValueError, match=match):
        torchbip.global_prune(other, 0.5, make_loader(), checkpoint_path=str(path), resume=True, **OPTIONS)
    assert not prune.is_pruned(other)


def test_checkpoint_with_another_amount_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bip.pt"
    torchbip.global_prune(make_model(), 0.5, make_loader(), checkpoint_path=str(path), **OPTIONS)
    with pytest.raises(ValueError, match=r"was written with amount=0.5, this call has amount=0.7"):
        torchbip.global_prune(
            make_model(), 0.7, make_loader(), checkpoint_path=str(path), resume=True, **OPTIONS
        )


def test_resume_without_checkpoint_path_is_an_error() -> None:
    with pytest.raises(ValueError, match="resume=True needs checkpoint_path"):
        torchbip.global_prune(make_model(), 0.5, make_loader(), resume=True, **OPTIONS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_runs_the_forward_in_low_precision(dtype: str) -> None:
    seen: list[torch.dtype] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(out.dtype)
        return nn.functional.cross_entropy(out.float(), y)

    model = make_model()
    report = torchbip.global_prune(model, 0.75, make_loader(), loss_fn=loss_fn, amp=dtype, **OPTIONS)
    assert set(seen) == {getattr(torch, dtype)}
    assert report.skipped_steps == 0
    assert report.global_sparsity == pytest.approx(0.75, abs=1e-3)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_overflow_lowers_the_loss_scale_and_skips_the_step() -> None:
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out.float(), y)
        # the first call overflows float16 gradients at the default scale 2**16
        return loss * (1e6 if calls["n"] == 1 else 1.0)

    model = make_model()
    report = torchbip.global_prune(model, 0.5, make_loader(), loss_fn=loss_fn, amp="float16", **OPTIONS)
    assert report.skipped_steps == 1
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_overflow_even_at_a_loss_scale_of_one_is_an_error_that_names_bfloat16() -> None:
    """Halving reaches a scale of exactly 1: its overflow is the one without scaling, and the run
    stops with the advice to use bfloat16 (it used to skip the check at a scale of 1)."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.float(), y) * 1e9  # overflows float16 at any scale

    with pytest.raises(FloatingPointError, match=r"even without loss scaling; use amp='bfloat16'"):
        torchbip.global_prune(
            model, 0.5, make_loader(), loss_fn=loss_fn, amp="float16", **{**OPTIONS, "steps": 40}
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_compiled_pruned_model_matches_eager() -> None:
    model = make_model()
    torchbip.global_prune(model, 0.8, make_loader(), **OPTIONS)
    model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_float16_loss_scale_counts_good_steps_not_passes(tmp_path: Path, mode: str) -> None:
    """The scale grows after 2000 good *steps*: a two-batch step (two passes) counts once."""
    path = tmp_path / "run.pt"
    torchbip.global_prune(
        make_model(), 0.5, make_loader(), amp="float16", mode=mode, checkpoint_path=str(path), **OPTIONS
    )
    saved = torch.load(path, weights_only=True)
    assert saved["skipped_steps"] == 0
    assert saved["good_steps"] == OPTIONS["steps"]
    assert saved["loss_scale"] == 2.0**16
