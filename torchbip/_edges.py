"""Private: which layers of a model read its inputs, and which produce its outputs.

The filter layout leaves out the layers whose filters are the model's outputs, and the channel
layout those whose input channels are the model's inputs. Which layers these are depends on how
the model calls its layers, not on the order in which it registers them (a model may declare
its head first). Two ways to find them, both giving an :class:`Edges`:

- :func:`called_edges` runs the model once on a batch's inputs and follows the autograd graph
  of that call (``global_prune``, which has the batches);
- :func:`traced_edges` traces the model with :mod:`torch.fx`, without running it
  (:class:`torchbip.BiP`, built before the user's first batch). A model that torch.fx cannot
  trace is refused there, with the tracer's reason.

The rule is the same for both. Among the candidate ``layers``:

- an *output* layer is one whose output reaches one of the model's outputs without passing
  through another candidate layer (the last layer called, or every head of a model with
  several);
- an *input* layer is one that is called on something computed without any candidate layer
  (the first layer called, or the first layer of every input branch).

A layer that is used several times counts as an input (output) layer when any of its calls
does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from torchbip._func import make_forward
from torchbip._tensors import tensor_leaves
from torchbip.data import describe, to_device

__all__ = ["Edges", "called_edges", "traced_edges"]


@dataclass(frozen=True)
class Edges:
    """The candidate layers at the two ends of a model, each list in the order of the layers given.

    Attributes:
        inputs: the layers that read the model's inputs (no other candidate layer before them).
        outputs: the layers whose outputs are the model's outputs (no other candidate layer after).
    """

    inputs: list[nn.Module]
    outputs: list[nn.Module]


def called_edges(model: nn.Module, layers: Sequence[nn.Module], inputs: Any, source: str) -> Edges:
    """The edges of ``model`` among ``layers``, from one forward pass on ``inputs``.

    The pass runs in training mode, as ``global_prune`` trains, on copies of the model's buffers
    (BatchNorm's running statistics are left alone), and draws no random numbers of the
    caller's; the training flags are restored. Tensors in ``inputs`` are moved to the device of
    the first layer's weight.

    Args:
        model: the model.
        layers: the candidate layers (each once).
        inputs: a batch's inputs, passed as ``global_prune`` passes them.
        source: where the batch came from, for the message (``"loader"``).

    Returns:
        The :class:`Edges`.

    Raises:
        ValueError: when the model fails on ``inputs`` (the message names ``source``, the
            inputs' shapes and the model's error), or holds uninitialised lazy tensors (which
            the pass would create).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class HeadFirst(nn.Module):  # registers its head before its body
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head, self.body = nn.Linear(4, 2), nn.Linear(3, 4)
        ...     def forward(self, x):
        ...         return self.head(torch.relu(self.body(x)))
        >>> model = HeadFirst()
        >>> edges = called_edges(model, [model.head, model.body], torch.zeros(5, 3), "loader")
        >>> edges.inputs == [model.body], edges.outputs == [model.head]
        (True, True)
    """
    lazy = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if _uninitialized(t)]
    if lazy:
        raise ValueError(
            f"the model holds uninitialised (lazy) tensors ({', '.join(map(repr, lazy[:3]))}); run one "
            "forward pass (or load the weights) first"
        )
    index = {id(m): i for i, m in enumerate(layers)}
    produced: dict[int, int] = {}  # id(autograd node of a layer's output) -> layer index
    keep_alive: list[Any] = []  # the nodes recorded (ids stay unique while they live)
    read_from: list[tuple[int, Any]] = []  # (layer index, the autograd nodes its input came from)
    called: list[int] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        i = index[id(module)]
        called.append(i)
        read_from.append((i, [t.grad_fn for t in tensor_leaves(args) if t.grad_fn is not None]))
        for t in tensor_leaves(output):
            if t.grad_fn is not None:
                produced[id(t.grad_fn)] = i
                keep_alive.append(t.grad_fn)

    weights = [getattr(m, "weight", None) for m in layers]
    device = next((w.device for w in weights if isinstance(w, Tensor)), torch.device("cpu"))
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in layers}.values()]
    forked = []  # the generators the pass could draw from: the CPU's (always forked) and the device's
    if device.type == "cuda":
        forked.append(device.index if device.index is not None else torch.cuda.current_device())
    try:
        model.train()
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        moved = to_device(inputs, device)
        with torch.random.fork_rng(devices=forked), torch.enable_grad():
            try:
                outputs = make_forward(model)(buffers, moved)
            except Exception as err:
                raise ValueError(
                    f"the model failed on the first batch from {source} (inputs {describe(moved)}), "
                    f"run to find its input and output layers: {type(err).__name__}: {err}"
                ) from err
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    ends = _reached(
        [t.grad_fn for t in tensor_leaves(outputs) if t.grad_fn is not None],
        produced,
        lambda n: n.next_functions,
    )
    if not ends and called:  # outputs computed without autograd (argmax, detached): the last call
        ends = {called[-1]}
    firsts = {i for i, sources in read_from if not _reached(sources, produced, lambda n: n.next_functions)}
    if not firsts and called:
        firsts = {called[0]}
    return Edges(
        inputs=[m for i, m in enumerate(layers) if i in firsts],
        outputs=[m for i, m in enumerate(layers) if i in ends],
    )


def traced_edges(model: nn.Module, layers: Sequence[nn.Module], what: str, side: str) -> Edges:
    """See :func:`_traced_edges`: traced on a copy of ``model`` (where it can be copied).

    Tracing runs the forward's Python code on proxies: on the model itself, a counter it keeps
    would count the trace, and a tensor it stores would be a proxy afterwards.
    """
    if id(model) in {id(m) for m in layers}:
        return _traced_edges(model, layers, what, side)
    try:
        twin = copy.deepcopy(model)
    except Exception:  # a model that cannot be copied is traced itself
        return _traced_edges(model, layers, what, side)
    names = {id(m): n for n, m in model.named_modules()}
    twins = dict(twin.named_modules())
    twin_layers = [twins[names[id(m)]] for m in layers]
    found = _traced_edges(twin, twin_layers, what, side)
    back = {id(t): m for t, m in zip(twin_layers, layers, strict=True)}
    return Edges(inputs=[back[id(m)] for m in found.inputs], outputs=[back[id(m)] for m in found.outputs])


def _traced_edges(model: nn.Module, layers: Sequence[nn.Module], what: str, side: str) -> Edges:
    """The edges of ``model`` among ``layers``, from its :mod:`torch.fx` graph (nothing is run).

    The tracer steps into every module that holds a candidate layer and records the layers and
    every other module as single calls. A module whose forward torch.fx cannot trace (control
    flow on its inputs, such as ``nn.TransformerEncoderLayer``'s) is recorded as one call too:
    that is enough where a candidate layer stands between it and the side asked for, and an
    error where it does not (its own first or last layers are then unknown).

    Args:
        model: the model.
        layers: the candidate layers (each once).
        what: the setting that needs the edges, for the message (``"layout='filter'"``).
        side: ``"outputs"`` or ``"inputs"``: the edge that must be known. The other one is
            left empty.

    Returns:
        The :class:`Edges`.

    Raises:
        ValueError: when the layers at that edge cannot be told because torch.fx cannot trace
            the model, or a module at that edge: the message names the module, gives the
            tracer's reason and what to pass instead.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> traced_edges(model, [model[0], model[2]], "layout='filter'", "outputs").outputs == [model[2]]
        True
        >>> traced_edges(model, [model[0], model[2]], "layout='channel'", "inputs").inputs == [model[0]]
        True
    """
    index = {id(m): i for i, m in enumerate(layers)}
    if id(model) in index:  # the model is one layer: it reads the inputs and writes the outputs
        return Edges(inputs=[model], outputs=[model])
    holders = {id(m) for m in model.modules() if any(id(s) in index for s in m.modules())}
    opaque: dict[int, tuple[str, BaseException]] = {}  # id(module) -> (its name, the tracer's error)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return id(m) in index or id(m) not in holders or id(m) in opaque

        def call_module(
            self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            if self.is_leaf_module(m, "") or m is model:
                return super().call_module(m, forward, args, kwargs)
            stack, calls = self.module_stack.copy(), dict(self.num_calls)
            before = len(self.graph.nodes)
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception as err:  # record the module as one call instead
                self.module_stack, self.num_calls = stack, calls
                for node in reversed(list(self.graph.nodes)[before:]):
                    self.graph.erase_node(node)
                opaque[id(m)] = (self.path_of_module(m), err)
                return super().call_module(m, forward, args, kwargs)

    edge = "produce the model's outputs" if side == "outputs" else "read the model's inputs"

    def refuse(name: str, err: BaseException) -> ValueError:
        return ValueError(
            f"{what} leaves out the layers that {edge}, "
            "found from the order in which the model calls its layers; without a batch to run the "
            f"model on, torchbip traces it with torch.fx, which cannot trace {name} "
            f"({type(err).__name__}: {err}). Pass parameters=[(module, 'weight'), ...] naming the "
            "layers to prune, or use torchbip.global_prune, which runs the model on its first batch"
        )

    try:
        graph = Tracer().trace(model)
    except Exception as err:
        raise refuse(f"{type(model).__name__}'s forward", err) from err
    modules = dict(model.named_modules(remove_duplicate=False))
    produced: dict[int, int] = {}  # id(fx node) -> layer index, or -1 - i for the i-th opaque call
    opaque_calls: list[nn.Module] = []
    # a layer's parameter read by the forward itself (F.linear(h, self.out.weight, ...)) makes
    # the operation that reads it a call of that layer
    owners = {
        f"{name}.{p}": index[id(m)]
        for name, m in modules.items()
        if id(m) in index
        for p, _ in m.named_parameters()
    }
    for node in graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        reads = [
            owners[str(a.target)]
            for a in node.all_input_nodes
            if a.op == "get_attr" and str(a.target) in owners
        ]
        if module is not None and id(module) in index:
            produced[id(node)] = index[id(module)]
        elif module is not None and id(module) in opaque:
            opaque_calls.append(module)
            produced[id(node)] = -len(opaque_calls)
        elif reads:
            produced[id(node)] = reads[0]

    def inputs_of(node: torch.fx.Node) -> list[torch.fx.Node]:
        return list(node.all_input_nodes)

    if side == "outputs":
        out = [a for n in graph.nodes if n.op == "output" for a in inputs_of(n)]
        ends = _reached(out, produced, inputs_of)
        for i in sorted(e for e in ends if e < 0):
            raise refuse(*_name(opaque[id(opaque_calls[-1 - i])], "whose outputs reach the model's outputs"))
        return Edges(inputs=[], outputs=[m for i, m in enumerate(layers) if i in ends])
    firsts: set[int] = set()
    for node in graph.nodes:
        if id(node) in produced and not _reached(inputs_of(node), produced, inputs_of):
            firsts.add(produced[id(node)])
    for i in sorted(e for e in firsts if e < 0):
        raise refuse(*_name(opaque[id(opaque_calls[-1 - i])], "which reads the model's inputs"))
    return Edges(inputs=[m for i, m in enumerate(layers) if i in firsts], outputs=[])


def _name(entry: tuple[str, BaseException], where: str) -> tuple[str, BaseException]:
    """``(description, error)`` of a module torch.fx could not trace, for the message."""
    name, err = entry
    return f"the module {name!r}, {where}", err


def _reached(starts: Iterable[Any], produced: Mapping[int, int], parents: Callable[[Any], Any]) -> set[int]:
    """The layers whose outputs a walk up the graph from ``starts`` meets first on each path.

    ``produced`` maps the id of a graph node (an autograd node, or an fx node) that is a layer's
    output to the layer's index; the walk stops at those nodes and follows ``parents`` otherwise.
    """
    found: set[int] = set()
    seen: set[int] = set()
    stack = [n for n in starts if n is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in produced:
            found.add(produced[id(node)])
            continue
        for parent in parents(node):
            if isinstance(parent, tuple):  # an autograd edge: (node, input number)
                parent = parent[0]
            if parent is not None:
                stack.append(parent)
    return found


def _uninitialized(t: Tensor) -> bool:
    return isinstance(t, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))
