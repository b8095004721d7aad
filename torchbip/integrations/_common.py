"""What the trainer callbacks share: checking BiP's settings early, and making pruning permanent."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch.nn.utils import prune

from torchbip.pruner import BiP

__all__ = ["check_settings", "remove_pruning"]

# Arguments of BiP that a callback sets itself.
_OWN = {"self", "model", "amount", "steps"}


def check_settings(owner: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check that every setting is a keyword argument of :class:`torchbip.BiP`.

    The values are checked when BiP is built (on the model); a misspelt name is an error at once.

    Raises:
        TypeError: naming the unknown argument.
    """
    known = [p for p in inspect.signature(BiP.__init__).parameters if p not in _OWN]
    for key in settings:
        if key not in known:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {key!r}; BiP's settings are {known}"
            )
    return dict(settings)


def remove_pruning(pruner: BiP) -> None:
    """:func:`torch.nn.utils.prune.remove` on every tensor the pruner pruned (after ``finish()``)."""
    for target in pruner.targets:
        prune.remove(target.module, target.name)
