"""Private: ``global_prune``'s driver of the BiP state (``BiPLoop``).

The loop draws the batches, computes the loss and both partial gradients with :mod:`torch.func`
(the user's ``.grad`` stays untouched), steps the weights with its own optimiser and hands the
element-wise upper gradients to a :class:`torchbip.BiP` object, which owns the scores, the
masks, their optimiser and schedule and the selection, as it does in a user's own loop. The loop
can be saved and restored (:meth:`BiPLoop.state_dict`), and averages gradients over a process
group for distributed data-parallel runs.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchbip._collectives import all_reduce_mean, broadcast_state
from torchbip._func import Target, make_forward
from torchbip._tensors import check_optimizer_state
from torchbip.bilevel import MaskedGrads, all_finite, masked_loss_grads, tensor_sums, upper_grad
from torchbip.config import BiPConfig
from torchbip.data import BatchStream, describe, to_device
from torchbip.layouts import Layout
from torchbip.pruned import pruned_tensors
from torchbip.pruner import BiP, schedule_lambda
from torchbip.report import SparsityReport

__all__ = ["CHECKPOINT_FORMAT", "BiPLoop"]

CHECKPOINT_FORMAT = "torchbip.bip-loop/3"
LossFn = Callable[[Any, Any], Tensor]


class BiPLoop:
    """One ``global_prune`` run: the weights' optimiser, the data streams and a BiP object.

    Construction builds the :class:`torchbip.BiP` object, which applies the first mask (the
    top-k of the initial scores) to every target as torch pruning state.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        amount: int | float,
        layout: Layout,
        steps: int,
        cfg: BiPConfig,
        loss_fn: LossFn,
        lower_stream: BatchStream,
        upper_stream: BatchStream,
        process_group: Any = None,
    ) -> None:
        self.model, self.targets = model, targets
        self.steps, self.cfg, self.loss_fn = steps, cfg, loss_fn
        self.lower_stream, self.upper_stream = lower_stream, upper_stream
        self.group = process_group
        self.step_index = 0
        self.losses: list[tuple[int, float]] = []
        self.window: list[float] = []
        self.device = targets[0].weight().device
        # The caller's gradients (``.grad``) are theirs: the loop's optimiser works on its own
        # gradients, and finish() puts the caller's back, the same tensors with the same values.
        self.user_grads = {id(p): p.grad for p in model.parameters()}
        if self.group is not None:
            broadcast_state(model, self.group)
        # The upper level: the same object as in a user's loop; this loop feeds it gradients
        # from torch.func. SGD's lower step below leaves pruned entries alone (their gradient and
        # momentum are masked); AdamW's decoupled decay and state do not, so the BiP object holds
        # them (hold_pruned).
        self.adamw = cfg.optimizer == "adamw"
        self.bip = BiP(
            model, amount, parameters=[(t.module, t.name) for t in targets], layout=layout,
            min_keep=cfg.min_keep, upper_lr=cfg.upper_lr, upper_momentum=cfg.upper_momentum,
            upper_schedule=cfg.upper_schedule, steps=steps, implicit_coef=cfg.effective_implicit_coef,
            score_init=cfg.score_init, hold_pruned=self.adamw, process_group=False,
        )  # fmt: skip
        self.layout = self.bip.layout
        # a layout may leave some targets out (torchbip.Coupled drops excluded groups)
        targets = self.targets = self.bip.targets
        self.grad_views = self.bip.grad_views
        self.masks = {t.mask_fqn: getattr(t.module, t.name + "_mask") for t in targets}
        self.mask_list = list(self.masks.values())
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # Every trainable pruned tensor moves on its unpruned entries only: the targets, and
        # tensors that earlier pruning left outside this run (their masks stay fixed).
        self.masked = {
            t.orig_fqn: (t.weight(), mask) for t, mask in zip(targets, self.mask_list, strict=True)
        }
        for fqn, module, hook in pruned_tensors(model):
            p = self.params.get(fqn + "_orig")
            if p is not None and fqn + "_orig" not in self.masked:
                self.masked[fqn + "_orig"] = (p, module._buffers[hook._tensor_name + "_mask"])
        # Gradient hooks a user registered on a parameter (``p.register_hook``) see the gradient
        # of the whole lower objective (the loss and the L2 term), as in a loop whose loss holds the
        # L2 term: a hook that returns zeros freezes the parameter. Such parameters therefore get
        # the L2 term in their gradient, not as the optimiser's weight decay.
        self.grad_hooks = {n: p for n, p in self.params.items() if p._backward_hooks}
        self.post_hooks = [p for p in self.params.values() if getattr(p, "_post_accumulate_grad_hooks", None)]
        self.unmasked = [n for n in self.params if n not in self.masked]
        others = [self.params[n] for n in self.unmasked]
        hooked = {id(p) for p in self.grad_hooks.values()}
        score_names = {t.fqn + "_scores" for t in targets}
        self.buffers = {
            n: b for n, b in model.named_buffers() if n not in self.masks and n not in score_names
        }
        # The weights' optimiser (the lower level; the BiP object holds the scores' optimiser).
        # SGD: the L2 term is in the masked gradients (see _lower_step), weight decay for the others.
        # AdamW: decoupled decay for the targets and the others; tensors whose masks stay fixed
        # in this run (earlier pruning) get the L2 term in their masked gradient instead, so
        # that their pruned entries see a zero gradient and no decay, and never move.
        lower_params = [p for p, _ in self.masked.values()] + others
        target_origs = {id(t.weight()) for t in targets}
        self.decoupled = (
            {id(p) for p, _ in self.masked.values() if id(p) in target_origs and id(p) not in hooked}
            if self.adamw
            else set()
        )
        masked_params = [p for p, _ in self.masked.values()]
        groups = [
            {"params": [p for p in masked_params if id(p) not in self.decoupled], "weight_decay": 0.0},
            {"params": [p for p in masked_params if id(p) in self.decoupled], "weight_decay": cfg.gamma},
            {"params": [p for p in others if id(p) not in hooked], "weight_decay": cfg.gamma},
            {"params": [p for p in others if id(p) in hooked], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if self.adamw:
            self.lower_opt: torch.optim.Optimizer = torch.optim.AdamW(
                groups, lr=cfg.lower_lr, fused=_fusable(lower_params)
            )
        else:
            self.lower_opt = torch.optim.SGD(
                groups, lr=cfg.lower_lr, momentum=cfg.momentum, fused=_fusable(lower_params)
            )
        self.lower_sched = torch.optim.lr_scheduler.LambdaLR(
            self.lower_opt, schedule_lambda(cfg.lower_schedule, steps)
        )
        self.forward = make_forward(model)
        self.implicit_coef = cfg.effective_implicit_coef
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.amp or "")
        self.loss_scale = 2.0**16 if cfg.amp == "float16" else 1.0
        self.good_steps = 0
        self.skipped_steps = 0
        self._overflowed = False  # a pass of the current step was skipped (float16 overflow)

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> float:
        """Run one BiP step (a lower and an upper update); return its training loss.

        Raises:
            FloatingPointError: when the loss, a gradient or the new mask is not what it must be
                (a NaN or an infinity, a mask that does not keep exactly its count), naming the step.
            ValueError: when the model or the loss fails on a batch, or, in the first step, a
                pruned tensor whose module's forward is never called gets no gradient.
        """
        step = self.step_index
        calls = self._watch_calls() if step == 0 else None
        self._overflowed = False
        try:
            if self.cfg.mode == "fused":
                out, loss = self._backward(self.lower_stream, step, with_mask_grads=True)
                if out is not None:
                    self._check_gradients_reach_targets(out, calls, step)
                    self._lower_step(out.params)
                    self._upper_step(step)
            else:
                out, loss = self._backward(self.lower_stream, step, with_mask_grads=False)
                if out is not None:
                    self._lower_step(out.params)
                    if self.adamw:  # (AdamW moves pruned entries: the upper pass reads the held ones)
                        self.bip.restore_pruned()
                out, loss = self._backward(self.upper_stream, step, with_mask_grads=True)
                if out is not None:
                    self._check_gradients_reach_targets(out, calls, step)
                    self._upper_step(step)
        finally:
            if calls is not None:
                for handle in calls[1]:
                    handle.remove()
        if self._overflowed:  # once per step, also when both passes of a two-batch step overflowed
            self.skipped_steps += 1
        elif self.cfg.amp == "float16":  # a good step (both passes of a two-batch step): the scale
            self.good_steps += 1  # grows after 2000 of them
            if self.good_steps % 2000 == 0:
                self.loss_scale *= 2.0
        with warnings.catch_warnings():
            # a float16 step skipped for overflow: the schedule still advances, on purpose
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            self.lower_sched.step()
        self.step_index += 1
        log_every = self.cfg.log_every
        self.window = [*self.window[-(log_every - 1) :], loss] if log_every > 1 else [loss]
        if step % log_every == 0 or step == self.steps - 1:
            self.losses.append((step, loss))
        return loss

    def _backward(
        self, stream: BatchStream, step: int, with_mask_grads: bool
    ) -> tuple[MaskedGrads | None, float]:
        """One forward and backward pass; checks what it returns (loss, gradients)."""
        scale = self.loss_scale
        loss_fn = self.loss_fn if scale == 1.0 else (lambda out, y: self.loss_fn(out, y) * scale)
        autocast = self._autocast()
        inputs: Any = None
        labels: Any = None
        try:
            inputs, labels = stream.next()
            inputs, labels = to_device(inputs, self.device), to_device(labels, self.device)
            self._batch = (inputs, labels)
            try:
                with autocast:
                    out = masked_loss_grads(
                        self.forward, self.params, self.masks, self.buffers, inputs, labels, loss_fn,
                        with_mask_grads=with_mask_grads,
                    )  # fmt: skip
            except Exception as err:
                raise ValueError(
                    f"the model or loss_fn failed on a batch from {stream.name} at step {step} "
                    f"(inputs {describe(inputs)}, targets {describe(labels)}): {type(err).__name__}: {err}"
                ) from err
        except BaseException:  # (also KeyboardInterrupt)
            if self.group is not None:  # the other ranks wait in the next all-reduce: tell them
                all_reduce_mean(self._reduce_shapes(with_mask_grads), self.group, failed=True)
            raise
        if self.group is not None:
            failed = all_reduce_mean([out.loss, *out.params.values(), *out.masks.values()], self.group)
            if failed:
                raise RuntimeError(
                    f"{failed} other rank(s) of the process group failed at step {step} (see their "
                    "error); this rank stops too, and its model was restored"
                )
        if self.cfg.amp == "float16":  # loss scaling, also at a scale of 1 (then: overflow without it)
            grads = [*out.params.values(), *out.masks.values()]
            finite = bool(all_finite(grads))
            loss = float(out.loss) / scale
            if not finite or not math.isfinite(loss):  # float16 overflow: skip, lower the scale
                self.loss_scale /= 2.0
                self.good_steps = 0
                self._overflowed = True
                if self.loss_scale < 1.0:
                    raise FloatingPointError(
                        f"float16 gradients overflow at step {step} even without loss scaling; "
                        "use amp='bfloat16' or amp=None"
                    )
                return None, loss if math.isfinite(loss) else math.nan
            if scale != 1.0:
                with torch.no_grad():
                    for g in grads:
                        g.div_(scale)
        # What this step will apply, checked with one host sync (fused with reading the loss): the
        # score gradient covers every target entry (a NaN or infinity in g makes it non-finite,
        # also where the mask is 0), the other parameters' gradients are checked themselves.
        if with_mask_grads:
            # One sum per target's score gradient (the BiP object also records which targets got
            # a gradient) and per other gradient.
            sums = self.bip.prepare(self._element_upper_grads(out))
            if self.unmasked:
                sums = torch.cat([sums, tensor_sums([out.params[n] for n in self.unmasked])])
        else:
            sums = (
                tensor_sums(list(out.params.values())) if out.params else torch.zeros(1, dtype=torch.float64)
            )
        finite_t = torch.isfinite(sums).all().to(sums.dtype)
        loss_value, finite = torch.stack([out.loss.detach().to(sums.device, sums.dtype), finite_t]).tolist()
        loss = loss_value / scale
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss_fn returned a non-finite loss ({loss}) at step {step} on a batch from "
                f"{stream.name}; the model was restored. Lower lower_lr/upper_lr or check the data."
            )
        if not finite:
            bad = [n for n, g in [*out.params.items(), *out.masks.items()] if not bool(all_finite([g]))]
            raise FloatingPointError(
                f"non-finite gradients at step {step} on a batch from {stream.name} although the loss "
                f"({loss:.6g}) is finite, in {bad or ['the score gradient']}; the model was restored. "
                "A loss term such as torch.where(cond, x.sqrt(), 0) has NaN gradients where x <= 0 even "
                "where cond is False: compute it on safe values, e.g. x.clamp_min(eps).sqrt()"
            )
        with torch.no_grad():
            for name, value in out.buffers.items():
                self.buffers[name].copy_(value)
            if self.group is not None:
                all_reduce_mean([b for b in self.buffers.values() if b.is_floating_point()], self.group)
        return out, loss

    def mask_sparsity(self) -> float:
        """:attr:`torchbip.BiP.sparsity`: what finishing now would leave (for the progress bar)."""
        return self.bip.sparsity

    def _reduce_shapes(self, with_mask_grads: bool) -> list[Tensor]:
        """Zeros in the layout of a step's all-reduce (what a failed rank contributes)."""
        loss = torch.zeros((), device=self.device)
        masks = [torch.zeros_like(m) for m in self.masks.values()] if with_mask_grads else []
        return [loss, *(torch.zeros_like(p) for p in self.params.values()), *masks]

    def _watch_calls(self) -> tuple[set[int], list[Any]]:
        """Record which target modules the first step's forward calls."""
        called: set[int] = set()
        handles = []
        for module in {id(t.module): t.module for t in self.targets}.values():
            handles.append(
                module.register_forward_pre_hook(lambda mod, args: called.add(id(mod)), prepend=True)
            )
        return called, handles

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_gradients_reach_targets(
        self, grads: MaskedGrads, calls: tuple[set[int], list[Any]] | None, step: int
    ) -> None:
        """In the first step: raise for a target whose module's forward never ran and got no gradient.

        Such a tensor (a layer the model holds but does not call, or one whose parent reads the
        weight directly) would be counted in the budget and pruned by its initial scores alone,
        and its mask would never be applied in the model's forward.
        """
        if calls is None:
            return
        uncalled = [t for t in self.targets if id(t.module) not in calls[0]]
        if not uncalled:
            return
        counts = torch.stack(
            [
                grads.params[t.orig_fqn].count_nonzero() + grads.masks[t.mask_fqn].count_nonzero()
                for t in uncalled
            ]
        ).tolist()
        dead = [t for t, n in zip(uncalled, counts, strict=True) if n == 0]
        if dead:
            names = ", ".join(f"{t.fqn!r} ({type(t.module).__name__})" for t in dead)
            raise ValueError(
                f"parameters names {names}, whose module's forward is never called (at step {step}): "
                "the model does not use the layer, or its parent reads the tensor directly (as "
                "nn.MultiheadAttention does with out_proj), so a pruning mask on it is never applied "
                "and it gets no gradient; leave it out: pass parameters= naming the tensors to prune "
                "without it"
            )

    def _check_every_target_was_reached(self) -> None:
        """At the end: raise for a target that got no score gradient in any step of the run.

        Such a target was never trained. A zero gradient for a while is no error (the masks, or
        parameters that start at zero such as a zero-initialised BatchNorm behind a residual
        branch, can cut a layer off from the loss), so the targets that never got one are checked
        once more on the last batch with every mask set to one: if the loss does not depend on
        them even then (an output that is detached or unused), that is an error.
        """
        if self.step_index == 0 or bool(self.bip.grad_seen.all()) or not hasattr(self, "_batch"):
            return
        zero = [t for t, seen in zip(self.targets, self.bip.grad_seen.tolist(), strict=True) if not seen]
        inputs, labels = self._batch
        ones = {name: torch.ones_like(mask) for name, mask in self.masks.items()}
        buffers = {name: b.clone() for name, b in self.buffers.items()}
        for fqn, _, _ in pruned_tensors(self.model):  # masks of earlier pruning too
            if fqn + "_mask" in buffers:
                buffers[fqn + "_mask"] = torch.ones_like(buffers[fqn + "_mask"])
        with self._autocast():
            dense = masked_loss_grads(
                self.forward, self.params, ones, buffers, inputs, labels, self.loss_fn, with_mask_grads=True
            )
        independent = [t for t in zero if int(dense.masks[t.mask_fqn].count_nonzero()) == 0]
        if len(independent) == len(self.targets) and not self._loss_uses_outputs(inputs, labels, buffers):
            raise ValueError(
                f"the loss depends on none of the {len(self.targets)} pruned tensors (no gradient in any of "
                f"the {self.step_index} steps, nor with every mask set to one): does loss_fn return a "
                "detached or constant tensor (.detach(), .item(), torch.tensor(...))? BiP needs a loss "
                "computed from the model's outputs"
            )
        if independent:
            names = ", ".join(repr(t.fqn) for t in independent)
            raise ValueError(
                f"parameters names {names}, on which the loss does not depend (no gradient in any of "
                f"the {self.step_index} steps, nor with every mask set to one: is the layer's output "
                "detached or unused?); BiP could not train it: leave it out: pass parameters= naming "
                "the tensors to prune without it"
            )

    def _loss_uses_outputs(self, inputs: Any, labels: Any, buffers: dict[str, Tensor]) -> bool:
        """Whether ``loss_fn`` has a nonzero gradient with respect to the model's outputs (plain autograd).

        ``False`` for a loss that is detached or constant, which makes every pruned tensor look
        unused; a network cut off by its own activations (a dead ReLU) still answers ``True``.
        """
        with torch.no_grad(), self._autocast():
            outputs = self.forward({**self.params, **buffers}, inputs)
        if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
            return True  # not a plain tensor: no verdict, the per-tensor message stands
        outputs = outputs.detach().requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(outputs, labels)
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                return False
            (grad,) = torch.autograd.grad(loss, outputs, allow_unused=True)
        return grad is not None and bool(grad.count_nonzero())

    def _lower_step(self, grads: dict[str, Tensor]) -> None:
        gamma = self.cfg.gamma
        # A layout may hold more entries than its training masks zero (Coupled: a pruned
        # channel's producers too): those get no weight decay and no momentum either.
        held = self.bip.layout.held_masks(self.mask_list)
        holds = {id(m): h for m, h in zip(self.mask_list, held, strict=True) if h is not m}
        with torch.no_grad():
            for name, (p, mask) in self.masked.items():
                if holds:
                    mask = holds[id(mask)].to(p.dtype) if id(mask) in holds else mask
                if name in self.grad_hooks:
                    p.grad = _run_hooks(p, torch.add(grads[name], p, alpha=gamma)).mul_(mask)
                elif id(p) in self.decoupled:  # AdamW's weight decay holds the L2 term
                    p.grad = grads[name]  # already m * g: zero where the mask is
                else:
                    # lower_grad's m * (g + gamma * theta) in one pass, in place: the gradient of
                    # m * theta is already m * g, so this is g + gamma * m * theta
                    p.grad = grads[name].addcmul_(p, mask, value=gamma)
                state = self.lower_opt.state.get(p, {})
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].mul_(mask)
            for name in self.unmasked:
                p = self.params[name]
                p.grad = (
                    _run_hooks(p, torch.add(grads[name], p, alpha=gamma))
                    if name in self.grad_hooks
                    else grads[name]
                )
        for p in self.post_hooks:
            for hook in p._post_accumulate_grad_hooks.values():
                hook(p)
        self.lower_opt.step()

    def _element_upper_grads(self, grads: MaskedGrads) -> list[Tensor]:
        """The element-wise upper gradient of every target, from the two partial gradients.

        Written straight into the BiP object's score-gradient buffers when the layout has one
        score per entry (the object then copies nothing).
        """
        c = self.bip.implicit_coef
        outs = self.bip.score_grad_buffers()
        wide = self.bip.flat_scores.dtype  # (float32 for a bfloat16 or float16 model: computed in it)
        with torch.no_grad():
            return [
                upper_grad(
                    grads.masks[t.mask_fqn].to(wide),
                    grads.params[t.orig_fqn].to(wide),
                    c,
                    out=None if outs is None else outs[i],
                )
                for i, t in enumerate(self.targets)
            ]

    def _upper_step(self, step: int) -> None:
        try:
            self.bip.apply()
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}; the model was restored") from err

    # -- end of the run ---------------------------------------------------------------------

    def finish(self) -> SparsityReport:
        """Leave torch's pruned form: drop the scores, refresh masked weights, give back grads.

        Raises:
            ValueError: for a target that got no gradient in the whole run and on which the loss
                does not depend (see :meth:`_check_every_target_was_reached`).
        """
        self._check_every_target_was_reached()
        report = self.bip.finish()
        with torch.no_grad():
            # The hooks ran inside torch.func and left transformed tensors behind.
            for _, module, hook in pruned_tensors(self.model):
                setattr(module, hook._tensor_name, hook.apply_mask(module).detach())
            for p in self.model.parameters():
                p.grad = self.user_grads.get(id(p))
        return report

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run, as tensors and plain types.

        ``torch.load(..., weights_only=True)`` reads it back.
        """
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step_index,
            "steps": self.steps,
            "targets": [t.fqn for t in self.targets],
            "n_keep": self.bip.n_keep,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "bip": self.bip.state_dict(),
            "lower_opt": self.lower_opt.state_dict(),
            "lower_sched": _sched_state(self.lower_sched),
            "lower_stream": self.lower_stream.state_dict(),
            "upper_stream": self.upper_stream.state_dict(),
            "rng": torch.get_rng_state(),
            "loss_scale": self.loss_scale,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
            "losses": [list(x) for x in self.losses],
            "window": list(self.window),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`; raise ``ValueError`` if it belongs to another run.

        ``global_prune`` first compares the run the checkpoint records with its own
        (:func:`torchbip._checkpoint.check_resume`); the checks here guard the loop's own state.
        """
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{source} is not a checkpoint this torchbip version reads (format {found!r}, "
                f"expected {CHECKPOINT_FORMAT!r})"
            )
        fqns = [t.fqn for t in self.targets]
        if state["targets"] != fqns or state["n_keep"] != self.bip.n_keep:
            raise ValueError(
                f"{source} was written for another model or amount: it prunes {state['targets']} "
                f"keeping {state['n_keep']}, this run prunes {fqns} keeping {self.bip.n_keep}"
            )
        if state["steps"] != self.steps:
            raise ValueError(
                f"{source} was written for a run of {state['steps']} steps, this run has {self.steps}"
            )
        try:  # before anything loads: torch's fused steps do not check the state's shapes
            check_optimizer_state(state.get("lower_opt"), self.lower_opt, "the weight optimizer's state")
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as err:
            raise ValueError(f"{source} does not match the model: {err}") from err
        try:
            self.bip.load_state_dict(state["bip"])
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        try:
            self.lower_opt.load_state_dict(state["lower_opt"])
            self.lower_sched.load_state_dict(state["lower_sched"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source}: {err}") from err
        # Each rank replays its own shard, but only rank 0 saved: check the replay on one process.
        verify = self.group is None
        self.lower_stream.load_state_dict(state["lower_stream"], source=source, verify=verify)
        if self.upper_stream is not self.lower_stream:
            self.upper_stream.load_state_dict(state["upper_stream"], source=source, verify=verify)
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step_index = int(state["step"])
        self.loss_scale = float(state["loss_scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.losses = [(int(s), float(v)) for s, v in state["losses"]]
        self.window = [float(v) for v in state["window"]]


def _sched_state(sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    # LambdaLR stores closures as None in its state: plain types only, as weights_only needs.
    return sched.state_dict()


def _run_hooks(param: Tensor, grad: Tensor) -> Tensor:
    """Apply the gradient hooks registered on ``param`` (``param.register_hook``) to ``grad``."""
    for hook in (param._backward_hooks or {}).values():
        result = hook(grad)
        if result is not None:
            grad = result
    return grad


def _fusable(params: list[Tensor]) -> bool | None:
    """Use torch's fused SGD or AdamW kernel for float32 and float64 tensors on CPU or CUDA.

    Same update as the default per-tensor loop, about 3x faster per step on CPU; results may
    differ from it in the last bit where a scheduled learning rate is rounded (measured: one
    bias entry by 2e-9 after 50 LeNet steps). ``None`` (torch's default) otherwise, so that
    bfloat16 and float16 weights keep the default kernel's rounding.
    """
    ok = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params
    )
    return True if ok else None
