"""export_slim must only refuse channel removal for ties that the removal would actually untie.

A tensor that Torch-Pruning never slices (a one-slope PReLU's weight, a 0-d buffer) stays tied
whatever channels go; the layers holding it must not keep their zero channels.
Oracle: the channels removed by the pre-change export (4 of 8) and the masked model's outputs.
"""

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from torchbip.export import SlimExportWarning, export_slim
from torchbip.structured import bip_structured


class SharedSlope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.PReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.PReLU()
        self.act2.weight = self.act1.weight  # one slope, shared: never sliced
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act2(self.c2(self.act1(self.c1(x)))))


class SharedCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.d = nn.Linear(8, 3)
        self.bn2 = nn.BatchNorm1d(3)
        self.bn2.num_batches_tracked = self.bn.num_batches_tracked  # a shared 0-d buffer

    def forward(self, x):
        return self.bn2(self.d(torch.relu(self.bn(self.a(x)))))


def test_shared_scalar_prelu_slope_does_not_block_removal():
    torch.manual_seed(0)
    net = SharedSlope().eval()
    x = torch.randn(4, 3, 8, 8)
    bip_structured(net.c2, "weight", 0.5, dim=1)  # 4 of c2's 8 input channels pruned
    expected = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimExportWarning)  # nothing is kept for a tie
        slim = export_slim(net, x).eval()
    assert slim.c1.out_channels == 4
    assert slim.c2.in_channels == 4
    assert slim.act1.weight is slim.act2.weight
    torch.testing.assert_close(slim(x), expected)


def test_shared_zero_dim_buffer_does_not_block_removal():
    torch.manual_seed(0)
    net = SharedCounter().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
    bip_structured(net.a, "weight", 0.5, dim=0)
    dead = net.a.weight_mask[:, 0] == 0
    with torch.no_grad():
        net.a.bias[dead] = 0
        net.bn.weight[dead] = 0
        net.bn.bias[dead] = 0
    x = torch.randn(4, 6)
    expected = net(x)
    slim = export_slim(net, x).eval()
    assert slim.a.out_features == 4
    assert slim.bn.num_batches_tracked is slim.bn2.num_batches_tracked
    torch.testing.assert_close(slim(x), expected)
