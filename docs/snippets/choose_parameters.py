"""Choose what to prune with ``parameters=``; per-layer floors: min_keep."""

import math

import torch
from torch import nn
from torch.nn.utils import prune

import torchbip

torch.manual_seed(0)
x = torch.randn(256, 20)
y = (x[:, :4].sum(1) > 0).long()
loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(20, 64)
        self.blocks = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()
        )
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))))


run = {"steps": 16, "progress": False, "seed": 0}

# 1. The default: the weight of every nn.Linear and nn.Conv1d/2d/3d,
#    ranked globally against one threshold.
model = Net()
report = torchbip.global_prune(model, 0.9, loader, **run)
print(sorted(report.sparsity.tensors))
# ['blocks.0.weight', 'blocks.2.weight', 'head.weight', 'stem.weight']

# 2. Only some tensors: (module, name) pairs, as for torch's
#    prune.global_unstructured. Here the first and last layers stay dense.
model = Net()
hidden = [(m, "weight") for m in model.blocks if isinstance(m, nn.Linear)]
report = torchbip.global_prune(model, 0.9, loader, parameters=hidden, **run)
print(sorted(report.sparsity.tensors))
# ['blocks.0.weight', 'blocks.2.weight']
assert not hasattr(model.stem, "weight_mask")  # dense, but still trained

# 3. Any floating-point Parameter can be chosen: here the biases too.
model = Net()
pairs = [
    (m, name)
    for m in model.modules()
    if isinstance(m, nn.Linear)
    for name in ("weight", "bias")
]
report = torchbip.global_prune(model, 0.5, loader, parameters=pairs, **run)
print(report.sparsity.tensors["head.bias"])

# 4. A per-layer floor: without one, the global ranking may prune a small
#    layer (nearly) away. min_keep=0.01 keeps at least 1% of each tensor.
model = Net()
report = torchbip.global_prune(model, 0.95, loader, min_keep=0.01, **run)
for name, t in report.sparsity.tensors.items():
    print(f"{name}: {t.numel - t.zeros} of {t.numel} kept")
    assert t.numel - t.zeros >= math.ceil(0.01 * t.numel)

# 5. A float min_keep is a fraction of the whole tensor, also of a tensor
#    pruned before (amount counts its remaining entries; the floor does not).
model = Net()
prune.l1_unstructured(model.blocks[0], "weight", amount=0.9)  # 410 of 4096 left
report = torchbip.global_prune(model, 0.9, loader, min_keep=0.05, **run)
kept = report.sparsity.tensors["blocks.0.weight"]
print(f"blocks.0.weight: {kept.numel - kept.zeros} of {kept.numel} kept")
# blocks.0.weight: 205 of 4096 kept (the floor: the ranking wants fewer)
assert kept.numel - kept.zeros >= math.ceil(0.05 * 4096)  # 205, not 0.05 * 410
