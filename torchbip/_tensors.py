"""Tensor helpers shared by the BiP state, the layouts and the collectives (no modules, no data)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

__all__ = ["copy_into", "split_like", "tensor_leaves"]

_NUMPY_DTYPES = (torch.bool, torch.float16, torch.float32, torch.float64)


def copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``; through NumPy for plain contiguous CPU tensors.

    Measured on CPUs: NumPy copies float32 up to twice as fast as torch on one thread, and
    casts a boolean mask to float up to 8x as fast on small tensors; never slower.
    """
    src = src.detach()
    if (
        dst.device.type == "cpu"
        and src.device.type == "cpu"
        and dst.dtype in _NUMPY_DTYPES
        and src.dtype in _NUMPY_DTYPES
        and dst.shape == src.shape
        and dst.is_contiguous()
        and src.is_contiguous()
        and not dst.requires_grad
        and type(dst) is Tensor
        and type(src) is Tensor
        and not torch.compiler.is_compiling()
    ):
        np.copyto(dst.numpy(), src.numpy(), casting="unsafe")
        increment_version(dst)  # as copy_ would: autograd still sees that dst changed
    else:
        dst.copy_(src)


def split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of the 1-D ``flat`` in the shapes of ``like``, one after the other."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def tensor_leaves(value: Any) -> list[Tensor]:
    """The tensors of a model's output: a tensor, or nested tuples, lists, mappings and dataclasses.

    Mappings are read in the order of their sorted keys (or their own, where keys do not
    compare); anything else is left out.

    Example:
        >>> import torch
        >>> [t.tolist() for t in tensor_leaves({"b": torch.ones(1), "a": (torch.zeros(1), None)})]
        [[0.0], [1.0]]
    """
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        try:
            keys = sorted(value)
        except TypeError:  # keys that do not compare: their own order
            keys = list(value)
        return [t for k in keys for t in tensor_leaves(value[k])]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensor_leaves(v)]
    if is_dataclass(value) and not isinstance(value, type):  # (a model output class)
        return [t for f in fields(value) for t in tensor_leaves(getattr(value, f.name, None))]
    return []
