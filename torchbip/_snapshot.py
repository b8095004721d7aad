"""Private: an exact snapshot of a model's state, restored when a pruning run fails."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

__all__ = ["ModelSnapshot"]


class ModelSnapshot:
    """Remember everything ``global_prune`` may change, and put it back on :meth:`restore`.

    Kept per module: the parameter and buffer dictionaries (the same objects, so identities are
    restored), copies of their values and gradients, ``requires_grad`` flags, the forward
    pre-hooks (and the attributes of torch pruning hooks: pruning on top of a
    :class:`~torch.nn.utils.prune.PruningContainer` appends to the same container), the forward
    hooks (BiP adds a :class:`~torchbip.method.DeepcopyGuard` for each tensor it prunes), the
    training flag, the non-persistent buffer set, and the plain attributes named ``names`` (the
    tensors that torch's pruning hooks set).
    """

    def __init__(self, model: nn.Module, names: Iterable[str] = ()) -> None:
        self._names = set(names)
        self._modules = []
        for module in model.modules():
            params = dict(module._parameters)
            buffers = dict(module._buffers)
            self._modules.append(
                (
                    module,
                    params,
                    {k: _copy(p) for k, p in params.items()},
                    {k: (None if p is None else p.grad) for k, p in params.items()},
                    {k: (None if p is None else p.requires_grad) for k, p in params.items()},
                    buffers,
                    {k: _copy(b) for k, b in buffers.items()},
                    set(module._non_persistent_buffers_set),
                    dict(module._forward_pre_hooks),
                    dict(module._forward_hooks),
                    {
                        key: dict(vars(hook))
                        for key, hook in module._forward_pre_hooks.items()
                        if isinstance(hook, prune.BasePruningMethod)
                    },
                    module.training,
                    {n: module.__dict__[n] for n in self._names if n in module.__dict__},
                )
            )

    @torch.no_grad()
    def restore(self) -> None:
        """Put every remembered piece of state back."""
        for (
            module,
            params,
            values,
            grads,
            flags,
            buffers,
            buffer_values,
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
            for k, p in params.items():
                if p is not None:
                    p.data = values[k]  # type: ignore[assignment]
                    p.grad = grads[k]
                    p.requires_grad_(bool(flags[k]))
            module._buffers.clear()
            module._buffers.update(buffers)
            for k, b in buffers.items():
                if b is not None:
                    b.data = buffer_values[k]  # type: ignore[assignment]
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(non_persistent)
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)
            module._forward_hooks.clear()
            module._forward_hooks.update(post_hooks)
            for key, state in hook_states.items():
                vars(hooks[key]).clear()
                vars(hooks[key]).update(state)
            module.training = training
            module.__dict__.update(attrs)


def _copy(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().clone()
