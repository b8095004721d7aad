"""Quickstart: LeNet-300-100 on MNIST pruned to 90% with BiP (CPU, seconds)."""

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

import torchbip
from torchbip.baselines import train
from torchbip.datasets import load_mnist

torch.manual_seed(0)

# Data: the MNIST split in the repository, data/mnist.npz (nothing is downloaded),
# 300 training images per digit.
train_set = load_mnist(split="train", per_class=300)
train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
test_images, test_labels = load_mnist(split="test", per_class=100).tensors

# A dense model to start from: LeNet-300-100, trained for two epochs.
model = nn.Sequential(
    nn.Flatten(),
    nn.Linear(784, 300),
    nn.ReLU(),
    nn.Linear(300, 100),
    nn.ReLU(),
    nn.Linear(100, 10),
)
train(model, train_loader, epochs=2, lr=0.1)


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(test_images).argmax(1)
    return (predictions == test_labels).float().mean().item()


print(f"dense test accuracy: {accuracy(model):.2%}")

# BiP: prune 90% of the weights of every nn.Linear, ranked globally,
# while co-training the weights for two epochs.
report = torchbip.global_prune(
    model, amount=0.9, loader=train_loader, epochs=2, progress=False
)
print(report)

# The model is in torch's pruned form: weight_orig, weight_mask and a
# pruning hook on each pruned layer.
assert prune.is_pruned(model)
sparsity = report.global_sparsity
print(f"test accuracy at {sparsity:.0%} sparsity: {accuracy(model):.2%}")

# Make the pruning permanent: plain `weight` tensors with zeros in them,
# as after any torch pruning method.
for fqn in report.sparsity.tensors:  # "1.weight", "3.weight", "5.weight"
    module_name, _, tensor_name = fqn.rpartition(".")
    prune.remove(model.get_submodule(module_name), tensor_name)
assert not prune.is_pruned(model)
print(list(model.state_dict()))
