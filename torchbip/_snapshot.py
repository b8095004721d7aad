"""Private: an exact snapshot of a model's state, restored when a pruning run or a load fails.

Restoring puts back the same objects (modules' parameter and buffer dictionaries, hooks, flags)
and writes the saved values into each tensor's original storage, rather than giving the tensor
new memory: a model in shared memory stays shared, and pinned, strided or tied tensors keep their
storage, strides and sharing. Only a tensor without writable strided memory (a sparse tensor, an
expanded one whose entries share a location) gets its saved copy back as its data instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchbip.pruned import named_pruning_hooks

__all__ = ["ModelSnapshot"]


# Part of what torch raises for the data pointer of a storage that holds no data: the storage of
# a wrapper tensor subclass (``torch.Tensor._make_wrapper_subclass``; torch's note "Invalid Python
# Storages").
_NO_DATA = "invalid python storage"
# Part of what torch raises for the storage of functorch's wrappers (grad, vmap):
# "Cannot access storage of TensorWrapper" / "... of BatchedTensorImpl".
_NO_STORAGE = "Cannot access storage of"


def _storage_ptr(tensor: Tensor) -> int | None:
    """The data pointer of ``tensor``'s storage; ``None`` for a tensor subclass without memory of its own."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except NotImplementedError as err:
        if _NO_STORAGE in str(err):
            return None
        raise
    except RuntimeError as err:
        if _NO_DATA in str(err):
            return None
        raise


def _same_view(tensor: Tensor, alias: Tensor) -> bool:
    """Whether ``tensor`` still looks at ``alias``'s memory: storage, offset, shape, strides, dtype.

    A tensor subclass without a storage of its own looks at no memory: ``False``.
    """
    if tensor.layout != torch.strided or alias.layout != torch.strided:
        return False
    if tensor.device != alias.device or tensor.dtype != alias.dtype:
        return False
    ptr = _storage_ptr(tensor)
    if ptr is None or ptr != _storage_ptr(alias):
        return False
    return bool(
        tensor.storage_offset() == alias.storage_offset()
        and tensor.shape == alias.shape
        and tensor.stride() == alias.stride()
    )


class _SavedTensor:
    """One parameter, buffer or gradient: the object, its original memory and a copy of its values.

    ``alias`` is the tensor's original ``.data``: the same storage, offset, shape and strides,
    without the autograd history. ``values`` is the one copy of the values (``None`` when the
    caller promised not to write into the tensor). Restoring points the object back at
    ``alias`` if something swapped its memory (``tensor.data = ...``, ``model.to(...)``), then
    copies ``values`` into it in place: shared memory, pinned memory, memory formats, strides
    and the sharing between views stay as they were.
    """

    __slots__ = ("alias", "cls", "lazy", "tensor", "values")

    def __init__(self, tensor: Tensor, copy: bool) -> None:
        self.tensor = tensor
        self.cls = type(tensor)
        self.lazy = nn.parameter.is_lazy(tensor)
        self.alias = tensor.data
        self.values = tensor.detach().clone() if copy and not self.lazy else None

    def restore(self) -> None:
        tensor = self.tensor
        if self.lazy:
            # An uninitialised (lazy) parameter has no values, and torch refuses to read its
            # memory: one that a forward pass materialised gets its empty data and class back.
            if type(tensor) is not self.cls:
                tensor.data = self.alias
                tensor.__class__ = self.cls
            return
        if type(tensor) is not self.cls:  # e.g. a parameter subclass swapped during the run
            tensor.__class__ = self.cls
        if self.alias.layout != torch.strided:
            # No storage to keep (sparse): put the saved copy back as the data.
            tensor.data = self.values if self.values is not None else self.alias
            return
        if not _same_view(tensor, self.alias):
            tensor.data = self.alias
        if self.values is None:
            return
        try:
            tensor.copy_(self.values)
        except RuntimeError:
            # Memory that cannot be written element by element (an expanded tensor whose entries
            # share one location): the values matter more than the memory.
            tensor.data = self.values


# A module's hook dictionaries and the flags torch keeps beside them (by hook id): a hook put back
# needs its flags (``with_kwargs``, ``always_call``), and one added during a run must go with them.
# Names that this torch version lacks are skipped.
_MODULE_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# A tensor's gradient hooks (``p.register_hook``, ``p.register_post_accumulate_grad_hook``).
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _hook_dicts(owner: object, names: Iterable[str]) -> dict[str, tuple[Any, dict[Any, Any]]]:
    """Each hook dictionary of ``owner`` that exists: the object and a copy of its entries."""
    out = {}
    for name in names:
        hooks = getattr(owner, name, None)
        if isinstance(hooks, dict):
            out[name] = (hooks, dict(hooks))
    return out


def _restore_hook_dicts(
    owner: object, saved: dict[str, tuple[Any, dict[Any, Any]]], names: Iterable[str]
) -> None:
    """Put back the entries of ``owner``'s hook dictionaries; empty those created since."""
    for name in names:
        hooks = getattr(owner, name, None)
        if name in saved:
            original, entries = saved[name]
            if hooks is not original:  # (torch never replaces them; a safeguard)
                setattr(owner, name, original)
            original.clear()
            original.update(entries)
        elif isinstance(hooks, dict):  # the first hook of its kind, registered during the run
            hooks.clear()


class _SavedModule:
    """One module: its class, child, parameter and buffer dictionaries, hooks, flags, attributes."""

    __slots__ = (
        "attrs",
        "buffers",
        "children",
        "cls",
        "hook_states",
        "hooks",
        "module",
        "non_persistent",
        "params",
        "properties",
        "state",
        "training",
    )

    def __init__(self, module: nn.Module, names: set[str]) -> None:
        self.module = module
        self.cls = type(module)
        # A parametrized module's class is its own (torch makes one per module): the properties
        # that compute its parametrized tensors live there.
        self.properties = (
            {k: v for k, v in vars(self.cls).items() if isinstance(v, property)}
            if parametrize.is_parametrized(module)
            else None
        )
        self.params = dict(module._parameters)
        self.buffers = dict(module._buffers)
        self.children = dict(module._modules)
        self.non_persistent = set(module._non_persistent_buffers_set)
        self.hooks = _hook_dicts(module, _MODULE_HOOKS)
        self.hook_states = [(hook, type(hook), dict(vars(hook))) for _, hook in named_pruning_hooks(module)]
        self.training = module.training
        self.attrs = {n: module.__dict__[n] for n in names if n in module.__dict__}
        self.state = dict(module.__dict__)

    def restore(self, names: set[str]) -> None:
        module = self.module
        if type(module) is not self.cls:  # a lazy module materialised, a parametrization added
            module.__class__ = self.cls
        if self.properties is not None:
            for key in [k for k, v in vars(self.cls).items() if isinstance(v, property)]:
                if key not in self.properties:
                    delattr(self.cls, key)
            for key, value in self.properties.items():
                if vars(self.cls).get(key) is not value:
                    setattr(self.cls, key, value)
        for name in names:
            module.__dict__.pop(name, None)
        # Attributes deleted during the run (a lazy module's handles of its initialisation hooks).
        for key, value in self.state.items():
            if key not in module.__dict__:
                module.__dict__[key] = value
        module._parameters.clear()
        module._parameters.update(self.params)
        module._buffers.clear()
        module._buffers.update(self.buffers)
        module._modules.clear()
        module._modules.update(self.children)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(self.non_persistent)
        _restore_hook_dicts(module, self.hooks, _MODULE_HOOKS)
        if "_is_full_backward_hook" in self.state:
            module._is_full_backward_hook = self.state["_is_full_backward_hook"]
        for hook, cls, hook_state in self.hook_states:
            hook.__class__ = cls  # (BiP makes a torch container it prunes on top of its own class)
            vars(hook).clear()
            vars(hook).update(hook_state)
        module.training = self.training
        module.__dict__.update(self.attrs)


class ModelSnapshot:
    """Remember everything ``global_prune`` may change, and put it back on :meth:`restore`.

    Kept per module: its class (a lazy module that materialises, or a module given a
    parametrization, changes it; a parametrized module's class keeps its properties), the child,
    parameter and buffer dictionaries (the same objects, so identities are restored), every hook
    dictionary with torch's flags for each hook (forward pre-hooks and forward hooks, their
    ``with_kwargs`` and ``always_call`` flags, backward and state-dict hooks; the attributes of
    torch pruning hooks: pruning on top of a :class:`~torch.nn.utils.prune.PruningContainer`
    appends to the same container; hooks that the model or a loader adds during a run are
    dropped: BiP registers none that outlive a call, the deep-copy guard of a tensor it prunes
    lives inside its pruning pre-hook), the training flag, the non-persistent buffer set, the
    attributes deleted during the run, and the plain attributes named ``names`` (the tensors that
    torch's pruning hooks set, or layer sizes such as ``in_features``).

    Kept per tensor (each parameter, buffer and gradient once, also when modules share it): the
    object, its class, its original memory (its ``.data``) and one copy of its values; per
    parameter its gradient object, ``requires_grad`` and gradient hooks (``p.register_hook``,
    ``p.register_post_accumulate_grad_hook``). :meth:`restore` writes the values back into the
    original memory, so a model in shared memory (``share_memory()``) stays there, and pinned,
    ``channels_last``, strided and tied or overlapping parameters keep their storage, strides
    and sharing. The memory cost is one copy of the values.

    Args:
        model: the model.
        names: plain module attributes to save and restore where a module has them.
        unchanged: tensors the caller replaces but never writes into: their objects and
            memory are remembered, their values are not copied.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] = (), unchanged: Iterable[Tensor] = ()) -> None:
        self._names = set(names)
        skip = {id(t) for t in unchanged}
        self._tensors: dict[int, _SavedTensor] = {}
        self._params: dict[int, tuple[nn.Parameter, _SavedTensor | None, bool, dict[str, Any]]] = {}
        self._modules: list[_SavedModule] = []
        for module in model.modules():
            saved_module = _SavedModule(module, self._names)
            for t in [*saved_module.params.values(), *saved_module.buffers.values()]:
                if t is not None and id(t) not in self._tensors:
                    self._tensors[id(t)] = _SavedTensor(t, id(t) not in skip)
            for p in saved_module.params.values():
                if p is not None and id(p) not in self._params:
                    grad = p.grad
                    saved = None if grad is None else self._tensors.get(id(grad))
                    if grad is not None and saved is None:
                        saved = self._tensors[id(grad)] = _SavedTensor(grad, True)
                    self._params[id(p)] = (p, saved, p.requires_grad, _hook_dicts(p, _TENSOR_HOOKS))
            self._modules.append(saved_module)

    @contextlib.contextmanager
    def restored_on_failure(self) -> Iterator[None]:
        """Run the body; if it raises (``KeyboardInterrupt`` included), :meth:`restore`, then re-raise."""
        try:
            yield
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        """Put every remembered piece of state back: objects, memory, values, hooks and flags."""
        for saved_module in self._modules:
            saved_module.restore(self._names)
        # A gradient must match its parameter when it is set: detach them while memory moves back.
        for p, _, _, _ in self._params.values():
            p.grad = None
        for saved in self._tensors.values():
            saved.restore()
        for p, grad, requires_grad, hooks in self._params.values():
            p.grad = None if grad is None else grad.tensor
            p.requires_grad = requires_grad  # (an uninitialised parameter refuses requires_grad_)
            _restore_hook_dicts(p, hooks, _TENSOR_HOOKS)

    @property
    def nbytes(self) -> int:
        """The bytes of the copies this snapshot holds (one copy of each saved tensor's values)."""
        return sum(
            s.values.untyped_storage().nbytes()
            for s in self._tensors.values()
            if s.values is not None and s.values.layout == torch.strided
        )
