"""Private helpers: which tensors to prune, and the functional view of a pruned model."""

from __future__ import annotations

import inspect
import re
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from torchbip._frames import user_stacklevel
from torchbip.data import model_args
from torchbip.method import check_scores_slot, has_grad_capture
from torchbip.pruned import named_pruning_hooks

__all__ = [
    "LEAVE_OUT",
    "LEAVE_OUT_OR_EXCLUDE",
    "Target",
    "candidate_targets",
    "check_binary_masks",
    "check_targets",
    "computed_weight",
    "conv1d_note",
    "default_targets",
    "make_forward",
    "read_by_parent",
    "resolve_targets",
    "transposed_linear",
    "transposed_linear_names",
    "wholly_pruned",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# How a caller leaves a tied tensor out (the end of :func:`check_targets`'s advice): with
# ``parameters=`` (global_prune, the baselines), or also with ``exclude=`` (torchbip.BiP).
LEAVE_OUT = "leave them out with parameters=..."
LEAVE_OUT_OR_EXCLUDE = "leave them out (exclude=... or parameters=...)"


@dataclass(frozen=True)
class Target:
    """One tensor to prune: ``module.<name>``, reachable in the model as ``fqn``."""

    module: nn.Module
    name: str
    module_fqn: str

    @property
    def fqn(self) -> str:
        """Fully-qualified name of the tensor, e.g. ``"layer1.0.conv1.weight"``."""
        return f"{self.module_fqn}.{self.name}" if self.module_fqn else self.name

    @property
    def orig_fqn(self) -> str:
        """Name of the ``*_orig`` parameter in the model's state."""
        return self.fqn + "_orig"

    @property
    def mask_fqn(self) -> str:
        """Name of the ``*_mask`` buffer in the model's state."""
        return self.fqn + "_mask"

    @property
    def is_pruned(self) -> bool:
        """Whether the tensor is already reparametrised by torch's pruning."""
        return hasattr(self.module, self.name + "_orig") and hasattr(self.module, self.name + "_mask")

    def weight(self) -> Tensor:
        """The tensor (``*_orig`` if pruned), a Parameter."""
        return getattr(self.module, self.name + "_orig" if self.is_pruned else self.name)

    def allowed(self) -> Tensor | None:
        """Entries that earlier pruning left (``None``: the tensor is not pruned yet).

        The entries whose mask is not 0; :func:`check_binary_masks` refuses a mask with other
        values than 0 and 1 wherever BiP learns a mask over these entries.
        """
        if not self.is_pruned:
            return None
        return getattr(self.module, self.name + "_mask").detach() != 0


_BIP_BINARY = "BiP learns a binary mask and would overwrite those earlier non-binary values"
"""Why :class:`torchbip.BiP` and :func:`torchbip.global_prune` refuse a non-binary earlier mask."""


def check_binary_masks(targets: Sequence[Target], why: str = _BIP_BINARY) -> None:
    """Refuse a target whose earlier pruning left a mask with values other than 0 and 1.

    Torch's methods can leave such a mask: ``prune.custom_from_mask(module, name, mask)`` with
    ``0.5`` entries keeps those entries scaled by 0.5. A further pruning by one of torch's
    per-tensor methods (or by :func:`torchbip.bip_unstructured`) prunes only the entries whose
    mask is exactly 1 and keeps the other values. :class:`torchbip.BiP` and
    :func:`torchbip.global_prune` learn a binary mask over every entry an earlier pruning left,
    so they would write 0 or 1 over those values; they, and the baselines, refuse such a tensor
    before they change anything.

    Args:
        targets: the tensors to prune (checked by :func:`check_targets`: on one device).
        why: the end of the message, what the caller would do to the non-binary values.

    Raises:
        ValueError: naming the first such tensor and one of its mask values.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> soft = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
        >>> layer = prune.custom_from_mask(nn.Linear(2, 2), "weight", soft)
        >>> check_binary_masks([Target(layer, "weight", "fc")])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: parameters names 'fc.weight', whose mask from an earlier pruning holds values ...
    """
    pruned = [t for t in targets if t.is_pruned]
    masks = [getattr(t.module, t.name + "_mask").detach() for t in pruned]
    checked = [(t, m) for t, m in zip(pruned, masks, strict=True) if not m.is_meta and m.numel()]
    if not checked:
        return
    # one host synchronisation for all of them
    soft = torch.stack([((m != 0) & (m != 1)).any() for _, m in checked]).tolist()
    for (target, mask), is_soft in zip(checked, soft, strict=True):
        if is_soft:
            value = float(mask[(mask != 0) & (mask != 1)].reshape(-1)[0])
            raise ValueError(
                f"parameters names {target.fqn!r}, whose mask from an earlier pruning holds values other "
                f"than 0 and 1 (e.g. {value:g} in {target.mask_fqn!r}, as prune.custom_from_mask with a "
                f"non-binary mask leaves): {why}; pass a binary mask (0s and 1s), or make that pruning "
                f"permanent first (torch.nn.utils.prune.remove(module, {target.name!r}))"
            )


def wholly_pruned(targets: Iterable[Target]) -> list[str]:
    """The FQNs of ``targets`` whose every entry an earlier pruning zeroed (all-zero masks)."""
    return [
        t.fqn
        for t in targets
        if (allowed := t.allowed()) is not None and allowed.numel() and not allowed.any()
    ]


TRAINABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes of the tensors BiP prunes (float8 types have no arithmetic to train them with)."""


def transposed_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is laid out ``(in_features, out_features)``.

    The ``Conv1D`` of Hugging Face ``transformers`` (GPT-2 and its kin) computes
    ``x @ weight + bias``: its output features are the weight's columns, where ``nn.Linear``'s
    are its rows. Recognised by its class name and its ``nf`` (output features) attribute, so that
    ``transformers`` need not be installed.
    """
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


def transposed_linear_names(model: nn.Module) -> list[str]:
    """The names of the :func:`transposed_linear` layers of ``model`` that hold a Parameter weight."""
    return [
        name
        for name, module in model.named_modules()
        if transposed_linear(module) and isinstance(module._parameters.get("weight"), nn.Parameter)
    ]


def conv1d_note(names: Sequence[str]) -> str:
    """What to tell a user whose model has :func:`transposed_linear` layers the defaults leave out."""
    shown = ", ".join(map(repr, names[:3])) + (", ..." if len(names) > 3 else "")
    return (
        f"its {len(names)} transformers Conv1D layer(s) ({shown}), laid out (in_features, "
        "out_features), are not among BiP's default targets (the weights of nn.Linear and "
        "nn.Conv*d); to prune them pass parameters=[(m, 'weight') for m in model.modules() if "
        "type(m).__name__ == 'Conv1D'] (unstructured layout only)"
    )


def default_targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``model``.

    Leaves out layers whose forward their parent never calls (``nn.MultiheadAttention``'s
    ``out_proj``): a pruning mask there would never be applied. Leaves out computed weights
    (:func:`computed_weight`: ``weight_norm``, ``spectral_norm`` and other parametrizations),
    which are not Parameters that a mask could be put on.
    """
    uncalled = _uncalled_children(model)
    return [
        (m, "weight")
        for m in model.modules()
        if isinstance(m, PRUNABLE_TYPES) and id(m) not in uncalled and computed_weight(m, "weight") is None
    ]


def computed_weight(module: nn.Module, name: str) -> str | None:
    """Why ``module.<name>`` is computed from other tensors at each use; ``None`` if it is not.

    Such a tensor is no Parameter of the module, so torch's pruning cannot put a mask on it:
    a parametrization of :mod:`torch.nn.utils.parametrize` (``torch.nn.utils.parametrizations
    .weight_norm``, ``spectral_norm``, ``orthogonal``, your own) computes it each time it is read;
    the older ``torch.nn.utils.weight_norm`` and ``spectral_norm`` recompute it before every
    forward from ``<name>_g``/``<name>_v`` or ``<name>_orig``.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> computed_weight(weight_norm(nn.Linear(2, 2)), "weight").split(",")[0]
        'a parametrized tensor (_WeightNorm'
        >>> computed_weight(nn.Linear(2, 2), "weight") is None
        True
    """
    if parametrize.is_parametrized(module, name):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])  # type: ignore[index]
        return (
            f"a parametrized tensor ({kinds}, through torch.nn.utils.parametrize), computed from "
            f"module.parametrizations.{name} each time it is read; remove the parametrization "
            f"first (torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})) or leave "
            "the tensor out"
        )
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return (
                f"computed from {name}_g and {name}_v before every forward by torch.nn.utils.weight_norm; "
                "remove it first (torch.nn.utils.remove_weight_norm) or leave the tensor out"
            )
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return (
                f"computed from {name}_orig before every forward by torch.nn.utils.spectral_norm; "
                "remove it first (torch.nn.utils.remove_spectral_norm) or leave the tensor out"
            )
    return None


def _uncalled_children(model: nn.Module) -> dict[int, str]:
    """Modules whose parent reads their tensors without calling their forward, with the reason.

    ``nn.MultiheadAttention`` (also inside ``nn.Transformer*`` layers) passes
    ``out_proj.weight`` to ``F.multi_head_attention_forward`` itself, so the forward pre-hook
    that applies a pruning mask on ``out_proj`` never runs. Its own ``in_proj_weight`` (or
    ``q/k/v_proj_weight``) is read in its forward, so those can be pruned. Other parents are
    found by their source (:func:`read_by_parent`), as torchvision's Swin attention, which
    passes ``qkv.weight`` and ``proj.weight`` to its attention function.
    """
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            out[id(module.out_proj)] = (
                f"nn.MultiheadAttention {name!r} reads out_proj.weight without calling out_proj's "
                "forward, so a pruning mask on it would never be applied (and it would get no "
                f"gradient); prune (attention, 'in_proj_weight') instead, or leave {name}.out_proj out"
            )
    for key, reason in read_by_parent(model).items():
        out.setdefault(key, reason)
    return out


def read_by_parent(model: nn.Module) -> dict[int, str]:
    """Layers whose parent's code reads their ``weight`` and never calls them, with the reason.

    A parent that passes ``self.<child>.weight`` to a function (``F.linear``, an attention
    kernel) and never calls ``self.<child>(...)`` in any method of its class bypasses the
    child's forward, so the forward pre-hook that applies a pruning mask there never runs.
    Found from the source of the parent's class (and its bases outside ``torch.nn``); reading
    only the weight's ``dtype``, ``shape`` or ``device`` does not count. A parent whose source
    is not available (a class defined in an interactive session) is not found here: the first
    step of :class:`torchbip.BiP` and :func:`torchbip.global_prune` still finds a mask that is
    never applied.

    Example:
        >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
        >>> attention = ShiftedWindowAttention(8, [2, 2], [0, 0], num_heads=2)
        >>> sorted(read_by_parent(attention)) == sorted([id(attention.qkv), id(attention.proj)])
        True
    """
    out: dict[int, str] = {}
    for name, parent in model.named_modules():
        children = [c for c, m in parent._modules.items() if m is not None and c.isidentifier()]
        if not children:
            continue
        for child in _reads_without_calling(type(parent), children):
            module = parent._modules[child]
            assert module is not None
            fqn = f"{name}.{child}" if name else child
            out[id(module)] = (
                f"{type(parent).__name__} {name!r} reads {child}.weight without calling {child}'s "
                "forward (in its source), so a pruning mask on it would never be applied (and it "
                f"would get no gradient); leave {fqn} out"
            )
    return out


_METADATA = r"(?:dtype|shape|device|size|ndim|dim|requires_grad|is_cuda|numel|layout|is_meta)\b"


_SOURCES: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def _class_source(cls: type) -> str:
    """The source of ``cls`` and its bases outside ``torch.nn`` (what is available), cached."""
    source = _SOURCES.get(cls)
    if source is None:
        sources = []
        for klass in cls.__mro__:
            if klass is object or klass.__module__.split(".")[:2] == ["torch", "nn"]:
                continue
            try:
                sources.append(inspect.getsource(klass))
            except (OSError, TypeError):  # built in, defined in a REPL, or generated
                continue
        source = _SOURCES[cls] = "\n".join(sources)
    return source


def _reads_without_calling(cls: type, children: Sequence[str]) -> list[str]:
    """The ``children`` whose weight ``cls``'s source reads and which it never calls."""
    source = _class_source(cls)
    found = []
    for child in children:
        me = rf"\bself\.{re.escape(child)}"
        reads = re.search(rf"{me}\.weight\b(?!\s*\.\s*{_METADATA})(?!\s*=[^=])", source)
        calls = re.search(rf"{me}(?:\.forward|\.__call__)?\s*\(", source)
        if reads and not calls:
            found.append(child)
    return found


def resolve_targets(
    model: nn.Module,
    parameters: Iterable[tuple[nn.Module, str]] | None,
    defaults: list[tuple[nn.Module, str]] | None = None,
    *,
    leave_out: str = LEAVE_OUT,
) -> list[Target]:
    """Check ``parameters`` (or pick the defaults: ``defaults``, else :func:`default_targets`).

    :func:`candidate_targets` followed by :func:`check_targets`.

    Raises:
        ValueError: for a module outside ``model``, a missing tensor, a duplicate, a tied
            tensor (a Parameter that another module of the model also holds), a frozen tensor,
            an empty selection, tensors on several devices or on the ``meta`` device.
        TypeError: for ``parameters`` that is not an iterable of ``(module, name)`` pairs (a
            module, a single pair, a string or a mapping included).

    ``leave_out``: see :func:`check_targets`.
    """
    return check_targets(model, candidate_targets(model, parameters, defaults), leave_out=leave_out)


def candidate_targets(
    model: nn.Module,
    parameters: Iterable[tuple[nn.Module, str]] | None,
    defaults: list[tuple[nn.Module, str]] | None = None,
) -> list[Target]:
    """The ``(module, name)`` pairs of ``parameters`` (or the defaults) as targets, unchecked.

    Only what naming them needs is checked here (pairs of modules of ``model``, no duplicates,
    at least one), so that a caller can leave some out (``exclude=...``) before
    :func:`check_targets` checks the tensors themselves: a tied ``lm_head`` that is left out is
    no error.

    Raises:
        ValueError: for a module outside ``model``, a duplicate or an empty selection.
        TypeError: for ``parameters`` that is not an iterable of ``(module, name)`` pairs.
    """
    names = {id(m): n for n, m in model.named_modules()}  # a shared module: its first name
    if parameters is None:
        pairs = default_targets(model) if defaults is None else defaults
    else:
        pairs = _pairs(parameters)
    targets: list[Target] = []
    seen: set[tuple[int, str]] = set()
    for entry in pairs:
        if not (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and isinstance(entry[0], nn.Module)
            and isinstance(entry[1], str)
        ):
            if isinstance(entry, Tensor):  # model.parameters(): name the shape, not the values
                raise TypeError(
                    f"parameters must hold (module, name) pairs, got a tensor of shape {tuple(entry.shape)}; "
                    "pass e.g. parameters=[(model.fc, 'weight')] (not model.parameters())"
                )
            raise TypeError(f"parameters must hold (module, name) pairs, got {entry!r}")
        module, name = entry
        if id(module) not in names:
            raise ValueError(f"parameters names a {type(module).__name__} that is not part of the model")
        target = Target(module, name, names[id(module)])
        if (id(module), name) in seen:
            raise ValueError(f"parameters names {target.fqn!r} more than once")
        seen.add((id(module), name))
        targets.append(target)
    transposed = transposed_linear_names(model) if parameters is None else []
    if parameters is None:
        _warn_read_by_parent(model)
    if targets and transposed:
        warnings.warn(
            f"the model {type(model).__name__} is pruned without {conv1d_note(transposed)}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if not targets:
        what = "no nn.Linear or nn.Conv*d weights" if parameters is None else "an empty list"
        if parameters is None and defaults is not None and default_targets(model):
            what = (
                "no nn.Linear or nn.Conv*d weight among the layout's default targets (a structured "
                "layout leaves out the layers it cannot prune: the output layers under 'filter', "
                "the input layers under 'channel', layers that N:M blocks do not tile)"
            )
        if transposed:
            what += f"; {conv1d_note(transposed)}"
        hint = "pass parameters=[(module, 'weight'), ...]"
        computed = [
            f"{n}.weight" if n else "weight"
            for n, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES) and computed_weight(m, "weight") is not None
        ]
        if parameters is None and computed:
            what = (
                f"only computed nn.Linear/nn.Conv*d weights ({', '.join(map(repr, computed))}: weight_norm, "
                "spectral_norm or another parametrization), which cannot be pruned and are left out"
            )
            hint = f"remove their parametrizations first, or {hint} naming other tensors"
        raise ValueError(f"nothing to prune: the model {type(model).__name__} has {what}; {hint}")
    return targets


def _warn_read_by_parent(model: nn.Module) -> None:
    """Warn that the defaults leave out layers whose parent reads their weight (see above)."""
    read = read_by_parent(model)
    names = [n for n, m in model.named_modules() if id(m) in read and isinstance(m, PRUNABLE_TYPES)]
    if not names:
        return
    shown = ", ".join(map(repr, names[:4])) + (", ..." if len(names) > 4 else "")
    parents = sorted({type(p).__name__ for p in model.modules() if any(id(c) in read for c in p.children())})
    warnings.warn(
        f"the model {type(model).__name__} is pruned without {len(names)} layer(s) ({shown}) whose "
        f"parent ({', '.join(parents)}) reads their weight without calling their forward: a pruning "
        "mask on them would never be applied, so BiP's default targets leave them out",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def check_targets(model: nn.Module, targets: list[Target], *, leave_out: str = LEAVE_OUT) -> list[Target]:
    """Check that every target is a trainable floating-point Parameter BiP can mask; return them.

    ``leave_out`` completes the advice for a tied tensor, "untie the weights or ...", with the
    caller's own options: by default :data:`LEAVE_OUT` (``parameters=``, which
    :func:`torchbip.global_prune` and the baselines take), :class:`torchbip.BiP` passes
    :data:`LEAVE_OUT_OR_EXCLUDE`.

    Raises:
        ValueError: for a module whose forward its parent never calls, a missing tensor, a tied
            tensor (a Parameter that another module of the model also holds), a frozen tensor, a
            non-float tensor, tensors on several devices or on the ``meta`` device.
    """
    uncalled = _uncalled_children(model)
    holders: dict[int, list[tuple[int, str, str]]] = {}  # id(Parameter) -> (id(module), name, fqn)
    for module_fqn, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                fqn = f"{module_fqn}.{pname}" if module_fqn else pname
                holders.setdefault(id(p), []).append((id(module), pname, fqn))
    for target in targets:
        module, name = target.module, target.name
        if id(module) in uncalled:
            raise ValueError(f"parameters names {target.fqn!r}: {uncalled[id(module)]}")
        base = name.removesuffix("_orig")
        if base != name and base + "_mask" in module._buffers:
            pruned = Target(module, base, target.module_fqn).fqn
            raise ValueError(
                f"parameters names {target.fqn!r}, torch's unmasked copy of the pruned tensor "
                f"{pruned!r}: name the tensor itself, (module, {base!r})"
            )
        _check_scores_slot(target)
        tensor = getattr(module, name + "_orig", None) if target.is_pruned else None
        if tensor is None:
            tensor = module._parameters.get(name)
        computed = None if tensor is not None else computed_weight(module, name)
        if computed is not None:
            raise ValueError(f"parameters names {target.fqn!r}, {computed}")
        if not isinstance(tensor, nn.Parameter):
            raise ValueError(
                f"parameters names {target.fqn!r}, but {type(module).__name__} has no parameter {name!r}"
            )
        if isinstance(tensor, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"parameters names {target.fqn!r}, an uninitialised parameter of the lazy module "
                f"{type(module).__name__}: run one forward pass (or load the weights) first"
            )
        own = (id(module), name + "_orig" if target.is_pruned else name)
        tied = [fqn for mid, pname, fqn in holders.get(id(tensor), []) if (mid, pname) != own]
        if tied:
            raise ValueError(
                f"parameters names {target.fqn!r}, which is tied to (the same Parameter as) "
                f"{tied[0]!r}; torch's pruning masks one module at a time, so the other module would "
                f"keep the unmasked tensor: untie the weights or {leave_out}"
            )
        if not tensor.requires_grad:
            raise ValueError(
                f"parameters names {target.fqn!r}, which is frozen (requires_grad=False); "
                "BiP retrains the weights it prunes"
            )
        if tensor.dtype not in TRAINABLE_DTYPES:
            raise ValueError(
                f"{target.fqn!r} has dtype {tensor.dtype}; BiP needs floating point "
                "(float16, bfloat16, float32 or float64: it trains the weights and their scores)"
            )
        if target.is_pruned:
            hooks = [h for hook_name, h in named_pruning_hooks(module) if hook_name == name]
            if len(hooks) != 1:
                raise ValueError(f"{target.fqn!r} has a *_orig/*_mask pair but no pruning hook")
            if has_grad_capture(hooks[0]):
                raise ValueError(
                    f"parameters names {target.fqn!r}, which a torchbip.BiP built earlier on this model "
                    "prunes and has not finished: call its finish() first (or keep stepping it)"
                )
    devices = {t.weight().device for t in targets}
    if len(devices) > 1:
        raise ValueError(
            f"the tensors to prune live on several devices {sorted(map(str, devices))}; "
            "move the model to one device first, e.g. model.to('cuda')"
        )
    if targets and next(iter(devices)).type == "meta":
        raise ValueError(
            f"parameters names {targets[0].fqn!r}, which is on the meta device (shapes without "
            "values); materialise the model first, e.g. model.to_empty(device='cpu') and load its weights"
        )
    return targets


def _check_scores_slot(target: Target) -> None:
    """Refuse a module that holds something else under the name of the target's score buffer.

    See :func:`torchbip.method.check_scores_slot`; the message names the target as the
    ``parameters`` argument does.
    """
    holder = repr(target.module_fqn) if target.module_fqn else "the model"
    where = f"parameters names {target.fqn!r}, but the module {holder}"
    check_scores_slot(target.module, target.name, where=where)


def _pairs(parameters: Any) -> list[Any]:
    """``list(parameters)``, with a clear ``TypeError`` for the usual mistakes."""
    hint = "pass a list of (module, name) pairs, e.g. parameters=[(model.fc, 'weight')]"
    kind = type(parameters).__name__
    if isinstance(parameters, nn.Module):
        raise TypeError(f"parameters is a {kind} module, not (module, name) pairs; {hint}")
    if isinstance(parameters, Mapping):
        raise TypeError(
            f"parameters is a {kind}, not (module, name) pairs; "
            "for a {module: name} mapping pass parameters=list(mapping.items())"
        )
    if isinstance(parameters, (str, bytes)):
        raise TypeError(f"parameters is the {kind} {parameters!r}, not (module, name) pairs; {hint}")
    if (
        isinstance(parameters, tuple)
        and len(parameters) == 2
        and isinstance(parameters[0], nn.Module)
        and isinstance(parameters[1], str)
    ):
        raise TypeError(
            f"parameters is one (module, name) pair ({type(parameters[0]).__name__}, "
            f"{parameters[1]!r}), not a list of pairs; {hint}"
        )
    try:
        return list(parameters)
    except TypeError:
        raise TypeError(
            f"parameters is {parameters!r} of type {kind}, not (module, name) pairs; {hint}"
        ) from None


def make_forward(model: nn.Module) -> Any:
    """``forward(tensors, inputs)`` through :func:`torch.func.functional_call`.

    ``inputs`` is a batch's inputs: a plain tuple is passed as positional arguments, anything
    else (a namedtuple included) as one argument (:func:`torchbip.data.model_args`).

    A module that the model holds at two paths (``nn.Sequential(shared, act, shared)``) gets its
    own parameters and buffers back after every call: under a :mod:`torch.func` transform,
    ``functional_call`` otherwise leaves it holding the transform's (dead) tensors, and the
    model's optimiser would no longer update what its forward reads.
    """
    shared = _shared_slots(model)

    def forward(tensors: dict[str, Tensor], inputs: Any) -> Any:
        try:
            return torch.func.functional_call(model, tensors, model_args(inputs))
        finally:
            for slots, name, tensor in shared:
                if slots.get(name) is not tensor:
                    slots[name] = tensor

    return forward


def _shared_slots(model: nn.Module) -> list[tuple[dict[str, Any], str, Tensor]]:
    """``(dict, name, tensor)`` of every parameter and buffer of a module held at several paths."""
    seen: dict[int, int] = {}
    modules: dict[int, nn.Module] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
        modules[id(module)] = module
    out: list[tuple[dict[str, Any], str, Tensor]] = []
    for key, count in seen.items():
        if count > 1:
            module = modules[key]
            for slots in (module._parameters, module._buffers):
                out.extend((slots, name, t) for name, t in slots.items() if t is not None)
    return out
