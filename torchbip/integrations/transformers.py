"""BiP as a Hugging Face Trainer callback: :class:`BiPTrainerCallback`.

Add one callback to :class:`transformers.Trainer`; the model, the ``TrainingArguments`` and the
trainer's optimizer stay as they are:

.. code-block:: python

    from torchbip.integrations.transformers import BiPTrainerCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   callbacks=[BiPTrainerCallback(amount=0.5)])
    trainer.train()
    # the model's nn.Linear layers are in torch's pruned form: weight_orig, weight_mask, hook

The callback builds one :class:`torchbip.BiP` on the model when the trainer is built
(``on_init_end``, before the trainer creates its optimizer and before a checkpoint is loaded
into the model), steps it after every optimizer step (``gradient_accumulation_steps``,
``max_grad_norm`` and mixed precision are the trainer's; a step its loss scaler skips is
skipped), writes its state into every checkpoint folder (``torchbip_bip.pt``, read back by
``trainer.train(resume_from_checkpoint=...)``) and calls :meth:`torchbip.BiP.finish` when
training ends. The upper schedule spans the trainer's ``max_steps`` unless ``steps`` is given.

Needs ``transformers`` and ``accelerate`` (``pip install "torchbip[transformers]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchbip.integrations._common import Amount, CallbackBase

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        "torchbip.integrations.transformers needs transformers: pip install 'torchbip[transformers]'"
    ) from err

__all__ = ["STATE_FILE", "BiPTrainerCallback"]

STATE_FILE = "torchbip_bip.pt"


class BiPTrainerCallback(CallbackBase, TrainerCallback):  # type: ignore[misc,unused-ignore]
    r"""Run BiP inside the Hugging Face Trainer's own training loop.

    Args:
        amount: the sparsity budget, as for :class:`torchbip.BiP`: a fraction, a count or a dict
            from name patterns (e.g. ``"bert.encoder.*.weight"``) to amounts.
        steps: the number of optimizer steps the upper schedule spans; ``None`` (default): the
            trainer's ``state.max_steps``.
        remove: call :func:`torch.nn.utils.prune.remove` on every pruned tensor when training
            ends, so that the model holds plain, sparse ``weight`` Parameters (and
            ``save_pretrained`` writes the usual keys). By default the model stays in torch's
            pruned form.
        **settings: any other keyword argument of :class:`torchbip.BiP` (``parameters``,
            ``exclude``, ``layout``, ``budget``, ``min_keep``, ``max_keep``, ``upper_lr``,
            ``upper_momentum``, ``upper_schedule``, ``implicit_coef``, ``score_init``,
            ``hold_pruned``, ``process_group``); checked when the model is pruned.

    Attributes:
        pruner: the :class:`torchbip.BiP` object, once built (``None`` before).
        report: the final :class:`torchbip.SparsityReport`, once training ended.

    Raises:
        TypeError: for a keyword argument that :class:`torchbip.BiP` does not take.
    """

    def __init__(
        self, amount: Amount | Mapping[str, Amount] = 0.95, *, steps: int | None = None, remove: bool = False,
        **settings: Any,
    ) -> None:  # fmt: skip
        self._configure(amount, steps, remove, settings)

    # -- building and the end -----------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build BiP on the model, before the optimizer exists."""
        self._build(kwargs.get("model"))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build BiP if the model came late (``model_init``), set the schedule, read a checkpoint's state."""
        pruner = self._build(kwargs.get("model"))
        if pruner is None:
            return
        if self.steps is None and pruner.step_count == 0 and state.max_steps >= 1:
            pruner.set_steps(int(state.max_steps))
        if state.global_step > 0:  # resuming from a checkpoint
            pruner.load_state_dict(torch.load(_resume_file(args, state), weights_only=True))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Leave torch's pruned form (:meth:`torchbip.BiP.finish`), or plain weights with ``remove``."""
        self._finish()

    # -- the step -----------------------------------------------------------------------------

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Note that an optimizer step follows, and the loss scale its gradients carry."""
        pruner = self._active()
        if pruner is None:
            return
        self._due = pruner.has_grad
        scaler = _optimizer_attr(kwargs, "scaler")
        # accelerate updates the scale inside optimizer.step(): read the one the gradients carry now.
        self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Step BiP after the optimizer's step (skipped with it on an overflow)."""
        pruner = self._active()
        if pruner is None or not self._due:
            return
        self._due = False
        skipped = bool(_optimizer_attr(kwargs, "step_was_skipped"))
        pruner.step(scale=self._scale, skip=skipped)

    # -- checkpoints --------------------------------------------------------------------------

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write BiP's state into the checkpoint folder the trainer just wrote."""
        pruner = self._active()
        if pruner is None or not state.is_world_process_zero:
            return
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(pruner.state_dict(), folder / STATE_FILE)


def _optimizer_attr(kwargs: Mapping[str, Any], name: str) -> Any:
    """An attribute of the optimizer a hook was given (accelerate's AcceleratedOptimizer), or ``None``."""
    return getattr(kwargs.get("optimizer"), name, None)


def _resume_file(args: TrainingArguments, state: TrainerState) -> Path:
    """The BiP state of the checkpoint the trainer resumed from."""
    candidates = []
    if isinstance(args.resume_from_checkpoint, str | os.PathLike):
        candidates.append(Path(args.resume_from_checkpoint) / STATE_FILE)
    candidates.append(Path(str(args.output_dir)) / f"checkpoint-{state.global_step}" / STATE_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"BiPTrainerCallback: the trainer resumed at step {state.global_step}, but no BiP state "
        f"({STATE_FILE}) is in {', '.join(str(p.parent) for p in candidates)}; BiP's scores, "
        "momentum and schedule cannot be restored. Resume from a checkpoint this callback saved "
        "(pass its folder as TrainingArguments(resume_from_checkpoint=...) if it is elsewhere)"
    )
