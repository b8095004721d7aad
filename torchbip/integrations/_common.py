"""What the trainer callbacks share: their settings, building BiP once, and the end of training."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.hooks import RemovableHandle

from torchbip.pruner import BiP
from torchbip.report import SparsityReport, TensorSparsity, in_model_order

__all__ = [
    "CallbackBase",
    "accept_permanent_state",
    "accept_pruned_state",
    "check_settings",
    "remove_pruning",
]

# Arguments of BiP that a callback sets itself.
_OWN = {"self", "model", "amount", "steps"}

Amount = int | float


def check_settings(owner: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check that every setting is a keyword argument of :class:`torchbip.BiP`.

    The values are checked when BiP is built (on the model); a misspelt name is an error at once.
    A one-shot iterator (a generator of ``parameters`` pairs or ``exclude`` patterns) is read into
    a list here: the callback checks the settings before it builds BiP (and may build it again,
    on a model that ``model_init`` made), and each must see every item.

    Raises:
        TypeError: naming the unknown argument.
    """
    known = [p for p in inspect.signature(BiP.__init__).parameters if p not in _OWN]
    for key in settings:
        if key not in known:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {key!r}; BiP's settings are {known}"
            )
    return {key: list(value) if isinstance(value, Iterator) else value for key, value in settings.items()}


def accept_permanent_state(pruner: BiP) -> Callable[..., None]:
    """A ``load_state_dict`` pre-hook for the model ``pruner`` prunes: read a pruned checkpoint's plain keys.

    A checkpoint saved after :func:`remove_pruning` holds each pruned tensor as a plain
    ``<name>`` with zeros where it was pruned; the model, pruned again by a new callback, expects
    ``<name>_orig`` and ``<name>_mask``. The hook renames the tensor and takes its mask from its
    zeros, for every target the model still prunes and the state holds only in the plain form.
    """
    names = {t.fqn: t for t in pruner.targets}

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for fqn, target in names.items():
            plain, orig = prefix + fqn, prefix + target.orig_fqn
            mask = getattr(target.module, target.name + "_mask", None)
            if plain in state and orig not in state and isinstance(mask, Tensor):
                value = state.pop(plain)
                state[orig] = value
                state[prefix + target.mask_fqn] = (value != 0).to(mask.dtype)

    return hook


def accept_pruned_state(pruner: BiP) -> PrunedStateReader:
    """A ``load_state_dict`` pre-hook for the model after :func:`remove_pruning`: read pruned checkpoints.

    The reverse of :func:`accept_permanent_state`: a checkpoint saved while the model was in
    torch's pruned form (every checkpoint a trainer writes during training) holds
    ``<name>_orig`` and ``<name>_mask``; the model, made permanent, expects the plain
    ``<name>``. The hook replaces the pair by ``<name> = <name>_orig * <name>_mask`` (the value
    :func:`torch.nn.utils.prune.remove` leaves), for every target that is plain in the module
    the hook is called for and that the state holds only in the pruned form. The hook keeps
    the masks it read (:attr:`PrunedStateReader.loaded`).
    """
    return PrunedStateReader([(t.module_fqn, t.name) for t in pruner.targets])


class PrunedStateReader:
    """The hook :func:`accept_pruned_state` returns.

    An object, not a closure, so that the model stays picklable; it holds tensor names only and
    looks the layers up in the module it is called for, so a copy of the model judges its own.

    Args:
        names: ``(module_fqn, tensor name)`` of every tensor the callback pruned.

    Attributes:
        loaded: the boolean mask (``True``: kept) of each tensor, by its name in the module, as
            the last state loaded into it held it in the pruned form: the zeros the tensor got
            from that state (a state that holds the plain tensor drops its entry).
    """

    def __init__(self, names: list[tuple[str, str]]) -> None:
        self.names = names
        self.loaded: dict[str, Tensor] = {}

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for module_fqn, name in self.names:
            try:
                owner = module.get_submodule(module_fqn)
            except AttributeError:  # (a module the copy no longer has)
                continue
            fqn = f"{module_fqn}.{name}" if module_fqn else name
            plain, orig, mask = prefix + fqn, prefix + fqn + "_orig", prefix + fqn + "_mask"
            if name + "_mask" in owner._buffers:
                continue
            if orig in state and mask in state and plain not in state:
                keep = state.pop(mask)
                state[plain] = state.pop(orig) * keep
                self.loaded[fqn] = keep != 0
            elif plain in state:
                self.loaded.pop(fqn, None)


def remove_pruning(pruner: BiP) -> None:
    """:func:`torch.nn.utils.prune.remove` on every tensor the pruner pruned (after ``finish()``)."""
    for target in pruner.targets:
        prune.remove(target.module, target.name)


class CallbackBase:
    """The state and logic both trainer callbacks share (a mixin next to the trainer's callback class).

    A callback calls :meth:`_configure` from its ``__init__``, :meth:`_build` once the model is
    known, :meth:`_active` in each hook that steps or saves BiP, and :meth:`_finish` when
    training ends.
    """

    amount: Amount | Mapping[str, Amount]
    steps: int | None
    remove: bool
    settings: dict[str, Any]
    pruner: BiP | None
    report: SparsityReport | None
    _due: bool
    _scale: float | None

    def _configure(
        self,
        amount: Amount | Mapping[str, Amount],
        steps: int | None,
        remove: bool,
        settings: Mapping[str, Any],
    ) -> None:
        """Check and keep the callback's arguments; nothing is built yet."""
        if not isinstance(remove, bool):
            raise TypeError(f"remove must be a bool, got {remove!r}")
        self.amount = amount
        self.steps = steps
        self.remove = remove
        self.settings = check_settings(type(self).__name__, settings)
        self.pruner = None
        self.report = None
        self._due = False
        self._scale = None
        self._keeps: list[Tensor] = []  # the final masks, once training ended
        self._again = False  # a later run trains with those masks fixed
        self._plain_hook: RemovableHandle | None = None  # after remove: pruned checkpoints load
        self._plain_reader: PrunedStateReader | None = None  # (the hook: the masks it read)

    def _build(self, model: nn.Module | None) -> BiP | None:
        """Build BiP on ``model`` unless it is built (or the model is not known yet); then :meth:`_active`."""
        if self.pruner is None and model is not None:
            self.pruner = BiP(model, self.amount, steps=self.steps, **self.settings)
        return self._active()

    def _active(self) -> BiP | None:
        """The pruner while it prunes: ``None`` before it is built and after training ended."""
        return None if self.pruner is None or self.report is not None else self.pruner

    def _finish(self, as_loaded: bool = False) -> None:
        """:meth:`torchbip.BiP.finish` (keeping its report), then :func:`remove_pruning` with ``remove``.

        After a later run with the masks fixed (:meth:`_train_again`), ``report`` is computed
        again from the masks the model holds now (a checkpoint loaded in that run may have
        brought others), before :func:`remove_pruning`.

        Args:
            as_loaded: finish with ``as_loaded=True``: the masks and weights the model holds are
                final as they are (a checkpoint the trainer loaded into it at the end).
        """
        pruner = self._active()
        if pruner is None:
            if self.pruner is not None and self._again:
                self._keeps = self._held_keeps()
                self.report = self._held_report()
                if self.remove:
                    self._remove(self.pruner)
            self._again = False
            return
        self.report = pruner.finish(as_loaded=as_loaded)
        self._keeps = pruner.keeps  # (new tensors: m != 0)
        if self.remove:
            self._remove(pruner)

    def _remove(self, pruner: BiP) -> None:
        """:func:`remove_pruning`, and from then on accept pruned checkpoints (:func:`accept_pruned_state`).

        The trainer's checkpoints were written in torch's pruned form; loading one into the model
        afterwards (Lightning's ``trainer.test(ckpt_path="best")``, say) gives the plain weights
        ``orig * mask``. The hook stays until the callback prunes the model again.
        """
        remove_pruning(pruner)
        if self._plain_hook is None:
            self._plain_reader = accept_pruned_state(pruner)
            self._plain_hook = pruner.model.register_load_state_dict_pre_hook(self._plain_reader)

    def _held_keeps(self) -> list[Tensor]:
        """The boolean masks the model holds now, one per pruned tensor (a plain tensor: its non-zeros)."""
        assert self.pruner is not None
        keeps = []
        for target in self.pruner.targets:
            mask = target.module._buffers.get(target.name + "_mask")
            keeps.append((mask if mask is not None else getattr(target.module, target.name)) != 0)
        return keeps

    def _held_report(self) -> SparsityReport:
        """The :class:`~torchbip.SparsityReport` of the masks the model holds now (:meth:`_held_keeps`)."""
        assert self.pruner is not None
        return in_model_order(
            self.pruner.model,
            (
                (t.module, t.fqn, TensorSparsity(keep.numel(), int(keep.numel() - keep.count_nonzero())))
                for t, keep in zip(self.pruner.targets, self._held_keeps(), strict=True)
            ),
        )

    def _finish_as_loaded(self, pruner: BiP) -> None:
        """End BiP on a model whose masks a checkpoint saved after the end made final.

        The run that follows trains with those masks fixed (and, with ``remove``, makes them
        permanent at its end).
        """
        self.report = pruner.finish(as_loaded=True)
        self._keeps = pruner.keeps  # (new tensors: m != 0)
        self._again = True

    def _train_again(self, model: nn.Module, what: str) -> None:
        """A later training run with this finished callback: the same model, its masks fixed.

        The final masks are put back on every tensor that is no longer pruned (``remove=True``,
        or :func:`torch.nn.utils.prune.remove` by hand), so the run trains the kept entries only;
        where a checkpoint in torch's pruned form was loaded into the plain model since (the
        trainer's resume), its masks are put back instead: those its weights were zeroed with.

        Raises:
            RuntimeError: for another model (a callback prunes one model).
        """
        assert self.pruner is not None
        if model is not self.pruner.model:
            raise RuntimeError(
                f"{type(self).__name__}: this callback already pruned another model; it prunes one "
                f"model: give this {what} a new {type(self).__name__}"
            )
        loaded = self._plain_reader.loaded if self._plain_reader is not None else {}
        for target, keep in zip(self.pruner.targets, self._keeps, strict=True):
            if target.name + "_mask" not in target.module._buffers:
                weight = getattr(target.module, target.name)
                keep = loaded.get(target.fqn, keep).to(weight.device)
                prune.custom_from_mask(target.module, target.name, keep)
        if self._plain_hook is not None:  # pruned again: its checkpoints load as they are
            self._plain_hook.remove()
            self._plain_hook = None
            self._plain_reader = None
        self._again = True
        warnings.warn(
            f"{type(self).__name__}: this callback already pruned the model; this {what} trains it "
            "with the masks fixed (use a new callback to prune again)",
            stacklevel=3,
        )
