"""Find the tensors of a model that :mod:`torch.nn.utils.prune` reparametrised.

Torch's pruning replaces a pruned tensor ``module.<name>`` by a Parameter ``<name>_orig``, a
buffer ``<name>_mask`` and a forward pre-hook, a
:class:`~torch.nn.utils.prune.BasePruningMethod` whose ``_tensor_name`` is ``name`` (torch allows
one such hook per tensor; a second pruning turns it into a
:class:`~torch.nn.utils.prune.PruningContainer`). The functions here read those hooks, for
torch's methods and torchbip's alike, and change nothing.

Example:
    >>> from torch import nn
    >>> from torch.nn.utils import prune
    >>> from torchbip.pruned import pruned_tensors
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = prune.l1_unstructured(model[2], "weight", amount=2)
    >>> [(fqn, type(hook).__name__) for fqn, _, hook in pruned_tensors(model)]
    [('2.weight', 'L1Unstructured')]
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.utils import prune

__all__ = ["named_pruning_hooks", "pruned_tensors", "pruning_hook"]


def named_pruning_hooks(module: nn.Module) -> Iterator[tuple[str, prune.BasePruningMethod]]:
    """The pruning hooks of one module (not of its children), with the tensor each one prunes.

    A pruning hook is a forward pre-hook that is a
    :class:`~torch.nn.utils.prune.BasePruningMethod` and names its tensor (``_tensor_name``).
    This does not check that the module still holds the tensor's ``<name>_mask`` buffer;
    :func:`pruned_tensors` does.

    Args:
        module: any module.

    Yields:
        ``(name, hook)`` for each pruning hook, in the order the hooks were registered.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> layer = nn.Linear(3, 2)
        >>> _ = prune.random_unstructured(layer, "weight", amount=1)
        >>> _ = prune.l1_unstructured(layer, "bias", amount=1)
        >>> [(name, type(hook).__name__) for name, hook in named_pruning_hooks(layer)]
        [('weight', 'RandomUnstructured'), ('bias', 'L1Unstructured')]
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            name = getattr(hook, "_tensor_name", None)
            if name is not None:
                yield name, hook


def pruning_hook(module: nn.Module, name: str) -> prune.BasePruningMethod | None:
    """The pruning hook of ``module.<name>`` (torch allows one per tensor), or ``None``.

    Args:
        module: any module.
        name: a tensor's name in ``module``, e.g. ``"weight"``.

    Returns:
        The :class:`~torch.nn.utils.prune.BasePruningMethod` forward pre-hook that prunes
        ``name`` (a :class:`~torch.nn.utils.prune.PruningContainer` after several prunings), or
        ``None`` if no hook prunes it.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> layer = nn.Linear(3, 2)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=2)
        >>> _ = prune.l1_unstructured(layer, "weight", amount=1)
        >>> type(pruning_hook(layer, "weight")).__name__, pruning_hook(layer, "bias")
        ('PruningContainer', None)
    """
    return next((hook for hook_name, hook in named_pruning_hooks(module) if hook_name == name), None)


def pruned_tensors(model: nn.Module) -> list[tuple[str, nn.Module, prune.BasePruningMethod]]:
    """Every tensor of ``model`` that torch's pruning reparametrised, with its module and hook.

    A tensor counts when its module has a pruning hook for it (see :func:`named_pruning_hooks`)
    and still holds its ``<name>_mask`` buffer. A module reached under several names (shared) is
    listed once, under the first, as :meth:`torch.nn.Module.named_modules` lists it.

    Args:
        model: any model, pruned or not.

    Returns:
        ``(fqn, module, hook)`` per pruned tensor, in the order of
        :meth:`~torch.nn.Module.named_modules` and then of the module's hooks: ``fqn`` is the
        tensor's fully-qualified name in ``model`` (e.g. ``"layer1.0.conv1.weight"``),
        ``module`` the module that holds it and ``hook`` its
        :class:`~torch.nn.utils.prune.BasePruningMethod`. Empty for a model that nothing pruned.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> pruned_tensors(model)
        []
        >>> _ = prune.ln_structured(model[0], "weight", amount=1, n=2, dim=0)
        >>> _ = prune.l1_unstructured(model[2], "bias", amount=1)
        >>> [(fqn, module is model[int(fqn[0])]) for fqn, module, _ in pruned_tensors(model)]
        [('0.weight', True), ('2.bias', True)]
    """
    out = []
    for module_fqn, module in model.named_modules():
        prefix = module_fqn + "." if module_fqn else ""
        for name, hook in named_pruning_hooks(module):
            if name + "_mask" in module._buffers:
                out.append((prefix + name, module, hook))
    return out
