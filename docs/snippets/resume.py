"""Checkpoint a BiP run, interrupt it, and resume it to the same result."""

import torch
from torch import nn
from torch.utils.data import DataLoader

import torchbip
from torchbip.datasets import load_mnist

train_set = load_mnist(split="train", per_class=50)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def make_loader() -> DataLoader:
    return DataLoader(train_set, batch_size=25, shuffle=True)


class StopsAt:
    """A loader that raises KeyboardInterrupt at its n-th batch (a Ctrl-C)."""

    def __init__(self, loader: DataLoader, n: int) -> None:
        self.loader, self.n, self.count = loader, n, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.count += 1
            if self.count == self.n:
                raise KeyboardInterrupt
            yield batch


run = {"epochs": 2, "seed": 0, "progress": False}

# The reference: one uninterrupted run.
reference = make_model()
torchbip.global_prune(reference, 0.9, make_loader(), **run)

# The same run, saving its whole state every 10 steps, stopped at step 25.
model = make_model()
try:
    torchbip.global_prune(
        model, 0.9, StopsAt(make_loader(), 26),
        checkpoint_path="bip.ckpt", checkpoint_every=10, **run,
    )  # fmt: skip
except KeyboardInterrupt:
    print("interrupted; the model is as it was before the call")

# Same call, same arguments, plus resume=True: continues from step 20.
report = torchbip.global_prune(
    model, 0.9, make_loader(), checkpoint_path="bip.ckpt", resume=True, **run
)
print(report.steps, "steps")
state, want = model.state_dict(), reference.state_dict()
assert all(torch.equal(state[k], want[k]) for k in want)
print("identical to the uninterrupted run")
