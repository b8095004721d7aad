"""What tracing a model with Torch-Pruning's dependency graph needs: the package, the inputs.

Torch-Pruning is an optional extra (``torchbip[export]``); :func:`torch_pruning` imports it when
a feature needs it and says how to install it otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from torchbip._tensors import tensor_leaves

__all__ = [
    "UnboundedGroupError",
    "as_inputs",
    "build_graph",
    "cuts_channels",
    "is_depthwise",
    "is_frozen_batchnorm",
    "output_tensors",
    "per_channel_pruners",
    "pruning_group",
    "torch_pruning",
]

# The per-channel tensors (dim 0) of the layers :func:`per_channel_pruners` slices.
_INSTANCE_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
_FROZEN_BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


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


def output_tensors(value: Any) -> list[Tensor]:
    """The tensors of a model's output, also those held by other objects in it.

    In the order of :func:`torchbip._tensors.tensor_leaves` (tensors in nested tuples, lists,
    mappings and dataclasses), and besides the tensors in the attributes of any other object the
    output holds, recursively: a transformers cache (``DynamicCache``, which a causal language
    model returns with ``use_cache=True``) keeps the keys and values it computed in objects of
    its own. Modules are left out, and each such object is read once.

    Example:
        >>> class Cache:
        ...     def __init__(self) -> None:
        ...         self.layers = [torch.zeros(2)]
        >>> [tuple(t.shape) for t in output_tensors({"logits": torch.ones(3), "cache": Cache()})]
        [(2,), (3,)]
    """
    return tensor_leaves(value, objects=True)


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm whose statistics and affine values are buffers (torchvision's ``FrozenBatchNorm2d``).

    Detected by its class name and its four one-dimensional buffers of one length, so that a
    copy of the class (detectron2 has one) counts too. Its buffers take no gradient, so
    Torch-Pruning's tracer sees neither them nor the module; :func:`per_channel_pruners` slices
    them.

    Example:
        >>> from torchvision.ops import FrozenBatchNorm2d
        >>> is_frozen_batchnorm(FrozenBatchNorm2d(4)), is_frozen_batchnorm(nn.BatchNorm2d(4))
        (True, False)
    """
    if not type(module).__name__.startswith("FrozenBatchNorm") or module._parameters:
        return False
    tensors = [module._buffers.get(name) for name in _FROZEN_BATCHNORM_TENSORS]
    return all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tensors) and (
        len({t.shape[0] for t in tensors if t is not None}) == 1
    )


@functools.cache
def _per_channel_pruner(tp: Any) -> type:
    """A Torch-Pruning layer pruner that slices a layer's per-channel tensors along dim 0."""

    class PerChannelPruner(tp.pruner.function.BasePruningFunc):
        """Slices ``names`` (parameters or buffers, those the layer holds) and ``num_features``."""

        TARGET_MODULES = None

        def __init__(self, names: tuple[str, ...]) -> None:
            super().__init__()
            self.names = names

        def _tensors(self, layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
            found = [(n, getattr(layer, n, None)) for n in self.names]
            return [(n, t) for n, t in found if isinstance(t, torch.Tensor) and t.dim() == 1]

        def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            dropped = {int(i) for i in idxs}
            size = self.get_out_channels(layer)
            if size is None:
                return layer
            keep = [i for i in range(size) if i not in dropped]
            for name, tensor in self._tensors(layer):
                kept = tensor.detach().index_select(0, torch.tensor(keep, device=tensor.device)).contiguous()
                if isinstance(tensor, nn.Parameter):
                    setattr(layer, name, nn.Parameter(kept, tensor.requires_grad))
                else:
                    layer._buffers[name] = kept
            if isinstance(getattr(layer, "num_features", None), int):
                layer.num_features = len(keep)  # type: ignore[assignment]
            return layer

        prune_in_channels = prune_out_channels  # one channel axis: an intra-layer dependency

        def get_out_channels(self, layer: nn.Module) -> int | None:
            tensors = self._tensors(layer)
            if tensors:
                return int(tensors[0][1].shape[0])
            features = getattr(layer, "num_features", None)
            return features if isinstance(features, int) else None

        get_in_channels = get_out_channels

    return PerChannelPruner


def per_channel_pruners(tp: Any, model: nn.Module) -> dict[type, Any]:
    """Torch-Pruning pruners for the per-channel layers of ``model`` that it slices wrongly.

    - torchvision's ``FrozenBatchNorm2d`` (see :func:`is_frozen_batchnorm`): its buffers are
      invisible to the tracer, so the export left them at the old channel count;
    - ``nn.InstanceNorm*d``: Torch-Pruning's own pruner slices the affine parameters but not
      ``running_mean``/``running_var`` (``track_running_stats=True``), which then no longer
      match the channels in eval mode.

    Keyed by the exact classes found in ``model`` (as ``customized_pruners`` of
    ``DependencyGraph.build_dependency``); the graph's nodes for them are of type
    ``OPTYPE.CUSTOMIZED``, per-channel pass-throughs for the rest of torchbip.
    """
    pruner = _per_channel_pruner(tp)
    found: dict[type, Any] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            found.setdefault(type(module), pruner(_INSTANCE_NORM_TENSORS))
        elif is_frozen_batchnorm(module):
            found.setdefault(type(module), pruner(_FROZEN_BATCHNORM_TENSORS))
    return found


@contextlib.contextmanager
def _all_trainable(model: nn.Module) -> Iterator[None]:
    """Make every floating-point parameter of ``model`` require grad; restore the flags on exit.

    Example:
        >>> layer = nn.Linear(2, 2).requires_grad_(False)
        >>> with _all_trainable(layer):
        ...     layer.weight.requires_grad
        True
        >>> layer.weight.requires_grad
        False
    """
    frozen = [
        p
        for p in model.parameters()
        if not p.requires_grad and (p.dtype.is_floating_point or p.dtype.is_complex)
    ]
    try:
        for p in frozen:
            p.requires_grad = True  # (an uninitialised lazy parameter refuses requires_grad_)
        yield
    finally:
        for p in frozen:
            p.requires_grad = False


def _traced_outputs(outputs: Any) -> list[Tensor]:
    """The outputs Torch-Pruning traces back from: those of :func:`output_tensors` with a ``grad_fn``.

    Torch-Pruning flattens tuples, lists and dicts only, and fails on anything else in the
    output (a transformers cache); a tensor without a ``grad_fn`` (integer ids, a constant)
    leads back to no layer.
    """
    return [t for t in output_tensors(outputs) if t.grad_fn is not None]


def build_graph(tp: Any, model: nn.Module, inputs: tuple[Any, ...], feature: str) -> Any:
    """Torch-Pruning's dependency graph of ``model`` traced on ``inputs``.

    With the pruners of :func:`per_channel_pruners` for the layers of ``model`` they cover.

    The tracer follows autograd's ``grad_fn`` chain, which a layer leaves only when a tensor it
    computes with requires grad: a frozen layer (``requires_grad=False``) would be missing from
    the graph, and the channels it ties together with it. Every floating-point parameter of
    ``model`` therefore requires grad while it is traced; each gets its own flag back afterwards,
    also when tracing fails.

    Args:
        tp: the ``torch_pruning`` module (see :func:`torch_pruning`).
        model: the model to trace (a copy: tracing runs a forward pass).
        inputs: the arguments of ``model(*inputs)``.
        feature: the call that needs the graph, for the message.

    Raises:
        ValueError: when Torch-Pruning cannot trace the model (its error is chained).
    """
    try:
        with torch.enable_grad(), _all_trainable(model):
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                verbose=False,
                customized_pruners=per_channel_pruners(tp, model) or None,
                output_transform=_traced_outputs,
            )
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


# How often Torch-Pruning's search for a group may add one node (with one pruning function):
# once per path from the root that maps the channels to other positions (a concatenation of a
# tensor with itself). More, and the search is taken for one that never ends.
_MAX_VISITS = 32
# How many channel indices one search may add in all: reshapes that multiply the index lists
# (the window partitions of a Swin Transformer) make a finite search too large to run. The
# largest groups of common models add a few hundred thousand.
_MAX_INDICES = 2_000_000


class UnboundedGroupError(RuntimeError):
    """Torch-Pruning's search for a pruning group goes round a cycle of the graph for ever."""


@functools.cache
def _bounded_group(base: type) -> type:
    """Torch-Pruning's ``Group`` (``base``), raising :class:`UnboundedGroupError` on an endless search."""

    class BoundedGroup(base):
        """Counts how often each node and pruning function is added."""

        def add_dep(self, dep: Any, idxs: Any) -> None:
            visits: dict[tuple[int, Any], int] = self.__dict__.setdefault("_visits", {})
            key = (id(dep.target), dep.handler)
            visits[key] = visits.get(key, 0) + 1
            if visits[key] > _MAX_VISITS:
                raise UnboundedGroupError(f"the search adds {dep.target} more than {_MAX_VISITS} times")
            work = self.__dict__.get("_work", 0) + len(idxs)
            self.__dict__["_work"] = work
            if work > _MAX_INDICES:
                raise UnboundedGroupError(
                    f"the search's index lists grow past {_MAX_INDICES} entries (at {dep.target})"
                )
            super().add_dep(dep, idxs)

    return BoundedGroup


def pruning_group(tp: Any, graph: Any, module: nn.Module, pruning_fn: Any, idxs: list[int]) -> Any:
    """``graph.get_pruning_group(module, pruning_fn, idxs)``, bounded.

    Torch-Pruning's search for the channels coupled with ``idxs`` can go round a cycle of the
    graph for ever, mapping a channel to a new position each time round: the key and value
    projections of grouped-query attention with rotary embeddings (a Llama with
    ``num_key_value_heads < num_attention_heads``), through ``rotate_half``'s slices and
    concatenation. The search is stopped once it adds one node (with one pruning function)
    more than a fixed number of times.

    Raises:
        UnboundedGroupError: when the search does not end.
    """
    module_globals: Any = getattr(getattr(tp, "dependency", None), "graph", None)
    original = getattr(module_globals, "Group", None)
    if original is None or not hasattr(original, "add_dep"):  # another Torch-Pruning layout: unbounded
        return graph.get_pruning_group(module, pruning_fn, idxs)
    module_globals.Group = _bounded_group(original)
    try:
        return graph.get_pruning_group(module, pruning_fn, idxs)
    finally:
        module_globals.Group = original


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
