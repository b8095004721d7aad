"""The same ``seed`` gives bitwise-identical masks and weights on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import torchbip


@pytest.fixture(params=[1, None], ids=["1-thread", "default-threads"])
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    threads = torch.get_num_threads()
    if request.param is not None:
        torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(threads)


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.3),  # draws from the RNG at every step
            nn.Linear(4 * 6 * 6, 3),
        )


def make_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=gen)
    y = x.flatten(1)[:, :3].argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # order from the global RNG


def run(seed: int, mode: str, caller_seed: int = 1234) -> dict[str, Tensor]:
    model = make_model()
    torch.manual_seed(caller_seed)  # the caller's RNG state: ``seed`` alone must decide
    torchbip.global_prune(
        model, 0.7, make_loader(), steps=6, mode=mode, seed=seed, progress=False, lower_lr=0.05, upper_lr=1.0
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.usefixtures("_threads")
@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_same_seed_same_masks_and_weights(mode: str) -> None:
    first, second = run(0, mode), run(0, mode, caller_seed=99)
    assert list(first) == list(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_the_seed_matters() -> None:
    """With dropout and a shuffling loader, another seed gives other weights (the test has teeth)."""
    first, other = run(0, "fused"), run(1, "fused")
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith("_orig"))


def test_the_seed_does_not_consume_the_callers_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    torchbip.global_prune(make_model(), 0.5, make_loader(), steps=2, seed=0, progress=False)
    assert torch.equal(torch.rand(3), expected)


# -- the loaders' own generators ----------------------------------------------------------------


def generator_loader(kind: str, generator_seed: int) -> tuple[DataLoader, torch.Generator]:
    """The loader of :func:`make_loader`, its order drawn from a generator of the caller's."""
    g = torch.Generator().manual_seed(generator_seed)
    data = make_loader().dataset
    if kind == "dataloader":
        return DataLoader(data, batch_size=16, shuffle=True, generator=g), g
    return DataLoader(data, batch_size=16, sampler=RandomSampler(data, generator=g)), g


def run_on(loader: DataLoader, seed: int | None = 0, **options: Any) -> dict[str, Tensor]:
    model = make_model()
    torchbip.global_prune(
        model, 0.7, loader, steps=6, seed=seed, progress=False, lower_lr=0.05, upper_lr=1.0, **options
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["dataloader", "sampler"])
@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_a_seeded_run_leaves_the_loaders_generator_alone(kind: str, mode: str) -> None:
    """The generator is the caller's: it ends as it started, so a second run on the same loader
    (8 batches a run in two_batch mode: the order of a second epoch too) is the first again."""
    loader, g = generator_loader(kind, 5)
    before = g.get_state()
    first = run_on(loader, mode=mode)
    assert torch.equal(g.get_state(), before)
    second = run_on(loader, mode=mode)
    assert torch.equal(g.get_state(), before)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.usefixtures("one_thread")
def test_the_seed_alone_decides_a_generator_loaders_order() -> None:
    """Generators left in other states by the caller give the same run under one seed (as the
    global RNG's state does for a loader without a generator)."""
    first, second = run_on(generator_loader("dataloader", 5)[0]), run_on(generator_loader("dataloader", 6)[0])
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.usefixtures("one_thread")
def test_a_loader_and_upper_loader_sharing_a_generator_are_left_alone() -> None:
    g = torch.Generator().manual_seed(3)
    data = make_loader().dataset
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=g)
    upper = DataLoader(data, batch_size=8, shuffle=True, generator=g)
    before = g.get_state()
    first = run_on(loader, mode="two_batch", upper_loader=upper)
    assert torch.equal(g.get_state(), before)
    second = run_on(loader, mode="two_batch", upper_loader=upper)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_seeded_run_leaves_cudas_pending_seed_alone() -> None:
    """Before CUDA is initialised, ``torch.manual_seed`` queues a seed for it; a seeded run on the
    CPU must not replace the caller's queued seed with its own (torch keeps the queued call in
    ``torch.cuda._lazy_seed_tracker``, a private tracker with no public equivalent)."""
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if tracker is None or not hasattr(tracker, "manual_seed_all_cb") or torch.cuda.is_initialized():
        pytest.skip("needs torch's lazy CUDA seed tracker, with CUDA not initialised")
    model, loader = make_model(), make_loader()  # (make_model seeds torch: before the caller's seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # the caller's seed, CUDA's queued
        queued = tracker.manual_seed_all_cb
        torchbip.global_prune(model, 0.7, loader, steps=2, seed=5, progress=False)
        assert tracker.manual_seed_all_cb is queued
