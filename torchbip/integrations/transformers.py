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
into the model; a model that ``model_init`` makes anew in ``train()`` is pruned in
``on_train_begin``), steps it after every optimizer step (``gradient_accumulation_steps``,
``max_grad_norm`` and mixed precision are the trainer's; a step its loss scaler skips is
skipped), writes its state into every checkpoint folder (``torchbip_bip.pt``, read back by
``trainer.train(resume_from_checkpoint=...)``) and calls :meth:`torchbip.BiP.finish` when
training ends. On resume the state is read from the folder the trainer resumes from (the one
passed to ``trainer.train``, else ``TrainingArguments.resume_from_checkpoint``, else
``output_dir/checkpoint-<step>``) and must match the model the trainer just loaded from that
checkpoint (masks, and weights at pruned entries): another run's state is an error, never a
silent mix. The upper schedule spans the trainer's ``max_steps`` unless ``steps`` is given.

Needs ``transformers`` and ``accelerate`` (``pip install "torchbip[transformers]"``).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchbip.integrations._common import Amount, CallbackBase
from torchbip.pruner import BiP

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
            ``save_pretrained`` writes the usual keys); a checkpoint written during training
            (torch's pruned form) still loads into the model, as ``weight_orig * weight_mask``.
            By default the model stays in torch's pruned form.
        **settings: any other keyword argument of :class:`torchbip.BiP` (``parameters``,
            ``exclude``, ``layout``, ``budget``, ``min_keep``, ``max_keep``, ``upper_lr``,
            ``upper_momentum``, ``upper_schedule``, ``implicit_coef``, ``score_init``,
            ``hold_pruned``, ``process_group``); checked when the model is pruned.

    Attributes:
        pruner: the :class:`torchbip.BiP` object, once built (``None`` before).
        report: the final :class:`torchbip.SparsityReport`, once training ended; after each
            later ``train()`` (the masks fixed), that of the masks the model ends it with.

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
        """Build BiP if the model came late (``model_init``), set the schedule, read a checkpoint's state.

        ``train()`` calls ``model_init`` again and trains that new model: BiP moves to it (before
        its first step). A later ``train()`` of the same model, once BiP finished, keeps the masks
        fixed: the final masks, or those of the checkpoint it resumes from (an unfinished run's
        BiP state there is not resumed, with a warning).
        """
        model = kwargs.get("model")
        if self.pruner is not None and self.report is not None:
            if model is not None:
                self._train_again(model, "train()")
                if state.global_step > 0:
                    _warn_not_resumed(args, state)
            return
        if self.pruner is not None and model is not None and model is not self.pruner.model:
            if state.global_step > 0 or self.pruner.step_count:
                loaded = " and loaded a checkpoint into the new, unpruned model" if state.global_step else ""
                raise RuntimeError(
                    f"BiPTrainerCallback: the trainer replaced the model (model_init) after BiP had started "
                    f"on it{loaded}; resuming a run whose model comes from model_init is not supported: "
                    "pass the model itself (Trainer(model=...))"
                )
            self.pruner.finish(as_loaded=True)  # the model the trainer dropped: release it
            self.pruner = None
        pruner = self._build(model)
        if pruner is None:
            return
        if self.steps is None and pruner.step_count == 0 and state.max_steps >= 1:
            pruner.set_steps(int(state.max_steps))
        if state.global_step > 0:  # resuming from a checkpoint
            pruner.load_state_dict(_resume_state(args, state, pruner))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Leave torch's pruned form (:meth:`torchbip.BiP.finish`), or plain weights with ``remove``.

        With ``load_best_model_at_end`` the trainer has just loaded the best checkpoint into the
        model: BiP's state saved in that folder is restored first, so that BiP finishes the
        model as it was at that checkpoint (its masks, and its values at pruned entries). Without
        a state of that checkpoint (a folder this callback did not write), the masks and weights
        the trainer loaded are kept as they are.
        """
        pruner = self._active()
        best = state.best_model_checkpoint
        if pruner is None or not args.load_best_model_at_end or best is None:
            self._finish()
            return
        path = Path(best) / STATE_FILE
        saved = torch.load(path, weights_only=True) if path.is_file() else None
        if saved is None or not _belongs_to(saved, pruner):
            self._finish(as_loaded=True)
            return
        if saved.get("step") != pruner.step_count:
            pruner.load_state_dict(saved)
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
        """Step BiP after the optimizer's step (skipped with it on an overflow).

        No upper step past the trainer's ``max_steps``: resumed from the checkpoint of its last
        step (with ``max_steps`` not a multiple of the epoch's steps), the trainer runs one more
        optimizer step (at learning rate 0 under its default linear schedule). BiP skips it, as
        a step the loss scaler skipped (:meth:`torchbip.BiP.step` with ``skip=True``: the
        gradients are dropped and the optimizer's changes to pruned entries undone), so the
        masks end as the uninterrupted run's.
        """
        pruner = self._active()
        if pruner is None or not self._due:
            return
        self._due = False
        past_the_end = 0 < state.max_steps <= state.global_step  # (global_step: the steps before this one)
        skipped = bool(_optimizer_attr(kwargs, "step_was_skipped")) or past_the_end
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


def _resume_state(args: TrainingArguments, state: TrainerState, pruner: BiP) -> dict[str, Any]:
    """The BiP state saved with the checkpoint the trainer resumed from.

    The trainer has loaded the checkpoint's model, whose buffers include BiP's masks, so the state
    file that belongs to it holds exactly those masks and, for pruned entries, those weights (see
    :func:`_belongs_to`): a file that does not (another run's ``checkpoint-<step>`` in
    ``output_dir``) is refused.
    """
    folders = [_trainer_resume_folder(), args.resume_from_checkpoint]
    folders.append(Path(str(args.output_dir)) / f"checkpoint-{state.global_step}")
    candidates: list[Path] = []
    for folder in folders:
        if isinstance(folder, str | os.PathLike) and Path(folder) / STATE_FILE not in candidates:
            candidates.append(Path(folder) / STATE_FILE)
    foreign = []
    for path in candidates:
        if not path.is_file():
            continue
        saved = torch.load(path, weights_only=True)
        if _belongs_to(saved, pruner):
            return saved
        foreign.append(str(path))
    if foreign:
        raise RuntimeError(
            f"BiPTrainerCallback: the trainer resumed at step {state.global_step}, but the BiP state in "
            f"{', '.join(foreign)} does not match the model the trainer loaded from its checkpoint "
            "(other masks, or other weights at pruned entries): it was saved by another run or at "
            "another step; resume from the checkpoint folder the state was saved in"
        )
    raise FileNotFoundError(
        f"BiPTrainerCallback: the trainer resumed at step {state.global_step}, but no BiP state "
        f"({STATE_FILE}) is in {', '.join(str(p.parent) for p in candidates)}; BiP's scores, "
        "momentum and schedule cannot be restored. Resume from a checkpoint this callback saved"
    )


def _warn_not_resumed(args: TrainingArguments, state: TrainerState) -> None:
    """In a later ``train()`` (masks fixed): warn if its checkpoint holds an unfinished run's BiP state.

    The trainer loaded the checkpoint's model, masks included; the callback finished, so BiP's
    scores, momentum and schedule saved in the folder are not resumed.
    """
    folder = _trainer_resume_folder()
    if folder is not None:
        folders = [Path(folder)]
    else:
        folders = [Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str | os.PathLike):
            folders.insert(0, Path(args.resume_from_checkpoint))
    for path in folders:
        if (path / STATE_FILE).is_file():
            warnings.warn(
                f"BiPTrainerCallback: train() resumed from {path}, which holds the BiP state of an "
                f"unfinished run ({STATE_FILE}, step {state.global_step}); this callback finished already, "
                "so that state is not resumed: the model trains with the checkpoint's masks fixed, and "
                "callback.report describes the masks it ends with. To resume pruning from that "
                "checkpoint, train a fresh model with a new BiPTrainerCallback (resume_from_checkpoint=...)",
                stacklevel=3,
            )
            return


def _trainer_resume_folder() -> str | os.PathLike[str] | None:
    """The folder given to ``Trainer.train(resume_from_checkpoint=...)``, read off the trainer's frame.

    The trainer passes it to its inner loop, which calls ``on_train_begin``, but not to the
    callbacks; ``None`` if no such frame is found (the state is then looked for elsewhere, and
    checked against the model either way).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop":
                folder = frame.f_locals.get("resume_from_checkpoint")
                return folder if isinstance(folder, str | os.PathLike) else None
            frame = frame.f_back
        return None
    finally:
        del frame


def _belongs_to(saved: object, pruner: BiP) -> bool:
    """Whether a BiP state matches the model ``pruner`` prunes, as the trainer loaded it.

    The masks must be equal, and so must the weights the state holds for pruned entries (saved
    right after a step, they equal the whole ``weight_orig``). The scores are not compared: the
    trainer's checkpoint leaves them out (the modules' score buffers share one storage).
    """
    if not isinstance(saved, Mapping):
        return False
    masks, weights = saved.get("masks"), saved.get("saved")
    if not isinstance(masks, list | tuple) or len(masks) != len(pruner.masks):
        return False
    pairs = list(zip(masks, pruner.keeps, strict=True))
    if isinstance(weights, list | tuple) and len(weights) == len(pruner.origs):
        pairs += zip(weights, [p.detach() for p in pruner.origs], strict=True)
    return all(
        isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a.to(b.device), b)
        for a, b in pairs
    )
