"""BiP against torchbip.baselines, at one sparsity, from one dense model."""

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

import torchbip
from torchbip.baselines import (
    imp,
    omp_finetune,
    random_finetune,
    score_prune,
    train,
)
from torchbip.datasets import load_mnist

torch.manual_seed(0)
train_set = load_mnist(split="train", per_class=200)
loader = DataLoader(train_set, batch_size=64, shuffle=True)
test_images, test_labels = load_mnist(split="test", per_class=100).tensors


def accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(test_images).argmax(1)
    return (predictions == test_labels).float().mean().item()


init = nn.Sequential(
    nn.Flatten(),
    nn.Linear(784, 300),
    nn.ReLU(),
    nn.Linear(300, 100),
    nn.ReLU(),
    nn.Linear(100, 10),
)
dense = copy.deepcopy(init)
train(dense, loader, epochs=2, lr=0.1)
print(f"dense: {accuracy(dense):.2%}")

# The same sparsity and the same pruning budget (epochs) for every method. By
# default the baselines train the weights as BiP's lower level does (SGD at
# BiPConfig().lower_lr, momentum and weight decay gamma, cosine schedule).
amount, epochs = 0.9, 2
bip = {"epochs": epochs, "progress": False}
runs = {
    "bip": lambda m: torchbip.global_prune(m, amount, loader, **bip),
    "bip, implicit_coef=0": lambda m: score_prune(m, amount, loader, **bip),
    "omp + fine-tune": lambda m: omp_finetune(m, amount, loader, epochs),
    "random + fine-tune": lambda m: random_finetune(m, amount, loader, epochs),
}
for name, prune_fn in runs.items():
    model = copy.deepcopy(dense)
    prune_fn(model)
    sparsity = torchbip.sparsity_report(model).global_sparsity
    print(f"{name}: {accuracy(model):.2%} at {sparsity:.0%}")

# IMP starts from the initialisation: each round trains (as the dense model
# did, at lr=0.1), prunes 20% of the remaining weights by magnitude and
# rewinds the weights to the initialisation (about ten rounds to reach 90%).
model = copy.deepcopy(init)
result = imp(model, amount, loader, epochs_per_round=1, rate=0.2, lr=0.1)
sparsity = result.rounds[-1].sparsity
print(f"imp: {accuracy(model):.2%} at {sparsity:.0%}")
