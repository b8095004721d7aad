"""BiP as a PyTorch Lightning callback: :class:`BiPCallback`.

Add one callback to the trainer; the LightningModule and its ``configure_optimizers`` stay as
they are:

.. code-block:: python

    from torchbip.integrations.lightning import BiPCallback

    trainer = lightning.pytorch.Trainer(max_epochs=5, callbacks=[BiPCallback(amount=0.9)])
    trainer.fit(module, train_loader)
    # module's layers are in torch's pruned form: weight_orig, weight_mask and the hook

The callback builds one :class:`torchbip.BiP` on the LightningModule right after its
``configure_model`` (so layers made there or in ``setup`` are pruned; before Lightning wraps the
module for DDP and calls ``configure_optimizers``, so the optimizer holds the same
``weight_orig`` Parameters), steps it once after every optimizer step (``accumulate_grad_batches``,
``gradient_clip_val``, the device and the precision, ``"16-mixed"``/``"bf16-mixed"`` or
``"64-true"``/``"bf16-true"``, are Lightning's own; a step that the loss scaler skips is
skipped; backward passes in validation are ignored), saves its state in Lightning's checkpoints (resume with
``trainer.fit(..., ckpt_path=...)``) and calls :meth:`torchbip.BiP.finish` when training ends,
also when a ``fit()`` trains nothing (in ``on_fit_end``: a resume from the last step's
checkpoint, ``max_steps=0``, ...).
The upper schedule spans ``trainer.estimated_stepping_batches`` unless ``steps`` is given.

Needs ``lightning`` (``pip install "torchbip[lightning]"``); the standalone ``pytorch_lightning``
package works too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.hooks import RemovableHandle

from torchbip._snapshot import ModelSnapshot
from torchbip.integrations._common import Amount, CallbackBase, accept_permanent_state
from torchbip.pruner import BiP, grad_scaler_state

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import LightningModule, Trainer  # type: ignore[assignment,no-redef,unused-ignore]
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment,no-redef,unused-ignore]
    except ImportError as err:
        raise ImportError(
            "torchbip.integrations.lightning needs PyTorch Lightning: pip install 'torchbip[lightning]'"
        ) from err

__all__ = ["BiPCallback"]


class _PruneAfterConfigure:
    """The module's ``configure_model`` for one ``fit()``: the module's own, then BiP is built.

    Set on the module by :meth:`BiPCallback.setup`, removed when called (or when the fit fails
    before). A copy or pickle of the module holds the module's own ``configure_model`` instead.
    """

    def __init__(self, callback: BiPCallback, trainer: Trainer, module: LightningModule) -> None:
        self.callback, self.trainer, self.module = callback, trainer, module
        self.previous = module.__dict__.get("configure_model")
        self.configure = module.configure_model

    def unwrap(self) -> None:
        """Give the module its ``configure_model`` back."""
        if self.module.__dict__.get("configure_model") is not self:
            return
        if self.previous is None:
            del self.module.__dict__["configure_model"]
        else:
            self.module.__dict__["configure_model"] = self.previous

    def __call__(self) -> None:
        self.unwrap()
        self.configure()
        if getattr(self.module, "_trainer", None) is self.trainer:  # (not a stale wrapper)
            self.callback._prune(self.trainer, self.module)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return getattr, (self.module, "configure_model")  # (copied: the module's own method)


# Lightning calls configure_model only where it differs from LightningModule's (by code object)
_PruneAfterConfigure.__code__ = _PruneAfterConfigure.__call__.__code__  # type: ignore[attr-defined]


class BiPCallback(CallbackBase, Callback):
    r"""Run BiP inside Lightning's own training loop.

    Args:
        amount: the sparsity budget, as for :class:`torchbip.BiP`: a fraction, a count or a dict
            from name patterns (relative to the LightningModule, e.g. ``"net.0.weight"``) to
            amounts.
        steps: the number of optimizer steps the upper schedule spans; ``None`` (default):
            ``trainer.estimated_stepping_batches`` (no schedule when that is infinite).
        remove: call :func:`torch.nn.utils.prune.remove` on every pruned tensor when training
            ends, so that the model holds plain, sparse ``weight`` Parameters. The checkpoints
            written during training (torch's pruned form) still load into the module, as
            ``weight_orig * weight_mask`` (``trainer.test(ckpt_path="best")``). By default the
            model stays in torch's pruned form (the mask stays fixed in later training).
        **settings: any other keyword argument of :class:`torchbip.BiP` (``parameters``,
            ``exclude``, ``layout``, ``budget``, ``min_keep``, ``max_keep``, ``upper_lr``,
            ``upper_momentum``, ``upper_schedule``, ``implicit_coef``, ``score_init``,
            ``hold_pruned``, ``process_group``); checked when the model is pruned in ``setup``.

    Attributes:
        pruner: the :class:`torchbip.BiP` object, once ``setup`` built it (``None`` before).
        report: the final :class:`torchbip.SparsityReport`, once training ended; after each
            later ``fit()`` (the masks fixed), that of the masks the module ends it with.

    Raises:
        TypeError: for a keyword argument that :class:`torchbip.BiP` does not take.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import lightning.pytorch as L
        >>> from torch import nn
        >>> class Classifier(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return F.cross_entropy(self.net(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        >>> torch.manual_seed(0) and None
        >>> x = torch.randn(64, 8)
        >>> loader = torch.utils.data.DataLoader(list(zip(x, (x[:, 0] > 0).long())), batch_size=16)
        >>> callback = BiPCallback(amount=0.8)
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[callback], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(Classifier(), loader)
        >>> callback.report.global_sparsity, callback.pruner.step_count
        (0.8, 8)
    """

    def __init__(
        self, amount: Amount | Mapping[str, Amount] = 0.95, *, steps: int | None = None, remove: bool = False,
        **settings: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self._configure(amount, steps, remove, settings)
        self._restored: Mapping[str, Any] | None = None
        self._skip = False
        self._backoff = False  # the skip is read off the scale after the step (a fused optimizer)
        self._load_hook: RemovableHandle | None = None
        self._snapshot: ModelSnapshot | None = None  # the module before BiP, until training starts
        self._unwrap: Callable[[], None] | None = None  # drops a pending build (see setup)

    # -- building and the end -----------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Arrange for BiP to be built on the module (``stage="fit"`` only).

        Lightning calls the callbacks' ``setup`` before the module's own ``setup`` and
        ``configure_model`` (where layers may be made late), and wraps the module for DDP and
        calls ``configure_optimizers`` after them. BiP is built in between: right after the
        module's ``configure_model`` (for every module: Lightning then calls it), so that it
        prunes every layer and the optimizer holds the same ``weight_orig`` Parameters. A later
        ``fit()`` with this callback, once it finished, trains the same module with the masks
        fixed: the final masks, or those of the checkpoint it resumes from (``ckpt_path=``; an
        unfinished run's BiP state there is not resumed, with a warning).

        Raises:
            RuntimeError: under a strategy that runs ``fit()`` in new processes (``"ddp_spawn"``,
                ``"ddp_fork"``, ``"ddp_notebook"``): Lightning hands back only the weights,
                loaded non-strictly, so the pruned form would be lost; use ``strategy="ddp"``.
        """
        if stage != "fit":
            return
        self._restored = None  # (a state Lightning restored in trainer.test/validate/predict(ckpt_path=...))
        if self.pruner is not None:
            if self.report is not None:
                self._train_again(pl_module, "fit()")
                if self._load_hook is None:  # a checkpoint saved after remove=True holds the plain weights
                    self._load_hook = pl_module.register_load_state_dict_pre_hook(
                        accept_permanent_state(self.pruner)
                    )
            return
        launcher = getattr(trainer.strategy, "launcher", None)
        if type(launcher).__name__ == "_MultiProcessingLauncher":
            raise RuntimeError(
                f"BiPCallback: strategy {type(trainer.strategy).__name__} with start method "
                f"{getattr(launcher, '_start_method', '?')!r} runs fit() in new processes and hands back "
                "only the weights, loaded non-strictly: the pruned model would be lost. Use "
                'strategy="ddp" (Lightning starts the processes itself, or torchrun does)'
            )
        if self._unwrap is not None:
            self._unwrap()  # (a wrapper of an earlier fit() that failed before configure_model)
        wrapper = _PruneAfterConfigure(self, trainer, pl_module)
        pl_module.__dict__["configure_model"] = wrapper  # (nn.Module keeps a plain attribute there)
        self._unwrap = wrapper.unwrap

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build BiP on the module, converted to the trainer's precision and moved to its device.

        The strategy converts and moves it next (a no-op then), so BiP's masks are the buffers
        the module keeps. What BiP changes is remembered until training starts: a refusal there
        (a checkpoint that does not fit) puts the module back as it was.
        """
        self._unwrap = None
        BiP.check(pl_module, self.amount, steps=self.steps, **self.settings)  # refused: module untouched
        names = {name.rsplit(".", 1)[-1] for name, _ in pl_module.named_parameters()}
        snapshot = ModelSnapshot(pl_module, names)  # (one copy of the values: a checkpoint loads into them)
        strategy = trainer.strategy
        strategy.precision_plugin.convert_module(pl_module)  # in place ("64-true", "bf16-true", ...)
        pl_module.to(strategy.root_device)
        pruner = self._build(pl_module)
        self._snapshot = snapshot
        if pruner is not None:  # a checkpoint saved after remove=True holds the plain weights
            self._load_hook = pl_module.register_load_state_dict_pre_hook(accept_permanent_state(pruner))

    def _undo(self) -> None:
        """Put the module back as it was before :meth:`_prune` (a refusal before training)."""
        snapshot, self._snapshot = self._snapshot, None
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        if snapshot is not None:
            snapshot.restore()
        self.pruner = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check that BiP was built (Lightning called the module's ``configure_model``)."""
        if self.pruner is None and self._unwrap is not None:  # the build still waits
            self.teardown(trainer, pl_module, "fit")
            raise RuntimeError(
                "BiPCallback: this Lightning version did not call the module's configure_model() "
                "before training, where the callback builds BiP; it needs Lightning >= 2.1"
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Drop a build still pending (a ``fit()`` that failed before ``configure_model``)."""
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A ``fit()`` that fails before training starts leaves the module as it was.

        (A build still pending is dropped; a module pruned already, say before a failing sanity
        check, is put back. A failure during training keeps BiP, for a resume.)
        """
        self.teardown(trainer, pl_module, "fit")
        if self._snapshot is not None:
            self._undo()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the schedule's length and restore a checkpoint's BiP state.

        A checkpoint that does not fit (another schedule length, no BiP state) is refused, and
        the module is put back as it was before the callback pruned it.
        """
        pruner = self._active()
        if pruner is None:
            self._not_resumed(trainer)
            return
        try:
            self._start(trainer, pruner)
        except BaseException:
            self._undo()
            raise
        self._snapshot = None

    def _start(self, trainer: Trainer, pruner: BiP) -> None:
        if self.steps is None and pruner.step_count == 0:
            total = trainer.estimated_stepping_batches
            if math.isfinite(total) and total >= 1:
                pruner.set_steps(int(total))
        restored, self._restored = self._restored, None
        if restored is not None and restored.get("finished"):  # saved after BiP ended: masks are final
            self._finish_as_loaded(pruner)
        elif restored is not None and "bip" in restored:
            pruner.load_state_dict(restored["bip"])
        elif trainer.ckpt_path is not None and pruner.step_count == 0:
            raise RuntimeError(
                f"BiPCallback: fit() resumed from {trainer.ckpt_path}, which holds no BiPCallback state; "
                "BiP's scores, momentum and schedule cannot be restored. Resume from a checkpoint saved "
                "with this callback"
            )

    def _not_resumed(self, trainer: Trainer) -> None:
        """In a later ``fit()`` (masks fixed): warn if its checkpoint holds an unfinished run's BiP state.

        The module trains with the masks it loaded from that checkpoint; the callback finished, so
        BiP's scores, momentum and schedule saved there are not resumed.
        """
        restored, self._restored = self._restored, None
        if not self._again or restored is None or "bip" not in restored:
            return
        saved = restored["bip"]
        step = saved.get("step") if isinstance(saved, Mapping) else None
        warnings.warn(
            f"BiPCallback: fit() resumed from {trainer.ckpt_path}, which holds the BiP state of an "
            f"unfinished run (step {step}); this callback finished already, so that state is not resumed: "
            "the module trains with the checkpoint's masks fixed, and callback.report describes the "
            "masks it ends with. To resume pruning from that checkpoint, fit a fresh module with a new "
            "BiPCallback (ckpt_path=...)",
            stacklevel=3,
        )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop capturing gradients: a backward pass in validation is not training."""
        if self.pruner is not None:
            self.pruner.capturing = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Capture gradients again (the training batches' of an unfinished accumulation are kept)."""
        if self.pruner is not None:
            self.pruner.capturing = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave torch's pruned form (:meth:`torchbip.BiP.finish`), or plain weights with ``remove``."""
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        self._finish()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """End BiP also after a ``fit()`` that trained nothing.

        Lightning skips the training loop, with ``on_train_start`` and ``on_train_end``, when
        ``max_steps`` or ``max_epochs`` was reached already (a resume from a checkpoint written at
        the last step, ``ckpt_path="last"`` of a finished run) or there is nothing to train
        (``max_steps=0``, ``max_epochs=0``, ``limit_train_batches=0``). BiP, built in
        ``configure_model``, is then started and finished here as in those hooks: a checkpoint's
        BiP state is restored (or refused, as in ``on_train_start``) and the module ends as the
        run that wrote the checkpoint ended; without a checkpoint BiP took no step and ends
        with its initial masks (it warns). ``remove`` applies either way. After a later ``fit()``
        that trained nothing, the masks the callback put back are removed (``remove``).
        """
        if self._snapshot is not None:  # built for this fit(); on_train_start never ran
            restored = self._restored is not None
            self.on_train_start(trainer, pl_module)  # (a refused checkpoint: undone, raised)
            pruner = self._active()
            if pruner is not None and not restored and pruner.step_count == 0:
                warnings.warn(
                    "BiPCallback: this fit() trained nothing (Lightning ran no training loop: "
                    "max_steps or max_epochs is 0, or there are no training batches); BiP took no "
                    "step and ends with its initial masks",
                    stacklevel=2,
                )
            self.on_train_end(trainer, pl_module)
        elif self._again:
            self._not_resumed(trainer)
            if self._load_hook is not None:
                self._load_hook.remove()
                self._load_hook = None
            self._finish()  # (with remove: the masks put back by the later fit() are removed)

    # -- the step -----------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Note that an optimizer step follows, and the loss scale its gradients carry.

        Under a loss scaler, Lightning skips the optimizer's step when the ``training_step`` that
        ends an accumulation returns ``None``; BiP then drops the window's gradients (Lightning
        zeroes them before the next one) and does not step. A fused optimizer unscales its
        gradients inside the scaler's step: whether that step was skipped is read after it.
        """
        pruner = self._active()
        if pruner is None or self._due:
            return
        # A training_step that returns None runs no backward pass: nothing to step then.
        self._due = pruner.has_grad
        self._scale, self._skip, self._backoff = None, False, False
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not self._due or scaler is None or not scaler.is_enabled():
            return
        stage = _scaler_stage(scaler, optimizer)
        if stage is None or stage == "UNSCALED":
            # Lightning unscales before this hook and updates the scale right after its step.
            self._scale, self._skip = grad_scaler_state(scaler, unscaled=True)
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            self._scale, self._backoff = float(scaler.get_scale()), True
        else:  # not unscaled: the closure returned None and Lightning does not step
            self._due = False
            pruner.zero_grad()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Step BiP once after the optimizer stepped (after the last batch of an accumulation)."""
        pruner = self._active()
        if pruner is None or not self._due:
            return
        self._due = False
        if self._backoff:  # the scaler updated its scale after the step: lowered on an overflow
            scaler = trainer.precision_plugin.scaler  # type: ignore[attr-defined]
            assert self._scale is not None
            self._skip = float(scaler.get_scale()) < self._scale
        pruner.step(scale=self._scale, skip=self._skip)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """BiP's state (:meth:`torchbip.BiP.state_dict`), saved in Lightning's checkpoint.

        After training ended, only the mark that BiP finished: the checkpoint's masks are final.
        """
        if self.pruner is None:
            return {}
        if self.report is not None:
            return {"finished": True}
        return {"bip": self.pruner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's BiP state; it is restored when training starts."""
        self._restored = state_dict


def _scaler_stage(scaler: Any, optimizer: Any) -> str | None:
    """The stage of ``scaler`` for ``optimizer`` (``"READY"``, ``"UNSCALED"``, ``"STEPPED"``).

    ``None`` for a scaler that does not keep one per optimizer (another implementation).
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:
        return None
    state = states.get(id(optimizer))  # (a defaultdict: get() adds nothing)
    return "READY" if state is None else getattr(state.get("stage"), "name", None)
