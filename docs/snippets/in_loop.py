"""BiP inside your own training loop: construct, step() after the optimiser, finish()."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

import torchbip
from torchbip.datasets import load_mnist

torch.manual_seed(0)
train_set = load_mnist(split="train", per_class=100)
loader = DataLoader(train_set, batch_size=50, shuffle=True)
model = nn.Sequential(
    nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10)
)
epochs = 2

# 1. Construct: both weights are now in torch's pruned form, at 90%.
pruner = torchbip.BiP(model, amount=0.9, steps=epochs * len(loader))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
scaler = torch.amp.GradScaler("cpu", enabled=False)  # True for float16

for _ in range(epochs):
    for x, y in loader:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(optimizer)
        pruner.step(scaler=scaler)  # 2. after the optimiser's step
        scaler.update()

report = pruner.finish()  # 3. torch's pruned form, scores dropped
print(report.global_sparsity)
for module in (model[1], model[3]):
    prune.remove(module, "weight")  # permanent zeros, plain weights
