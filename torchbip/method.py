r"""BiP's unstructured pruning method: scores in, exact top-k of their magnitudes out.

:class:`BiPPruningMethod` is a :class:`torch.nn.utils.prune.BasePruningMethod`: it knows only how
to turn scores into a mask. Through torch's own entry points (``apply``, ``prune``,
:func:`torch.nn.utils.prune.global_unstructured`) it ranks the *magnitudes* of what it is given,
the weight or ``importance_scores``, exactly like :class:`~torch.nn.utils.prune.L1Unstructured`
(but with an exact count and deterministic ties). :func:`torchbip.global_prune` learns BiP scores
and selects its masks from them with its own top-k (:class:`torchbip.masks.GlobalTopK`), not
through :meth:`BiPPruningMethod.compute_mask`.

On their own, :class:`BiPPruningMethod` and :func:`bip_unstructured` keep the given scores in a
non-persistent ``<name>_scores`` buffer. Whatever makes the pruning permanent
(:func:`torch.nn.utils.prune.remove`, also through a
:class:`~torch.nn.utils.prune.PruningContainer` that mixes BiP with torch's methods in any order,
or :func:`torchbip.export.make_permanent`) drops it again, so the module then holds exactly what
torch's own methods leave. For the container that torch builds when one of its methods is
applied on top of a BiP method, torchbip cannot change the container's ``remove``; there a
parameter-registration hook (:func:`torch.nn.modules.module.register_module_parameter_registration_hook`,
registered once when this module is imported) drops the buffer when torch's ``remove`` puts the
parameter back. It does nothing for any module without such a buffer and a torchbip method among
its pruning hooks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import numbers
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.nn.utils import prune

from torchbip.masks import count_from_amount, topk_mask, validate_amount
from torchbip.pruned import pruning_hook

__all__ = ["BiPContainer", "BiPMethod", "BiPPruningMethod", "bip_unstructured", "magnitudes", "scores_name"]


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


def magnitudes(t: Tensor) -> Tensor:
    """What BiP's ``compute_mask`` ranks: ``|t|``, detached (booleans and unsigned ints as they are).

    Signed integers are widened to ``int64`` first, so that the most negative value of a narrower
    type (``-128`` in ``int8``) ranks as the largest magnitude instead of overflowing to itself;
    in ``int64``, ``-2**63`` ranks level with ``2**63 - 1``.

    Args:
        t: the weight or the importance scores.

    Returns:
        A tensor of ``t``'s shape: ``t``'s dtype, or ``int64`` for signed integers.

    Example:
        >>> import torch
        >>> magnitudes(torch.tensor([-3.0, 1.0, -0.5])).tolist()
        [3.0, 1.0, 0.5]
        >>> magnitudes(torch.tensor([-128, 127], dtype=torch.int8)).tolist()
        [128, 127]
    """
    t = t.detach()
    if not t.is_signed():
        return t
    if t.is_floating_point() or t.is_complex():
        return t.abs()
    wide = t.to(torch.int64)
    if t.dtype == torch.int64:  # |-2**63| does not fit: rank it level with the largest
        lowest = torch.iinfo(torch.int64)
        return torch.where(wide == lowest.min, lowest.max, wide.abs())
    return wide.abs()


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


RANKABLE_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex32,
        torch.complex64,
        torch.complex128,
    }
)
"""The dtypes whose magnitudes the pruning methods can rank (not float8 or quantized types)."""


def check_rankable(scores: Tensor, what: str = "importance_scores") -> None:
    """Raise ``TypeError`` unless the scores are a dense tensor of a dtype that can be ranked.

    A sparse (or other non-strided) layout, and a dtype outside :data:`RANKABLE_DTYPES` (float8,
    quantized), have no operations to rank their magnitudes with; torch would fail in the middle
    of the ranking with a message that names no argument. ``what`` names them as in
    :func:`check_finite`.

    Example:
        >>> import torch
        >>> check_rankable(torch.ones(2, 2).to_sparse())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: importance_scores must be a dense (strided) tensor ..., got a sparse_coo tensor of ...
    """
    if scores.layout != torch.strided:
        fix = ".to_dense()"
    elif scores.dtype not in RANKABLE_DTYPES:
        fix = ".dequantize()" if scores.is_quantized else ".float()"
    else:
        return
    layout = str(scores.layout).removeprefix("torch.")
    raise TypeError(
        f"{what} must be a dense (strided) tensor of a dtype that can be ranked (bool, an integer, "
        f"floating-point or complex dtype; not float8 or quantized), got a {layout} tensor of dtype "
        f"{scores.dtype}" + (f"; e.g. pass importance_scores{fix}" if what == "importance_scores" else "")
    )


def check_finite(scores: Tensor, what: str = "importance_scores") -> None:
    """Raise ``ValueError`` if the importance scores hold a NaN or an infinity.

    ``what`` names them in the message: the argument, or the weight whose magnitudes stand in
    for it. A ``meta`` tensor holds no values to check. Scores that cannot be ranked at all get
    the ``TypeError`` of :func:`check_rankable` first.
    """
    check_rankable(scores, what)
    if not scores.is_meta and not torch.isfinite(scores).all():
        raise ValueError(f"{what} contain NaN or infinite values, which cannot be ranked")


def check_scores_device(importance_scores: Tensor | None, current: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``importance_scores`` (if given) live on the device of ``name``.

    Torch's ``apply`` would fail on a mismatch with a message that names neither, or (for a
    tensor pruned before, with ``meta`` scores) prune nothing; checked before anything changes.
    """
    if importance_scores is not None and importance_scores.device != current.device:
        raise ValueError(
            f"importance_scores are on device {importance_scores.device} but {name!r} is on device "
            f"{current.device}; pass them on {current.device} "
            f"(e.g. importance_scores.to(module.{name}.device))"
        )


def integer_argument(arg: str, value: object) -> int:
    """``value`` as a Python ``int``: an int or a NumPy integer; a ``TypeError`` naming ``arg`` else.

    A ``bool`` (also NumPy's) is refused, as a float is.

    Example:
        >>> import numpy as np
        >>> integer_argument("dim", np.int64(-1))
        -1
        >>> integer_argument("dim", True)
        Traceback (most recent call last):
        ...
        TypeError: dim must be an int, got True of type bool
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def scores_source(importance_scores: Tensor | None, name: str) -> str:
    """What ranks the entries, for messages: ``importance_scores`` or the tensor ``name`` itself."""
    if importance_scores is not None:
        return "importance_scores"
    return f"the values of {name!r} (ranked by magnitude, as no importance_scores were given)"


P = ParamSpec("P")
R = TypeVar("R")


def check_scores_type(importance_scores: object) -> None:
    """Raise ``TypeError`` unless ``importance_scores`` is ``None`` or a tensor that can be ranked.

    A tensor must be dense, of a dtype that can be ranked (:func:`check_rankable`).
    """
    if importance_scores is not None and not isinstance(importance_scores, Tensor):
        raise TypeError(
            f"importance_scores must be a torch.Tensor of the pruned tensor's shape or None, got "
            f"{type(importance_scores).__name__}; e.g. pass torch.as_tensor(scores)"
        )
    if importance_scores is not None:
        check_rankable(importance_scores)


def outside_inference_mode(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a pruning ``apply`` with inference mode off.

    Its masks and buffers are then ordinary tensors: inference tensors created under
    :func:`torch.inference_mode` would break the next training step.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def remaining_entries(module: nn.Module, name: str, current: Tensor) -> int:
    """How many entries of ``module.<name>`` a further unstructured pruning may still prune.

    Torch's :class:`~torch.nn.utils.prune.PruningContainer` hands an unstructured method the
    entries whose mask is exactly 1, so they are counted here the same way (for a binary mask,
    the entries not pruned yet); without a mask, every entry of ``current``.
    """
    mask = getattr(module, name + "_mask", None)
    if not isinstance(mask, Tensor) or mask.is_meta:  # a meta mask holds no values to count
        return current.numel()
    return int(torch.count_nonzero(mask == 1))


@contextlib.contextmanager
def unchanged_on_failure(module: nn.Module, name: str) -> Iterator[None]:
    """Undo what torch's :meth:`~torch.nn.utils.prune.BasePruningMethod.apply` leaves on failure.

    When a mask computation fails, torch's ``apply`` has already taken an earlier pruning hook of
    ``name`` off the module (and added the new method to it, if it was a container), and its own
    rollback registers a first-time parameter again at the end of ``module._parameters``. This
    puts the hooks, the container's methods and the order of the parameters and buffers back as
    they were, then re-raises.

    Args:
        module: the module being pruned.
        name: the pruned tensor's name.
    """
    hooks = list(module._forward_pre_hooks.items())
    with_kwargs = dict(module._forward_pre_hooks_with_kwargs)
    parameters = list(module._parameters.items())
    buffers = list(module._buffers.items())
    hook = pruning_hook(module, name)
    methods = tuple(hook) if isinstance(hook, prune.PruningContainer) else None
    try:
        yield
    except BaseException:
        if isinstance(hook, prune.PruningContainer) and methods is not None:
            hook._pruning_methods = methods
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks.update(hooks)
        module._parameters.clear()
        module._parameters.update(parameters)
        module._buffers.clear()
        module._buffers.update(buffers)
        module._forward_pre_hooks_with_kwargs.clear()
        module._forward_pre_hooks_with_kwargs.update(with_kwargs)
        raise


def holds_bip(hook: object) -> bool:
    """Whether a pruning hook is a torchbip method or a container that holds one."""
    if isinstance(hook, BiPMethod):
        return True
    return isinstance(hook, prune.PruningContainer) and any(isinstance(m, BiPMethod) for m in hook)


def check_scores_slot(module: nn.Module, name: str, where: str | None = None) -> None:
    """Refuse a module that holds something else under the name of ``name``'s score buffer.

    BiP keeps the scores of ``module.<name>`` in the buffer ``<name>_scores``
    (:func:`scores_name`). A buffer, parameter, submodule, plain attribute or class attribute
    (e.g. a property) of the user's under that name would be overwritten, or would make the
    registration fail after torch had already pruned the module, so every entry point refuses it
    before it changes anything. A score buffer left by BiP itself (the tensor's pruning hook
    holds a torchbip method: the tensor is pruned again, or the module is a deep copy of one
    that BiP prunes) is replaced as before.

    Args:
        module: the module that holds the tensor.
        name: the tensor's name, e.g. ``"weight"``.
        where: the start of the message, naming the module (by default
            ``"module <its class>"``).

    Raises:
        ValueError: naming the attribute and the tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> layer.register_buffer("weight_scores", torch.ones(2, 2))
        >>> check_scores_slot(layer, "weight")
        Traceback (most recent call last):
        ...
        ValueError: module Linear already has an attribute 'weight_scores', ...
    """
    slot = scores_name(name)
    taken = (
        slot in module.__dict__
        or slot in module._parameters
        or slot in module._modules
        or hasattr(type(module), slot)  # a property or class attribute
    )
    if slot in module._buffers:
        taken = not holds_bip(pruning_hook(module, name))
    if taken:
        start = where if where is not None else f"module {type(module).__name__}"
        raise ValueError(
            f"{start} already has an attribute {slot!r}, the name under which BiP keeps the scores of "
            f"{name!r}: rename that attribute"
        )


class _DetachedCopy:
    """``__deepcopy__`` of one masked tensor: a deep copy of its detached view (no graph)."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __call__(self, memo: dict[int, Any]) -> Tensor:
        return copy.deepcopy(self.value, memo)


def guard_deepcopy(tensor: Tensor) -> Tensor:
    """Let ``copy.deepcopy`` copy a masked tensor that carries an autograd graph; return it.

    A pruning pre-hook sets ``module.<name> = <name>_orig * <name>_mask``. With gradients on,
    that is a non-leaf tensor, which ``copy.deepcopy`` rejects (pytorch issue #37322), so a
    module pruned by torch's own methods cannot be deep-copied after a training step. This gives
    the tensor a ``__deepcopy__`` that copies its values without the graph (a detached view, no
    copy of the data); the tensor itself, and so every gradient, stays as torch's hook makes it.

    While :func:`torch.compile` traces, dynamo records the attribute and sets it on the real
    tensor after the graph has run: no graph break, so ``fullgraph=True`` works as before and
    the model deep-copies after compiled training steps too. A no-op for a leaf (no gradients),
    a tensor subclass, a tensor of a :mod:`torch.func` transform, and while
    :func:`torch.jit.trace` traces (its check would see the attribute as a difference between
    two traces).

    Args:
        tensor: the masked tensor that a pruning pre-hook computed.

    Returns:
        ``tensor`` itself.
    """
    if torch.compiler.is_compiling():
        # only what dynamo traces without a graph break (it cannot trace the functorch check)
        guard = type(tensor) is Tensor and tensor.requires_grad and torch.is_grad_enabled()
    else:
        guard = (
            not torch.jit.is_tracing()
            and type(tensor) is Tensor
            and tensor.grad_fn is not None
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        )
    if guard:
        # copy.deepcopy looks up __deepcopy__ on the instance before the class.
        tensor.__deepcopy__ = _DetachedCopy(tensor.detach())  # type: ignore[method-assign]
    return tensor


class GradCapture:
    r"""A callback that receives :math:`g = \nabla_z \ell` at the masked tensor :math:`z`.

    Set on a torchbip pruning hook by :class:`torchbip.BiP` (:func:`set_grad_capture`); the
    hook registers it as a gradient hook on the masked tensor it computes in every forward pass
    with gradients on. It is not copied with the model: ``copy.deepcopy`` and pickling of a
    module give its hook no capture.
    """

    # Pickling the masked tensor it hooks drops it on purpose: torch need not warn about that.
    __torch_unserializable__ = True

    def __init__(self, fn: Callable[[Tensor], None]) -> None:
        self.fn = fn

    def __call__(self, grad: Tensor) -> None:
        self.fn(grad)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_capture, ()


def _no_capture() -> None:
    """What a :class:`GradCapture` becomes when its module is copied or unpickled."""


def set_grad_capture(hook: prune.BasePruningMethod, capture: GradCapture | None) -> None:
    """Give a torchbip pruning hook a gradient capture, or take it away (``None``)."""
    if capture is not None:
        hook._grad_capture = capture  # type: ignore[attr-defined]
    elif "_grad_capture" in vars(hook):
        del hook._grad_capture  # type: ignore[attr-defined]


def has_grad_capture(hook: prune.BasePruningMethod) -> bool:
    """Whether a live :class:`torchbip.BiP` (built, not finished) captures this hook's gradients.

    A hook of a deep-copied or unpickled module holds no capture (see :class:`GradCapture`).
    """
    return isinstance(vars(hook).get("_grad_capture"), GradCapture)


def capture_grad(hook: prune.BasePruningMethod, masked: Tensor) -> Tensor:
    """Register the hook's gradient capture (if any) on the masked tensor; return the tensor.

    Only for a tensor of an ordinary autograd graph: under :mod:`torch.func` transforms (as in
    :func:`torchbip.global_prune`) the gradients are computed functionally instead.
    """
    capture = getattr(hook, "_grad_capture", None)
    if (
        capture is not None
        and masked.requires_grad
        and torch.is_grad_enabled()
        # torch.compile traces no torch.func transform (and cannot trace this check)
        and (torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(masked))
    ):
        masked.register_hook(capture)
    return masked


def drop_scores(module: nn.Module, name: str) -> None:
    """Drop the ``<name>_scores`` buffer of ``module`` (if any).

    Args:
        module: the module whose pruning was made permanent.
        name: the tensor's name.
    """
    if scores_name(name) in module._buffers:
        delattr(module, scores_name(name))


class BiPMethod(prune.BasePruningMethod):
    r"""What torchbip's pruning methods add to :class:`~torch.nn.utils.prune.BasePruningMethod`.

    The forward pre-hook sets ``<name> = <name>_orig * <name>_mask`` as torch's does, and lets
    ``copy.deepcopy`` copy the result after a forward pass with gradients on (see
    :func:`guard_deepcopy`), so a module pruned by BiP can be deep-copied after a training step
    (for torch's own methods it cannot, pytorch issue #37322). Nothing else is registered on the
    module: besides torch's ``<name>_orig``, ``<name>_mask`` and this hook, only the
    non-persistent ``<name>_scores`` buffer, which :meth:`remove` drops.
    """

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        """Set ``module.<name>`` to the masked tensor, deep-copyable (torch's hook, guarded)."""
        setattr(module, self._tensor_name, capture_grad(self, guard_deepcopy(self.apply_mask(module))))

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent (torch's :meth:`remove`) and drop the score buffer."""
        super().remove(module)
        drop_scores(module, self._tensor_name)


class BiPContainer(prune.PruningContainer):
    """The container a BiP method applied on top of an earlier method of the same tensor leaves.

    Torch's :class:`~torch.nn.utils.prune.PruningContainer` with BiP's pre-hook (deep-copyable
    after a training step, see :class:`BiPMethod`) and a :meth:`remove` that also drops the
    ``<name>_scores`` buffer. Torch methods applied on top of it are added to it, as to any
    container. A container that torch builds (one of its methods on top of a BiP method) stays
    torch's: there the masked tensor cannot be deep-copied after a forward pass with gradients
    on, as with torch's own methods (pytorch issue #37322); its ``remove`` still leaves nothing
    of torchbip behind (see the module docstring).
    """

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        """Set ``module.<name>`` to the masked tensor, deep-copyable (torch's hook, guarded)."""
        setattr(module, self._tensor_name, capture_grad(self, guard_deepcopy(self.apply_mask(module))))

    def remove(self, module: nn.Module) -> None:
        """Make the pruning permanent (torch's :meth:`remove`) and drop the score buffer."""
        super().remove(module)
        drop_scores(module, self._tensor_name)


def attach_scores(
    method: prune.BasePruningMethod,
    module: nn.Module,
    name: str,
    scores: Tensor,
) -> None:
    """What every BiP method adds after torch's ``apply``: the score buffer, a leaf tensor.

    Args:
        method: the hook that torch's ``apply`` returned.
        module: the pruned module.
        name: the pruned tensor's name.
        scores: the tensor to keep as the score buffer (registered as it is).
    """
    if type(method) is prune.PruningContainer:
        # The container that torch's apply built around the earlier method, or a container of
        # torch's that already held earlier methods: make it BiP's (same state, BiP's pre-hook,
        # which captures gradients for torchbip.BiP, and a remove that drops the scores). A failed
        # global_prune or BiP construction puts the hook's class back (see ModelSnapshot).
        method.__class__ = BiPContainer
    # Non-persistent: state_dict holds exactly the keys that torch's own methods leave.
    module.register_buffer(scores_name(name), scores, persistent=False)
    # A plain (leaf) tensor until the next forward pass, so `copy.deepcopy` works.
    with torch.no_grad():
        setattr(module, name, method.apply_mask(module))


def _drop_scores_on_remove(module: nn.Module, name: str, param: Tensor | None) -> None:
    """Parameter-registration hook: drop ``<name>_scores`` when torch's ``remove`` ends.

    :meth:`torch.nn.utils.prune.BasePruningMethod.remove` (also a plain container's) ends with
    ``setattr(module, name, orig)``, after it deleted ``<name>_orig`` and ``<name>_mask``, while
    the hook is still registered. Only then, and only if that hook holds a torchbip method, is
    the score buffer dropped.
    """
    if (
        scores_name(name) in module._buffers
        and name + "_orig" not in module._parameters
        and name + "_mask" not in module._buffers
        and holds_bip(pruning_hook(module, name))
    ):
        drop_scores(module, name)


_REMOVE_HOOK = register_module_parameter_registration_hook(_drop_scores_on_remove)


class BiPPruningMethod(BiPMethod):
    r"""Prune the entries of lowest magnitude of the scores (an exact, deterministic top-k).

    :meth:`compute_mask` ranks ``|t|``, where ``t`` is what torch hands it: the weight itself, or
    the user's ``importance_scores`` (:meth:`apply`, :func:`torch.nn.utils.prune.global_unstructured`,
    :meth:`~torch.nn.utils.prune.BasePruningMethod.prune`), the criterion of
    :class:`~torch.nn.utils.prune.L1Unstructured`. The mask keeps the entries of highest magnitude
    among those that ``default_mask`` still keeps; an entry pruned earlier is never revived.
    Exactly ``round(amount * remaining)`` entries are pruned; ties are broken by flat index (the
    lower index is kept). The scores that :func:`torchbip.global_prune` learns are ranked by
    value by its own top-k (:class:`torchbip.masks.GlobalTopK`), not through this method.

    State on the module after :meth:`apply` (as for every torch pruning method):
    ``<name>_orig`` (the parameter), ``<name>_mask`` (buffer), a forward pre-hook that sets
    ``<name> = <name>_orig * <name>_mask`` (deep-copyable after a training step, see
    :class:`BiPMethod`), plus the non-persistent ``<name>_scores`` buffer holding the scores as
    given. ``state_dict`` holds exactly the keys that torch's own methods leave
    (``<name>_orig``, ``<name>_mask``). :func:`torch.nn.utils.prune.remove` makes the pruning
    permanent and drops the score buffer, also when a
    :class:`~torch.nn.utils.prune.PruningContainer` combines BiP with torch's methods: afterwards
    the module holds what it would hold had only torch's methods pruned it.

    Args:
        amount: a float in ``[0, 1]``, the fraction of the *remaining* entries to prune, or an
            int, the number of entries to prune (torch's convention).

    Example:
        >>> import torch
        >>> method = BiPPruningMethod(amount=0.5)
        >>> scores = torch.tensor([[0.9, -0.1], [0.5, -0.7]])
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
        """Return ``default_mask`` with the remaining entries of lowest ``|t|`` set to zero.

        Args:
            t: the tensor to prune or its importance scores, the shape of ``default_mask``;
                their magnitudes are ranked.
            default_mask: the mask from earlier pruning (ones where nothing was pruned).

        Returns:
            A mask of ``default_mask``'s dtype with exactly ``count`` more zeros, where ``count``
            is ``round(amount * remaining)`` for a float amount or ``amount`` for an int. For a
            ``meta`` tensor (no values), a ``meta`` mask of that shape, as torch's methods give.
        """
        check_mask_shape(t, default_mask)
        check_finite(t)
        if t.is_meta or default_mask.is_meta:
            # no values to rank: a mask of the right shape, as torch's own methods give
            count_from_amount(self.amount, default_mask.numel())
            return torch.empty_like(default_mask, device="meta")
        allowed = default_mask != 0
        n_allowed = int(allowed.sum())
        n_prune = count_from_amount(self.amount, n_allowed)
        keep = topk_mask(magnitudes(t), n_allowed - n_prune, allowed)
        # default_mask with the pruned entries zeroed (a soft default_mask keeps its values, as
        # with torch's methods); empty_like keeps its memory format (e.g. channels_last).
        return torch.empty_like(default_mask).copy_(keep).mul_(default_mask)

    @classmethod
    @outside_inference_mode
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: int | float,
        importance_scores: Tensor | None = None,
    ) -> prune.BasePruningMethod:
        """Prune ``module.<name>`` by the magnitudes of the scores and register the score buffer.

        Args:
            module: the module holding the tensor.
            name: the parameter name, e.g. ``"weight"``.
            amount: see :class:`BiPPruningMethod`.
            importance_scores: scores of the tensor's shape, ranked by magnitude (as torch's
                :func:`~torch.nn.utils.prune.l1_unstructured` does); by default the current
                (masked) weights. The buffer keeps them as given.

        Returns:
            The hook now attached to the module (a :class:`BiPPruningMethod`, or a
            :class:`torch.nn.utils.prune.PruningContainer` when the tensor was pruned before).

        Raises:
            ValueError: for a bad ``amount`` or ``importance_scores``, or a module that already
                holds an attribute ``<name>_scores`` of its own (:func:`check_scores_slot`); the
                module is unchanged.
        """
        validate_amount(amount)
        check_scores_type(importance_scores)
        current = named_tensor(module, name)
        check_scores_slot(module, name)
        check_scores_device(importance_scores, current, name)
        scores = current.detach().abs() if importance_scores is None else importance_scores
        if scores.shape != current.shape:
            raise ValueError(
                f"importance_scores has shape {tuple(scores.shape)} but {name} has shape "
                f"{tuple(current.shape)}"
            )
        check_finite(scores, scores_source(importance_scores, name))
        # raise before torch removes any old hook
        count_from_amount(amount, remaining_entries(module, name, current))
        with unchanged_on_failure(module, name):
            method = super().apply(module, name, amount=amount, importance_scores=scores)
        attach_scores(method, module, name, scores.detach().clone())
        return method


def bip_unstructured(
    module: nn.Module,
    name: str,
    amount: int | float,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """Prune ``module.<name>`` by the magnitudes of scores, in torch's functional style.

    Like :func:`torch.nn.utils.prune.l1_unstructured` (the same criterion, ``|importance_scores|``,
    by default the weight magnitudes), with an exact count and deterministic ties; the scores are
    kept in the non-persistent ``<name>_scores`` buffer. Use :func:`torchbip.global_prune` to
    learn scores.

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
        >>> _ = prune.l1_unstructured(layer, "weight", amount=1)  # a PruningContainer
        >>> sorted(name for name, _ in prune.remove(layer, "weight").named_buffers())
        []
    """
    BiPPruningMethod.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module
