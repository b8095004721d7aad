"""Coupled's trial removal must not keep one deep copy of the model alive per bisection level.

Oracle: at most two copies of the user's model (the twin and the copy being traced) may be
alive at any graph build of find_groups.
"""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

import torchbip.coupled as coupled


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.register_buffer("scale", torch.ones(1, c, 1, 1))  # per channel, invisible to the graph

    def forward(self, x):
        return torch.relu(self.conv(x)) * self.scale


class Net(nn.Module):
    def __init__(self, n: int = 16, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.blocks = nn.Sequential(*[nn.Sequential(Block(c), nn.Conv2d(c, c, 1)) for _ in range(n)])
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def test_bisection_keeps_few_copies_alive(monkeypatch):
    alive: list[weakref.ref] = []
    peak = [0]
    real_deepcopy, real_build = copy.deepcopy, coupled.build_graph

    def tracking_deepcopy(obj, memo=None):
        out = real_deepcopy(obj, memo)
        if isinstance(obj, Net):
            alive.append(weakref.ref(out))
        return out

    def counting_build(tp, net, *args, **kwargs):
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return real_build(tp, net, *args, **kwargs)

    monkeypatch.setattr(coupled.copy, "deepcopy", tracking_deepcopy)
    monkeypatch.setattr(coupled, "build_graph", counting_build)
    torch.manual_seed(0)
    found = coupled.find_groups(Net(n=8), torch.randn(2, 3, 6, 6))
    assert any("fails once its channels are removed" in reason for _, reason in found.skipped)
    assert peak[0] <= 2, f"{peak[0]} copies of the model alive at once during the trial"
