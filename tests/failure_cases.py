"""Models, data and the runner shared by ``tests/failure_modes/test_arguments.py`` and ``test_restore.py``.

:func:`raises_and_restores` calls ``global_prune``, expects an error and then checks with
:mod:`model_state` that the model is exactly as it was before the call.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip

__all__ = ["KINDS", "RUN", "make_data", "make_model", "raises_and_restores"]


def make_data(n_batches: int = 4, batch: int = 16, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """``n_batches`` batches of ``batch`` inputs of 8 features, labelled by the argmax of the first 3."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 8, generator=gen)
    y = x[:, :3].argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def make_model(kind: str) -> nn.Sequential:
    """A small classifier of 8 features into 3 classes, with gradients (so that they are checked too).

    ``two-layer``: Linear(8, 16), ReLU, Linear(16, 3).
    ``dense``: Linear(8, 16), ReLU, Linear(16, 16), ReLU, Linear(16, 3).
    ``l1-pruned``: ``dense`` after torch's L1 pruning of ``0.weight`` and twice of ``2.weight`` (a
    PruningContainer).
    ``bn``: Linear(8, 16), BatchNorm1d(16), ReLU, Linear(16, 3).
    """
    torch.manual_seed(0)
    if kind == "two-layer":
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    elif kind == "bn":
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    elif kind in ("dense", "l1-pruned"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if kind == "l1-pruned":
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.l1_unstructured(model[2], "weight", amount=10)
        prune.l1_unstructured(model[2], "weight", amount=0.25)  # a PruningContainer
    x, y = make_data()[0]
    F.cross_entropy(model(x), y).backward()
    model.train()
    return model


KINDS = [
    pytest.param("dense", id="dense"),
    pytest.param("l1-pruned", id="l1-pruned"),
    pytest.param("bn", id="bn"),
]

RUN: dict[str, Any] = {"steps": 6, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0}


def raises_and_restores(
    model: nn.Module, exc: type[BaseException], match: str, **kwargs: Any
) -> pytest.ExceptionInfo[BaseException]:
    """Call ``global_prune``, expect ``exc`` matching ``match``, then check the model is intact.

    The defaults are ``amount=0.5``, ``loader=make_data()`` and :data:`RUN`; ``kwargs`` override
    them. With a ``seed``, torch's global RNG state must be unchanged too.
    """
    kwargs = {"amount": 0.5, "loader": make_data(), **RUN, **kwargs}
    before = capture(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match) as info:
        torchbip.global_prune(model, **kwargs)
    assert_unchanged(before, model)
    if kwargs.get("seed") is not None:
        assert torch.equal(torch.get_rng_state(), rng)
    return info
