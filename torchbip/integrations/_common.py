"""What the trainer callbacks share: their settings, building BiP once, and the end of training."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.utils import prune

from torchbip.pruner import BiP
from torchbip.report import SparsityReport

__all__ = ["CallbackBase", "check_settings", "remove_pruning"]

# Arguments of BiP that a callback sets itself.
_OWN = {"self", "model", "amount", "steps"}

Amount = int | float


def check_settings(owner: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check that every setting is a keyword argument of :class:`torchbip.BiP`.

    The values are checked when BiP is built (on the model); a misspelt name is an error at once.

    Raises:
        TypeError: naming the unknown argument.
    """
    known = [p for p in inspect.signature(BiP.__init__).parameters if p not in _OWN]
    for key in settings:
        if key not in known:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {key!r}; BiP's settings are {known}"
            )
    return dict(settings)


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

    def _build(self, model: nn.Module | None) -> BiP | None:
        """Build BiP on ``model`` unless it is built (or the model is not known yet); then :meth:`_active`."""
        if self.pruner is None and model is not None:
            self.pruner = BiP(model, self.amount, steps=self.steps, **self.settings)
        return self._active()

    def _active(self) -> BiP | None:
        """The pruner while it prunes: ``None`` before it is built and after training ended."""
        return None if self.pruner is None or self.report is not None else self.pruner

    def _finish(self) -> None:
        """:meth:`torchbip.BiP.finish` (keeping its report), then :func:`remove_pruning` with ``remove``."""
        pruner = self._active()
        if pruner is None:
            return
        self.report = pruner.finish()
        if self.remove:
            remove_pruning(pruner)
