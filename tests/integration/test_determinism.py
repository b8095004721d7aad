"""The same ``seed`` gives bitwise-identical masks and weights on the CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

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
