r"""BiP's unstructured pruning method: learned scores in, exact top-k mask out.

:class:`BiPPruningMethod` is a :class:`torch.nn.utils.prune.BasePruningMethod`: it knows only how
to turn scores into a mask. The scores are learned by :func:`torchbip.global_prune`; on their own,
:class:`BiPPruningMethod` and :func:`bip_unstructured` prune by the given ``importance_scores``
(the weight magnitudes by default) and register them as a ``<name>_scores`` buffer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip.masks import count_from_amount, topk_mask, validate_amount

__all__ = ["BiPPruningMethod", "DeepcopyGuard", "bip_unstructured", "scores_name"]


def scores_name(name: str) -> str:
    """Name of the score buffer that BiP registers for tensor ``name``.

    Args:
        name: the pruned tensor's name, e.g. ``"weight"``.

    Returns:
        ``name + "_scores"``.

    Example:
        >>> scores_name("weight")
        'weight_scores'
    """
    return name + "_scores"


def named_tensor(module: nn.Module, name: str) -> Tensor:
    """``module.<name>``, or a ``ValueError`` that names the module and ``name``."""
    current = getattr(module, name, None)
    if not isinstance(current, Tensor):
        raise ValueError(f"module {type(module).__name__} has no tensor named name={name!r}")
    return current


def check_mask_shape(t: Tensor, default_mask: Tensor) -> None:
    """Raise ``ValueError`` unless the importance scores have ``default_mask``'s shape."""
    if t.shape != default_mask.shape:
        raise ValueError(
            f"importance scores have shape {tuple(t.shape)} but default_mask has shape "
            f"{tuple(default_mask.shape)}"
        )


def check_finite(scores: Tensor) -> None:
    """Raise ``ValueError`` if the importance scores hold a NaN or an infinity."""
    if not torch.isfinite(scores).all():
        raise ValueError("importance_scores contain NaN or infinite values")


class BiPPruningMethod(prune.BasePruningMethod):
    r"""Prune the entries with the lowest BiP scores (an exact, deterministic top-k).

    The mask keeps the highest-scoring entries among those that ``default_mask`` still keeps; an
    entry pruned earlier is never revived. Ties are broken by flat index (lower index kept).

    State on the module after :meth:`apply` (as for every torch pruning method):
    ``<name>_orig`` (the parameter), ``<name>_mask`` (buffer), a forward pre-hook that sets
    ``<name> = <name>_orig * <name>_mask``, plus the ``<name>_scores`` buffer holding the scores
    and a :class:`DeepcopyGuard` forward hook, so that ``copy.deepcopy`` of the module works
    after a forward pass with gradients on (it fails for torch's own methods, pytorch issue
    #37322).
    The score buffer is non-persistent, so ``state_dict`` holds exactly the keys that torch's own
    methods leave (``<name>_orig``, ``<name>_mask``), also when a
    :class:`~torch.nn.utils.prune.PruningContainer` combines BiP with other methods.
    :func:`torch.nn.utils.prune.remove` makes the pruning permanent; BiP's own :meth:`remove`
    also drops the score buffer.

    Args:
        amount: a float in ``[0, 1]``, the fraction of the *remaining* entries to prune, or an
            int, the number of entries to prune (torch's convention).

    Example:
        >>> import torch
        >>> method = BiPPruningMethod(amount=0.5)
        >>> scores = torch.tensor([[0.9, 0.1], [0.5, 0.7]])
        >>> method.compute_mask(scores, default_mask=torch.ones(2, 2)).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
        >>> method.compute_mask(scores, default_mask=torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        tensor([[0., 0.],
                [0., 1.]])
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int | float) -> None:
        self.amount = validate_amount(amount)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """Return ``default_mask`` with the lowest-scoring remaining entries set to zero.

        Args:
            t: importance scores, the shape of the pruned tensor.
            default_mask: the mask from earlier pruning (ones where nothing was pruned).

        Returns:
            A mask of ``default_mask``'s dtype with exactly ``count`` more zeros, where ``count``
            is ``round(amount * remaining)`` for a float amount or ``amount`` for an int.
        """
        check_mask_shape(t, default_mask)
        check_finite(t)
        allowed = default_mask != 0
        n_allowed = int(allowed.sum())
        n_prune = count_from_amount(self.amount, n_allowed)
        keep = topk_mask(t, n_allowed - n_prune, allowed)
        # empty_like keeps default_mask's memory format (e.g. channels_last, as the weight's).
        return torch.empty_like(default_mask).copy_(keep)

    @classmethod
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: int | float,
        importance_scores: Tensor | None = None,
    ) -> prune.BasePruningMethod:
        """Prune ``module.<name>`` by scores and register the score buffer.

        Args:
            module: the module holding the tensor.
            name: the parameter name, e.g. ``"weight"``.
            amount: see :class:`BiPPruningMethod`.
            importance_scores: scores of the tensor's shape; by default the magnitudes of the
                current (masked) weights.

        Returns:
            The hook now attached to the module (a :class:`BiPPruningMethod`, or a
            :class:`torch.nn.utils.prune.PruningContainer` when the tensor was pruned before).

        Raises:
            ValueError: for a bad ``amount`` or ``importance_scores``; the module is unchanged.
        """
        validate_amount(amount)
        current = named_tensor(module, name)
        scores = current.detach().abs() if importance_scores is None else importance_scores
        if scores.shape != current.shape:
            raise ValueError(
                f"importance_scores has shape {tuple(scores.shape)} but {name} has shape "
                f"{tuple(current.shape)}"
            )
        check_finite(scores)
        mask = getattr(module, name + "_mask", None)
        remaining = int(mask.sum()) if isinstance(mask, Tensor) else current.numel()
        count_from_amount(amount, remaining)  # raise before torch removes any old hook
        method = super().apply(module, name, amount=amount, importance_scores=scores)
        attach_scores(method, module, name, scores.detach().clone())
        return method

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent, drop the score buffer and the :class:`DeepcopyGuard`."""
        super().remove(module)
        assert self._tensor_name is not None
        detach_scores(module, self._tensor_name)


def attach_scores(method: prune.BasePruningMethod, module: nn.Module, name: str, scores: Tensor) -> None:
    """What every BiP method adds after torch's ``apply``: scores, a leaf tensor, a guard.

    Args:
        method: the method that torch's ``apply`` returned.
        module: the pruned module.
        name: the pruned tensor's name.
        scores: the tensor to keep as the score buffer (registered as it is).
    """
    # Non-persistent: a PruningContainer's remove() never calls BiP's, so a persistent score
    # buffer would stay in the state_dict and break strict loading into a fresh model.
    module.register_buffer(scores_name(name), scores, persistent=False)
    # A plain (leaf) tensor until the next forward pass, so `copy.deepcopy` works (torch's own
    # methods leave a non-leaf here, which deepcopy rejects: pytorch issue #37322).
    with torch.no_grad():
        setattr(module, name, method.apply_mask(module))
    DeepcopyGuard.register(module, name)


def detach_scores(module: nn.Module, name: str) -> None:
    """Undo :func:`attach_scores` after torch's ``remove``: drop the score buffer and the guard.

    Args:
        module: the module whose pruning was made permanent.
        name: the tensor's name.
    """
    if scores_name(name) in module._buffers:
        delattr(module, scores_name(name))
    DeepcopyGuard.unregister(module, name)


class _DetachedCopy:
    """``__deepcopy__`` of one masked tensor: a deep copy of its detached view (no graph)."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __call__(self, memo: dict[int, Any]) -> Tensor:
        return copy.deepcopy(self.value, memo)


class DeepcopyGuard:
    r"""Forward hook that lets ``copy.deepcopy`` copy a pruned module after a forward pass.

    A pruning pre-hook sets ``module.<name> = <name>_orig * <name>_mask``. With gradients on,
    that is a non-leaf tensor, which ``copy.deepcopy`` rejects (pytorch issue #37322), so a
    pruned model cannot be deep-copied after a training step. After each forward pass this hook
    gives that tensor a ``__deepcopy__`` that copies its values without the autograd graph (a
    detached view, no copy of the data). The tensor itself stays as torch's pre-hook left it:
    gradients flow exactly as with torch's own methods, also when ``module.<name>`` is read
    after the forward pass (e.g. by a layer that reuses an embedding matrix).

    The hook is a no-op when ``module.<name>`` is not such a tensor: a Parameter again (after
    :func:`torch.nn.utils.prune.remove` through a :class:`~torch.nn.utils.prune.PruningContainer`,
    which never calls :meth:`BiPPruningMethod.remove`), a leaf, a tensor of a :mod:`torch.func`
    transform, or while :func:`torch.compile` traces the module (to avoid a graph break; deep-copy
    the module after a forward pass under ``torch.no_grad()`` there). It is a small picklable
    object, so ``pickle`` and ``torch.save`` of the whole module work.

    Args:
        name: the pruned tensor's name, e.g. ``"weight"``.

    Example:
        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> layer = bip_unstructured(nn.Linear(4, 2), "weight", amount=0.5)
        >>> layer(torch.randn(3, 4)).sum().backward()
        >>> layer.weight.is_leaf, copy.deepcopy(layer).weight.is_leaf
        (False, True)
        >>> [type(h).__name__ for h in layer._forward_hooks.values()]
        ['DeepcopyGuard']
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        """Give ``module.<name>`` a graph-free ``__deepcopy__`` if it is a non-leaf tensor."""
        if torch.compiler.is_compiling():
            return
        tensor = module.__dict__.get(self.name)
        if (
            type(tensor) is not Tensor
            or tensor.grad_fn is None
            or torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        ):
            return
        # copy.deepcopy looks up __deepcopy__ on the instance before the class.
        tensor.__deepcopy__ = _DetachedCopy(tensor.detach())  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"DeepcopyGuard(name={self.name!r})"

    @classmethod
    def register(cls, module: nn.Module, name: str) -> None:
        """Add the guard of ``module.<name>`` unless it is there already.

        Args:
            module: the pruned module.
            name: the pruned tensor's name.
        """
        if not any(isinstance(h, cls) and h.name == name for h in module._forward_hooks.values()):
            module.register_forward_hook(cls(name))

    @classmethod
    def unregister(cls, module: nn.Module, name: str) -> None:
        """Remove the guard of ``module.<name>`` (if any).

        Args:
            module: the module.
            name: the tensor's name.
        """
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, cls) and hook.name == name:
                del module._forward_hooks[key]


def bip_unstructured(
    module: nn.Module,
    name: str,
    amount: int | float,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """Prune ``module.<name>`` by BiP scores, in torch's functional style.

    Like :func:`torch.nn.utils.prune.l1_unstructured`, but ``importance_scores`` are BiP scores
    (by default the weight magnitudes, so this alone is magnitude pruning); they are kept in the
    non-persistent ``<name>_scores`` buffer. Use :func:`torchbip.global_prune` to learn the scores.

    Args:
        module: module containing the tensor to prune.
        name: parameter name within ``module``.
        amount: a float in ``[0, 1]`` (fraction of the remaining entries) or an int (count).
        importance_scores: optional scores of the parameter's shape.

    Returns:
        ``module``, modified in place.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> layer = nn.Linear(4, 2)
        >>> _ = bip_unstructured(layer, "weight", amount=3)
        >>> int((layer.weight_mask == 0).sum()), prune.is_pruned(layer)
        (3, True)
        >>> sorted(name for name, _ in layer.named_buffers())
        ['weight_mask', 'weight_scores']
        >>> sorted(layer.state_dict())
        ['bias', 'weight_mask', 'weight_orig']
    """
    BiPPruningMethod.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module
