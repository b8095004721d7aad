"""Run a distributed test worker so that its process group is freed where it is destroyed.

Objects of the worker's run (a DDP or FSDP model, a BiP object, reference cycles among them)
hold the process group; if one of them is still alive, ``destroy_process_group()`` does not free
the group, which is then destroyed during interpreter teardown, where gloo now and then aborts
the process ("terminate called without an active exception") after all the work is done.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def run_then_destroy(work: Callable[[], T]) -> T:
    """``work()``; then, with its objects gone, destroy the default process group.

    After a ``work()`` that returns, a barrier first: every rank is done with its collectives
    before any tears the group down (after a failure, the other ranks may never arrive).
    """
    try:
        result = work()
        dist.barrier()
        return result
    finally:
        gc.collect()  # the run's objects, reference cycles included, release the group
        dist.destroy_process_group()
