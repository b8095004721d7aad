"""Data-parallel BiP: ``torchrun --nproc_per_node=2 distributed.py`` (CPU)."""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import torchbip
from torchbip.datasets import load_mnist

distributed = "RANK" in os.environ  # set by torchrun; without it: one process
if distributed:
    dist.init_process_group("gloo")  # "nccl" with one GPU per process
rank = dist.get_rank() if distributed else 0

# Each rank reads its own shard of the data. The sampler's epoch is set by
# global_prune at every pass, so the shuffle changes from pass to pass.
train_set = load_mnist(split="train", per_class=100)
sampler = DistributedSampler(train_set, seed=0) if distributed else None
loader = DataLoader(
    train_set, batch_size=32, sampler=sampler, shuffle=sampler is None
)

# The bare model, not a DistributedDataParallel wrapper: global_prune
# broadcasts rank 0's weights, then averages gradients, losses and
# floating-point buffers over the default process group at every step.
torch.manual_seed(rank)  # different on purpose: rank 0's weights win
model = nn.Sequential(
    nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10)
)
report = torchbip.global_prune(
    model, amount=0.9, loader=loader, seed=0, progress=rank == 0
)

# Every rank now holds the same masks and weights; save them once.
if rank == 0:
    print(report)
    torch.save(model.state_dict(), "pruned.pt")
if distributed:
    dist.destroy_process_group()
