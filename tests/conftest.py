"""Shared fixtures and hypothesis profiles.

Profiles: ``ci`` (the default: few examples, no deadline) and ``dev`` (many examples); pick one
with the ``HYPOTHESIS_PROFILE`` environment variable, e.g. ``HYPOTHESIS_PROFILE=dev pytest``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SEED = 0


@pytest.fixture
def seed() -> Iterator[int]:
    """Seed Python's and torch's RNGs for one test, restoring the torch RNG state afterwards."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(SEED)
        torch.manual_seed(SEED)
        yield SEED
    random.setstate(state)


@pytest.fixture
def device() -> torch.device:
    """The device named by ``TORCH_DEVICE`` (default ``cpu``); skips when it is not available."""
    name = os.environ.get("TORCH_DEVICE", "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"TORCH_DEVICE={name} but CUDA is not available")
    return dev


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (restored afterwards): faster for tiny models, and float
    reductions come out the same on every machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
