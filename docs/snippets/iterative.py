"""Iterative pruning: BiP on top of torch's methods, in rounds, under them."""

import torch
from torch import nn
from torch.nn.utils import prune

import torchbip

torch.manual_seed(0)
x = torch.randn(512, 16)
y = (x[:, :3]).argmax(1)
loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
run = {"steps": 24, "progress": False, "seed": 0}


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 3),
    )


# 1. BiP on top of torch's pruning: earlier zeros stay, and `amount`
#    counts among the entries that remain.
model = make_model()  # 1024 + 4096 + 192 = 5312 weights
prune.l1_unstructured(model[0], "weight", amount=0.5)  # 512 of 1024
torchbip.global_prune(model, amount=0.5, loader=loader, **run)
print(torchbip.sparsity_report(model).zeros)  # 512 + 4800 / 2 = 2912
hook = next(iter(model[0]._forward_pre_hooks.values()))
print(type(hook).__name__, [type(m).__name__ for m in hook])
# BiPContainer ['L1Unstructured', 'BiPPruningMethod']: torch's PruningContainer
# with BiP's pre-hook

# 2. BiP in rounds: three rounds of 50% give 1 - 0.5**3 = 87.5% sparsity.
model = make_model()
for _ in range(3):
    torchbip.global_prune(model, amount=0.5, loader=loader, **run)
print(f"{torchbip.sparsity_report(model).global_sparsity:.3f}")  # 0.875
# One run to the final sparsity is usually as good, and cheaper:
#   torchbip.global_prune(model, amount=0.875, loader=loader, ...)

# 3. torch's methods on top of BiP, e.g. a structured pass over rows.
prune.ln_structured(model[2], "weight", amount=0.25, n=2, dim=0)
rows = int((model[2].weight_mask.sum(1) == 0).sum())
print(rows, "of 64 rows are now all zero")

# 4. Make it permanent: one prune.remove per tensor folds every stacked
#    mask into the weight.
for module in (model[0], model[2], model[4]):
    prune.remove(module, "weight")
assert not prune.is_pruned(model)
