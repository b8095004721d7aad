r"""Coupled channels: one BiP score per channel of a dependency group, so pruned channels go.

Pruning a convolution's output channel on its own leaves the rest of the network reading it:
its BatchNorm channel still adds a bias, every consumer still has an input channel for it, and
a residual addition ties it to the same channel of every other layer that writes into the sum.
:class:`Coupled` learns one score per *coupled channel* instead. Torch-Pruning's dependency
graph (the optional extra ``torchbip[export]``, i.e. ``pip install torch-pruning``) gives the
groups of layers whose channels must go together: a convolution's output channel with its
BatchNorm channel, the input channel of every consumer, and every layer tied to it through
residual additions, concatenations and flattening (a group whose channels go through
``torch.split``, ``torch.chunk`` or ``unbind`` is left dense, as is one that reaches the model's
output: Torch-Pruning can map a split's pieces to the wrong channels; so is one whose channels
go through a channel slice such as ``y[:, :k]``, whose bounds the forward fixes: removing a
channel would shift them. Give each piece a layer of its own instead). A group of ``C``
channels gets ``C`` scores. While training, channel ``k``'s mask
zeroes the ``k``-th input slice of every reader
(the consumers' input channels): nothing reads a pruned channel, so the model computes what it
would with the whole channel removed, and the channel keeps a first-order gradient (the change
of the loss from putting it back), so its score moves and it can return. :meth:`torchbip.BiP.finish`
then zeroes the ``k``-th slice of every tensor in the group (weights, biases and the
BatchNorm's affine parameters, the outputs unchanged), so a pruned channel is exactly zero
everywhere and :func:`torchbip.export_slim` removes every pruned channel. The heads of every
:class:`torch.nn.MultiheadAttention` form one more group per module (a head's query, key and
value rows of ``in_proj_weight`` and ``in_proj_bias``); the export replaces the module by a
:class:`torchbip.attention.SlimMultiheadAttention` with the kept heads.

The score of channel :math:`k` moves along the chain rule through the shared mask: the sum,
over every masked tensor :math:`t` of the group and every entry in its slice :math:`k`, of the
element-wise upper gradient :math:`d\ell/dm_t` times the tensor's other mask factor (a
convolution that reads one group and writes another is masked by both). Masking every tensor
while training would make that gradient zero for a pruned channel (the loss is flat in a
channel that is zero everywhere); masking the readers alone keeps it.

Budgets (``amount`` is always one number):

- ``"layer"`` (the paper): every group prunes ``round(amount * C)`` of its ``C`` channels;
- ``"global"``: all channels of all groups ranked together, with the per-group floor
  ``min_keep`` and cap ``max_keep`` of :class:`torchbip.BiP`;
- ``"macs"``: ``amount`` is the fraction of the model's multiply-accumulates (all
  convolutions, linear layers and attention modules, with their projections, the key and value
  projections reading ``kdim`` and ``vdim`` features, and both attention products, on
  ``example_inputs``) to remove; every group prunes the same fraction of its
  channels, the one whose MACs come closest to the target (groups of fewer than 16 channels,
  such as attention heads, move in coarse steps: they keep that fraction rounded, and the larger
  groups' common fraction is then set again to land closest to the target).

Per-channel layers pass a group through: a PReLU (its slopes, one per channel, are zeroed with
their channel; one shared slope stays), an InstanceNorm (its affine parameters are zeroed with
their channel, as a BatchNorm's) and torchvision's ``FrozenBatchNorm2d`` (its buffers are sliced
at the export).

Every group keeps at least one channel (a layer is never removed whole). Groups whose channels
reach the model's output (the classifier), pass through a layer whose channels cannot be
zeroed exactly (a LayerNorm, a BatchNorm or an InstanceNorm with running statistics and without
affine parameters, a grouped convolution that is not depthwise, a transposed convolution) or
through an operation without parameters that mixes them (``F.normalize`` or ``softmax`` over
channels, a channel shuffle, ``flip``; the dependency graph takes these for element-wise
operations, so every group is also measured on the example inputs, see :func:`find_groups`)
are left dense and listed in :attr:`CoupledLayout.skipped`. So is a group whose channels the
model cannot lose, which :func:`find_groups` finds by removing one of them from a copy of the
model before any training: a buffer or constant that the forward uses per channel (``x *
self.scale``) is invisible to the graph and keeps the old channel count.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import torchbip
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))
    >>> x = torch.randn(2, 3, 6, 6)
    >>> pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x))
    >>> pruner.names  # the first conv's group: its filters, its BatchNorm, the next conv's inputs
    ['0.weight', '0.bias', '1.weight', '1.bias', '3.weight', '3.bias', '5.weight']
    >>> # while training, the readers are masked (the next conv's inputs), not the BatchNorm
    >>> int(model[1].weight_mask.sum()), int(model[3].weight_mask[:, :, 0, 0].any(0).sum())
    (8, 4)
    >>> _ = pruner.finish()  # then every tensor of a pruned channel is zero
    >>> bn, conv = model[1].weight_mask, model[0].weight_mask[:, 0, 0, 0]
    >>> int(bn.sum()), bn.tolist() == conv.tolist()
    (4, True)
    >>> slim = torchbip.export_slim(model, x)
    >>> slim[0].out_channels, slim[3].in_channels, slim[3].out_channels, slim[5].in_features
    (4, 4, 4, 16)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip._func import PRUNABLE_TYPES, Target
from torchbip._tensors import tensor_leaves
from torchbip._tracing import (
    UnboundedGroupError,
    as_inputs,
    build_graph,
    cuts_channels,
    is_depthwise,
    is_frozen_batchnorm,
    output_tensors,
    pruning_group,
    torch_pruning,
)
from torchbip.layouts import Layout, MaskLayout
from torchbip.masks import GlobalTopK, cap_counts, count_from_amount, floor_counts, topk_mask, validate_amount
from torchbip.method import BiPMethod, attach_scores, outside_inference_mode
from torchbip.pruned import pruned_tensors
from torchbip.scores import init_scores

__all__ = ["BUDGETS", "BiPCoupled", "ChannelGroup", "Coupled", "CoupledLayout", "Slot", "find_groups"]

BUDGETS: tuple[str, ...] = ("layer", "global", "macs")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FINE_GROUP = 16  # groups of at least this many channels take the MACs budget's fine adjustment


# -- the groups --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One tensor's share of a group: its entries along ``dim`` at ``positions``.

    Attributes:
        param: index of the tensor in :attr:`Found.params`.
        dim: the tensor's axis that the group's channels index.
        positions: indices along ``dim`` (a long tensor).
        channels: the group channel of each position (a long tensor of the same length;
            several positions share a channel after a flatten).
    """

    param: int
    dim: int
    positions: Tensor
    channels: Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose channels go together, one score per channel.

    Attributes:
        root: the name of the layer whose output channels define the group.
        size: the number of channels.
        slots: every tensor's share (see :class:`Slot`).
        layers: the names of the member layers, in the dependency graph's order.
    """

    root: str
    size: int
    slots: tuple[Slot, ...]
    layers: tuple[str, ...]


@dataclass(frozen=True)
class LayerMacs:
    """A convolution's, linear layer's or attention module's multiply-accumulates.

    Attributes:
        module: the layer (of the user's model).
        per_pair: MACs per entry pair (output channel, input channel of its weight); for an
            attention module, the MACs of one head.
    """

    module: nn.Module
    per_pair: float

    @property
    def dense(self) -> float:
        """The layer's MACs with every channel kept."""
        if isinstance(self.module, nn.MultiheadAttention):  # per_pair: the MACs of one head
            return self.per_pair * self.module.num_heads
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        return self.per_pair * weight.shape[0] * weight.shape[1]


@dataclass
class Found:
    """The result of :func:`find_groups`.

    Attributes:
        params: ``(module, name)`` of every tensor in a group, in model order.
        groups: the groups BiP can prune.
        skipped: ``(root, reason)`` for the groups it leaves dense.
        macs: the MACs of every convolution, linear layer and attention module, by name.
    """

    params: list[tuple[nn.Module, str]]
    groups: list[ChannelGroup]
    skipped: list[tuple[str, str]]
    macs: dict[str, LayerMacs]

    @property
    def dense_macs(self) -> float:
        """The MACs of all convolutions, linear layers and attention modules on the example inputs."""
        return sum(layer.dense for layer in self.macs.values())


def _layer_signature(
    model: nn.Module,
) -> tuple[tuple[str, str, tuple[tuple[str, tuple[int, ...]], ...]], ...]:
    """What the traced groups depend on: every module's name, type and parameter shapes."""
    return tuple(
        (
            name,
            type(module).__name__,
            tuple((k, tuple(p.shape)) for k, p in module._parameters.items() if p is not None),
        )
        for name, module in model.named_modules()
    )


def _like_parameters(inputs: tuple[Any, ...], model: nn.Module) -> tuple[Any, ...]:
    """Floating-point example inputs on the device and in the dtype of the model's parameters.

    The channel groups do not depend on either; the example batch may have been made for the
    precision or device the model is trained in (a trainer converts it later).
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return inputs
    return tuple(
        x.to(device=param.device, dtype=param.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
        for x in inputs
    )


def find_groups(model: nn.Module, example_inputs: Tensor | tuple[Any, ...]) -> Found:
    """The coupled channel groups of ``model``, from Torch-Pruning's dependency graph.

    The graph is traced on a copy of ``model`` (tracing runs a forward pass in eval mode), so
    ``model`` is left exactly as it was. Each group is then measured on the copy (see
    :func:`_mixing_groups`): a group whose pruned channels would still reach the outputs past
    its readers is left dense. Then one channel of every group is removed from the copy as
    :func:`torchbip.export_slim` would remove it, and the copy is run (see
    :func:`_unremovable_groups`): a group without which the model fails (a buffer or constant
    that the forward uses per channel, which the graph does not see, keeps the old channel
    count) is left dense too, before any training.

    Args:
        model: the model.
        example_inputs: a batch for ``model(*example_inputs)`` (a tensor or a tuple).

    Returns:
        A :class:`Found`.

    Raises:
        ValueError: when the model fails on ``example_inputs`` or Torch-Pruning cannot trace it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> found = find_groups(model, torch.randn(1, 3, 4, 4))
        >>> [(g.root, g.size, g.layers) for g in found.groups]
        [('0', 4, ('0', '2'))]
        >>> found.skipped
        [('2', "its channels reach the model's output")]
    """
    pruned = [fqn for fqn, _, _ in pruned_tensors(model)]
    if pruned:
        raise ValueError(
            f"layout=Coupled starts from an unpruned model, but {pruned} are pruned already; "
            "prune.remove them first"
        )
    tp = torch_pruning("torchbip.Coupled")
    op = tp.ops.OPTYPE
    passthrough = {op.ELEMENTWISE, op.CONCAT, op.SPLIT, op.RESHAPE, op.SLICE, op.UNBIND, op.EXPAND}
    twin = copy.deepcopy(model)
    inputs = _like_parameters(as_inputs(example_inputs), twin)
    names = {m: n for n, m in twin.named_modules()}
    param_names = {id(p): n for n, p in twin.named_parameters()}
    modules = dict(model.named_modules())
    training = twin.training
    cuda = _cuda_devices(twin, inputs)  # the forward passes below draw none of the caller's numbers
    try:  # the model's own error, before the tracer retries it in ways that hide it (in eval, as it)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            reference = [tuple(t.shape) for t in output_tensors(twin.eval()(*inputs))]
        twin.train(training)
    except Exception as err:
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
        raise ValueError(
            f"Coupled(example_inputs=...): the model fails on the example inputs of shapes {shapes} "
            f"({type(err).__name__}: {err}); pass a batch the model accepts"
        ) from err
    with torch.random.fork_rng(devices=cuda):
        graph = build_graph(tp, twin, inputs, "Coupled(example_inputs=...)")
        per_layer = _layer_macs(twin, inputs)
    macs = {n: LayerMacs(modules[n], per_pair) for n, per_pair in per_layer.items()}
    param_index: dict[tuple[str, str], int] = {}
    params: list[tuple[nn.Module, str]] = []
    groups: list[ChannelGroup] = []
    skipped: list[tuple[str, str]] = []
    ordered: list[tuple[ChannelGroup, list[tuple[str, str, int, list[int], list[int]]]]] = []
    for root_module, group in _root_groups(tp, graph):
        if group is None:
            skipped.append((names[root_module], _UNBOUNDED))
            continue
        root, size = names[root_module], len(group[0].idxs)
        shares: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}
        layers: list[str] = []
        reason = None
        for item in group:
            dep, node = item.dep, item.dep.target
            module = node.module
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            if node.type == op.OUTPUT or (is_out and not node.outputs):
                reason = "its channels reach the model's output"
                break
            if node.type in (op.SPLIT, op.UNBIND):  # Torch-Pruning can map a split's pieces wrongly
                reason = _SPLIT
                break
            if node.type == op.SLICE and cuts_channels(node):  # the export cannot shift its bounds
                reason = _SLICE
                break
            if node.type in passthrough:
                continue
            if node.type == op.CUSTOMIZED and is_frozen_batchnorm(module):
                continue  # fixed per-channel scale and shift: a pruned channel's readers ignore it
            if isinstance(module, nn.Module):
                name = names.get(module, type(module).__name__)
            else:  # a Parameter the forward uses directly
                name = param_names.get(id(module), type(module).__name__)
            entries: list[tuple[str, int]]
            layer = node.type in (op.CONV, op.LINEAR, op.DEPTHWISE_CONV)
            if layer and not isinstance(module, PRUNABLE_TYPES):
                # Torch-Pruning takes a transposed convolution, whose weight is laid out
                # (in, out, ...), for an ordinary one
                reason = f"{name!r} ({type(module).__name__}) is not a Linear or Conv layer Coupled prunes"
                break
            if layer and getattr(module, "groups", 1) != 1:
                if not is_depthwise(module):  # Torch-Pruning calls groups == out_channels depthwise
                    reason = f"{name!r} is a grouped convolution that is not depthwise"
                    break
                entries = [("weight", 0), ("bias", 0)]
            elif node.type in (op.CONV, op.LINEAR):
                entries = [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
            elif node.type == op.BN and getattr(module, "weight", None) is not None:
                entries = [("weight", 0), ("bias", 0)]
            elif node.type == op.BN:
                reason = f"the BatchNorm {name!r} has no affine parameters to zero"
                break
            elif node.type == op.PRELU:  # per channel, prelu(0) = 0; one shared slope: nothing to slice
                entries = [("weight", 0)] if module.weight.numel() > 1 else []
            elif isinstance(module, nn.modules.instancenorm._InstanceNorm):  # per channel, as a BatchNorm
                if module.affine:
                    entries = [("weight", 0), ("bias", 0)]
                elif module.track_running_stats:  # eval: a zero channel becomes -mean / std
                    reason = (
                        f"the InstanceNorm {name!r} has running statistics but no affine parameters to zero"
                    )
                    break
                else:  # a zero channel stays zero (its own mean is zero)
                    entries = []
            elif node.type == op.PARAMETER:
                reason = (
                    f"{name!r}, a parameter that the forward uses directly (not through a layer), holds "
                    "its channels; Coupled prunes layers' tensors only"
                )
                break
            else:
                reason = (
                    f"{name!r} ({type(module).__name__}) mixes its channels; they cannot be zeroed exactly"
                )
                break
            if entries and name not in layers:
                layers.append(name)
            for pname, dim in entries:
                if getattr(module, pname, None) is None:
                    continue
                positions, channels = shares.setdefault((name, pname, dim), ([], []))
                for i, r in zip(item.idxs, item.root_idxs, strict=True):
                    positions.append(int(i))
                    channels.append(int(r))
        if reason is not None:
            skipped.append((root, reason))
            continue
        ordered.append(
            (
                ChannelGroup(root, size, (), tuple(layers)),
                [(n, p, d, pos, ch) for (n, p, d), (pos, ch) in shares.items()],
            )
        )
    for index in reversed(_mixing_groups(twin, inputs, [shares_ for _, shares_ in ordered], cuda)):
        skipped.append((ordered.pop(index)[0].root, _MIXING))
    traced = [(g.root, g.size) for g, _ in ordered]  # the graph's groups (then attention heads)
    for name, module in twin.named_modules():  # attention heads: one group per attention module
        if not isinstance(module, nn.MultiheadAttention) or name in {g.root for g, _ in ordered}:
            continue
        if not (module._qkv_same_embed_dim and module.bias_k is None and module.in_proj_weight is not None):
            skipped.append((name, "attention with separate query/key/value weights or bias_k/bias_v"))
            continue
        e, d = module.embed_dim, module.head_dim
        rows = list(range(3 * e))
        heads = [(r % e) // d for r in rows]
        shares_list = [(name, "in_proj_weight", 0, rows, heads)]
        if module.in_proj_bias is not None:
            shares_list.append((name, "in_proj_bias", 0, rows, heads))
        ordered.append((ChannelGroup(name, module.num_heads, (), (name,)), shares_list))
    with torch.random.fork_rng(devices=cuda):  # (changes the twin: last)
        failing = _unremovable_groups(model, twin, graph, tp, inputs, traced, reference)
    for index, error in reversed(failing):
        skipped.append((ordered.pop(index)[0].root, _UNREMOVABLE.format(error=error)))
    # tensors in model order: modules as named_modules() lists them, then their own order
    rank = {n: i for i, n in enumerate(modules)}
    own = {n: {p: i for i, p in enumerate(m._parameters)} for n, m in modules.items()}
    keys = sorted(
        {(n, p) for _, shares_ in ordered for n, p, *_ in shares_},
        key=lambda k: (rank[k[0]], own[k[0]].get(k[1], 0)),
    )
    for key in keys:
        param_index[key] = len(params)
        params.append((modules[key[0]], key[1]))
    for group_, shares_ in ordered:
        slots = []
        for n, p, d, pos, ch in shares_:
            unique: dict[int, int] = {}
            for i, r in zip(pos, ch, strict=True):
                unique.setdefault(i, r)
            slots.append(
                Slot(
                    param_index[(n, p)],
                    d,
                    torch.tensor(list(unique), dtype=torch.long),
                    torch.tensor(list(unique.values()), dtype=torch.long),
                )
            )
        groups.append(ChannelGroup(group_.root, group_.size, tuple(slots), group_.layers))
    return Found(params, groups, skipped, macs)


def _root_groups(tp: Any, graph: Any) -> Iterator[tuple[nn.Module, Any]]:
    """Each root layer of ``graph`` with the group of all its output channels, or ``None``.

    As ``graph.get_all_groups(root_module_types=PRUNABLE_TYPES)``: a layer whose output channels
    an earlier group holds is no root of its own, and a group holding the output channels of a
    layer that Torch-Pruning ignores is left out. The group is ``None`` where Torch-Pruning's
    search for it does not end (see :func:`torchbip._tracing.pruning_group`).
    """
    ignored = {id(m) for m in graph.IGNORED_LAYERS_IN_TRACING}
    visited: set[int] = set()
    for module in list(graph.module2node):
        if not isinstance(module, PRUNABLE_TYPES) or id(module) in ignored | visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        size = None if pruner is None else pruner.get_out_channels(module)
        if size is None:
            continue
        try:
            group = pruning_group(tp, graph, module, pruner.prune_out_channels, list(range(size)))
        except UnboundedGroupError:
            yield module, None
            continue
        producers = {
            id(item.dep.target.module) for item in group if graph.is_out_channel_pruning_fn(item.dep.handler)
        }
        visited |= producers
        if not producers & ignored:
            yield module, group


_SPLIT = (
    "its channels go through torch.split/chunk/unbind, whose pieces the dependency graph can map to "
    "the wrong channels (give each piece a layer of its own instead)"
)
_SLICE = (
    "its channels go through a slice such as y[:, :k], whose bounds the forward fixes: removing a "
    "channel would shift which channels it keeps (give each piece a layer of its own instead)"
)

_UNBOUNDED = (
    "Torch-Pruning's search for the channels coupled with its channels does not end or grows without "
    "bound (it maps them to ever new positions round a cycle of the graph, as for the key/value "
    "projections of grouped-query attention with rotary embeddings, or multiplies them at every "
    "reshape, as through a Swin Transformer's window partitions)"
)

_MIXING = (
    "its channels pass through an operation without parameters that mixes them (a normalization "
    "over channels, a softmax, a channel shuffle or flip, ...): a pruned channel would still change "
    "what the kept channels compute"
)

_UNREMOVABLE = (
    "the model fails once its channels are removed ({error}): something the dependency graph does not "
    "see (a buffer or constant that the forward uses per channel) keeps their number, so "
    "export_slim could not remove them"
)

Share = tuple[str, str, int, list[int], list[int]]  # (module, tensor, dim, positions, channels)

_PASS_SEED = 0  # the seed each forward pass of a :func:`_mixing_groups` test starts from


def _cuda_devices(model: nn.Module, inputs: tuple[Any, ...]) -> list[int]:
    """The CUDA devices (indices) holding the model's tensors or the inputs.

    A forward pass may draw from their generators: they are forked, with the CPU's, around it.
    """
    devices: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers(), *tensor_leaves(inputs)]:
        if tensor.device.type == "cuda":
            index = tensor.device.index
            devices.add(index if index is not None else torch.cuda.current_device())
    return sorted(devices)


def _mixing_groups(
    model: nn.Module, inputs: tuple[Any, ...], groups: list[list[Share]], cuda: list[int]
) -> list[int]:
    """The groups (indices, ascending) whose channels reach the output past their readers.

    While training, a group's channels are masked at their readers only (the input slices of
    its consumers); :meth:`torchbip.BiP.finish` then zeroes the rest of each pruned channel,
    which leaves the outputs unchanged only if nothing but the readers sees the channel. The
    dependency graph takes some channel-mixing operations without parameters for element-wise
    ones (``F.normalize``, ``softmax``, ``flip``, a channel shuffle). Measured here: a random
    half of each group's channels is masked at the readers, and the outputs must not move when
    those channels' producers (weights, biases, BatchNorm parameters) take random values. All
    groups are tested at once, and halves of a failing set again (two forward passes per test,
    in eval mode, each from the same fixed seed so that a forward that samples (a VAE, MC
    dropout) draws the same numbers in both; the CPU's generator and those of the model's CUDA
    devices are forked, so the caller's random state is left as it was). ``cuda``: those
    devices (:func:`_cuda_devices`).
    """
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    plans: list[tuple[int, list[tuple[Tensor, int, Tensor, bool]]]] = []
    for index, shares in enumerate(groups):
        size = 1 + max((c for *_, channels in shares for c in channels), default=0)
        if size < 2 or not any(dim == 1 for _, _, dim, _, _ in shares):
            continue  # nothing to prune, or no readers (the whole group is masked while training)
        chosen = torch.zeros(size, dtype=torch.bool)
        chosen[torch.randperm(size, generator=generator)[: size // 2]] = True
        entries = []
        for name, pname, dim, positions, channels in shares:
            tensor = modules[name]._parameters[pname]
            assert tensor is not None
            picked = [p for p, c in zip(positions, channels, strict=True) if chosen[c]]
            if picked:
                index_ = torch.tensor(sorted(set(picked)), device=tensor.device)
                entries.append((tensor, dim, index_, dim == 0))
        plans.append((index, entries))

    def run(selected: list[tuple[int, list[tuple[Tensor, int, Tensor, bool]]]], perturb: bool) -> Any:
        # both passes of a test draw the same random numbers (a VAE's sampling, MC dropout), from
        # the generators forked below only
        torch.random.default_generator.manual_seed(_PASS_SEED)
        for device in cuda:
            torch.cuda.default_generators[device].manual_seed(_PASS_SEED)
        tensors = {id(t): t for _, entries in selected for t, *_ in entries}
        saved = {key: t.detach().clone() for key, t in tensors.items()}
        try:
            with torch.no_grad():
                if perturb:  # producers first: a reader slice of the same tensor stays zero
                    for _, entries in selected:
                        for tensor, dim, index, producer in entries:
                            if producer:
                                shape = list(tensor.shape)
                                shape[dim] = len(index)
                                scale = float(tensor.detach().abs().max()) or 1.0
                                noise = torch.randn(shape, generator=generator, dtype=torch.float64)
                                tensor.index_copy_(dim, index, (noise * scale).to(tensor))
                for _, entries in selected:
                    for tensor, dim, index, producer in entries:
                        if not producer:
                            tensor.index_fill_(dim, index, 0.0)
                return model(*inputs)
        finally:
            with torch.no_grad():
                for key, tensor in tensors.items():
                    tensor.copy_(saved[key])

    def clean(selected: list[tuple[int, list[tuple[Tensor, int, Tensor, bool]]]]) -> bool:
        reference, perturbed = run(selected, False), run(selected, True)
        for a, b in zip(output_tensors(reference), output_tensors(perturbed), strict=True):
            if a.is_floating_point():
                tolerance = 1e-5 * max(float(a.detach().abs().max()) if a.numel() else 0.0, 1e-12)
                if not torch.allclose(a, b, rtol=1e-4, atol=tolerance):
                    return False
        return True

    def search(selected: list[tuple[int, list[tuple[Tensor, int, Tensor, bool]]]]) -> list[int]:
        if not selected or clean(selected):
            return []
        if len(selected) == 1:
            return [selected[0][0]]
        half = len(selected) // 2
        return search(selected[:half]) + search(selected[half:])

    training = model.training
    try:
        with torch.random.fork_rng(devices=cuda):
            model.eval()
            return search(plans)
    finally:
        model.train(training)


def _unremovable_groups(
    model: nn.Module,
    twin: nn.Module,
    graph: Any,
    tp: Any,
    inputs: tuple[Any, ...],
    groups: Sequence[tuple[str, int]],
    reference: Sequence[tuple[int, ...]],
) -> list[tuple[int, str]]:
    """The groups (indices, ascending, with the error) whose channels the model cannot lose.

    ``groups``: ``(root, size)`` of each group of ``graph``, the dependency graph traced on
    ``twin`` (a copy of ``model``). The first channel of every group of two channels or more is
    removed with Torch-Pruning, as :func:`torchbip.export_slim` removes channels, and the model
    is run in eval mode on ``inputs``: it must run and give outputs of the ``reference`` shapes.
    A buffer or constant that the forward uses per channel (``x * self.scale``) is invisible to
    the graph and keeps the old channel count, so the forward fails. All groups are tried at
    once on ``twin`` itself (which is changed: call this last); when that fails, halves of the
    failing set are tried again, each on a fresh copy of ``model`` traced again.
    """
    candidates = [i for i, (_, size) in enumerate(groups) if size >= 2]

    def attempt(net: nn.Module, net_graph: Any, selected: list[int]) -> str | None:
        by_name = dict(net.named_modules())
        try:
            for i in selected:
                root = by_name[groups[i][0]]
                remove = net_graph.get_pruner_of_module(root).prune_out_channels
                pruning_group(tp, net_graph, root, remove, [0]).prune()
            with torch.no_grad():
                outputs = [tuple(t.shape) for t in output_tensors(net.eval()(*inputs))]
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        if outputs != list(reference):
            return f"the outputs' shapes change from {list(reference)} to {outputs}"
        return None

    def search(selected: list[int], traced: tuple[nn.Module, Any] | None) -> list[tuple[int, str]]:
        if not selected:
            return []
        if traced is None:
            net = copy.deepcopy(model)
            traced = (net, build_graph(tp, net, inputs, "Coupled(example_inputs=...)"))
            del net
        error = attempt(*traced, selected)
        traced = None  # this copy has served: free it before the halves make their own
        if error is None:
            return []
        if len(selected) == 1:
            return [(selected[0], error)]
        half = len(selected) // 2
        return search(selected[:half], None) + search(selected[half:], None)

    return search(candidates, (twin, graph))


def _layer_macs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, float]:
    """MACs by module name: per weight entry pair of a conv or linear layer, per attention head.

    An attention module's out_proj is counted with its attention.
    """
    found: dict[str, float] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        weight = module.weight
        assert isinstance(weight, Tensor)
        out = output[0] if isinstance(output, tuple) else output
        per_output = out.numel() / out.shape[1 if isinstance(module, _CONV_TYPES) else -1]
        found[names[module]] = found.get(names[module], 0.0) + per_output * math.prod(weight.shape[2:])

    def record_attention(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        names_ = ("query", "key", "value")
        query, key, value = (args[i] if len(args) > i else kwargs[names_[i]] for i in range(3))
        e, d = module.embed_dim, module.head_dim
        tokens, keys, values = query.numel() / e, key.numel() / module.kdim, value.numel() / module.vdim
        batch = 1 if query.dim() == 2 else query.shape[0 if module.batch_first else 1]
        # the keys each query attends to: the key's sequence, then bias_k's and add_zero_attn's
        length = keys / batch + (module.bias_k is not None) + module.add_zero_attn
        # one head: its query projection and its share of out_proj (embed_dim features each), its
        # key and value projections (kdim and vdim features in), the two attention products
        per_head = d * (2 * tokens * e + keys * module.kdim + values * module.vdim + 2 * tokens * length)
        found[names[module]] = found.get(names[module], 0.0) + per_head

    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    inner = {id(a.out_proj) for a in attentions}  # counted with its attention
    hooks = [m.register_forward_hook(record) for m in layers if id(m) not in inner]
    hooks += [m.register_forward_hook(record_attention, with_kwargs=True) for m in attentions]
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return found


# -- the pruning method ------------------------------------------------------------------------


class BiPCoupled(BiPMethod):
    """The pruning method of a tensor in a coupled group: it holds the mask BiP selects.

    The mask comes from the group's scores (:class:`CoupledLayout`), not from the tensor's own
    values; :meth:`compute_mask` combines it with earlier masks like torch's
    :class:`~torch.nn.utils.prune.CustomFromMask`. The state on the module is torch's
    (``<name>_orig``, ``<name>_mask``, the forward pre-hook) plus the ``<name>_scores`` buffer
    (the group's scores on the group's root weight, an empty tensor elsewhere).

    Args:
        mask: the element mask, of the tensor's shape.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> bn = nn.BatchNorm1d(3)
        >>> _ = BiPCoupled.apply(bn, "bias", torch.tensor([1.0, 0.0, 1.0]), torch.empty(0))
        >>> bn.bias_mask.tolist(), sorted(bn.state_dict())[:2]
        ([1.0, 0.0, 1.0], ['bias_mask', 'bias_orig'])
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: Tensor) -> None:
        self.mask: Tensor | None = mask

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """``default_mask`` times the held mask."""
        assert self.mask is not None, "the mask is held only while apply() runs"
        return default_mask * self.mask.to(dtype=default_mask.dtype, device=default_mask.device)

    @classmethod
    @outside_inference_mode
    def apply(  # type: ignore[override]
        cls, module: nn.Module, name: str, mask: Tensor, importance_scores: Tensor
    ) -> prune.BasePruningMethod:
        """Prune ``module.<name>`` with ``mask`` and register ``importance_scores`` as its scores."""
        method = super().apply(module, name, mask=mask)
        for hook in [method, *getattr(method, "_pruning_methods", ())]:
            if isinstance(hook, cls):
                hook.mask = None  # the module's <name>_mask holds it from here on
        attach_scores(method, module, name, importance_scores)
        return method


# -- the layout --------------------------------------------------------------------------------


def _frozen(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is a Parameter with ``requires_grad=False``."""
    tensor = module._parameters.get(name)
    return tensor is not None and not tensor.requires_grad


class CoupledLayout(MaskLayout):
    """:class:`Coupled` bound to the groups of one model and a budget.

    Attributes:
        groups: the groups it prunes.
        skipped: ``(root, reason)`` of the groups left dense (see the module docstring).
        counts: channels kept per group (``None`` for ``budget="global"``).
        owners: per group, the index of the target that holds its scores (the root's weight).
    """

    structured = "coupled"

    def __init__(
        self,
        found: Found,
        targets: Sequence[Target],
        amount: float | int,
        budget: str,
        min_keep: float | int | None,
        max_keep: float | int | None,
    ) -> None:
        self.budget = str.__str__(budget)
        wanted = {(id(t.module), t.name) for t in targets}
        param_key = [(id(m), n) for m, n in found.params]
        groups, dropped = [], []
        for group in found.groups:
            if all(param_key[s.param] in wanted for s in group.slots):
                groups.append(group)
            elif any(_frozen(*found.params[s.param]) for s in group.slots):
                dropped.append((group.root, "holds a frozen tensor (requires_grad=False)"))
            else:
                dropped.append((group.root, "excluded"))
        if not groups:
            raise ValueError(
                "layout=Coupled finds no channel group to prune (every group is excluded, reaches the "
                f"model's output or cannot be zeroed exactly: {found.skipped + dropped})"
            )
        used = sorted({s.param for g in groups for s in g.slots})
        by_key = {(id(t.module), t.name): t for t in targets}
        self.targets = [by_key[param_key[p]] for p in used]
        index = {p: i for i, p in enumerate(used)}
        self.groups = [
            ChannelGroup(
                g.root,
                g.size,
                tuple(Slot(index[s.param], s.dim, s.positions, s.channels) for s in g.slots),
                g.layers,
            )
            for g in groups
        ]
        self.skipped = list(found.skipped) + dropped
        self.shapes = [tuple(t.weight().shape) for t in self.targets]
        self.owners = []
        for g in self.groups:
            root_weight = [s for s in g.slots if s.dim == 0 and self.targets[s.param].module_fqn == g.root]
            self.owners.append(root_weight[0].param if root_weight else g.slots[0].param)
        self.by_target: list[list[tuple[int, Slot]]] = [[] for _ in self.targets]
        # While training, a group's mask acts at its readers only (the input channels of its
        # consumers; a group without any, such as attention heads, masks all its tensors): the
        # output is the same as with the whole group zeroed, since nothing else reads a pruned
        # channel, and a pruned channel keeps a first-order gradient (that of putting it back).
        self.gated: list[list[tuple[int, Slot]]] = [[] for _ in self.targets]
        for gi, g in enumerate(self.groups):
            readers = any(s.dim == 1 for s in g.slots)
            for s in g.slots:
                self.by_target[s.param].append((gi, s))
                if s.dim == 1 or not readers:
                    self.gated[s.param].append((gi, s))
        named = ("weight", "in_proj_weight")
        weights = {id(t.module): i for i, t in enumerate(self.targets) if t.name in named}
        self._macs = [(weights[id(m.module)], m) for m in found.macs.values() if id(m.module) in weights]
        self._fixed_macs = sum(m.dense for m in found.macs.values() if id(m.module) not in weights)
        self.dense_macs = found.dense_macs
        self._elements: list[Tensor] = []
        self._global: GlobalTopK | None = None
        sizes = [g.size for g in self.groups]
        self.counts: list[int] | None
        if budget == "layer":
            labels = [f"amount (a count per group, for {g.root!r})" for g in self.groups]
            self.counts = [
                max(1, n - count_from_amount(amount, n, label, "channels"))
                for n, label in zip(sizes, labels, strict=True)
            ]
        elif budget == "macs":
            if isinstance(amount, int):
                raise ValueError(
                    f"budget='macs' takes amount as a fraction of the MACs, got the int {amount}"
                )
            self.counts = self._counts_for_macs(float(amount))
        else:
            total = sum(sizes)
            n_keep = total - count_from_amount(amount, total, unit="channels")
            floors = [max(1, f) for f in floor_counts(sizes, min_keep)]
            caps = cap_counts(sizes, max_keep)
            if sum(floors) > n_keep:
                raise ValueError(
                    f"amount={amount!r} keeps {n_keep} channels, fewer than the {sum(floors)} that the "
                    f"per-group floors keep (at least one channel of each of the {len(sizes)} groups"
                    f"{'' if min_keep is None else f', min_keep={min_keep!r}'}); lower amount or min_keep"
                )
            if caps is not None and sum(caps) < n_keep:
                raise ValueError(
                    f"max_keep={max_keep!r} keeps at most {sum(caps)} channels, fewer than the {n_keep} "
                    f"that amount={amount!r} keeps; raise max_keep or amount"
                )
            for g, low, high in zip(self.groups, floors, caps or floors, strict=True):
                if low > high:
                    raise ValueError(
                        f"max_keep={max_keep!r} keeps at most {high} of the {g.size} channels of the group "
                        f"of {g.root!r}, but every group keeps at least {low} "
                        f"({'one channel' if min_keep is None else f'min_keep={min_keep!r}'}); raise max_keep"
                    )
            self._global = GlobalTopK(n_keep, floors, caps)
            self.counts = None
        self.n_keep = sum(self.counts) if self.counts is not None else self._global.n_keep  # type: ignore[union-attr]

    # -- MACs --------------------------------------------------------------------------------

    def group_keeps(self, scores: Sequence[Tensor]) -> list[Tensor]:
        """The boolean keep of every group (in :attr:`groups` order) that ``scores`` select.

        Example: the MACs a BiP object's current selection keeps, as a fraction::

            layout = pruner.layout
            layout.macs(layout.group_keeps(pruner.score_views)) / layout.dense_macs
        """
        selection = self.select(scores)
        return [selection[o] for o in self.owners]

    def macs(self, keeps: Sequence[Tensor] | None = None) -> float:
        """The MACs of the model's convolutions and linear layers with these group keeps.

        Args:
            keeps: one boolean keep per group (``None``: every channel kept).
        """
        counts = None if keeps is None else [int(k.sum()) for k in keeps]
        return self._macs_of_counts(counts)

    def _macs_of_counts(self, counts: Sequence[int] | None) -> float:
        total = self._fixed_macs
        for i, layer in self._macs:
            shape = self.shapes[i]
            kept = [float(shape[0]), float(shape[1])]
            if counts is not None:
                for gi, slot in self.by_target[i]:
                    # the slot's positions are kept in proportion to its group's kept channels
                    # (exact when each channel has the same number of positions, as it does)
                    share = len(slot.positions) * counts[gi] / self.groups[gi].size
                    kept[slot.dim] -= len(slot.positions) - share
            if isinstance(layer.module, nn.MultiheadAttention):  # kept rows: 3 * head_dim per head
                total += layer.per_pair * kept[0] / (3 * layer.module.head_dim)
            else:
                total += layer.per_pair * kept[0] * kept[1]
        return total

    def _bisect(self, counts: Callable[[float], list[int]], target: float) -> tuple[float, float]:
        """The fractions either side of where ``counts(fraction)``'s MACs cross ``target``."""
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            if self._macs_of_counts(counts(mid)) > target:
                low = mid
            else:
                high = mid
        return low, high

    def _counts_for_macs(self, amount: float) -> list[int]:
        target = (1.0 - amount) * self.dense_macs
        sizes = [g.size for g in self.groups]

        def counts(p: float) -> list[int]:
            return [max(1, n - round(p * n)) for n in sizes]

        low, high = self._bisect(counts, target)
        best = min((low, high), key=lambda p: abs(self._macs_of_counts(counts(p)) - target))
        least = self._macs_of_counts(counts(1.0))
        if target < least * (1 - 1e-9):
            raise ValueError(
                f"budget='macs': amount={amount!r} asks for {target:.4g} MACs, but one channel per group "
                f"and the layers outside the groups already take {least:.4g} (of {self.dense_macs:.4g}); "
                f"at most amount={1 - least / self.dense_macs:.4f} is reachable"
            )
        chosen = counts(best)
        fine = [i for i, n in enumerate(sizes) if n >= _FINE_GROUP]
        if not fine or len(fine) == len(sizes):
            return chosen
        # Small groups (attention heads) move in coarse steps: keep their rounded counts and
        # give the larger groups the common fraction that lands closest to the target.

        def with_fine(q: float) -> list[int]:
            out = list(chosen)
            for i in fine:
                out[i] = max(1, sizes[i] - round(q * sizes[i]))
            return out

        low, high = self._bisect(with_fine, target)
        options = [chosen, with_fine(low), with_fine(high)]
        return min(options, key=lambda c: abs(self._macs_of_counts(c) - target))

    # -- MaskLayout --------------------------------------------------------------------------

    def kept_targets(self, targets: Sequence[Target]) -> list[Target]:
        """See :meth:`MaskLayout.kept_targets`: the tensors of the groups it prunes."""
        return list(self.targets)

    def init_scores(self, weights: Sequence[Tensor], method: str) -> list[Tensor]:
        """The mean initial score (see :func:`torchbip.scores.init_scores`) of each channel's entries."""
        out = [torch.empty(0, dtype=w.dtype, device=w.device) for w in weights]
        for gi, g in enumerate(self.groups):
            owner = weights[self.owners[gi]]
            total = torch.zeros(g.size, dtype=owner.dtype, device=owner.device)
            count = torch.zeros(g.size, dtype=owner.dtype, device=owner.device)
            for s in g.slots:
                w = weights[s.param]
                per_index = _reduce_except(init_scores(w, method), s.dim)
                entries = w.numel() // w.shape[s.dim] if w.shape[s.dim] else 0
                positions, channels = s.positions.to(w.device), s.channels.to(w.device)
                total.index_add_(0, channels, per_index[positions])
                count.index_add_(0, channels, torch.full_like(per_index[positions], float(entries)))
            out[self.owners[gi]] = total / count.clamp_min(1)
        return out

    def select(self, scores: Sequence[Tensor], flat: Tensor | None = None) -> list[Tensor]:
        """See :meth:`MaskLayout.select`: a keep per group on its owner, empty keeps elsewhere."""
        group_scores = [scores[o] for o in self.owners]
        if self._global is not None:
            chosen = self._global(group_scores, [None] * len(group_scores))
        else:
            assert self.counts is not None
            chosen = [topk_mask(s, k, None) for s, k in zip(group_scores, self.counts, strict=True)]
        keeps = [torch.zeros(0, dtype=torch.bool, device=s.device) for s in scores]
        for owner, keep in zip(self.owners, chosen, strict=True):
            keeps[owner] = keep
        return keeps

    def factors(self, keeps: Sequence[Tensor], whole: bool = False) -> list[dict[int, Tensor]]:
        """Per target, the boolean keep of each axis a group masks (``{dim: keep along dim}``).

        ``whole``: every tensor of every group (the final masks); else the readers only (the
        masks while training).
        """
        group_keeps = [keeps[o] for o in self.owners]
        out: list[dict[int, Tensor]] = []
        for i, shape in enumerate(self.shapes):
            per_dim: dict[int, Tensor] = {}
            for gi, s in (self.by_target if whole else self.gated)[i]:
                keep = group_keeps[gi]
                f = per_dim.get(s.dim)
                if f is None:
                    f = per_dim[s.dim] = torch.ones(shape[s.dim], dtype=torch.bool, device=keep.device)
                f[s.positions.to(keep.device)] = keep[s.channels.to(keep.device)]
            out.append(per_dim)
        return out

    def masks(self, keeps: Sequence[Tensor], whole: bool = False) -> list[Tensor]:
        """See :meth:`MaskLayout.masks`: the product of each tensor's per-axis keeps.

        While training (the default) only the readers of each group are masked; ``whole=True``
        gives the final masks, every tensor of every group zeroed for its pruned channels
        (:meth:`finish_masks`).
        """
        elements = []
        for shape, per_dim in zip(self.shapes, self.factors(keeps, whole), strict=True):
            mask = torch.ones(shape, dtype=torch.bool, device=keeps[self.owners[0]].device)
            for dim, f in per_dim.items():
                mask = mask & f.view(_axis(shape, dim))
            elements.append(mask.contiguous())
        if not whole:
            self._elements = elements
        return elements

    def held_masks(self, masks: Sequence[Tensor]) -> list[Tensor]:
        """See :meth:`MaskLayout.held_masks`: every tensor of a pruned channel, not only its readers.

        While training only the readers of a pruned channel are masked, but its producers
        (filters, biases, BatchNorm parameters) are pruned too (:meth:`finish_masks` zeroes
        them), so their values are held as well: an optimizer's weight decay or momentum does
        not move a channel's filter while it is pruned. The selection is read off the training
        masks (a group's keep along a reader's axis), so it is the one those masks hold.
        """
        group_keeps: list[Tensor | None] = [None] * len(self.groups)
        for i, mask in enumerate(masks):
            for gi, s in self.gated[i]:
                if group_keeps[gi] is not None:
                    continue
                along = _reduce_except((mask != 0).to(torch.int32), s.dim) > 0
                found = torch.zeros(self.groups[gi].size, dtype=torch.bool, device=mask.device)
                found[s.channels.to(mask.device)] = along[s.positions.to(mask.device)]
                group_keeps[gi] = found
        keeps = [torch.zeros(0, dtype=torch.bool, device=m.device) for m in masks]
        for owner, keep in zip(self.owners, group_keeps, strict=True):
            assert keep is not None, "every group masks at least one tensor while training"
            keeps[owner] = keep
        return self.masks(keeps, whole=True)

    def finish_masks(self, scores: Sequence[Tensor]) -> list[Tensor]:
        """See :meth:`MaskLayout.finish_masks`: every tensor of a pruned channel zeroed.

        The model computes the same as with the training masks (nothing reads a pruned
        channel), and :func:`torchbip.export_slim` can prove every pruned channel removable.
        """
        return self.masks(self.select(scores), whole=True)

    def mask(self, index: int, keep: Tensor) -> Tensor:
        """The element mask of target ``index`` from the last :meth:`masks` call."""
        return self._elements[index]

    def score_grad(self, index: int, element_grad: Tensor, out: Tensor) -> None:
        """Not used: a coupled score gathers many tensors (see :meth:`score_grads`)."""
        raise NotImplementedError("CoupledLayout writes every score gradient at once: use score_grads")

    def score_grads(
        self, element_grads: Iterable[tuple[int, Tensor]], outs: Sequence[Tensor], masks: Sequence[Tensor]
    ) -> None:
        """Each channel's gradient: its slices' element gradients times the other axes' keeps.

        A tensor's keep along an axis is read from its element mask (``any`` over the other
        axes: every group keeps at least one channel, so the product's factors are its
        projections).
        """
        for owner in self.owners:
            outs[owner].zero_()
        for i, element in element_grads:
            shape, mask = self.shapes[i], masks[i]
            dims = {s.dim for _, s in self.gated[i]}
            for gi, s in self.gated[i]:
                weighted = element
                for dim in dims - {s.dim}:
                    keep = _reduce_except(mask.to(torch.int32), dim) > 0
                    weighted = weighted * keep.view(_axis(shape, dim)).to(element.dtype)
                per_index = _reduce_except(weighted, s.dim)
                out = outs[self.owners[gi]]
                positions, channels = s.positions.to(out.device), s.channels.to(out.device)
                out.index_add_(0, channels, per_index[positions].to(out.dtype))

    def apply(self, index: int, module: nn.Module, name: str, scores: Tensor, keep: Tensor) -> None:
        """See :meth:`MaskLayout.apply` (after :meth:`masks`, whose element masks it installs)."""
        BiPCoupled.apply(module, name, self._elements[index], scores)

    def describe(self) -> dict[str, object]:
        """See :meth:`MaskLayout.describe`."""
        return {
            **super().describe(),
            "budget": self.budget,
            "groups": [(g.root, g.size) for g in self.groups],
            "counts": self.counts,
        }


def _reduce_except(t: Tensor, dim: int) -> Tensor:
    others = [d for d in range(t.dim()) if d != dim]
    return t.sum(dim=others) if others else t


def _axis(shape: Sequence[int], dim: int) -> list[int]:
    """The view shape that puts a vector along ``dim`` of a tensor of ``shape``."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return view


# -- the layout object -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Coupled(Layout):
    """One learned score per coupled channel of a Torch-Pruning dependency group.

    See :mod:`torchbip.coupled`. ``amount`` is one number: the fraction of each group's channels
    to prune (``budget="layer"``), of all channels ranked together (``"global"``, with
    ``min_keep``/``max_keep`` per group) or of the model's MACs (``"macs"``).

    Args:
        example_inputs: a batch for ``model(*example_inputs)`` (a tensor or a tuple), used to
            trace the dependency graph and to count MACs.
        budget: ``"layer"``, ``"global"`` or ``"macs"``.

    Example:
        >>> import torch
        >>> Coupled(torch.randn(1, 3, 8, 8), budget="macs")
        Coupled(example_inputs=(1, 3, 8, 8), budget='macs')
    """

    example_inputs: Any
    budget: str = "layer"
    _found: dict[int, tuple[nn.Module, Any, Found]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"Coupled(budget={self.budget!r}): budget must be one of {BUDGETS}")
        # a plain str (a numpy.str_ or StrEnum value as given): states hold it, and
        # torch.load(weights_only=True) reads plain types only
        object.__setattr__(self, "budget", str.__str__(self.budget))
        inputs = as_inputs(self.example_inputs)
        if not inputs or not all(isinstance(x, Tensor) for x in inputs):
            raise TypeError(
                "Coupled(example_inputs=...) needs a tensor or a tuple of tensors (a batch for "
                f"model(*example_inputs)), got {type(self.example_inputs).__name__}"
            )

    def __repr__(self) -> str:
        shapes = [tuple(x.shape) for x in as_inputs(self.example_inputs)]
        shown = shapes[0] if len(shapes) == 1 else tuple(shapes)
        return f"Coupled(example_inputs={shown}, budget={self.budget!r})"

    @property
    def shorthand(self) -> str:
        """See :meth:`Layout.shorthand`."""
        return "coupled"

    def found(self, model: nn.Module) -> Found:
        """The groups of ``model`` (traced once per model and kept while its layers stay the same)."""
        layers = _layer_signature(model)
        hit = self._found.get(id(model))
        if hit is None or hit[0] is not model or hit[1] != layers:
            self._found.clear()
            self._found[id(model)] = (model, layers, find_groups(model, self.example_inputs))
        return self._found[id(model)][2]

    def default_parameters(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """Every tensor of every group: weights, biases and BatchNorm affine parameters.

        Raises:
            ValueError: when the model has no group to prune (the message lists why each group
                is left dense).
        """
        found = self.found(model)
        if not found.params:
            raise ValueError(
                f"layout=Coupled finds no channel group to prune in this {type(model).__name__}: every "
                f"group reaches the model's output or cannot be pruned safely: {found.skipped}"
            )
        # A group holding a frozen tensor is left dense (BiP retrains what it prunes): its
        # tensors are left out here, and the layout drops the group, naming the reason.
        trainable = [(m, n) for m, n in found.params if not _frozen(m, n)]
        if not trainable:
            frozen = [g.root for g in found.groups]
            raise ValueError(
                f"layout=Coupled finds no channel group to prune in this {type(model).__name__}: every "
                f"group holds a frozen tensor (requires_grad=False), which BiP cannot retrain ({frozen}); "
                "unfreeze the layers to prune"
            )
        return trainable

    def check_parameters(self, parameters: object) -> None:
        """See :meth:`Layout.check_parameters`: the groups choose the tensors.

        ``parameters`` may only repeat tensors of the groups already traced (as
        :func:`torchbip.global_prune` passes them on); anything else is refused.
        """
        if parameters is None:
            return
        try:
            pairs = [(id(m), n) for m, n in parameters] if isinstance(parameters, list) else None
        except (TypeError, ValueError):
            pairs = None
        for _, _, found in self._found.values():
            keys = {(id(m), n) for m, n in found.params}
            if pairs is not None and all(p in keys for p in pairs):
                return
        raise ValueError(
            "layout=Coupled chooses its tensors from the model's dependency graph: leave "
            "parameters= out (to keep layers dense, torchbip.BiP takes exclude=)"
        )

    def check_budget(
        self, budget: str, min_keep: float | int | None, max_keep: float | int | None, arg: str = "layout"
    ) -> None:
        """See :meth:`Layout.check_budget`."""
        if budget != "layer":
            raise ValueError(
                f"budget={budget!r}: with {arg}=Coupled(...) the budget is Coupled's own "
                f"(Coupled(example_inputs, budget={budget!r}))"
            )
        if self.budget != "global" and (min_keep is not None or max_keep is not None):
            name, value = ("min_keep", min_keep) if min_keep is not None else ("max_keep", max_keep)
            raise ValueError(
                f"{name}={value!r} applies to Coupled(..., budget='global') (a bound of the global "
                f"ranking); budget={self.budget!r} prunes the same fraction of every group"
            )

    def bind(
        self,
        targets: Sequence[Target],
        amount: float | int | Sequence[float | int],
        allowed: Sequence[Tensor | None],
        min_keep: float | int | None = None,
        max_keep: float | int | None = None,
    ) -> MaskLayout:
        """See :meth:`Layout.bind`."""
        if not isinstance(amount, (int, float)):
            raise ValueError(
                "layout=Coupled takes one amount (a fraction of the channels, or of the MACs with "
                "budget='macs'), not a dict of per-tensor amounts"
            )
        validate_amount(amount)
        pruned = [t.fqn for t, a in zip(targets, allowed, strict=True) if a is not None or t.is_pruned]
        if pruned:
            raise ValueError(
                f"layout=Coupled starts from unpruned tensors, but {pruned} are pruned already; "
                "prune.remove them first, or leave them out (parameters=..., or exclude=... with BiP)"
            )
        found = None
        for _, _, candidate in self._found.values():
            keys = {(id(m), n) for m, n in candidate.params}
            if all((id(t.module), t.name) in keys for t in targets):
                found = candidate
                break
        if found is None:
            raise ValueError(
                "layout=Coupled chooses its tensors from the model's dependency graph: leave "
                "parameters= out (to keep layers dense, torchbip.BiP takes exclude=)"
            )
        return CoupledLayout(found, targets, amount, self.budget, min_keep, max_keep)
