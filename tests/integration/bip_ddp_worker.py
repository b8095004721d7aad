"""A user's DDP training loop with ``torchbip.BiP``, launched by ``torchrun`` from ``test_bip_in_loop.py``.

Every rank builds the model (rank 1 from other weights: BiP starts every rank from rank 0's),
builds the BiP object, wraps the model in ``DistributedDataParallel`` and trains on its shard of
each batch. Rank ``r`` saves its model state and scores to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from process_group import run_then_destroy
from test_bip_in_loop import STEPS, make_model, make_sgd, train_on_shards
from torch.nn.parallel import DistributedDataParallel

import torchbip


def main(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(seed=rank, dtype=torch.float64)  # rank 1 differs until BiP broadcasts
    group = dist.distributed_c10d._get_default_group()
    refs = sys.getrefcount(group)
    pruner = torchbip.BiP(model, 0.8, steps=STEPS)
    held = sys.getrefcount(group) - refs  # BiP looks the default group up at every use
    ddp = DistributedDataParallel(model)
    train_on_shards(ddp, pruner, make_sgd(ddp.parameters()), rank, world)
    scores = pruner.flat_scores.clone()
    pruner.finish()
    torch.save({"model": model.state_dict(), "scores": scores, "held": held}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_then_destroy(lambda: main(sys.argv[1]))
