"""A user's FSDP2 training loop with ``torchbip.BiP``, launched by ``torchrun`` from ``test_bip_in_loop.py``.

Every rank builds the model (rank 1 from other weights: BiP starts every rank from rank 0's),
builds the BiP object on the whole model, shards it with ``fully_shard`` (each ``nn.Linear``,
then the root), builds the optimizer on the shards and trains on its part of each batch. Rank
``r`` saves the whole model state (shards gathered), the scores and the pruner's own view of its
shards to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from process_group import run_then_destroy
from test_bip_in_loop import STEPS, make_batches, make_model, make_sgd, train_on_shards
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import torchbip


def main(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(seed=rank, dtype=torch.float64)  # rank 1 differs until BiP broadcasts
    pruner = torchbip.BiP(model, 0.8, steps=STEPS)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    sharded = [type(layer.weight_orig).__name__ for layer in model if isinstance(layer, nn.Linear)]
    train_on_shards(model, pruner, make_sgd(model.parameters()), rank, world)
    scores = pruner.flat_scores.clone()
    state = pruner.state_dict()
    pruner.finish()
    whole = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    x, _ = make_batches(1, dtype=torch.float64)[0]
    with torch.no_grad():
        output = model(x)
    torch.save(
        {"model": whole, "scores": scores, "sharded": sharded, "state": state, "output": output},
        f"{out}/rank{rank}.pt",
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_then_destroy(lambda: main(sys.argv[1]))
    # fully_shard keeps a reference to the group that destroy_process_group() does not drop
    # (torch 2.14), so the group would be destroyed during interpreter teardown, where gloo now
    # and then aborts the process: leave without the teardown
    sys.stdout.flush()
    os._exit(0)
