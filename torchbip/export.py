r"""Export a structurally pruned model to a slim dense one: physically smaller layers.

:func:`export_slim` removes the filters and input channels that a structured mask (e.g.
:func:`torchbip.bip_structured` or ``global_prune(..., structured="filter")``) zeroed, together
with everything that depends on them: the BatchNorm channels, the input channels of every
consumer, across residual additions, concatenations and flattening. The coupling between layers
comes from Torch-Pruning's dependency graph (the optional extra ``torchbip[export]``, i.e.
``pip install torch-pruning``); torchbip decides *which* channels may go so that the slim model
computes exactly what the masked model computes.

Why "may": a pruned filter's output channel is not zero. It is a constant, its bias run through
the following BatchNorm (:math:`\beta - \gamma\mu/\sqrt{\sigma^2+\epsilon}`) and activation.
A channel is removed only when every layer that reads it gets the same result without it:

- the reader's weights for that channel are zero (an input-channel mask), or
- the channel is *dead* (every filter that writes it is zero) and the reader sees a constant
  that is zero, or that folds exactly into the reader's bias (a ``Linear``, or a convolution
  without padding: :math:`b \mathrel{+}= v \sum_k W_{:,c,k}`).

Otherwise the channel is kept (a nonzero constant entering a zero-padded convolution is not a
bias near the borders). Channels that reach the model's output are never removed, nor channels
that go through ``torch.split``, ``torch.chunk``, ``unbind`` or a channel slice such as
``y[:, :k]``, whose bounds the forward fixes (removing a channel before it would shift them),
nor the channels of a layer that holds a tensor another layer holds too (tied, such as
``dec.weight = enc.weight``: slicing each holder on its own would untie it); those are named in a
:class:`SlimExportWarning`. Per-channel layers go with their channels: BatchNorm, PReLU,
InstanceNorm (with its running statistics) and torchvision's ``FrozenBatchNorm2d`` (its
buffers). The constants are read from one forward pass on ``example_inputs`` in eval mode, and the slim
model is checked against the masked one on the same inputs (``verify=True``): equality holds in
eval mode.

When these rules keep more than a quarter of the weights that lie in entirely zero filters or
input channels (not counting the input channels of layers fed by the model's inputs alone, also
through operations such as ``x / 255``), so that the slim model saves visibly less than the
masks promise, :func:`export_slim` warns with a :class:`SlimExportWarning` naming the layers
where they stay.

Attention heads: a head of an :class:`torch.nn.MultiheadAttention` whose value rows (and value
bias) are zero contributes nothing, and is removed too; the module becomes a
:class:`torchbip.attention.SlimMultiheadAttention` with the other heads (at least one stays).
Its attention weights (``need_weights=True``) are then those of the kept heads: a model that
uses them keeps its heads by passing the module (or its ``out_proj``) in ``ignored_layers``.

Ties: a pruned tensor whose unmasked Parameter (``<name>_orig``) another module holds too (a
language-model head tied to its embedding, ``head.weight = emb.weight``, then ``head`` pruned
with torch's or torchbip's functional pruning) is refused with a ``ValueError``: making the mask
permanent would write the masked values into the one Parameter, masking the other module too.

Saving and loading: the slim model's ``state_dict`` holds plain tensors of the smaller shapes.
Save it with :func:`torch.save`; to load it, build the original architecture again and call
:func:`load_slim_state_dict`, which resizes each layer to the shapes in the state dict (no pickled
code, so ``torch.load(..., weights_only=True)`` works)::

    torch.save(slim.state_dict(), "slim.pt")
    model = load_slim_state_dict(torchvision.models.resnet18(), torch.load("slim.pt", weights_only=True))
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip._func import transposed_linear
from torchbip._snapshot import ModelSnapshot
from torchbip._tracing import (
    UnboundedGroupError,
    as_inputs,
    build_graph,
    cuts_channels,
    is_depthwise,
    output_tensors,
    pruning_group,
    torch_pruning,
)
from torchbip.pruned import named_pruning_hooks

__all__ = [
    "SlimExportWarning",
    "baked_copy",
    "export_slim",
    "load_slim_state_dict",
    "make_permanent",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_TYPES = (nn.Linear, *_CONV_TYPES)
_KEPT_ZEROS_WARN = 0.25  # the share of zero-slice weights kept above which the export warns


class SlimExportWarning(UserWarning):
    """:func:`export_slim` kept a visible share of the entirely zero filters or input channels.

    Filter this category to silence it: ``warnings.filterwarnings("ignore",
    category=SlimExportWarning)``.
    """


def make_permanent(model: nn.Module) -> nn.Module:
    """Apply :func:`torch.nn.utils.prune.remove` to every pruned tensor of ``model``, in place.

    Afterwards each pruned tensor is a plain Parameter holding ``orig * mask``, and nothing of
    torchbip remains (no ``<name>_scores`` buffer, whatever mix of BiP and torch methods pruned
    it): the model holds what it would hold had only torch's methods pruned it.

    Args:
        model: any model, pruned or not.

    Returns:
        ``model``.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> from torchbip import bip_unstructured
        >>> model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))
        >>> _ = prune.l1_unstructured(model[0], "weight", amount=3)
        >>> _ = prune.l1_unstructured(bip_unstructured(model[1], "weight", amount=1), "weight", amount=1)
        >>> prune.is_pruned(make_permanent(model)), int((model[0].weight == 0).sum())
        (False, 3)
        >>> sorted(name for name, _ in model.named_buffers())
        []
    """
    from torchbip.method import drop_scores, holds_bip

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = {name for module in model.modules() for name, _ in named_pruning_hooks(module)}
    with ModelSnapshot(model, names).restored_on_failure():  # a failed remove undoes the others
        for module in model.modules():
            for name, hook in list(named_pruning_hooks(module)):
                prune.remove(module, name)
                if holds_bip(hook):
                    drop_scores(module, name)
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask made permanent (``model`` is not changed).

    Raises:
        ValueError: if a pruned tensor's unmasked Parameter (``<name>_orig``) is tied to another
            module's tensor (see :func:`_check_untied_pruning`).
    """
    return make_permanent(_pruned_copy(model))


def _check_untied_pruning(model: nn.Module) -> None:
    """Refuse a pruned tensor whose unmasked Parameter (``<name>_orig``) another module holds too.

    Such a tie (``head.weight = emb.weight``, then ``head`` pruned by torch's or torchbip's
    functional pruning) masks the tensor for one module only; making the mask permanent writes
    the masked values into the one Parameter, so the other module would be masked too and a
    copy would no longer compute what ``model`` computes.

    Raises:
        ValueError: naming the pruned tensor and the other key that holds its Parameter.

    Example:
        >>> from torchbip import bip_structured
        >>> emb, head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
        >>> head.weight = emb.weight
        >>> _ = bip_structured(head, "weight", amount=2, dim=1)
        >>> try:
        ...     _check_untied_pruning(nn.ModuleDict({"emb": emb, "head": head}))
        ... except ValueError as err:
        ...     print(str(err)[:98])
        the pruned tensor 'head.weight' is tied: its unmasked Parameter 'head.weight_orig' is 'emb.weight'
    """
    holders: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for prefix, module in model.named_modules():
        head = prefix + "." if prefix else ""
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                holders[id(tensor)].append((id(module), head + name))
    for prefix, module in model.named_modules():
        head = prefix + "." if prefix else ""
        for name, _ in named_pruning_hooks(module):
            orig = module._parameters.get(name + "_orig")
            own = head + name + "_orig"
            others = [key for _, key in holders.get(id(orig), []) if key != own]
            if orig is not None and others:
                raise ValueError(
                    f"the pruned tensor {head + name!r} is tied: its unmasked Parameter {own!r} is "
                    f"{others[0]!r}. torch's pruning masks one module at a time, so {others[0]!r} reads "
                    f"the unmasked tensor while {head + name!r} reads it masked, and making the mask "
                    "permanent (prune.remove) would write the masked values into both: untie the "
                    "weights before pruning, or leave this tensor unpruned"
                )


def _pruned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that keeps its pruning (``model`` is not changed).

    Raises:
        ValueError: as :func:`_check_untied_pruning`.
    """
    _check_untied_pruning(model)
    # Each pruned attribute is copied as a fresh leaf: after a forward pass with gradients on it
    # is a non-leaf tensor that deepcopy rejects (pytorch issue #37322). The value is the one the
    # next forward pass would set. The memo gives the copy its own tensor; ``model`` keeps its.
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, hook in named_pruning_hooks(module):
                current = module.__dict__.get(name)
                if isinstance(current, Tensor):
                    memo[id(current)] = hook.apply_mask(module).detach()
    return copy.deepcopy(model, memo)


def _zero_groups(weight: Tensor, dim: int) -> Tensor:
    """Boolean per index along ``dim``: is the whole slice zero?"""
    nonzero = weight.detach().ne(0).movedim(dim, 0)
    return ~nonzero.reshape(nonzero.shape[0], -1).any(dim=1)


class _ZeroCache:
    """:func:`_zero_groups` per weight tensor, recomputed only when the layer was pruned."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def __call__(self, weight: Tensor, dim: int) -> Tensor:
        hit = self._cache.get((id(weight), dim))
        if hit is not None and hit[0] is weight:
            return hit[1]
        zero = _zero_groups(weight, dim)
        self._cache[(id(weight), dim)] = (weight, zero)
        return zero


def _forward_with_pre_hook(
    model: nn.Module, inputs: tuple[Any, ...], hook: Callable[[nn.Module, tuple[Any, ...]], None]
) -> None:
    """One forward pass without gradients, ``hook`` a forward pre-hook of every conv and linear layer."""
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _LAYER_TYPES)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


class _ChannelStats:
    """Per-input-channel minimum and maximum seen by every conv and linear layer."""

    def __init__(self, model: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.low: dict[nn.Module, Tensor] = {}
        self.high: dict[nn.Module, Tensor] = {}
        _forward_with_pre_hook(model, inputs, self._record)

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        channel = x.dim() - 1 if isinstance(module, nn.Linear) else 1
        flat = x.movedim(channel, 0).reshape(x.shape[channel], -1)
        low, high = flat.amin(dim=1), flat.amax(dim=1)
        if module in self.low:
            low, high = torch.minimum(low, self.low[module]), torch.maximum(high, self.high[module])
        self.low[module], self.high[module] = low, high

    def drop(self, module: nn.Module, indices: list[int]) -> None:
        """Forget input channels ``indices`` of ``module`` (they were removed)."""
        if module in self.low:
            keep = torch.ones_like(self.low[module], dtype=torch.bool)
            keep[indices] = False
            self.low[module], self.high[module] = self.low[module][keep], self.high[module][keep]

    def constant(self, module: nn.Module, index: int) -> float | None:
        """The value of input channel ``index`` of ``module`` if it was constant, else ``None``."""
        if module not in self.low:
            return None
        low, high = float(self.low[module][index]), float(self.high[module][index])
        return low if high - low <= 1e-6 * max(1.0, abs(low)) else None


def _foldable(module: nn.Module) -> bool:
    """Whether a constant input channel of ``module`` is exactly a bias term."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, _CONV_TYPES) and module.groups == 1:
        padding = module.padding
        return padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
    return False


class _Planner:
    """Decides which channels of one dependency group can go, and what to fold where."""

    def __init__(
        self,
        tp: Any,
        graph: Any,
        stats: _ChannelStats,
        keep_out: set[nn.Module],
        zeros: _ZeroCache,
        tied: Mapping[nn.Module, str],
    ) -> None:
        t = tp.ops.OPTYPE
        self.tp, self.graph, self.stats, self.keep_out, self.zeros = tp, graph, stats, keep_out, zeros
        self.passthrough = {t.BN, t.ELEMENTWISE, t.CONCAT, t.RESHAPE, t.SLICE, t.EXPAND, t.PRELU, t.IN}
        # the per-channel layers of torchbip._tracing.per_channel_pruners (FrozenBatchNorm2d,
        # InstanceNorm), sliced like a BatchNorm
        self.passthrough.add(t.CUSTOMIZED)
        # modules holding a tensor that another module holds too: slicing one would untie it
        self.tied = tied
        self.kept_tied: dict[nn.Module, str] = {}  # those that kept zero channels, and why
        # torch.split/chunk/unbind: Torch-Pruning can map the pieces to the wrong channels
        self.splits = {t.SPLIT, t.UNBIND}
        self.slice = t.SLICE
        self.layer_types = {t.CONV, t.LINEAR, t.DEPTHWISE_CONV}
        self.output = t.OUTPUT

    def judge(self, group: Any) -> tuple[list[int], dict[nn.Module, dict[int, float]]]:
        """Root indices of ``group`` that are safe to remove, and the bias folds they need."""
        graph = self.graph
        ok: dict[int, bool] = {}
        dead: dict[int, bool] = defaultdict(lambda: True)
        # a zero depthwise filter makes its channel constant whatever feeds it: the layers before
        # it need not be zero (their channel's one reader ignores it; other readers are measured)
        cut: dict[int, bool] = defaultdict(bool)
        producers: dict[int, int] = defaultdict(int)
        readers: list[tuple[nn.Module, int, int]] = []
        tied: list[nn.Module] = []
        for item in group:
            dep, idxs, roots = item.dep, item.idxs, item.root_idxs
            node, module = dep.target, dep.target.module
            for r in roots:
                ok.setdefault(r, True)
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            is_in = graph.is_in_channel_pruning_fn(dep.handler)
            if node.type == self.output or (is_out and not node.outputs):
                return [], {}  # the channel reaches the model's output
            if module in self.tied:  # Torch-Pruning would slice one holder of the tensor, untying it
                tied.append(module)
            if node.type in self.splits or (node.type == self.slice and cuts_channels(node)):
                return [], {}  # pieces of fixed bounds in the forward: a removal shifts them
            if node.type in self.passthrough:
                continue
            if node.type not in self.layer_types or not isinstance(module, _LAYER_TYPES):
                return [], {}  # a layer whose channels mix in ways we do not fold (LayerNorm, ...)
            weight = module.weight
            depthwise = is_depthwise(module)  # not Torch-Pruning's label: see is_depthwise
            if getattr(module, "groups", 1) != 1 and not depthwise:
                return [], {}  # a grouped convolution that is not depthwise keeps its channels
            if depthwise or (is_out and not is_in):
                if module in self.keep_out:
                    return [], {}
                zero = self.zeros(weight, 0)
                for i, r in zip(idxs, roots, strict=True):
                    producers[r] += 1
                    dead[r] = dead[r] and bool(zero[i])
                    cut[r] = cut[r] or (depthwise and bool(zero[i]))
            elif is_in and not is_out:
                if getattr(module, "groups", 1) != 1:
                    return [], {}
                zero = self.zeros(weight, 1)
                readers.extend((module, i, r) for i, r in zip(idxs, roots, strict=True) if not zero[i])
            else:
                return [], {}
        folds: dict[int, list[tuple[nn.Module, int, float]]] = defaultdict(list)
        for r in ok:
            ok[r] = producers[r] > 0
            dead[r] = dead[r] or cut[r]
        for module, i, r in readers:
            if not ok[r]:
                continue
            value = self.stats.constant(module, i) if dead[r] else None
            if value is None or (value != 0.0 and not _foldable(module)):
                ok[r] = False
            elif value != 0.0:
                folds[r].append((module, i, value))
        accepted = sorted(r for r, good in ok.items() if good)
        if accepted and tied:  # removable but for the tie: kept, and said (SlimExportWarning)
            for module in tied:
                self.kept_tied.setdefault(module, self.tied[module])
            return [], {}
        plan: dict[nn.Module, dict[int, float]] = defaultdict(dict)
        for r in accepted:
            for module, i, value in folds[r]:
                plan[module][i] = value
        return accepted, dict(plan)


def _emptying_roots(graph: Any, group: Any) -> set[int]:
    """One root index per layer of ``group`` that the group would leave without any channel."""
    spare: set[int] = set()
    for item in group:
        module, idxs, roots = item.dep.target.module, list(item.idxs), list(item.root_idxs)
        if not isinstance(module, _LAYER_TYPES) or not idxs:
            continue
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            size = module.weight.shape[0]
        elif graph.is_in_channel_pruning_fn(item.dep.handler):
            size = module.weight.shape[1] * getattr(module, "groups", 1)
        else:
            continue
        if len(set(idxs)) >= size:
            spare.add(int(roots[0]))
    return spare


def _fold(plan: Mapping[nn.Module, Mapping[int, float]]) -> None:
    """Add each constant input channel's contribution to its reader's bias."""
    with torch.no_grad():
        for module, values in plan.items():
            weight = cast(Tensor, module.weight)
            if module.bias is None:
                module.bias = nn.Parameter(
                    torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                )
            bias = cast(Tensor, module.bias)
            index = torch.tensor(sorted(values), device=weight.device)
            constants = torch.tensor(
                [values[i] for i in sorted(values)], dtype=weight.dtype, device=weight.device
            )
            per_channel = weight.index_select(1, index)
            per_channel = per_channel.reshape(*per_channel.shape[:2], -1).sum(dim=2)
            bias.add_(per_channel @ constants)


def export_slim(
    model: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    *,
    ignored_layers: Iterable[nn.Module] = (),
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> nn.Module:
    r"""Return a slim copy of ``model`` with its structurally pruned channels removed.

    ``model`` (pruned with :mod:`torch.nn.utils.prune` state or with the masks already made
    permanent) is not changed. In the copy every mask is made permanent, then every filter and
    input channel that is entirely zero is removed along with its dependants when that leaves
    the outputs unchanged (see the module docstring for the rule and the BatchNorm shift). A zero
    depthwise filter removes its channel from the layers before and after it as well; a layer
    whose filters are all zero keeps one (a layer is never removed whole); grouped convolutions
    other than depthwise ones keep their channels.
    The result is an ordinary ``nn.Module`` of the same classes with smaller layers; masks
    that left no whole channel zero (unstructured pruning) change nothing.

    Args:
        model: the pruned model.
        example_inputs: a batch for ``model(*example_inputs)`` (a tensor or a tuple), used to
            trace the graph, to read the constant channels and to verify the result. Use real or
            random inputs, not a constant image, and at least two samples: with one, a channel
            that is constant within each sample (a per-sample shift) would look constant for
            every input. Other arguments may have one element (a scale): the inputs are refused
            only when no tensor among them has a leading size of 2 or more.
        ignored_layers: modules whose output channels are never removed (the model's output
            layer is protected without being listed); an ``nn.MultiheadAttention`` listed (or
            its ``out_proj``) keeps all its heads.
        verify: check that the slim model's outputs equal the masked model's on
            ``example_inputs`` (eval mode) and raise if they do not.
        rtol: relative tolerance of the check, relative to the largest output magnitude. By
            default per output dtype, as :func:`torch.testing.assert_close`'s: ``1.6e-2`` for
            bfloat16, ``1e-3`` for float16, ``1e-4`` otherwise.
        atol: absolute tolerance of the check, relative to the largest output magnitude (when
            above 1). By default ``1e-5``.

    Returns:
        The slim model. Each of its modules has the training flag of the same module of
        ``model``, and each parameter the ``requires_grad`` of the same parameter (a bias that
        the export created by folding takes its weight's).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``example_inputs`` not a tensor or a
            tuple, ``ignored_layers`` not an iterable of modules or ``verify`` not a bool.
        ValueError: if an ignored layer is not part of ``model``, ``rtol``/``atol`` is not
            ``None`` or a finite number >= 0, ``example_inputs`` holds only batches of one sample,
            a pruned tensor is tied to another module's (``head.weight = emb.weight``, then
            ``head`` pruned: the copy could not compute what ``model`` computes), or Torch-Pruning
            cannot trace ``model``.
        ImportError: if Torch-Pruning is not installed.
        RuntimeError: if ``verify`` finds different outputs (an operation that mixes channels
            and that the dependency graph took for an element-wise one, or attention heads that
            were removed while the model uses their attention weights or a per-head mask of
            another layout); the message names the output's dtype and the tolerances.

    Note:
        ``model`` is read, never written: whatever fails, it keeps its tensor objects, values,
        memory, hooks and training flag (the export works on a copy).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchbip import bip_structured
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                       nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        >>> _ = bip_structured(model[0], "weight", amount=0.5, dim=0)
        >>> slim = export_slim(model, torch.randn(2, 3, 6, 6))
        >>> slim[0].out_channels, slim[1].num_features, slim[4].in_features
        (4, 4, 64)
        >>> x = torch.randn(5, 3, 6, 6)
        >>> torch.allclose(slim.eval()(x), model.eval()(x), atol=1e-5)
        True
    """
    names, ignored = _check_export_arguments(model, example_inputs, ignored_layers, verify, rtol, atol)
    rtol = None if rtol is None else float(rtol)  # (NumPy numbers too)
    atol = None if atol is None else float(atol)
    tp = torch_pruning("export_slim")
    inputs = as_inputs(example_inputs)
    slim = _pruned_copy(model)
    training = {name: module.training for name, module in slim.named_modules()}
    slim.eval()
    with torch.no_grad():  # the reference: what the masked model computes, its masks still applied
        reference = slim(*inputs)
    make_permanent(slim)
    flags = _Flags(slim, training)
    by_name = dict(slim.named_modules())
    keep_out = {by_name[names[id(m)]] for m in ignored}
    graph = build_graph(tp, slim, inputs, "export_slim")
    roots = [m for m in slim.modules() if isinstance(m, _LAYER_TYPES) and m in graph.module2node]
    fed = _first_layers(slim, graph)  # their input channels are the model's: none can go
    zero_before = _zero_slice_weights(slim, fed)
    stats: _ChannelStats | None = None
    zeros = _ZeroCache()
    tied = _tied_modules(slim)
    kept_tied: dict[nn.Module, str] = {}
    for module in roots:
        depthwise = is_depthwise(module)
        if getattr(module, "groups", 1) != 1 and not depthwise:
            continue  # grouped convolutions: channels are removed only through their neighbours
        pruner = graph.get_pruner_of_module(module)
        # a depthwise filter is its own input channel: its out-channel pruning removes both
        sides = (
            ((0, pruner.prune_out_channels),)
            if depthwise
            else ((0, pruner.prune_out_channels), (1, pruner.prune_in_channels))
        )
        for dim, fn in sides:
            candidates = torch.nonzero(zeros(module.weight, dim)).flatten().tolist()
            if len(candidates) >= module.weight.shape[dim]:
                candidates = candidates[1:]  # a layer is never removed whole: one zero channel stays
            if not candidates:
                continue
            if stats is None:
                stats = _ChannelStats(slim, inputs)
            planner = _Planner(tp, graph, stats, keep_out, zeros, tied)
            try:
                accepted, plan = planner.judge(pruning_group(tp, graph, module, fn, candidates))
            except UnboundedGroupError:  # Torch-Pruning cannot map these channels: they stay
                continue
            # A root can stand for a coarser unit than itself (one Linear input feature for a
            # whole conv channel after a flatten): judge the group of the accepted roots again,
            # until it is accepted whole.
            # A layer is never emptied, also one that the group reaches through a concatenation
            # (its channels then are only some of the root's): one of its channels stays.
            group = None
            while accepted:
                group = pruning_group(tp, graph, module, fn, accepted)
                again, plan = planner.judge(group)
                if again == accepted:
                    spare = _emptying_roots(graph, group)
                    if not spare:
                        break
                    again = [r for r in accepted if r not in spare]
                accepted = again
            kept_tied.update(planner.kept_tied)
            if accepted and group is not None:
                _fold(plan)
                for item in group:
                    if graph.is_in_channel_pruning_fn(item.dep.handler):
                        stats.drop(item.dep.target.module, list(item.idxs))
                group.prune()
                # Torch-Pruning counts a conv's removed channels in the indices of the group's root:
                # after a flatten, one Linear feature per spatial position (4 for a 2x2 map), so it
                # can leave out_channels at 4 for 7 kept filters. Attributes follow the tensors.
                for item in group:
                    target = item.dep.target.module
                    if isinstance(target, nn.Module) and getattr(target, "groups", 1) == 1:
                        _update_attributes(target)
    slimmed = _remove_heads(slim, tied, keep_out)
    if verify:
        heads = _heads_hint(slimmed)
        with torch.no_grad():
            try:
                outputs = slim(*inputs)
            except Exception as err:
                raise RuntimeError(
                    f"the slim model fails on example_inputs ({type(err).__name__}: {err}): {heads}an "
                    "operation ties channels in a way the dependency graph did not see; pass its "
                    "producers in ignored_layers"
                ) from err
        _check_close(outputs, reference, rtol, atol, heads)
    unsliced = {name for name, m in slim.named_modules() if transposed_linear(m)}
    flat = _flattened_linears(tp, slim, graph)
    _warn_kept_zeros(zero_before, _zero_slice_weights(slim, fed), unsliced, _kept_zero_features(slim, flat))
    _warn_kept_tied(kept_tied, {m: n for n, m in slim.named_modules()})
    flags.restore(slim)
    return slim


class _Flags:
    """Each module's ``training`` flag and each parameter's ``requires_grad``, by name.

    Removing channels replaces parameters with new ones that require grad (Torch-Pruning's
    layer pruners, :meth:`SlimMultiheadAttention.shrink`) and folding creates biases;
    :meth:`restore` gives the slim model the flags of the model it was copied from.
    """

    def __init__(self, model: nn.Module, training: Mapping[str, bool] | None = None) -> None:
        """Record ``model``'s flags; ``training``: the training flags by module name, if not its own."""
        self.training = (
            dict(training)
            if training is not None
            else {name: module.training for name, module in model.named_modules()}
        )
        self.requires_grad = {
            name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)
        }

    def restore(self, model: nn.Module) -> None:
        """Set the recorded flags on ``model``; a new parameter takes its layer's weight's flag."""
        for prefix, module in model.named_modules():
            module.training = self.training.get(prefix, module.training)
            head = prefix + "." if prefix else ""
            default = self.requires_grad.get(head + "weight")
            for name, p in module._parameters.items():
                if p is None or not (p.dtype.is_floating_point or p.dtype.is_complex):
                    continue
                flag = self.requires_grad.get(head + name, default)
                if flag is not None:
                    p.requires_grad = flag


def _tied_modules(model: nn.Module) -> dict[nn.Module, str]:
    """The modules that hold a parameter or buffer another module holds too, with the tie named.

    Torch-Pruning slices each module's tensors on their own (a new tensor per module), so
    removing a channel of one would untie the tensor: such modules keep their channels.

    Example:
        >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        >>> b.weight = a.weight
        >>> list(_tied_modules(nn.Sequential(a, b, nn.Linear(4, 2))).values())
        ["'0.weight' is '1.weight'", "'0.weight' is '1.weight'"]
    """
    holders: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for prefix, module in model.named_modules():
        own = [*module._parameters.items(), *module._buffers.items()]
        for name, tensor in own:
            # a scalar (a 0-d counter, a single shared slope) is never sliced: removing channels keeps it tied
            if tensor is not None and tensor.numel() > 1:
                holders[id(tensor)].append((f"{prefix}.{name}" if prefix else name, module))
    tied: dict[nn.Module, str] = {}
    for entries in holders.values():
        if len({id(m) for _, m in entries}) > 1:
            text = " is ".join(repr(key) for key, _ in entries)
            for _, module in entries:
                tied.setdefault(module, text)
    return tied


def _warn_kept_tied(kept: Mapping[nn.Module, str], names: Mapping[nn.Module, str]) -> None:
    """Warn that zero channels of layers holding a tied tensor were kept, naming them."""
    if not kept:
        return
    by_tie: dict[str, list[str]] = defaultdict(list)
    for module, tie in kept.items():
        by_tie[tie].append(repr(names.get(module, type(module).__name__)))
    listed = "; ".join(f"{', '.join(layers)} ({tie})" for tie, layers in by_tie.items())
    warnings.warn(
        f"export_slim kept zero channels of layers that hold a tensor another layer holds too: {listed}. "
        "Removing them would slice each holder on its own and untie the tensor; untie the layers "
        "before pruning to have those channels removed",
        SlimExportWarning,
        stacklevel=3,
    )


def _first_layers(model: nn.Module, graph: Any) -> set[str]:
    """The names of the conv and linear layers that no conv or linear layer feeds, in ``graph``.

    Their inputs are the model's inputs, or computed from them alone (a view, ``x / 255``, a
    normalization, a reshape), so no export can shrink their input channels.
    """
    names = {id(m): n for n, m in model.named_modules()}
    found: set[str] = set()
    for module, node in graph.module2node.items():
        if not isinstance(module, _LAYER_TYPES) or id(module) not in names:
            continue
        seen: set[int] = set()
        stack = list(node.inputs)
        while stack:
            upstream = stack.pop()
            if id(upstream) in seen:
                continue
            seen.add(id(upstream))
            if isinstance(upstream.module, _LAYER_TYPES):
                break
            stack.extend(upstream.inputs)
        else:
            found.add(names[id(module)])
    return found


def _flattened_linears(tp: Any, model: nn.Module, graph: Any) -> dict[str, nn.Module]:
    """The ``Linear`` layers that read convolution channels through a flatten (a reshape), by name.

    Such a layer has one input feature per position of each channel: the export removes a
    channel's features only all together, with the channel. Each name maps to the convolution.
    """
    reshape = tp.ops.OPTYPE.RESHAPE
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, nn.Module] = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Linear) or id(module) not in names:
            continue
        seen: set[tuple[int, bool]] = set()
        stack = [(upstream, False) for upstream in node.inputs]
        while stack:
            upstream, reshaped = stack.pop()
            reshaped = reshaped or upstream.type == reshape
            if (id(upstream), reshaped) in seen:
                continue
            seen.add((id(upstream), reshaped))
            if isinstance(upstream.module, _CONV_TYPES) and reshaped:
                found[names[id(module)]] = upstream.module
                break
            if not isinstance(upstream.module, _LAYER_TYPES):
                stack.extend((before, reshaped) for before in upstream.inputs)
    return found


def _kept_zero_features(model: nn.Module, flattened: Mapping[str, nn.Module]) -> dict[str, int]:
    """Per ``Linear`` of ``flattened``: the zero input features (columns) that stay in ``model``.

    Only those of channels with nonzero features count, when the layer's inputs split evenly
    into the convolution's channels (channel-major, as a flatten lays them out).
    """
    kept: dict[str, int] = {}
    for name, module in model.named_modules():
        conv = flattened.get(name)
        if conv is None or not isinstance(module, nn.Linear):
            continue
        zero = _zero_groups(module.weight, 1)
        channels = int(cast(Tensor, conv.weight).shape[0])
        if zero.numel() % channels == 0:
            per_channel = zero.reshape(channels, -1)
            zero = per_channel & ~per_channel.all(dim=1, keepdim=True)
        count = int(zero.sum())
        if count:
            kept[name] = count
    return kept


def _zero_slice_weights(model: nn.Module, fed: set[str]) -> dict[str, int]:
    """Per conv/linear layer: the weights in entirely zero filters or input channels.

    Input channels of a layer in ``fed`` (it reads the model's inputs, which no export can
    shrink) do not count. A transformers ``Conv1D`` (see :func:`torchbip._func.transposed_linear`)
    counts too, with its weight laid out ``(in_features, out_features)``: an output feature is a
    column, an input feature a row.
    """
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        transposed = transposed_linear(module)
        layer = isinstance(module, _LAYER_TYPES) or transposed
        if not layer or not isinstance(weight, Tensor) or weight.dim() < 2:
            continue
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        rows, cols = weight.shape[out_dim], weight.shape[in_dim]
        per_pair = weight.numel() // (rows * cols)
        zero_rows = int(_zero_groups(weight, out_dim).sum())
        zero_cols = 0 if name in fed else int(_zero_groups(weight, in_dim).sum())
        count = (zero_rows * cols + zero_cols * rows - zero_rows * zero_cols) * per_pair
        if count:
            counts[name] = count
    return counts


def _warn_kept_zeros(
    before: Mapping[str, int],
    after: Mapping[str, int],
    unsliced: Collection[str] = (),
    flattened: Mapping[str, int] | None = None,
) -> None:
    """Warn when the export kept more than a quarter of the weights in zero filters/channels.

    ``unsliced``: the names of the layers the export never slices (transformers ``Conv1D``);
    the warning names those that hold such weights. ``flattened``: the ``Linear`` layers that
    read flattened convolution channels and kept entirely zero input features, with their count.
    """
    total, kept = sum(before.values()), sum(after.values())
    if total == 0 or kept <= _KEPT_ZEROS_WARN * total:
        return
    worst = sorted(after.items(), key=lambda item: -item[1])
    listed = ", ".join(f"{name!r} ({count:,})" for name, count in worst[:5])
    more = f" and {len(worst) - 5} more layers" if len(worst) > 5 else ""
    conv1d = [name for name, _ in worst if name in unsliced]
    if conv1d:
        shown = ", ".join(repr(name) for name in conv1d[:5]) + (" ..." if len(conv1d) > 5 else "")
        more += (
            f". The export does not slice transformers Conv1D layers (laid out (in_features, "
            f"out_features)): {len(conv1d)} of them hold such weights ({shown})"
        )
    if flattened:
        shown = ", ".join(f"{name!r} ({count:,})" for name, count in list(flattened.items())[:5])
        more += (
            f". Zero input features of Linear layers that read flattened convolution channels stay "
            f"({shown}): the export removes a convolution channel only when all of its features are "
            "zero, which a per-feature mask (the 'channel' layout, Groups(dim=1)) rarely leaves; prune "
            "the convolution's filters instead, or leave such a layer out of the channel layout's "
            "parameters"
        )
    warnings.warn(
        f"the slim model still holds {kept:,} of the {total:,} weights ({kept / total:.0%}) that lay in "
        f"entirely zero filters or input channels of the masked model: {listed}{more}. Channels stay "
        "where removing them would change the outputs, and where you asked: layers in ignored_layers, "
        "channels that reach the model's output, residual "
        "additions or concatenations tied to channels that are not zero, grouped (not depthwise) or "
        "transposed convolutions, transformers Conv1D layers, a layer used at two places or holding a "
        "tensor tied to another layer's, "
        "split or sliced channels, channels Torch-Pruning cannot map (the key/value projections of "
        "grouped-query attention with rotary embeddings), input features of a Linear that reads "
        "flattened convolution channels where not all of a channel's features are zero, a nonzero constant "
        "entering a zero-padded convolution, and one channel of a layer whose channels are all zero",
        SlimExportWarning,
        stacklevel=3,
    )


def _remove_heads(
    model: nn.Module, tied: Mapping[nn.Module, str], keep_out: Collection[nn.Module] = ()
) -> list[str]:
    """Turn every attention module with removable heads into a slim one (never removing all).

    One holding a tensor tied to another module's (``tied``, see :func:`_tied_modules`) keeps
    its heads, and so does one in ``keep_out`` (the ignored layers) or whose ``out_proj`` is.

    Returns:
        The names of the modules that lost heads.
    """
    from torchbip.attention import SlimMultiheadAttention, removable_heads

    slimmed: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or module in tied or module.out_proj in tied:
            continue
        if module in keep_out or module.out_proj in keep_out:
            continue
        dead = set(removable_heads(module))
        if dead and len(dead) < module.num_heads:
            keep = [h for h in range(module.num_heads) if h not in dead]
            module.__class__ = SlimMultiheadAttention
            assert isinstance(module, SlimMultiheadAttention)
            module.shrink(keep)
            slimmed.append(name)
    return slimmed


def _heads_hint(slimmed: list[str]) -> str:
    """The start of the verify error when attention modules lost heads (else empty)."""
    if not slimmed:
        return ""
    shown = ", ".join(repr(name) for name in slimmed[:3]) + (" ..." if len(slimmed) > 3 else "")
    which = "it" if len(slimmed) == 1 else "them"
    return (
        f"heads were removed from {shown} (the model may use their attention weights, or a mask "
        f"laid out per head); pass {which} in ignored_layers to keep them. Otherwise "
    )


def _check_export_arguments(
    model: Any, example_inputs: Any, ignored_layers: Any, verify: Any, rtol: Any, atol: Any
) -> tuple[dict[int, str], list[nn.Module]]:
    """Check :func:`export_slim`'s arguments; return the module names and the ignored layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (Tensor, tuple)):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of the model's inputs, "
            f"got {type(example_inputs).__name__}"
        )
    batch = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    # an argument of one element (a scale, a step) is not a batch: refuse only when no tensor
    # argument holds two samples or more
    sizes = [tuple(t.shape) for t in batch if isinstance(t, Tensor) and t.dim() >= 1]
    single = sizes if all(size[0] < 2 for size in sizes) else []
    if single:
        raise ValueError(
            f"example_inputs holds a batch of one sample (shape {single[0]}): pass at least two, so "
            "that a channel constant within each sample is not taken for a constant one"
        )
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {verify!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (
            isinstance(value, bool | np.bool_)
            or not isinstance(value, numbers.Real)
            or not 0 <= float(value) < math.inf
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(ignored_layers, nn.Module) or not isinstance(ignored_layers, Iterable):
        raise TypeError(f"ignored_layers must be an iterable of modules, got {type(ignored_layers).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    ignored = list(ignored_layers)
    for m in ignored:
        if not isinstance(m, nn.Module):
            raise TypeError(f"ignored_layers must hold modules, got {m!r} of type {type(m).__name__}")
        if id(m) not in names:
            raise ValueError(f"ignored_layers holds a {type(m).__name__} that is not part of the model")
    return names, ignored


# (rtol, atol) by output dtype when export_slim's are None: torch.testing.assert_close's defaults
_TOLERANCES = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5)}
_DEFAULT_TOLERANCES = (1e-4, 1e-5)


def _tolerances(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """``rtol`` and ``atol``, each ``None`` replaced by the default for outputs of ``dtype``.

    Example:
        >>> _tolerances(torch.bfloat16, None, None), _tolerances(torch.float32, None, 1e-3)
        ((0.016, 1e-05), (0.0001, 0.001))
    """
    default_rtol, default_atol = _TOLERANCES.get(dtype, _DEFAULT_TOLERANCES)
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def _check_close(
    outputs: Any, reference: Any, rtol: float | None, atol: float | None, hint: str = ""
) -> None:
    """Raise unless ``outputs`` equal ``reference`` within the tolerances; ``hint`` starts the cause."""
    got = output_tensors(outputs)
    want = output_tensors(reference)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
        raise RuntimeError(
            "the slim model's outputs have other shapes than the masked model's: "
            f"{[tuple(g.shape) for g in got]} vs {[tuple(w.shape) for w in want]}"
        )
    for g, w in zip(got, want, strict=True):
        r, a = _tolerances(w.dtype, rtol, atol)
        scale = float(w.abs().max()) if w.numel() else 0.0
        error = float((g - w).abs().max()) if w.numel() else 0.0
        if error > a * max(scale, 1.0) + r * scale:
            raise RuntimeError(
                f"the slim model's outputs differ from the masked model's by {error:.3g} (largest "
                f"output {scale:.3g}, dtype {w.dtype}, rtol={r:g}, atol={a:g}) on example_inputs: "
                f"{hint}an operation mixes channels in a way the dependency graph did not see; pass "
                "its producers in ignored_layers (or, for a rounding difference, a larger rtol/atol)"
            )


def load_slim_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Resize a freshly built ``model`` to the shapes in ``state_dict`` and load it strictly.

    This is how a slim model from :func:`export_slim` is restored: build the original
    architecture (e.g. ``torchvision.models.resnet18()``), then load the slim state dict saved
    with ``torch.save(slim.state_dict(), path)`` and read with
    ``torch.load(path, weights_only=True)``. Every parameter and buffer whose shape differs is
    replaced by a new tensor of the saved shape, layer attributes (``in_channels``,
    ``out_features``, ``num_features``, ``groups`` of depthwise convolutions, ...) are updated, a
    bias that the export added (by folding) is created, then ``load_state_dict(strict=True)``
    fills in the values (in place where a shape is unchanged).

    All or nothing: the keys, types, dtypes and shapes are checked before anything changes, and
    if loading fails anyway (an exception from a custom module, ``KeyboardInterrupt``) the model
    is put back as it was: the same module, Parameter and buffer objects with the same values
    in the same memory, the same layer attributes and hooks (at the cost of one temporary copy
    of the tensors whose shape stays, which are filled in place). The same holds for a model
    converted with :func:`torchbip.sparse.to_sparse_csr`.

    Args:
        model: a model of the architecture that was exported (its values are overwritten).
        state_dict: the slim model's state dict.

    Returns:
        ``model``, resized and loaded in place.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``state_dict`` is not a mapping, or a
            key is not a string or a value not a tensor.
        ValueError: for unexpected or missing keys, a shape that :func:`export_slim` cannot
            produce from ``model`` (another number of dimensions, a larger or empty dimension,
            another kernel size, sizes that disagree within a layer), a value whose dtype is
            of another kind (floating point, complex, integer, bool) than the model's, or two
            keys of one tensor of ``model`` (tied) with different values (loading both would
            keep only the last).
        RuntimeError: from ``load_state_dict``, for a model whose own loading hooks rename keys
            (the checks above then are torch's).

    Example:
        >>> import io, torch
        >>> from torch import nn
        >>> from torchbip import bip_structured
        >>> def build():
        ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> model = build()
        >>> _ = bip_structured(model[0], "weight", amount=3, dim=0)
        >>> slim = export_slim(model, torch.randn(2, 3, 8, 8))
        >>> buffer = io.BytesIO()
        >>> torch.save(slim.state_dict(), buffer)
        >>> _ = buffer.seek(0)
        >>> rebuilt = load_slim_state_dict(build(), torch.load(buffer, weights_only=True))
        >>> rebuilt[0].out_channels, rebuilt[2].in_channels
        (5, 5)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> torch.equal(rebuilt(x), slim(x))
        True
        >>> fresh = build()
        >>> try:
        ...     load_slim_state_dict(fresh, {**slim.state_dict(), "head.weight": torch.ones(1)})
        ... except ValueError as err:
        ...     print(err)
        state_dict has unexpected key(s) ['head.weight']: not a parameter or persistent buffer of model
        >>> fresh[0].out_channels  # unchanged
        8
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    plan = _plan_load(model, state_dict)
    replaced = [tensor for tensor, _ in plan.resize.values()]
    loading = _with_head_keys(state_dict, plan)
    with ModelSnapshot(model, _LAYER_ATTRIBUTES, unchanged=replaced).restored_on_failure():
        _apply_plan(model, plan)
        model.load_state_dict(loading, strict=True)
    from torchbip.attention import SlimMultiheadAttention

    for module in plan.modules:  # attention that lost heads computes with the kept ones only
        if not isinstance(module, nn.MultiheadAttention) or isinstance(module, SlimMultiheadAttention):
            continue
        if module.num_heads * module.head_dim != module.embed_dim:
            module.__class__ = SlimMultiheadAttention
            module._qkv_same_embed_dim = False
            origin = plan.heads.get(module)
            recorded = [] if origin is None else [origin[0], *origin[1]]
            cast(SlimMultiheadAttention, module).set_extra_state(torch.tensor(recorded, dtype=torch.int64))
    return model


def _with_head_keys(state_dict: Mapping[str, Any], plan: _LoadPlan) -> Mapping[str, Any]:
    """``state_dict`` as ``load_state_dict`` takes it: the kept heads' keys where the modules have them.

    An ``nn.MultiheadAttention`` has no ``_extra_state`` key (the heads it keeps are set after
    loading); a :class:`torchbip.attention.SlimMultiheadAttention` has one, empty when the file
    holds none.
    """
    from torchbip.attention import SlimMultiheadAttention

    drop = {key for module, key in plan.head_keys.items() if not isinstance(module, SlimMultiheadAttention)}
    add = {
        key: torch.zeros(0, dtype=torch.int64)
        for module, key in plan.head_keys.items()
        if isinstance(module, SlimMultiheadAttention) and key not in state_dict
    }
    if not (drop & set(state_dict)) and not add:
        return state_dict
    loading: OrderedDict[str, Any] = OrderedDict((k, v) for k, v in state_dict.items() if k not in drop)
    loading.update(add)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        loading._metadata = metadata  # type: ignore[attr-defined]
    return loading


# Layer sizes that ``_update_attributes`` sets (restored when a load fails).
_LAYER_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "num_channels",
    "normalized_shape",
    "num_parameters",
    "num_heads",
)


class _LoadPlan:
    """What :func:`load_slim_state_dict` changes: new shapes per tensor, and biases to create."""

    def __init__(self) -> None:
        # id(old tensor) -> (old tensor, the saved shape); one entry per tensor, also when shared
        self.resize: dict[int, tuple[Tensor, torch.Size]] = {}
        # modules whose bias the export created by folding: module -> the bias key
        self.biases: dict[nn.Module, str] = {}
        self.modules: list[nn.Module] = []  # modules whose sizes change, in model order
        # attention modules -> the heads they kept, from their "_extra_state" key (None: absent)
        self.heads: dict[nn.Module, tuple[int, tuple[int, ...]] | None] = {}
        self.head_keys: dict[nn.Module, str] = {}  # attention modules -> their "_extra_state" key


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "bool" if dtype == torch.bool else "integer"


def _custom_loading(module: nn.Module) -> bool:
    """Whether ``module`` loads in its own way (hooks that may rename keys, its own loader)."""
    from torchbip.sparse import CSRModule  # here: torchbip.sparse imports this module

    known = (
        nn.Module._load_from_state_dict,
        nn.modules.batchnorm._NormBase._load_from_state_dict,
        nn.modules.instancenorm._InstanceNorm._load_from_state_dict,
        CSRModule._load_from_state_dict,
    )
    return bool(module._load_state_dict_pre_hooks) or type(module)._load_from_state_dict not in known


def _optional_keys(module: nn.Module, head: str, state_dict: Mapping[str, Any]) -> set[str]:
    """Keys torch's own loaders fill in or drop for old checkpoints (no version metadata)."""
    metadata = getattr(state_dict, "_metadata", None)
    version = (metadata or {}).get(head[:-1], {}).get("version")
    if not isinstance(module, nn.modules.batchnorm._NormBase) or (version is not None and version >= 2):
        return set()
    keys = {head + "num_batches_tracked"} if module.track_running_stats else set()
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and not module.track_running_stats:
        keys |= {head + "running_mean", head + "running_var"}
    return keys


def _plan_load(model: nn.Module, state_dict: Mapping[Any, Any]) -> _LoadPlan:
    """Check ``state_dict`` against ``model`` without changing anything; say what to resize."""
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r} of type {type(key).__name__}")
        if not isinstance(value, Tensor) and not key.endswith("_extra_state"):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    plan = _LoadPlan()
    expected: set[str] = set()
    optional: set[str] = set()
    custom = False
    firsts: dict[int, tuple[str, Tensor]] = {}  # id(tensor) -> (the first key, its saved value)
    layers: list[tuple[nn.Module, str, dict[str, torch.Size]]] = []  # the layers that change
    for prefix, module in model.named_modules(remove_duplicate=False):
        head = prefix + "." if prefix else ""
        custom = custom or _custom_loading(module)
        optional |= _optional_keys(module, head, state_dict)
        if type(module).set_extra_state is not nn.Module.set_extra_state:
            expected.add(head + "_extra_state")
        local = {
            **{k: p for k, p in module._parameters.items() if p is not None},
            **{
                k: b
                for k, b in module._buffers.items()
                if b is not None and k not in module._non_persistent_buffers_set
            },
        }
        planned: dict[str, torch.Size] = {}
        for name, tensor in local.items():
            key = head + name
            expected.add(key)
            saved = state_dict.get(key)
            if saved is None:
                continue
            _check_value(key, saved, tensor)
            first_key, first = firsts.setdefault(id(tensor), (key, saved))
            if first.shape != saved.shape:
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(saved.shape)} but state_dict[{first_key!r}], "
                    f"the same tensor of model, has shape {tuple(first.shape)}"
                )
            if not _same_values(first, saved, tensor.dtype):
                raise ValueError(
                    f"state_dict[{key!r}] and state_dict[{first_key!r}] hold different values, but they "
                    "name the same tensor of model (tied): loading both would keep only the last one. "
                    "Save a model with the same tie, or untie the tensor in model first"
                )
            planned[name] = saved.shape
            if saved.shape != tensor.shape:
                plan.resize[id(tensor)] = (tensor, saved.shape)
        if isinstance(module, nn.MultiheadAttention):
            _plan_heads(module, head, state_dict, planned, plan)
            optional.add(head + "_extra_state")  # the kept heads of a slim attention (not in old files)
        bias_key = head + "bias"
        created = _takes_bias(module) and module.bias is None and bias_key in state_dict
        if created:
            saved = state_dict[bias_key]
            _check_value(bias_key, saved, cast(Tensor, module.weight), created=True)
            expected.add(bias_key)
            plan.biases[module] = bias_key
            planned["bias"] = saved.shape
        if (created or any(planned[k] != local[k].shape for k in planned if k in local)) and all(
            module is not m for m, _, _ in layers
        ):
            layers.append((module, head, planned))
    if not custom:
        unexpected = [k for k in state_dict if k not in expected and k not in optional]
        if unexpected:
            raise ValueError(
                f"state_dict has unexpected key(s) {unexpected}: "
                "not a parameter or persistent buffer of model"
            )
        missing = sorted(expected - set(state_dict) - optional)
        if missing:
            raise ValueError(f"state_dict is missing key(s) {missing} of model")
    for module, head, planned in layers:
        _check_layer(module, head, planned)
        plan.modules.append(module)
    return plan


def _plan_heads(
    module: nn.MultiheadAttention,
    head: str,
    state_dict: Mapping[str, Any],
    planned: Mapping[str, torch.Size],
    plan: _LoadPlan,
) -> None:
    """Check the kept heads a slim attention recorded under ``<head>_extra_state``; add them to ``plan``."""
    from torchbip.attention import SlimMultiheadAttention, head_origin

    key = head + "_extra_state"
    plan.head_keys[module] = key
    if key not in state_dict:
        plan.heads[module] = None
        return
    rows = (
        planned["in_proj_weight"][0]
        if "in_proj_weight" in planned
        else 3 * module.num_heads * module.head_dim
    )
    origin = head_origin(state_dict[key], rows // (3 * module.head_dim), f"state_dict[{key!r}]")
    original = module.original_heads if isinstance(module, SlimMultiheadAttention) else module.num_heads
    if origin is not None and original is not None and origin[0] != original:
        raise ValueError(
            f"state_dict[{key!r}] records heads kept of {origin[0]}, but the model's attention has "
            f"{original}: build the original architecture"
        )
    plan.heads[module] = origin


def _same_values(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``a`` and ``b`` load the same values into a tensor of ``dtype`` (NaNs alike)."""
    if a is b or a.is_meta or b.is_meta:
        return True
    a, b = (t.detach().to_dense() if t.layout != torch.strided else t.detach() for t in (a, b))
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    if torch.equal(a, b):
        return True
    if not (dtype.is_floating_point or dtype.is_complex):
        return False
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def _check_value(key: str, saved: Tensor, tensor: Tensor, created: bool = False) -> None:
    """Raise unless ``saved`` can be loaded into ``tensor`` (or into a new bias next to it)."""
    what = "the weight of its layer" if created else "the model's tensor"
    if _kind(saved.dtype) != _kind(tensor.dtype):
        raise ValueError(
            f"state_dict[{key!r}] has dtype {saved.dtype}, {what} {tensor.dtype}: "
            f"{_kind(saved.dtype)} values do not load into {_kind(tensor.dtype)} ones"
        )
    if tensor.layout == torch.strided and saved.layout != torch.strided:
        raise ValueError(
            f"state_dict[{key!r}] is a {str(saved.layout).removeprefix('torch.')} tensor, the model's is "
            "dense: load a dense state dict (tensor.to_dense()) or convert the model first"
        )
    if saved.is_meta and not tensor.is_meta:
        raise ValueError(f"state_dict[{key!r}] is a meta tensor: it holds no values to load")
    if created or saved.shape == tensor.shape:  # a created bias is checked with its layer
        return
    old, new = tuple(tensor.shape), tuple(saved.shape)
    if len(new) != len(old):
        raise ValueError(
            f"state_dict[{key!r}] has shape {new} with {len(new)} dimensions, the model's tensor {old} "
            f"has {len(old)}: export_slim changes sizes, never the number of dimensions"
        )
    if any(n > o or (n == 0 and o > 0) for n, o in zip(new, old, strict=True)):
        raise ValueError(
            f"state_dict[{key!r}] has shape {new}, which export_slim cannot produce from the model's {old}: "
            "it removes channels (never all of them) and adds none; build the original architecture"
        )


def _check_layer(module: nn.Module, head: str, shapes: Mapping[str, torch.Size]) -> None:
    """Raise unless the planned shapes of one layer's tensors make a layer of its kind."""

    def fail(why: str) -> ValueError:
        sizes = ", ".join(f"state_dict[{head + k!r}] {tuple(v)}" for k, v in shapes.items())
        return ValueError(f"the shapes {sizes} do not make a {type(module).__name__}: {why}")

    def shape(name: str) -> tuple[int, ...] | None:
        if name in shapes:
            return tuple(shapes[name])
        tensor = getattr(module, name, None)
        return tuple(tensor.shape) if isinstance(tensor, Tensor) else None

    from torchbip.sparse import CSRModule, SparseCSRConv2d  # here: torchbip.sparse imports this module

    weight, bias = shape("weight"), shape("bias")
    if isinstance(module, CSRModule):  # the weight as a matrix: (out, in * kernel entries)
        assert weight is not None
        if bias is not None and bias != weight[:1]:
            raise fail(f"the bias must have shape ({weight[0]},), one entry per output")
        if isinstance(module, SparseCSRConv2d):
            entries = math.prod(module.kernel_size)
            if weight[1] % entries:
                raise fail(
                    f"the kernel size must stay {module.kernel_size}: {weight[1]} weight columns are "
                    f"not a whole number of input channels of {entries} entries"
                )
    elif isinstance(module, _LAYER_TYPES):
        assert weight is not None
        if bias is not None and bias != weight[:1]:
            raise fail(f"the bias must have shape ({weight[0]},), one entry per output")
        if isinstance(module, _CONV_TYPES):
            old = tuple(module.weight.shape)
            if weight[2:] != old[2:]:
                raise fail(f"the kernel size must stay {old[2:]}")
            groups = module.groups
            if groups > 1 and groups == module.in_channels == module.out_channels:
                if weight[1] != old[1]:
                    raise fail(f"a depthwise convolution keeps {old[1]} input(s) per group")
            elif weight[0] % groups:
                raise fail(f"{weight[0]} output channels do not split into groups={groups}")
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        sizes = {shape(k) for k in ("weight", "bias", "running_mean", "running_var")} - {None}
        if len(sizes) > 1:
            raise fail("weight, bias, running_mean and running_var need one length")
    elif isinstance(module, nn.GroupNorm):
        sizes = {shape(k) for k in ("weight", "bias")} - {None}
        if len(sizes) > 1:
            raise fail("weight and bias need one length")
        if weight is not None and weight[0] % module.num_groups:
            raise fail(f"{weight[0]} channels do not split into num_groups={module.num_groups}")
    elif isinstance(module, nn.LayerNorm) and len({shape(k) for k in ("weight", "bias")} - {None}) > 1:
        raise fail("weight and bias need one shape")
    elif isinstance(module, nn.MultiheadAttention) and "in_proj_weight" in shapes:
        rows = shapes["in_proj_weight"][0]
        if rows % (3 * module.head_dim):
            raise fail(f"in_proj_weight needs 3 * head_dim = {3 * module.head_dim} rows per head")
        if tuple(shapes["in_proj_weight"][1:]) != (module.embed_dim,):
            raise fail(f"in_proj_weight keeps {module.embed_dim} columns (embed_dim)")


def _apply_plan(model: nn.Module, plan: _LoadPlan) -> None:
    """Replace the tensors that change shape (the same new object wherever one was shared)."""
    fresh: dict[int, Tensor] = {}
    for key, (tensor, shape) in plan.resize.items():
        new = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        fresh[key] = nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in fresh:
                module._parameters[name] = cast(nn.Parameter, fresh[id(p)])
        for name, b in list(module._buffers.items()):
            if b is not None and id(b) in fresh:
                module._buffers[name] = fresh[id(b)]
    from torchbip.sparse import CSRModule  # here: torchbip.sparse imports this module

    for module in plan.biases:
        weight = cast(Tensor, module.weight)
        bias = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
        if isinstance(module, CSRModule):  # a CSR layer holds its bias as a buffer
            module._buffers["bias"] = bias
        else:
            module.bias = nn.Parameter(bias)
    for module in plan.modules:
        _update_attributes(module)


def _takes_bias(module: nn.Module) -> bool:
    """Whether ``module`` is a layer that the export may give a bias (by folding) it had not."""
    from torchbip.sparse import CSRModule  # here: torchbip.sparse imports this module

    return isinstance(module, (*_LAYER_TYPES, CSRModule))


def _update_attributes(module: nn.Module) -> None:
    """Make a resized layer's attributes agree with its tensors."""
    from torchbip.sparse import SparseCSRConv2d, SparseCSRLinear  # here: torchbip.sparse imports this module

    if isinstance(module, nn.Linear | SparseCSRLinear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _CONV_TYPES):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, SparseCSRConv2d):  # its weight: (out_channels, in_channels * kernel entries)
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] // math.prod(module.kernel_size)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        source = module.weight if module.weight is not None else module.running_mean
        if source is not None:
            module.num_features = source.shape[0]
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        module.num_heads = module.in_proj_weight.shape[0] // (3 * module.head_dim)
