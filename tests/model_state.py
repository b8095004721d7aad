"""Snapshots of everything a pruning call could change in a model, to assert it changed nothing.

Used by the bad-input and failure tests (``tests/unit/test_bad_inputs.py``, ``test_errors.py``):
the model after a failed ``global_prune`` must hold the same parameter and buffer objects with
the same values and gradients, the same hooks, flags and training modes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = ["assert_unchanged", "capture"]


def _copy(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


def capture(model: nn.Module) -> dict[str, Any]:
    """Objects (ids) and copies of everything ``global_prune`` could change, per module."""
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules[name] = {
            "params": {
                k: (id(p), _copy(p), _copy(p.grad), p.requires_grad, type(p))
                for k, p in module._parameters.items()
                if p is not None
            },
            "buffers": {k: (id(b), _copy(b)) for k, b in module._buffers.items() if b is not None},
            "non_persistent": set(module._non_persistent_buffers_set),
            "pre_hooks": [(k, id(h)) for k, h in module._forward_pre_hooks.items()],
            "post_hooks": [(k, id(h)) for k, h in module._forward_hooks.items()],
            "containers": [
                [id(m) for m in h._pruning_methods] if isinstance(h, prune.PruningContainer) else None
                for h in module._forward_pre_hooks.values()
            ],
            "attrs": {k: (id(v), _copy(v)) for k, v in vars(module).items() if isinstance(v, Tensor)},
            "training": module.training,
        }
    return {"modules": modules, "state_dict": list(model.state_dict())}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device) and (
            a.is_meta or torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b if a is not None and b is not None else a is b


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    """Fail unless ``model`` is as :func:`capture` saw it (ids, values, hooks, flags)."""
    after = capture(model)
    assert after["state_dict"] == before["state_dict"]
    assert list(after["modules"]) == list(before["modules"])
    for name, old in before["modules"].items():
        new = after["modules"][name]
        for key in old:
            assert _same(new[key], old[key]), f"module {name!r}: {key} changed"
