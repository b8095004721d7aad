"""Structured BiP (whole filters), a slim export, and an N:M (2:4) mask."""

import io

import torch
from torch import nn
from torch.utils.data import DataLoader

import torchbip
from torchbip.datasets import load_mnist

torch.manual_seed(0)
train_set = load_mnist(split="train", per_class=50)
loader = DataLoader(train_set, batch_size=50, shuffle=True)


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# 1. One learned score per output filter; amount counts filters. By
#    default every layer but the last is pruned, half of each layer's
#    filters (budget="layer"; budget="global" ranks all filters together).
model = make_cnn()
report = torchbip.global_prune(
    model, 0.5, loader, structured="filter", epochs=1, progress=False
)
print(report.sparsity.to_markdown())

# 2. A slim copy: the zeroed filters are removed, with the BatchNorm
#    channels and the next layer's input channels that depend on them.
#    The outputs are checked against the masked model (eval mode).
example = train_set.tensors[0][:16]
slim = torchbip.export_slim(model, example)
print(slim[0].out_channels, slim[4].in_channels, slim[4].out_channels)
model.eval()
slim.eval()
with torch.no_grad():
    torch.testing.assert_close(slim(example), model(example))

# Save the slim state dict; to load it, build the original architecture
# and let load_slim_state_dict resize each layer to the saved shapes.
buffer = io.BytesIO()
torch.save(slim.state_dict(), buffer)
buffer.seek(0)
state = torch.load(buffer, weights_only=True)
rebuilt = torchbip.load_slim_state_dict(make_cnn(), state).eval()
with torch.no_grad():
    assert torch.equal(rebuilt(example), slim(example))

# 3. N:M sparsity: the top 2 of every 4 consecutive input weights. The
#    sparsity is 1 - n/m by construction, so amount must be 0.5.
mlp = nn.Sequential(
    nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)
)
report = torchbip.global_prune(
    mlp, 0.5, loader, structured="2:4", epochs=1, progress=False
)
blocks = mlp[1].weight_mask.view(256, -1, 4).sum(-1)
assert (blocks == 2).all()
print(f"{report.global_sparsity:.0%}")
