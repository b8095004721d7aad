"""What tracing a model with Torch-Pruning's dependency graph needs: the package, the inputs.

Torch-Pruning is an optional extra (``torchbip[export]``); :func:`torch_pruning` imports it when
a feature needs it and says how to install it otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

__all__ = ["as_inputs", "build_graph", "cuts_channels", "is_depthwise", "torch_pruning"]


def torch_pruning(feature: str) -> Any:
    """Import Torch-Pruning for ``feature`` (its name, for the message), or say how to install it.

    Example:
        >>> torch_pruning("export_slim").__name__
        'torch_pruning'
    """
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as err:  # pragma: no cover - the test environment installs it
        raise ImportError(
            f"{feature} needs Torch-Pruning's dependency graph: pip install 'torchbip[export]' "
            "(or pip install torch-pruning)"
        ) from err


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the tuple of arguments of ``model(*example_inputs)``.

    Example:
        >>> as_inputs(1), as_inputs((1, 2))
        ((1,), (1, 2))
    """
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def build_graph(tp: Any, model: nn.Module, inputs: tuple[Any, ...], feature: str) -> Any:
    """Torch-Pruning's dependency graph of ``model`` traced on ``inputs``.

    Args:
        tp: the ``torch_pruning`` module (see :func:`torch_pruning`).
        model: the model to trace (a copy: tracing runs a forward pass).
        inputs: the arguments of ``model(*inputs)``.
        feature: the call that needs the graph, for the message.

    Raises:
        ValueError: when Torch-Pruning cannot trace the model (its error is chained).
    """
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    except Exception as err:
        raise ValueError(
            f"{feature}: Torch-Pruning's dependency graph cannot be built for this "
            f"{type(model).__name__} ({type(err).__name__}: {err}); the model was left unchanged. "
            "Structured pruning by coupled channel groups and the slim export need that graph; "
            "the filter and channel layouts of torchbip.BiP do not"
        ) from err


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one input and one output channel per group.

    (Torch-Pruning's graph calls every convolution with ``groups == out_channels`` depthwise,
    also one that reads several input channels per group.)

    Example:
        >>> is_depthwise(nn.Conv2d(8, 8, 3, groups=8)), is_depthwise(nn.Conv2d(16, 8, 3, groups=8))
        (True, False)
    """
    if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return False
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def cuts_channels(node: Any) -> bool:
    """Whether a slice node of Torch-Pruning's graph keeps part of an axis that may hold channels.

    Such a slice (``y[:, :k]``, ``y.narrow(1, 0, k)``) has bounds fixed in the forward code:
    removing a channel before it shifts which channels it keeps, so its channels cannot be
    removed. A slice along another axis (a spatial crop, every channel kept) passes channels
    through unchanged. The channel axis is 1 (``(N, C, ...)``), or also the last one for a
    3-dimensional tensor (``(N, L, C)`` in transformers). A node whose slice cannot be read
    counts as cutting.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> x = torch.randn(2, 8, 4, 4, requires_grad=True)
        >>> [cuts_channels(SimpleNamespace(grad_fn=y.grad_fn)) for y in (x[:, :4], x[:, :, 1:])]
        [True, False]
    """
    grad_fn = getattr(node, "grad_fn", None)
    try:
        sizes = [int(s) for s in grad_fn._saved_self_sym_sizes]  # type: ignore[union-attr]
        dim, start, end, step = (
            int(grad_fn._saved_dim),  # type: ignore[union-attr]
            int(grad_fn._saved_start),  # type: ignore[union-attr]
            int(grad_fn._saved_end),  # type: ignore[union-attr]
            int(grad_fn._saved_step),  # type: ignore[union-attr]
        )
    except (AttributeError, TypeError, ValueError):
        return True
    if not sizes:
        return True
    dim %= len(sizes)
    size = sizes[dim]
    whole = step == 1 and (start == 0 or start <= -size) and end >= size
    channel_axes = {1, 2} if len(sizes) == 3 else {min(1, len(sizes) - 1)}
    return dim in channel_axes and not whole
