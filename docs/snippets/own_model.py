"""Your own model: a CNN with BatchNorm, a custom loss, a config, save/load."""

import io

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

import torchbip
from torchbip.baselines import train
from torchbip.datasets import load_mnist

torch.manual_seed(0)
train_set = load_mnist(split="train", per_class=100)
train_loader = DataLoader(train_set, batch_size=50, shuffle=True)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


model = make_model()
train(model, train_loader, epochs=3, lr=0.1)


# Any loss_fn(outputs, targets) -> scalar tensor works; the targets of
# each batch are passed to it untouched.
def smoothed_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


# Settings in one object, validated when it is built, reusable across
# runs and storable as a dict (config.to_dict()).
config = torchbip.BiPConfig(
    epochs=2, lower_lr=0.02, min_keep=0.02, seed=0, progress=False
)
report = torchbip.global_prune(
    model, 0.8, train_loader, loss_fn=smoothed_ce, config=config
)
print(report)  # two conv weights and one linear weight, ranked together

# Keyword arguments override single fields of a config:
#   torchbip.global_prune(model, 0.8, loader, config=config, lower_lr=0.05)

# Save while still pruned: the state_dict has weight_orig and weight_mask.
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
buffer.seek(0)

# Load into a fresh model: give it the same pruned form first
# (prune.identity on the same tensors), then load strictly.
fresh = make_model()
for fqn in report.sparsity.tensors:
    module_name, _, tensor_name = fqn.rpartition(".")
    prune.identity(fresh.get_submodule(module_name), tensor_name)
state = torch.load(buffer, weights_only=True)
fresh.load_state_dict(state, strict=True)

x = next(iter(train_loader))[0]
model.eval()
fresh.eval()
with torch.no_grad():
    assert torch.equal(model(x), fresh(x))
print(torchbip.sparsity_report(fresh).to_markdown())
