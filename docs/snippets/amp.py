"""BiP with autocast (bfloat16), then a compiled pruned model for inference."""

import torch
from torch import nn
from torch.utils.data import DataLoader

import torchbip
from torchbip.datasets import load_mnist

torch.manual_seed(0)
train_set = load_mnist(split="train", per_class=100)
loader = DataLoader(train_set, batch_size=50, shuffle=True)
model = nn.Sequential(
    nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10)
)

# The forward pass runs under torch.autocast in bfloat16 (on a CPU or a
# GPU); weights, scores and optimiser states stay in float32.
# amp="float16" (GPUs) adds dynamic loss scaling: a step whose gradients
# overflow is skipped and counted in report.skipped_steps.
report = torchbip.global_prune(
    model, 0.9, loader, amp="bfloat16", seed=0, progress=False
)
print(report.global_sparsity, report.skipped_steps)
assert all(p.dtype == torch.float32 for p in model.parameters())

# The pruned model (hooks and all) works under torch.compile.
model.eval()
x = train_set.tensors[0][:8]
with torch.no_grad():
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")(x)
torch.testing.assert_close(compiled, eager)
