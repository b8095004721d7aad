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

    __slots__ = ("alias", "cls", "tensor", "values")

    def __init__(self, tensor: Tensor, copy: bool) -> None:
        self.tensor = tensor
        self.cls = type(tensor)
        lazy = nn.parameter.is_lazy(tensor)
        self.alias = tensor.data
        self.values = tensor.detach().clone() if copy and not lazy else None

    def restore(self) -> None:
        tensor = self.tensor
        if type(tensor) is not self.cls:  # e.g. a lazy parameter materialised by a forward pass
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


class ModelSnapshot:
    """Remember everything ``global_prune`` may change, and put it back on :meth:`restore`.

    Kept per module: the parameter and buffer dictionaries (the same objects, so identities are
    restored), the forward pre-hooks (and the attributes of torch pruning hooks: pruning on top
    of a :class:`~torch.nn.utils.prune.PruningContainer` appends to the same container), the
    forward hooks (BiP registers none: the deep-copy guard of a tensor it prunes lives inside its
    pruning pre-hook; forward hooks that the model or a loader adds during a run are dropped),
    the training flag, the non-persistent buffer set, and the plain attributes named ``names``
    (the tensors that torch's pruning hooks set, or layer sizes such as ``in_features``).

    Kept per tensor (each parameter, buffer and gradient once, also when modules share it): the
    object, its original memory (its ``.data``) and one copy of its values; per parameter its
    gradient object and ``requires_grad``. :meth:`restore` writes the values back into the
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
        self._params: dict[int, tuple[nn.Parameter, _SavedTensor | None, bool]] = {}
        self._modules: list[tuple[Any, ...]] = []
        for module in model.modules():
            params = dict(module._parameters)
            buffers = dict(module._buffers)
            for t in [*params.values(), *buffers.values()]:
                if t is not None and id(t) not in self._tensors:
                    self._tensors[id(t)] = _SavedTensor(t, id(t) not in skip)
            for p in params.values():
                if p is not None and id(p) not in self._params:
                    grad = p.grad
                    saved = None if grad is None else self._tensors.get(id(grad))
                    if grad is not None and saved is None:
                        saved = self._tensors[id(grad)] = _SavedTensor(grad, True)
                    self._params[id(p)] = (p, saved, p.requires_grad)
            self._modules.append(
                (
                    module,
                    params,
                    buffers,
                    set(module._non_persistent_buffers_set),
                    dict(module._forward_pre_hooks),
                    dict(module._forward_hooks),
                    [(hook, type(hook), dict(vars(hook))) for _, hook in named_pruning_hooks(module)],
                    module.training,
                    {n: module.__dict__[n] for n in self._names if n in module.__dict__},
                )
            )

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
        for (
            module,
            params,
            buffers,
            non_persistent,
            hooks,
            post_hooks,
            hook_states,
            training,
            attrs,
        ) in self._modules:
            for name in self._names:
                module.__dict__.pop(name, None)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(non_persistent)
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)
            module._forward_hooks.clear()
            module._forward_hooks.update(post_hooks)
            for hook, cls, state in hook_states:
                hook.__class__ = cls  # (BiP makes a torch container it prunes on top of its own class)
                vars(hook).clear()
                vars(hook).update(state)
            module.training = training
            module.__dict__.update(attrs)
        # A gradient must match its parameter when it is set: detach them while memory moves back.
        for p, _, _ in self._params.values():
            p.grad = None
        for saved in self._tensors.values():
            saved.restore()
        for p, grad, requires_grad in self._params.values():
            p.grad = None if grad is None else grad.tensor
            p.requires_grad_(requires_grad)

    @property
    def nbytes(self) -> int:
        """The bytes of the copies this snapshot holds (one copy of each saved tensor's values)."""
        return sum(
            s.values.untyped_storage().nbytes()
            for s in self._tensors.values()
            if s.values is not None and s.values.layout == torch.strided
        )
