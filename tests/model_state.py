"""Snapshots of everything a pruning call could change in a model, to assert it changed nothing.

Used by the bad-argument and failure tests (``tests/failure_modes/test_arguments.py``,
``test_restore.py``, through ``tests/failure_cases.py``): the model after a failed ``global_prune``
must hold the same parameter and buffer objects with the same values and gradients, the same
hooks, flags and training modes.

:func:`capture_memory` / :func:`assert_same_memory` add the memory itself
(``tests/failure_modes/test_atomic_storage.py``): every parameter, gradient and buffer in the
same storage at the same offset with the same strides, shared or pinned memory as before, and
bitwise the same bytes (NaN payloads and ``-0.0`` included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = ["assert_same_memory", "assert_unchanged", "capture", "capture_memory"]


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


def _equal_with_nan(a: Tensor, b: Tensor) -> bool:
    """Exactly equal values, a NaN counting as equal to a NaN (a model may hold NaN on purpose)."""
    return (a.is_floating_point() or a.is_complex()) and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.layout != b.layout:
            return False
        if a.layout != torch.strided:  # sparse: compare the values (torch.equal has no sparse kernel)
            a, b = a.to_dense(), b.to_dense()
        return (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device) and (
            a.is_meta or torch.equal(a, b) or _equal_with_nan(a, b)
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


def _bits(t: Tensor) -> Tensor:
    """The raw bytes of ``t``'s values, for a bitwise comparison."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).clone() if flat.dtype != torch.bool else flat.clone()


def _memory(t: Tensor) -> dict[str, Any]:
    """Where ``t`` lives and what it holds."""
    if t.layout != torch.strided:  # sparse: no storage, compare the parts
        parts = (t.crow_indices(), t.col_indices(), t.values()) if t.layout == torch.sparse_csr else (t,)
        return {
            "id": id(t),
            "layout": t.layout,
            "shape": tuple(t.shape),
            "dtype": t.dtype,
            "bits": [_bits(x.to_dense() if x.is_sparse else x) for x in parts],
        }
    return {
        "id": id(t),
        "type": type(t),
        "storage": t.untyped_storage().data_ptr(),
        "nbytes": t.untyped_storage().nbytes(),
        "offset": t.storage_offset(),
        "shape": tuple(t.shape),
        "stride": t.stride(),
        "dtype": t.dtype,
        "device": t.device,
        "shared": t.is_shared(),
        "pinned": t.is_pinned(),
        "requires_grad": t.requires_grad,
        "bits": None if t.is_meta else _bits(t),
    }


def capture_memory(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The memory and bytes of every parameter, gradient and buffer, by fully qualified name."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        head = name + "." if name else ""
        for k, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            out[head + k] = _memory(t)
            if isinstance(t, nn.Parameter) and t.grad is not None:
                out[head + k + ".grad"] = _memory(t.grad)
    return out


def assert_same_memory(before: dict[str, dict[str, Any]], model: nn.Module) -> None:
    """Fail unless every tensor of ``model`` is in the memory :func:`capture_memory` saw, bit for bit."""
    after = capture_memory(model)
    assert list(after) == list(before), f"tensors {sorted(set(after) ^ set(before))} appeared or went"
    for key, old in before.items():
        new = after[key]
        assert new.keys() == old.keys(), f"{key}: layout changed"
        for field, value in old.items():
            if field == "bits":
                pairs = (
                    list(zip(new[field], value, strict=True))
                    if isinstance(value, list)
                    else [(new[field], value)]
                )
                assert all(a is b or torch.equal(a, b) for a, b in pairs), f"{key}: the values changed"
            else:
                assert new[field] == value, f"{key}: {field} changed from {value!r} to {new[field]!r}"
