r"""``BiP``: the state of BiP's upper level, stepped from the user's own training loop.

:class:`BiP` is shaped like a :mod:`torch.optim` optimizer or a :mod:`torch.ao.pruning`
sparsifier: it is built on a model, the user's loop runs forward and backward passes and the
weights' optimizer, and :meth:`BiP.step` then moves the mask scores along BiP's implicit
gradient and sets the masks to the top-k of the scores:

.. code-block:: python

    pruner = torchbip.BiP(model, amount=0.9, steps=len(loader) * epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
    pruner.finish()                  # torch's pruned form: weight_orig, weight_mask, hook

:func:`torchbip.global_prune` drives the same object from its own loop, with gradients from
:mod:`torch.func`: one implementation of the upper level, two ways to feed it gradients.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import inspect
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchbip._collectives import agree, all_reduce_mean, broadcast_state, default_group
from torchbip._frames import user_stacklevel
from torchbip._func import (
    LEAVE_OUT_OR_EXCLUDE,
    Target,
    candidate_targets,
    check_binary_masks,
    check_targets,
    conv1d_note,
    transposed_linear_names,
    wholly_pruned,
)
from torchbip._snapshot import ModelSnapshot
from torchbip._tensors import check_optimizer_state, copy_into, split_like
from torchbip.bilevel import all_finite, tensor_sums
from torchbip.config import BiPConfig
from torchbip.data import describe
from torchbip.layouts import Groups, Layout, MaskLayout, as_layout
from torchbip.masks import validate_amount
from torchbip.method import GradCapture, drop_scores, pruning_hook, scores_name, set_grad_capture
from torchbip.report import SparsityReport, TensorSparsity, in_model_order
from torchbip.structured import group_unit

__all__ = ["BiP", "STATE_FORMAT", "grad_scaler_state", "schedule_lambda", "unwrap_model"]

STATE_FORMAT = "torchbip.bip/1"
Amount = int | float


def schedule_lambda(kind: str, steps: int | None) -> Callable[[int], float]:
    """The learning-rate factor of a named schedule at step ``t`` (for ``LambdaLR``).

    Args:
        kind: ``"cosine"`` (to 0 at ``steps``), ``"step"`` (x0.1 at 50% and 75% of ``steps``) or
            ``"constant"``.
        steps: the length of the schedule (unused by ``"constant"``).

    Returns:
        ``t -> factor``.

    Example:
        >>> f = schedule_lambda("step", 8)
        >>> [round(f(t), 3) for t in (0, 4, 6)]
        [1.0, 0.1, 0.01]
    """
    if kind == "constant" or steps is None:
        return lambda t: 1.0
    total = steps
    if kind == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    return lambda t: 0.1 ** ((t >= total * 0.5) + (t >= total * 0.75))


class BiP:
    r"""BiP's upper level as a state object: scores, masks, their optimizer and the selection.

    Construction puts every chosen tensor in torch's pruned form at once (``weight_orig`` is the
    same Parameter object as before, so an optimizer built before or after holds it;
    ``weight_mask`` and a forward pre-hook as for torch's own methods), at the budget from the
    first step: the mask is the top-k of the initial scores (the weights' magnitudes).

    In the user's loop, the masked forward pass hands each mask's gradient
    :math:`g = \nabla_z \ell` at :math:`z = m \odot \theta` to this object (a gradient hook on
    the masked tensor, summed over every backward pass since the last :meth:`step`, so gradient
    accumulation works; the user's gradient clipping or loss scaling of ``.grad`` does not change
    it). :meth:`step` then computes the upper gradient
    :math:`\theta \odot g - c\, m \odot g \odot g` (:math:`\theta` as the loss saw it, before
    the optimizer's step), updates the scores with SGD and sets the masks to the top-k. Call it
    after ``optimizer.step()``, as for :mod:`torch.ao.pruning` sparsifiers.

    Pruned entries of ``weight_orig`` keep their values (``hold_pruned``): whatever the
    optimizer did to them (weight decay, momentum or Adam state) is undone in :meth:`step`, so
    an entry that comes back returns with the value it had when it was pruned. A
    ``model.load_state_dict(...)`` after construction (a rollback to a checkpoint) sets them, and
    :math:`\theta` of the next step, to the loaded values.

    Distributed data parallel: build the object on the model on every rank, then wrap the model
    in :class:`~torch.nn.parallel.DistributedDataParallel` as usual. Construction broadcasts
    rank 0's parameters and buffers (as DDP does), and :meth:`step` averages the captured
    gradients over the process group in one all-reduce, so every rank keeps identical scores
    and masks (and DDP keeps the weights identical).

    FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) works the same way: build the object on
    the whole model on every rank, then call ``fully_shard`` (on the layers and the root, as
    usual) and build the optimizer on the sharded parameters. The masks and scores stay whole
    on every rank; the forward pass applies the mask to the weight FSDP gathered, :meth:`step`
    averages the captured gradients over the process group, holds pruned entries in each rank's
    own shard of ``weight_orig`` and gathers each pruned tensor once (for :math:`\theta` of the
    next step). Only sharding along dim 0 on a 1-D mesh (``fully_shard``'s default) is
    supported; a model that is sharded before BiP is built, or FSDP1's flat parameters, are
    refused with an error.

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapper of it); pruned in place.
        amount: a float in ``[0, 1]`` (the fraction of the remaining entries of all chosen
            tensors to prune, ranked globally; with a :class:`~torchbip.layouts.Groups` layout,
            of the groups) or an int count; or a dict from name patterns
            (:mod:`fnmatch`, matched against each tensor's name such as ``"layer1.0.conv1.weight"``)
            to a per-tensor amount, as Torch-Pruning's ``pruning_ratio_dict``: each matching tensor
            is pruned on its own (the first matching pattern wins); tensors that no pattern
            matches are left dense.
        parameters: ``(module, name)`` pairs to prune, as for
            :func:`torch.nn.utils.prune.global_unstructured`; by default the layout's defaults
            (every ``nn.Linear``/``nn.Conv*d`` weight; see :mod:`torchbip.layouts`).
        exclude: name patterns of tensors (or modules) to leave out, e.g. ``["fc.weight"]``,
            ``["conv1"]`` or ``["*lm_head*"]`` (a tied language-model head, ``lm_head.weight`` or
            ``model.lm_head.weight``); a pattern that matches nothing is an error.
        layout: ``"unstructured"``, ``"filter"``, ``"channel"``, an ``"N:M"`` pattern or a
            :class:`torchbip.layouts.Layout`. By default ``"filter"`` leaves out the layers whose
            outputs are the model's outputs and ``"channel"`` those that read its inputs, by the
            order in which the model calls its layers, found by tracing a copy of it with
            :mod:`torch.fx` (there is no batch to run it on yet); where torch.fx cannot trace the
            model's ends, the last (first) registered layer is left out, with a warning naming it:
            pass ``parameters`` to choose.
        budget: with ``"filter"``/``"channel"``: ``"layer"`` (the same fraction of every
            tensor) or ``"global"``.
        min_keep: per-tensor floor of a global ranking: an int count or a float fraction of each
            tensor that is always kept (rounded up, at least one). A float is a fraction of the
            whole tensor (with a group layout: of all its groups), also of a tensor pruned
            before, not of its remaining entries; a floor above what remains keeps all of it.
        max_keep: per-tensor cap of a global ranking: an int count or a float fraction of each
            (whole) tensor that is kept at most (rounded down).
        upper_lr: learning rate :math:`\beta` of the scores.
        upper_momentum: SGD momentum of the scores.
        upper_schedule: ``"constant"``, ``"step"`` (x0.1 at 50% and 75% of ``steps``) or
            ``"cosine"`` (without ``steps`` both stay constant).
        steps: the number of :meth:`step` calls the schedule spans (``None``: no schedule).
        implicit_coef: :math:`c`, the coefficient of the implicit term (:math:`1/\gamma` in
            theory, with :math:`\gamma` the weights' weight decay; 0 switches it off).
        score_init: ``"magnitude"`` or ``"scaled_magnitude"`` (see :class:`torchbip.BiPConfig`).
        hold_pruned: undo the optimizer's changes to pruned entries in :meth:`step`. Costs one
            copy of the pruned tensors; turn it off only when the optimizer leaves entries with
            zero gradient alone (plain SGD without momentum and weight decay). The copy also
            holds :math:`\theta` before the optimizer's step; without it the upper gradient uses
            ``weight_orig`` after the step (one weight step later, so the scores differ
            slightly from :func:`torchbip.global_prune`'s).
        process_group: the :mod:`torch.distributed` group to average over; ``None`` (default)
            uses the default group when it has more than one process, ``False`` never
            communicates.

    Raises:
        ValueError: for a bad ``amount``, ``parameters``, ``exclude``, ``layout`` / ``budget`` /
            ``min_keep`` / ``max_keep`` combination or setting, or (on every rank) for ranks of a
            process group whose models or settings differ; the model is left as it was.
        TypeError: for a ``model`` that is not a module, or arguments of the wrong type.
        RuntimeError: under :func:`torch.inference_mode`.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> pruner = BiP(model, amount=0.75, steps=4)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
        >>> for _ in range(4):
        ...     x = torch.randn(16, 8)
        ...     optimizer.zero_grad()
        ...     F.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        ...     optimizer.step()
        ...     _ = pruner.step()
        >>> pruner.finish().global_sparsity
        0.75
        >>> prune.is_pruned(model), hasattr(model[0], "weight_scores")
        (True, False)
    """

    def __init__(
        self,
        model: nn.Module,
        amount: Amount | Mapping[str, Amount] = 0.95,
        *,
        parameters: Iterable[tuple[nn.Module, str]] | None = None,
        exclude: Iterable[str] | None = None,
        layout: str | Layout | None = "unstructured",
        budget: str = "layer",
        min_keep: Amount | None = None,
        max_keep: Amount | None = None,
        upper_lr: float = BiPConfig.upper_lr,
        upper_momentum: float = BiPConfig.upper_momentum,
        upper_schedule: str = BiPConfig.upper_schedule,
        steps: int | None = None,
        implicit_coef: float = 1.0,
        score_init: str = BiPConfig.score_init,
        hold_pruned: bool = True,
        process_group: Any = None,
    ) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "BiP trains masks and cannot be built under torch.inference_mode(); build it outside"
            )
        model = unwrap_model(model)
        group = default_group(process_group)
        try:
            plan = self._checked_plan(
                model, amount, parameters, exclude, layout, budget, min_keep, max_keep, upper_lr,
                upper_momentum, upper_schedule, steps, implicit_coef, score_init, hold_pruned,
            )  # fmt: skip
        except (ValueError, TypeError, RuntimeError) as err:
            if group is None:
                raise
            agree(None, err, group, "torchbip.BiP", {})  # every rank raises, none waits below
            raise
        spec, cfg, targets, bound, steps, settings = plan
        if group is not None:  # the same BiP on every rank, or an error on every rank
            mine = {
                "tensors": [(t.fqn, tuple(t.weight().shape)) for t in targets],
                "n_keep": bound.n_keep,
                "layout": bound.describe(),
                "settings": settings,
                "hold_pruned": hold_pruned,
            }
            labels = {
                "tensors": "tensors to prune", "n_keep": "kept entries", "layout": "layout",
                "hold_pruned": "hold_pruned",
            }  # fmt: skip
            agree(mine, None, group, "torchbip.BiP", {**labels, "settings": "settings"})

        self.model, self.targets, self.spec, self.layout = model, targets, spec, bound
        self.implicit_coef = float(cfg.implicit_coef)  # type: ignore[arg-type]
        self.hold_pruned = hold_pruned
        self.steps = steps
        self.step_count = 0
        self.skipped_steps = 0
        self._finished = False
        # The default group is looked up at every use, not held: a BiP object alive at exit does
        # not keep it from being freed by dist.destroy_process_group().
        self._world = group is not None and group is dist.group.WORLD
        self._group = None if self._world else group
        self.settings = settings
        # Tensors whose every entry an earlier pruning zeroed: not BiP's doing (finish()'s warning).
        self._whole_before = wholly_pruned(targets)
        snapshot = ModelSnapshot(model, {t.name for t in targets}, unchanged=list(model.parameters()))
        with snapshot.restored_on_failure():
            if self.group is not None:  # start every rank from rank 0's model, as DDP does
                broadcast_state(model, self.group)
            self._apply(cfg.score_init)

    @classmethod
    def check(cls, model: nn.Module, amount: Amount | Mapping[str, Amount] = 0.95, **settings: Any) -> None:
        """Raise what building :class:`BiP` with these arguments would raise, changing nothing.

        For code that must refuse bad settings before it changes or trains the model (a trainer
        callback that converts the model's precision first, a script before its data phase).
        Process groups are not contacted.

        Args:
            model: the model.
            amount: as for :class:`BiP`.
            **settings: any other keyword argument of :class:`BiP`.

        Raises:
            ValueError, TypeError, RuntimeError: as :class:`BiP` would, for the same arguments.

        Example:
            >>> from torch import nn
            >>> BiP.check(nn.Sequential(nn.Linear(4, 4)), amount=0.5)  # fine: returns None
            >>> try:
            ...     BiP.check(nn.Sequential(nn.Linear(4, 4)), amount=1.5)
            ... except ValueError as err:
            ...     print(str(err).split(";")[0])
            amount=1.5 is a float outside [0, 1] (a fraction of the remaining entries)
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "BiP trains masks and cannot be built under torch.inference_mode(); build it outside"
            )
        try:
            arguments = inspect.signature(cls.__init__).bind(None, model, amount, **settings)
        except TypeError as err:
            raise TypeError(f"BiP.check(): {err}") from err
        arguments.apply_defaults()
        given = arguments.arguments
        model = unwrap_model(model)  # (in construction's order: the model's errors first)
        default_group(given["process_group"])  # its type
        cls._checked_plan(
            model, given["amount"], given["parameters"], given["exclude"], given["layout"],
            given["budget"], given["min_keep"], given["max_keep"], given["upper_lr"],
            given["upper_momentum"], given["upper_schedule"], given["steps"], given["implicit_coef"],
            given["score_init"], given["hold_pruned"],
        )  # fmt: skip

    @staticmethod
    def _checked_plan(
        model: nn.Module,
        amount: Amount | Mapping[str, Amount],
        parameters: Iterable[tuple[nn.Module, str]] | None,
        exclude: Iterable[str] | None,
        layout: str | Layout | None,
        budget: str,
        min_keep: Amount | None,
        max_keep: Amount | None,
        upper_lr: float,
        upper_momentum: float,
        upper_schedule: str,
        steps: int | None,
        implicit_coef: float,
        score_init: str,
        hold_pruned: bool,
    ) -> tuple[Layout, BiPConfig, list[Target], MaskLayout, int | None, dict[str, object]]:
        """Check every argument and bind the layout, without changing the model."""
        spec = as_layout(layout, budget)
        schedule = upper_schedule
        if implicit_coef is None:
            raise ValueError(
                "implicit_coef=None: BiP needs a number (1/gamma in theory, with gamma the weight decay "
                "of the weights' optimizer; 0 switches the implicit term off)"
            )
        if isinstance(implicit_coef, bool) or not (
            isinstance(implicit_coef, numbers.Real) and math.isfinite(implicit_coef) and implicit_coef >= 0
        ):
            raise ValueError(f"implicit_coef must be a finite number >= 0, got {implicit_coef!r}")
        if not isinstance(hold_pruned, bool):
            raise TypeError(f"hold_pruned must be a bool, got {hold_pruned!r}")
        # The upper-level settings and steps are validated by BiPConfig (global_prune's rules).
        cfg = BiPConfig(
            upper_lr=upper_lr, upper_momentum=upper_momentum, upper_schedule=schedule,
            implicit_coef=implicit_coef, score_init=score_init, min_keep=min_keep,
            steps=steps,
        )  # fmt: skip
        steps = cfg.steps
        if isinstance(amount, Mapping) and (min_keep is not None or max_keep is not None):
            name, value = ("min_keep", min_keep) if min_keep is not None else ("max_keep", max_keep)
            raise ValueError(
                f"{name}={value!r} bounds each tensor's share of one global ranking; amount={dict(amount)!r} "
                "gives every matching tensor its own amount instead: drop it, or pass one amount"
            )
        if isinstance(amount, Mapping) and isinstance(spec, Groups) and spec.budget == "global":
            raise ValueError(
                f"budget='global' (layout={spec!r}) ranks the {group_unit(spec.dim)} of all tensors "
                f"together; amount={dict(amount)!r} gives every matching tensor its own amount instead: "
                "drop one of them"
            )
        max_keep = _plain_number(max_keep)
        spec.check_budget(budget, cfg.min_keep, max_keep)
        spec.check_parameters(parameters)
        check_no_fsdp(model, "build torchbip.BiP on the whole model first, then call fully_shard")
        found = candidate_targets(
            model, parameters, None if parameters is not None else spec.default_parameters(model)
        )
        targets, amounts = _select(model, found, amount, exclude)  # before the checks: exclude a tied head
        check_targets(model, targets, leave_out=LEAVE_OUT_OR_EXCLUDE)  # (the tied-weights advice)
        check_binary_masks(targets)
        weights = [t.weight() for t in targets]
        if not bool(all_finite(weights)):
            bad = [t.fqn for t in targets if not bool(all_finite([t.weight()]))]
            raise ValueError(
                f"parameters names {', '.join(map(repr, bad))}, which holds NaN or infinite values; "
                "BiP's scores start from the weights' magnitudes: load or re-initialise the weights first"
            )
        allowed = [t.allowed() for t in targets]
        found_targets = targets
        bound = spec.bind(targets, amounts, allowed, cfg.min_keep, max_keep)
        targets = bound.kept_targets(targets)
        settings: dict[str, object] = {
            "layout": spec.shorthand,
            "amount": amount if not isinstance(amount, Mapping) else dict(amount),
            "upper_lr": cfg.upper_lr,
            "upper_momentum": cfg.upper_momentum,
            "upper_schedule": cfg.upper_schedule,  # (a plain str: BiPConfig's, not a str subclass)
            "steps": steps,
            "implicit_coef": float(cfg.implicit_coef),
            "score_init": str(cfg.score_init),
            "min_keep": cfg.min_keep,
            "max_keep": max_keep,
        }
        before = {t.fqn: _digest(a) for t, a in zip(found_targets, allowed, strict=True) if a is not None}
        # (a state without the entry comes from an earlier version, which did not record them)
        settings["pruned_before"] = {n: before[n] for n in (t.fqn for t in targets) if n in before}
        return spec, cfg, targets, bound, steps, settings

    def _apply(self, score_init: str) -> None:
        """Put every target in torch's pruned form and build the flat score state."""
        targets, layout = self.targets, self.layout
        scores = layout.init_scores([_current(t) for t in targets], score_init)
        keeps = layout.select(scores)
        layout.masks(keeps)  # the element masks, which apply() installs (Coupled builds them here)
        for i, (t, s, keep) in enumerate(zip(targets, scores, keeps, strict=True)):
            layout.apply(i, t.module, t.name, s, keep)
        device = targets[0].weight().device
        # One flat score buffer (and one for its gradient); the modules' score buffers are views.
        self.flat_scores = torch.cat([getattr(t.module, scores_name(t.name)).reshape(-1) for t in targets])
        self.flat_grad = torch.zeros_like(self.flat_scores)
        buffers = [getattr(t.module, scores_name(t.name)) for t in targets]
        self.score_views = split_like(self.flat_scores, buffers)
        self.grad_views = split_like(self.flat_grad, buffers)
        for t, view in zip(targets, self.score_views, strict=True):
            t.module._buffers[scores_name(t.name)] = view
        self.masks = [getattr(t.module, t.name + "_mask") for t in targets]
        self.origs = [t.weight() for t in targets]
        self.hooks = [pruning_hook(t.module, t.name) for t in targets]
        self.saved = [p.detach().clone() for p in self.origs] if self.hold_pruned else None
        # Fingerprints of weight_orig after the last step and at the first backward pass since
        # then that reached each tensor (None: none yet), kept for the first steps; see _check_order.
        # [steps still to check (0: done), steps seen in the other order]
        self._order_checks = [_ORDER_STEPS, 0]  # (a list: the capture closures read it)
        self.saved_sums = self._fingerprints()
        self.seen_sums: list[Tensor | None] = [None] * len(targets)
        # g summed over the backward passes since the last step (None: no gradient yet).
        self.captured: list[Tensor | None] = [None] * len(targets)
        self.owned = [False] * len(targets)  # whether captured[i] is a copy the pruner may write into
        self.fired = [False] * len(targets)
        self._capturing = [True]  # (a list: the capture closures read it without holding self)
        self.grad_seen = torch.zeros(len(targets), dtype=torch.bool, device=device)
        for i, hook in enumerate(self.hooks):
            assert hook is not None
            set_grad_capture(hook, GradCapture(self._capture_fn(i)))
        self.optimizer = torch.optim.SGD(
            [self.flat_scores],
            lr=float(self.settings["upper_lr"]),  # type: ignore[arg-type]
            momentum=float(self.settings["upper_momentum"]),  # type: ignore[arg-type]
            fused=True if self.flat_scores.dtype in (torch.float32, torch.float64)
            and self.flat_scores.device.type in ("cpu", "cuda") else None,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule_lambda(str(self.settings["upper_schedule"]), self.steps)
        )
        self._load_hooks = self._register_load_hooks()

    def _register_load_hooks(self) -> list[Any]:
        """A :class:`_LoadedWeights` post-hook on every pruned module; their handles."""
        return [
            t.module.register_load_state_dict_post_hook(_LoadedWeights(self, i))
            for i, t in enumerate(self.targets)
        ]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``copy.deepcopy``: the copy captures the gradients of its own copy of the model.

        (The model's hooks are copied without their capture, see
        :class:`~torchbip.method.GradCapture`, and without their load hooks, see
        :class:`_LoadedWeights`.)
        """
        self.__dict__.update(state)
        for handle in self.__dict__.get("_load_hooks", ()):
            hooks = handle.hooks_dict_ref()
            if hooks is not None and hooks.get(handle.id) is _ignore_load:
                handle.remove()  # a copied module's no-op hook (not a shallow copy's live one)
        self._load_hooks = []
        if not self._finished:
            self.saved_sums = self._fingerprints()
            self.seen_sums[:] = [None] * len(self.origs)
            for i, hook in enumerate(self.hooks):
                assert hook is not None
                set_grad_capture(hook, GradCapture(self._capture_fn(i)))
            self._load_hooks = self._register_load_hooks()

    def _capture_fn(self, index: int) -> Callable[[Tensor], None]:
        captured, fired, owned, on = self.captured, self.fired, self.owned, self._capturing
        origs, seen, checks = self.origs, self.seen_sums, self._order_checks
        parameters, key = self.targets[index].module._parameters, self.targets[index].name + "_orig"

        def capture(grad: Tensor) -> None:
            if not on[0]:
                return
            # weight_orig as the first backward pass since the step saw it (later ones: an LBFGS
            # closure may follow a change); not once FSDP2 replaced it by its shard
            if captured[index] is None and checks[0] > 0 and parameters.get(key) is origs[index]:
                seen[index] = _fingerprint(origs[index])
            # The first gradient is kept as autograd made it (no copy) when it is contiguous; the
            # pruner writes into it only once it owns a copy (a second backward pass, scaling, a
            # collective), so whoever else holds that tensor never sees it change.
            current, grad = captured[index], grad.detach()
            if grad.layout != torch.strided:  # nn.Embedding(sparse=True): made dense, a copy of our own
                grad = grad.to_dense()
                if current is None:
                    captured[index], owned[index], fired[index] = grad, True, True
                    return
            if current is None:
                own = not grad.is_contiguous()
                captured[index] = grad.contiguous() if own else grad
                owned[index] = own
            elif owned[index]:
                current.add_(grad)
            else:
                captured[index] = current + grad
                owned[index] = True
            fired[index] = True

        return capture

    def _own_captured(self) -> None:
        """Make the captured gradients the pruner's own copies, before writing into them."""
        for i, g in enumerate(self.captured):
            if g is not None and not self.owned[i]:
                self.captured[i] = g.clone()
                self.owned[i] = True

    # -- properties ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The fully qualified names of the pruned tensors, e.g. ``["0.weight", "2.weight"]``."""
        return [t.fqn for t in self.targets]

    @property
    def keeps(self) -> list[Tensor]:
        """The boolean element masks (``True``: kept), one per pruned tensor, read off the masks."""
        return [m != 0 for m in self.masks]

    @property
    def n_keep(self) -> int:
        """The number of entries (or groups) the masks keep in all."""
        return int(self.layout.n_keep)

    @property
    def sparsity(self) -> float:
        """The fraction of the pruned tensors' entries that finishing now would zero.

        With :class:`torchbip.Coupled` every tensor of a pruned channel counts, not only the
        readers that its training masks zero.
        """
        total = sum(m.numel() for m in self.masks)
        if not total:
            return 0.0
        final = self.layout.held_masks(self.masks)
        kept = torch.stack([m.count_nonzero() for m in final]).sum()  # one host sync
        return 1.0 - int(kept) / total

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` was called (the scores are gone; the object cannot step)."""
        return self._finished

    @property
    def capturing(self) -> bool:
        """Whether backward passes hand their gradients to this object (``True`` by default).

        Set it to ``False`` around backward passes that are not training, e.g. a validation loop
        that computes input gradients; gradients captured before stay.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> pruner = BiP(model, amount=0.5)
            >>> pruner.capturing = False
            >>> model(torch.randn(2, 4)).sum().backward()
            >>> pruner.has_grad
            False
        """
        return self._capturing[0]

    @capturing.setter
    def capturing(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"capturing must be a bool, got {value!r}")
        self._capturing[0] = value

    @property
    def has_grad(self) -> bool:
        """Whether a backward pass reached the pruned tensors since the last :meth:`step`."""
        return any(self.fired)

    def set_steps(self, steps: int) -> None:
        """Set the number of :meth:`step` calls the upper schedule spans, before the first step.

        For trainers that know the length of training only once it starts (the integrations in
        :mod:`torchbip.integrations` build the object earlier, so that a checkpoint loads into the
        pruned model). The schedule is the one given at construction, now spanning ``steps``.

        Args:
            steps: an int >= 1.

        Raises:
            ValueError: for a bad ``steps``.
            RuntimeError: after the first step (unless ``steps`` is unchanged).
        """
        if steps is None:
            raise ValueError("steps must be an int >= 1, got None")
        checked = BiPConfig(steps=steps).steps  # construction's rules (NumPy integers accepted)
        assert checked is not None
        steps = checked
        if steps == self.steps:
            return
        if self.step_count or self._finished:
            raise RuntimeError(
                f"BiP.set_steps({steps}) after {self.step_count} step(s): the schedule's length is set "
                "before the first step"
            )
        self.steps = steps
        self.settings["steps"] = steps
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, schedule_lambda(str(self.settings["upper_schedule"]), steps)
        )

    # -- the step ----------------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Forget the gradients captured since the last :meth:`step`.

        E.g. after a validation pass that ran backward by mistake, or before a skipped step.
        """
        self.captured[:] = [None] * len(self.captured)
        self.owned[:] = [False] * len(self.owned)
        self.fired[:] = [False] * len(self.fired)
        self.seen_sums[:] = [None] * len(self.seen_sums)

    @torch.no_grad()
    def step(
        self,
        upper_grads: Sequence[Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        scale: float | None = None,
        skip: bool = False,
    ) -> bool:
        r"""One upper-level step: move the scores along the implicit gradient and re-select masks.

        Args:
            upper_grads: the element-wise upper gradients :math:`d\ell/dm`, one per pruned
                tensor in :attr:`names` order, when the caller computed them itself (as
                :func:`torchbip.global_prune` does with :mod:`torch.func`). By default they are
                computed from the gradients captured in the backward passes since the last step.
            scaler: the :class:`torch.amp.GradScaler` of a mixed-precision loop. The captured
                gradients are divided by its scale, and the step is skipped when the scaler
                skipped the optimizer's step (an overflow). Call :meth:`step` after
                ``scaler.step(optimizer)`` and before ``scaler.update()``.
            scale: the loss scale the captured gradients carry, for loops whose scaler
                :meth:`step` cannot read at the right time (a trainer that calls
                ``scaler.update()`` itself); the gradients are divided by it.
            skip: skip this step because the optimizer's step was skipped (an overflow under a
                loss scaler): the captured gradients are dropped and the optimizer's changes to
                pruned entries undone; counted in :attr:`skipped_steps`.

        Returns:
            ``True`` if the scores and masks were updated, ``False`` if the step was skipped.

        Raises:
            RuntimeError: after :meth:`finish`; when no backward pass reached the model since the
                last step; when a scaler has not stepped yet; when the parameters were replaced
                (other than by FSDP2's ``fully_shard`` with its default sharding) or a pruned module
                is no longer in the model (replaced, e.g. ``model[2] = nn.Linear(...)``); on a
                distributed rank when another rank's step failed.
            ValueError: in the first step, for pruned tensors that got no gradient (their
                module's forward is never called, or the loss does not use them), or for
                ``upper_grads`` of the wrong number or shapes.
            TypeError: for ``upper_grads`` that is not a sequence of tensors, a ``scaler`` that
                is not a loss scaler, or a ``skip`` that is not a bool.
            FloatingPointError: when the gradients hold a NaN or an infinity (without a scaler).
        """
        try:
            self._check_usable()  # (a rank whose model was converted tells the others, below)
            if not isinstance(skip, bool):
                raise TypeError(f"skip must be a bool, got {skip!r}")
            if upper_grads is not None and (
                not isinstance(upper_grads, Sequence)
                or isinstance(upper_grads, str)
                or not all(isinstance(g, Tensor) for g in upper_grads)
            ):
                raise TypeError(
                    f"upper_grads must be a sequence of tensors (one per pruned tensor) or None, got "
                    f"{describe(upper_grads)}"
                    + (" (pass a loss scaler as scaler=...)" if _is_scaler(upper_grads) else "")
                )
            if scaler is not None and not _is_scaler(scaler):
                raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {describe(scaler)}")
            bad_scale = (
                isinstance(scale, bool | np.bool_)
                or not isinstance(scale, numbers.Real)
                or not 0 < scale < math.inf  # also NaN
            )
            if scale is not None and bad_scale:
                raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
            if scale is not None and scaler is not None:
                raise ValueError("pass either scaler= or scale=, not both")
            scaled = upper_grads is None and scaler is not None and scaler.is_enabled()
            if scaled and not skip:  # the scaler's skip goes through the step's collective below
                assert scaler is not None
                scale, scaler_skips = grad_scaler_state(scaler)
        except (TypeError, ValueError, RuntimeError):
            if upper_grads is None:
                self._fail_collective()  # the other ranks raise instead of waiting for this one
            raise
        if skip:
            if upper_grads is None:
                self._skip_collective()
            self.zero_grad()
            self._restore_pruned()
            self._remember_weights()
            self.skipped_steps += 1
            return False
        if scaled:
            assert scale is not None
            sums = self.prepare(inv_scale=1.0 / scale)
            skip = scaler_skips
        elif upper_grads is None and scale is not None:
            sums = self.prepare(inv_scale=1.0 / float(scale))
        else:
            sums = self.prepare(upper_grads)
        if skip or not bool(torch.isfinite(sums).all()):
            self.zero_grad()
            if skip:
                self._restore_pruned()
                self._remember_weights()
                self.skipped_steps += 1
                return False
            bad = [n for n, s in zip(self.names, sums.tolist(), strict=True) if not math.isfinite(s)]
            found = f"BiP.step(): the upper gradient of {', '.join(map(repr, bad))} holds NaN or infinite "
            if upper_grads is None and scale is not None:  # a loss scaler did not skip: it never saw it
                origs = ", ".join(repr(self.targets[self.names.index(n)].orig_fqn) for n in bad)
                raise FloatingPointError(
                    found + f"values at step {self.step_count}, but the loss scaler did not skip the "
                    "step: a scaler sees only the gradients of the optimizers it steps, and "
                    f"{origs} is in none of them; put it in the optimizer "
                    "(with lr=0 to keep its weights fixed) so that the scaler skips the step and "
                    "lowers its scale"
                )
            raise FloatingPointError(
                found + f"values at step {self.step_count} (the loss's gradients overflowed or the "
                "loss is not finite); under float16 autocast pass the GradScaler: "
                "pruner.step(scaler=scaler)"
            )
        self.apply()
        return True

    @torch.no_grad()
    def prepare(self, upper_grads: Sequence[Tensor] | None = None, *, inv_scale: float = 1.0) -> Tensor:
        r"""The first half of :meth:`step`: write the score gradients, return one sum per tensor.

        For drivers that check the gradients themselves (:func:`torchbip.global_prune` reads the
        sums with its loss, in one host sync): call :meth:`prepare`, check, then :meth:`apply`.

        Args:
            upper_grads: see :meth:`step`; ``None`` uses the captured gradients (averaged over the
                process group, if any).
            inv_scale: a factor for the captured gradients (``1 / scale`` of a loss scaler).

        Returns:
            A 1-D float64 tensor: the sum of each tensor's score gradient (NaN or infinite when
            the gradient is), on the scores' device, without a host sync.
        """
        self._check_usable()
        if upper_grads is None:
            group = self.group  # looked up once per step (see the property)
            error = self._no_gradient_error()
            if error is not None and group is None:
                raise error
            fired = [int(f) for f in self.fired]
            for i, (g, mask) in enumerate(zip(self.captured, self.masks, strict=True)):
                if g is None:  # no gradient reached this tensor since the last step
                    self.captured[i] = torch.zeros_like(mask, memory_format=torch.contiguous_format)
                    self.owned[i] = True
            if group is not None:
                # One collective for the mean gradients, every rank's failure and which tensors
                # each rank saw a gradient of: a rank that fails does not leave the others waiting.
                self._own_captured()  # the mean is written in place
                failed = all_reduce_mean(self._captured(), group, error is not None, fired)
                if error is not None:
                    raise error
                if failed:
                    raise RuntimeError(
                        f"{failed} other rank(s) of the process group failed in BiP.step() or skipped "
                        "this step (step(skip=True)); every rank must step or skip together"
                    )
            self._check_first_step(fired)
            self._check_order()
            self._upper_grads_from_captured(inv_scale)
        else:
            self._order_checks[0] = 0  # (a driver with its own gradients: no capture to check)
            self._write_score_grads(upper_grads)
        sums = tensor_sums(self.grad_views)
        self.grad_seen |= sums != 0
        return sums

    @torch.no_grad()
    def apply(self) -> None:
        """The second half of :meth:`step`: update the scores and re-select the masks.

        Uses the score gradients that :meth:`prepare` wrote, and undoes the optimizer's changes to
        pruned entries.

        Raises:
            RuntimeError: after :meth:`finish`.
        """
        self._check_not_finished()
        self.flat_scores.grad = self.flat_grad
        self.optimizer.step()
        self.scheduler.step()
        self._restore_pruned()
        self.update_masks()
        if self.saved is not None:
            self._store_saved()
        self._remember_weights()
        self.zero_grad()
        self.step_count += 1

    def _fail_collective(self) -> int | None:
        """This rank's part of the step's collective when it does not step (zeros, failed).

        Returns:
            How many ranks did not step, or ``None`` without a process group.
        """
        group = self._group_if_any()
        if group is None:
            return None
        zeros = [torch.zeros_like(m, memory_format=torch.contiguous_format) for m in self.masks]
        return all_reduce_mean(zeros, group, True, [0] * len(self.masks))

    def _skip_collective(self) -> None:
        """``step(skip=True)`` under a process group: every rank must skip the same step.

        The ranks that skip contribute the failure flag of the step's collective, so a rank that
        steps learns of them; a rank that skips alone raises.
        """
        skipped = self._fail_collective()
        if skipped is None:
            return
        world = dist.get_world_size(self._group_if_any())
        if skipped != world:
            self.zero_grad()
            raise RuntimeError(
                f"BiP.step(skip=True) on this rank while {world - skipped} other rank(s) of the process "
                "group stepped: every rank must skip the same steps (a loss scaler's overflow is the "
                "same on every rank under DDP)"
            )

    def _group_if_any(self) -> Any:
        """:attr:`group`, or ``None`` where that group is gone (nothing to tell then)."""
        try:
            return self.group
        except RuntimeError:
            return None

    def _upper_grads_from_captured(self, inv_scale: float) -> None:
        r""":math:`\theta \odot g - c\, m \odot g \odot g` from the captured :math:`g`, as score grads."""
        c = self.implicit_coef
        if inv_scale != 1.0:
            self._own_captured()
        captured = self._captured()
        if inv_scale != 1.0:
            for g in captured:
                g.mul_(inv_scale)
        saved = self.saved

        wide = self.flat_scores.dtype  # (float32 for a bfloat16 or float16 model: computed in it)

        def theta(i: int) -> Tensor:  # one gather at a time for sharded tensors
            return (saved[i] if saved is not None else self._full(i)).to(wide)

        if self.layout.elementwise:  # g * (theta - c * m * g), written into the score gradient
            for i, (g, mask, out) in enumerate(zip(captured, self.masks, self.grad_views, strict=True)):
                g = g.to(wide)
                if c:
                    torch.addcmul(theta(i), mask.to(wide), g, value=-c, out=out).mul_(g)
                else:
                    torch.mul(theta(i), g, out=out)
            return
        elements = (
            (i, torch.addcmul(theta(i), mask.to(wide), g.to(wide), value=-c).mul_(g) if c else theta(i) * g)
            for i, (g, mask) in enumerate(zip(captured, self.masks, strict=True))
        )
        self.layout.score_grads(elements, self.grad_views, self.masks)

    def _captured(self) -> list[Tensor]:
        out = [g for g in self.captured if g is not None]
        assert len(out) == len(self.captured), "prepare() fills in every captured gradient"
        return out

    def score_grad_buffers(self) -> list[Tensor] | None:
        r"""The score-gradient buffers, one per pruned tensor, when the layout has one score per entry.

        A driver that computes :math:`d\ell/dm` itself may write it into these and pass them to
        :meth:`prepare` (or :meth:`step`), which then copies nothing. ``None`` for layouts whose
        scores are reduced (groups).
        """
        return list(self.grad_views) if self.layout.elementwise else None

    def _write_score_grads(self, upper_grads: Sequence[Tensor]) -> None:
        if len(upper_grads) != len(self.targets):
            raise ValueError(
                f"upper_grads has {len(upper_grads)} tensors, expected {len(self.targets)} (one per name in "
                f"{self.names})"
            )
        for i, (g, orig) in enumerate(zip(upper_grads, self.origs, strict=True)):
            if tuple(g.shape) != tuple(orig.shape):
                raise ValueError(
                    f"upper_grads[{i}] has shape {tuple(g.shape)}, expected {tuple(orig.shape)} "
                    f"(the shape of {self.names[i]!r})"
                )
        written = [(i, g) for i, g in enumerate(upper_grads) if g is not self.grad_views[i]]
        if written:  # gradients that are not already the score-gradient buffers themselves
            self.layout.score_grads(written, self.grad_views, self.masks)

    def _check_not_finished(self) -> None:
        if self._finished:
            raise RuntimeError("this BiP object has finished (finish() was called); build a new one")

    def _check_usable(self) -> None:
        self._check_not_finished()
        self._sync_params()

    def _sync_params(self) -> None:
        """Check the model's tensors: every mask buffer and ``weight_orig`` is the one BiP was built on.

        (Or, for ``weight_orig``, FSDP2's shard of it.) Every pruned module must still be in the
        model (at its place, or anywhere else in it, e.g. inside a wrapper).
        """
        gone = self._modules_gone()
        if gone:
            t = gone[0]
            raise RuntimeError(
                f"the module {t.module_fqn!r} that holds the pruned tensor {t.fqn!r} is no longer in the "
                "model (it was replaced or removed after BiP was built), so BiP's masks are no longer "
                "the model's; call finish() on this BiP object (it releases the model as it is now) and "
                "build a new BiP"
            )
        for t, mask in zip(self.targets, self.masks, strict=True):
            if t.module._buffers.get(t.name + "_mask") is not mask:
                raise RuntimeError(
                    f"the mask buffer {t.fqn + '_mask'!r} was replaced after BiP was built, so BiP's "
                    "masks are no longer the model's: by model.to(), .cuda(), .half() or .double() "
                    "(move and convert the model first, then build BiP), by another "
                    "torch.nn.utils.prune call on the tensor, or by a second BiP on the model; call "
                    "finish() on this BiP object (it releases the model as it is now) and build a new BiP"
                )
        for i, (t, orig) in enumerate(zip(self.targets, self.origs, strict=True)):
            current = t.module._parameters.get(t.name + "_orig")
            if current is orig:
                continue
            if current is not None and _is_dtensor(current) and not _is_dtensor(orig):
                self._adopt_shard(i, current)
                continue
            raise RuntimeError(
                f"the parameter {t.orig_fqn!r} was replaced after BiP was built (only FSDP2's "
                "fully_shard may replace it, by its shard; FSDP1's flat parameters, model.to_empty() "
                "and load_state_dict(assign=True) after construction are not supported; finish() "
                "releases the model as it is now)"
            )

    def _adopt_shard(self, index: int, shard: Tensor) -> None:
        """Take over the sharded ``weight_orig`` that FSDP2's ``fully_shard`` put in place."""
        name = self.targets[index].orig_fqn
        placements = tuple(getattr(shard, "placements", ()))
        mesh = getattr(shard, "device_mesh", None)
        if (
            mesh is None
            or mesh.ndim != 1
            or len(placements) != 1
            or type(placements[0]).__name__ != "Shard"
            or getattr(placements[0], "dim", None) != 0
        ):
            raise RuntimeError(
                f"the parameter {name!r} is sharded as {placements} on {mesh}: BiP supports FSDP2's "
                "fully_shard with its default sharding (Shard(0) on a 1-D mesh)"
            )
        if tuple(shard.shape) != tuple(self.masks[index].shape):
            raise RuntimeError(
                f"the sharded parameter {name!r} has the global shape {tuple(shard.shape)}, expected "
                f"{tuple(self.masks[index].shape)}"
            )
        ranks = 1 if self.group is None else dist.get_world_size(self.group)
        if ranks != mesh.size():
            raise RuntimeError(
                f"the parameter {name!r} is sharded over {mesh.size()} ranks, but BiP was built with "
                f"process_group={self.group!r}: build it on every rank of the FSDP mesh with the "
                "default process_group"
            )
        self.origs[index] = shard

    def _rows(self, index: int) -> tuple[Tensor, slice] | None:
        """This rank's shard of a sharded ``weight_orig`` and the rows it holds; ``None`` if whole."""
        orig = self.origs[index]
        if not _is_dtensor(orig):
            return None
        local = orig.to_local()  # type: ignore[attr-defined]  # under no_grad: the shard itself
        mesh = orig.device_mesh  # type: ignore[attr-defined]
        rows = orig.shape[0]
        chunk = -(-rows // mesh.size())  # torch.chunk's split of dim 0, as fully_shard shards
        start = min(mesh.get_local_rank() * chunk, rows)
        stop = min(start + chunk, rows)
        if local.shape[0] != stop - start:
            raise RuntimeError(
                f"the shard of {self.targets[index].orig_fqn!r} holds {local.shape[0]} rows, expected "
                f"rows {start}:{stop} of {rows}"
            )
        return local, slice(start, stop)

    def _full(self, index: int) -> Tensor:
        """The whole value of ``weight_orig`` (gathered from the ranks when it is sharded)."""
        orig = self.origs[index]
        return orig.full_tensor() if _is_dtensor(orig) else orig.detach()  # type: ignore[attr-defined]

    def _store_saved(self) -> None:
        """``saved`` = the current ``weight_orig`` (one gather per sharded tensor)."""
        assert self.saved is not None
        for i, saved in enumerate(self.saved):
            copy_into(saved, self._full(i))

    def _reload_saved(self, index: int, module: nn.Module) -> None:
        r"""After a ``load_state_dict`` into a pruned module: hold the ``weight_orig`` it loaded.

        (``saved`` is :math:`\theta` of the next upper gradient and the values that pruned entries
        keep; a load into another module, e.g. a shallow copy sharing the hooks, is not BiP's.)
        """
        target = self.targets[index]
        if self._finished or self.saved is None or module is not target.module:
            return
        current = module._parameters.get(target.name + "_orig")
        if current is not self.origs[index]:
            if current is None or not _is_dtensor(current) or _is_dtensor(self.origs[index]):
                return  # replaced (load_state_dict(assign=True)): the next step refuses it
            try:
                self._adopt_shard(index, current)  # FSDP2's shard, loaded before the first step
            except RuntimeError:
                return  # the next step names the problem
        with torch.no_grad():
            copy_into(self.saved[index], self._full(index))
        if self._order_checks[0] > 0 and not _is_dtensor(current):
            self.saved_sums[index] = _fingerprint(self.origs[index])

    def _check_order(self) -> None:
        r"""Warn (once) when :meth:`step` is called before ``optimizer.step()``, in the first steps.

        The weights' values tell: in the documented order they change after the backward pass
        (the optimizer's step) and before :meth:`step`; called the other way round, they changed
        after the last :meth:`step` and before the forward pass and not since, and
        :math:`\theta` of the upper gradient is one optimizer step older than the weights the
        loss saw. Each ``weight_orig`` is compared by a float64 sum taken after the last step, at
        the first backward pass since then (an optimizer that evaluates a closure several times,
        as LBFGS does, runs later ones on weights it changed itself) and now; values, not
        autograd's version counters, which fused optimizers and writes through ``.data`` leave
        unchanged. The order is a property of the loop: one step in which the weights moved after
        the backward pass settles the documented order; :data:`_ORDER_CHECKS` steps that look the
        other way warn (one alone may be an edit between steps followed by an optimizer step that
        moved nothing, as in a warm-up from a learning rate of 0). At most :data:`_ORDER_STEPS`
        steps are checked (a sum of every pruned tensor, twice per step); later ones cost nothing.
        """
        checks = self._order_checks
        if checks[0] <= 0:
            return
        checks[0] -= 1
        compared = [
            (last, seen, _fingerprint(orig))
            for orig, last, seen in zip(self.origs, self.saved_sums, self.seen_sums, strict=True)
            if last is not None and seen is not None and not _is_dtensor(orig)
        ]
        if not compared:
            return
        device = compared[0][0].device
        values = torch.stack([v.to(device) for triple in compared for v in triple]).view(-1, 3).tolist()
        if any(seen != now for _, seen, now in values):  # the optimizer moved them after the backward pass
            checks[0] = 0  # the documented order
            return
        if any(last != seen for last, seen, _ in values):  # moved before the forward pass only
            checks[1] += 1
        if checks[1] >= _ORDER_CHECKS:
            checks[0] = 0
            warnings.warn(
                "BiP.step() is called before optimizer.step(): the weights changed after the last "
                "BiP.step() and before the forward pass, so the upper gradient uses weights one "
                "optimizer step older than the loss saw; call pruner.step() after optimizer.step()",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def _fingerprints(self) -> list[Tensor | None]:
        """Each ``weight_orig``'s fingerprint (``None`` for shards, and after the checked steps)."""
        if self._order_checks[0] <= 0:
            return [None] * len(self.origs)
        return [None if _is_dtensor(orig) else _fingerprint(orig) for orig in self.origs]

    def _remember_weights(self) -> None:
        """Take the weights' fingerprints after a step, while the order is still checked."""
        self.saved_sums = self._fingerprints()

    def _no_gradient_error(self) -> RuntimeError | None:
        """The error for a step with no gradient of any pruned tensor since the last one."""
        if any(self.fired):
            return None
        return RuntimeError(
            "BiP.step() found no gradient of the pruned tensors since the last step: call it after "
            "loss.backward() (and optimizer.step()), on the model this BiP object was built on, in "
            "train mode with gradients enabled"
        )

    def _check_first_step(self, fired: Sequence[int]) -> None:
        """In the first step every pruned tensor must have had a gradient (on some rank).

        A refused step drops the captured gradients (the next step counts only its own batches).
        """
        if self.step_count == 0 and not all(fired):
            self.zero_grad()
            names = ", ".join(repr(n) for n, f in zip(self.names, fired, strict=True) if not f)
            frozen = [
                t.orig_fqn
                for t, f in zip(self.targets, fired, strict=True)
                if not f and not getattr(t.module._parameters.get(t.name + "_orig"), "requires_grad", True)
            ]
            if frozen:
                raise ValueError(
                    f"parameters names {names}, which got no gradient in the first backward pass: "
                    f"{', '.join(map(repr, frozen))} has requires_grad=False, so autograd computes no "
                    "gradient at the masked weight, which the scores need; set requires_grad=True (and "
                    "leave it out of the optimizer to keep its weights fixed) or leave it out (exclude=...)"
                )
            raise ValueError(
                f"parameters names {names}, which got no gradient in the first backward pass: the "
                "module's forward is never called (its parent reads the tensor directly, as "
                "nn.MultiheadAttention does with out_proj) or the loss does not use it; leave it out "
                "(exclude=...)"
            )

    @torch.no_grad()
    def restore_pruned(self) -> None:
        """Undo what the weights' optimizer did to pruned entries since the last step.

        :meth:`step` (:meth:`apply`) does it anyway; a driver that reads the weights between the
        optimizer's step and :meth:`step` (a second batch's backward pass, as
        :func:`torchbip.global_prune`'s two-batch mode runs) calls it first. A no-op with
        ``hold_pruned=False``.
        """
        self._check_usable()
        self._restore_pruned()

    def _restore_pruned(self) -> None:
        """Undo what the optimizer did to pruned entries."""
        if self.saved is None:
            return
        held = self.layout.held_masks(self.masks)  # (Coupled: every tensor of a pruned channel)
        for i, (orig, mask, saved) in enumerate(zip(self.origs, held, self.saved, strict=True)):
            shard = self._rows(i)
            if shard is None:
                _keep_or_restore(orig.data, mask, saved)
            else:
                local, rows = shard
                _keep_or_restore(local, mask[rows], saved[rows])

    @torch.no_grad()
    def update_masks(self) -> None:
        """Set every mask to the selection (top-k) of the current scores.

        Raises:
            RuntimeError: after :meth:`finish` (the masks are final then).
        """
        self._check_not_finished()
        try:
            self.layout.write_masks(self.score_views, self.flat_scores, self.masks)
        except FloatingPointError as err:
            raise FloatingPointError(f"at step {self.step_count}: {err}") from err

    # -- reports and the end -------------------------------------------------------------------

    def report(self) -> SparsityReport:
        """The sparsity of every pruned tensor now, in the order of ``model.named_modules()``.

        A tensor whose module is no longer in the model (replaced after BiP was built) is left out.
        """
        gone = {id(t) for t in self._modules_gone()}
        return in_model_order(
            self.model,
            (
                (t.module, t.fqn, TensorSparsity(m.numel(), int((m == 0).sum())))
                for t, m in zip(self.targets, self.masks, strict=True)
                if id(t) not in gone
            ),
        )

    def _modules_gone(self) -> list[Target]:
        """The targets whose module is no longer in the model (replaced or removed after construction)."""
        gone = [t for t in self.targets if _submodule(self.model, t.module_fqn) is not t.module]
        if gone:  # a module moved elsewhere in the model (e.g. into a wrapper) is still pruned by BiP
            present = {id(m) for m in self.model.modules()}
            gone = [t for t in gone if id(t.module) not in present]
        return gone

    def finish(self, *, as_loaded: bool = False) -> SparsityReport:
        """Leave exactly torch's pruned form: drop the scores and the gradient capture.

        Pruned entries of ``weight_orig`` get back the values they had when they were pruned.
        Afterwards :func:`torch.nn.utils.prune.remove` makes the pruning permanent.

        Args:
            as_loaded: keep the masks and ``weight_orig`` exactly as they are (no values put
                back, no final selection from the scores): for a model into which a checkpoint
                saved after :meth:`finish` was loaded, whose masks are final already.

        When the model's masks or ``weight_orig`` were replaced after construction (``model.to()``
        or ``.double()``, a :mod:`torch.nn.utils.prune` call on a pruned tensor), or a pruned module
        was replaced in the model, which :meth:`step` refuses, :meth:`finish` warns and releases the
        model as it is now: it drops the scores and the gradient capture and changes nothing else
        (no final selection, no values put back), so that a new :class:`BiP` can be built on the
        model. The report leaves out the tensors of modules that are no longer in the model.

        Returns:
            The final :class:`~torchbip.SparsityReport`.
        """
        if self._finished:
            return self.report()
        try:
            self._sync_params()
        except RuntimeError as err:
            return self._release(err)
        with torch.no_grad():
            final = None if as_loaded else self.layout.finish_masks(self.score_views)
            if not as_loaded:
                self._restore_pruned()
            if final is not None:  # the layout's final form of the same selection
                for mask, element in zip(self.masks, final, strict=True):
                    copy_into(mask, element)
            for i, (t, hook) in enumerate(zip(self.targets, self.hooks, strict=True)):
                assert hook is not None
                set_grad_capture(hook, None)
                if scores_name(t.name) in t.module._buffers:
                    delattr(t.module, scores_name(t.name))
                # torch's orig * mask, of the whole weight (FSDP2 gathers it again before a forward)
                setattr(t.module, t.name, self._full(i) * getattr(t.module, t.name + "_mask"))
        self._end()
        report = self.report()
        if not isinstance(self.settings["amount"], Mapping):  # (a tensor's own amount is what it asked)
            report.warn_if_pruned_away(
                "BiP",
                "lower amount, set min_keep (a floor in every tensor) or leave the tensor out",
                before=self._whole_before,
            )
        return report

    def _release(self, reason: RuntimeError) -> SparsityReport:
        """:meth:`finish` for a model whose tensors were replaced: drop what BiP added, nothing else."""
        warnings.warn(
            f"BiP.finish(): {reason}. The model is released as it is: the scores and the gradient "
            "capture are dropped, the masks and weights are left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )
        masks = []
        for t, hook, mask in zip(self.targets, self.hooks, self.masks, strict=True):
            assert hook is not None
            set_grad_capture(hook, None)
            current = pruning_hook(t.module, t.name)
            if current is hook or hook in getattr(current, "_pruning_methods", ()):
                drop_scores(t.module, t.name)  # (not the scores of a method on top of BiP's)
            now = t.module._buffers.get(t.name + "_mask")
            if now is None:  # pruning made permanent (prune.remove): the weight's zeros
                weight = getattr(t.module, t.name, None)
                now = (weight != 0) if isinstance(weight, Tensor) else mask
            masks.append(now)
        self.masks = masks
        self._end()
        return self.report()

    def _end(self) -> None:
        """Mark the object finished and drop its per-step state."""
        self._finished = True
        self.captured, self.saved = [], None
        self._world, self._group = False, None  # no collective after the end
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks = []

    @property
    def group(self) -> Any:
        """The process group :meth:`step` averages over (``None``: no communication).

        Raises:
            RuntimeError: when BiP was built on the default group and that group was destroyed.
        """
        if not self._world:
            return self._group
        if not dist.is_initialized():
            raise RuntimeError(
                "the default process group that BiP averages over was destroyed "
                "(dist.destroy_process_group()); call step() before destroying it"
            )
        return dist.group.WORLD

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The scores, masks, optimizer, schedule and step, as tensors and plain types.

        ``torch.load(..., weights_only=True)`` reads it back. Save it next to the model's and the
        weights' optimizer's ``state_dict`` after a :meth:`step`.

        Raises:
            RuntimeError: after :meth:`finish` (the masks are final then: save the model's
                ``state_dict``, which holds them).
        """
        if self._finished:
            raise RuntimeError(
                "BiP.state_dict() after finish(): this BiP object has dropped its scores and held "
                "weights; the final masks are in the model's state_dict (save that)"
            )
        return {
            "format": STATE_FORMAT,
            "names": self.names,
            "layout": self.layout.describe(),
            "settings": {k: v for k, v in self.settings.items() if k != "amount"},
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "scores": self.flat_scores.detach().clone(),
            "masks": [k.clone() for k in self.keeps],
            "saved": None if self.saved is None else [s.clone() for s in self.saved],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # not the live momentum
            "scheduler": self.scheduler.state_dict(),
        }

    state_dict_keys: tuple[str, ...] = (
        "format", "names", "layout", "settings", "step", "skipped_steps", "scores", "masks", "saved",
        "optimizer", "scheduler",
    )  # fmt: skip
    """The keys of every :meth:`state_dict`."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also the masks of the model).

        ``state`` is copied, not kept: later steps leave it as it was, so one state can be loaded
        again (a rollback) or into several pruners.

        Everything is checked before anything changes: the format, the tensors' names, the
        layout and settings, the shapes, and that the masks are the selection of the scores (as
        every state this object writes holds them).

        Under a process group every rank loads or every rank raises (one ``all_gather_object``):
        a state refused on one rank, or ranks given different states, leave every rank as it was.

        Raises:
            ValueError: for a state of another format, model, layout or budget, or a damaged or
                truncated one (the message names the difference); nothing is changed then.
            RuntimeError: after :meth:`finish`; on a rank whose state loads when another rank's
                was refused.
        """
        group = None if self._finished else self._group_if_any()
        if group is None:
            self._load_checked(state, *self._check_state(state))
            return
        error: Exception | None = None
        mine: dict[str, Any] = {}
        try:
            checked = self._check_state(state)
            mine = {"state": f"step {state['step']}, scores {_bytes_digest(checked[0])}"}
        except (ValueError, RuntimeError, TypeError) as err:
            error = err
        agree(mine, error, group, "BiP.load_state_dict", {"state": "state loaded (step, scores digest)"})
        self._load_checked(state, *checked)

    def _check_state(self, state: Mapping[str, Any]) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
        """Check a state for :meth:`load_state_dict`; its scores, masks and held weights."""
        self._check_usable()
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        if found != STATE_FORMAT:
            raise ValueError(f"state is not a BiP state_dict (format {found!r}, expected {STATE_FORMAT!r})")
        missing = [key for key in self.state_dict_keys if key not in state]
        if missing:
            raise ValueError(f"state lacks {missing} (a damaged or truncated BiP state_dict)")
        if list(state["names"]) != self.names:
            raise ValueError(
                f"state was saved for the tensors {state['names']}, this BiP prunes {self.names}"
            )
        if state["layout"] != self.layout.describe():
            mine_layout, saved_layout = self.layout.describe(), state["layout"]
            changed = (
                {k for k in {*mine_layout, *saved_layout} if mine_layout.get(k) != saved_layout.get(k)}
                if isinstance(saved_layout, Mapping)
                else set()
            )
            hint = (
                " (only the per-tensor floors or caps differ: a float min_keep/max_keep is a fraction of "
                "the whole tensor, also of one pruned before; a state saved by an earlier version of "
                "torchbip counted the remaining entries of such a tensor and cannot continue here: "
                "start the run again)"
                if changed and changed <= {"floors", "caps"}
                else ""
            )
            raise ValueError(
                f"state was saved for the layout {saved_layout}, this BiP has {mine_layout}{hint}"
            )
        if not isinstance(state["settings"], Mapping):
            raise ValueError(f"state['settings'] must be a dict, got {describe(state['settings'])}")
        mine = {k: v for k, v in self.settings.items() if k != "amount"}
        unrecorded = "pruned_before" not in state["settings"]  # an earlier version did not record them
        recorded = mine.get("pruned_before")
        earlier_here = set(recorded) if isinstance(recorded, Mapping) else set()  # (torch pruned them before)
        if unrecorded:
            mine.pop("pruned_before", None)  # its masks are checked against this model's below
        if state["settings"].get("pruned_before") != mine.get("pruned_before"):
            saved_before = state["settings"].get("pruned_before")
            saved_before = saved_before if isinstance(saved_before, Mapping) else {}
            here: Mapping[str, str] = mine.get("pruned_before") or {}  # type: ignore[assignment]
            names = sorted(n for n in {*saved_before, *here} if saved_before.get(n) != here.get(n))
            raise ValueError(
                f"state was saved on tensors that torch.nn.utils.prune had pruned before BiP with other "
                f"masks than this model's ({', '.join(map(repr, names))}): {_EARLIER_MASKS_ADVICE}"
            )
        differ = sorted(k for k in mine if state["settings"].get(k) != mine[k])
        if differ:
            details = ", ".join(f"{k}: saved {state['settings'].get(k)!r}, here {mine[k]!r}" for k in differ)
            raise ValueError(f"state was saved with other settings ({details})")
        scores = state["scores"]
        if not isinstance(scores, Tensor) or scores.shape != self.flat_scores.shape:
            found_scores = scores.numel() if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"state holds {found_scores} scores, expected {self.flat_scores.numel()}")
        if scores.dtype != self.flat_scores.dtype:
            earlier = scores.dtype in (torch.float16, torch.bfloat16) and all(
                o.dtype == scores.dtype for o in self.origs
            )
            raise ValueError(
                f"state['scores'] are {scores.dtype}, this BiP's are {self.flat_scores.dtype} "
                + (
                    "(saved by an earlier torchbip, which kept the scores of a float16 or bfloat16 "
                    "model in the model's dtype; they are float32 now, so the state cannot continue "
                    "the same run: start a new one)"
                    if earlier
                    else "(the model was saved in another precision: convert the model before "
                    "building BiP, as it was saved)"
                )
            )
        keeps = self._checked_tensors(state["masks"], self.masks, "masks")
        if not all(k.dtype == torch.bool or bool(((k == 0) | (k == 1)).all()) for k in keeps):
            raise ValueError("state['masks'] holds values other than 0 and 1")
        if (state["saved"] is None) != (self.saved is None):
            raise ValueError(
                f"state was saved with hold_pruned={state['saved'] is not None}, this BiP has "
                f"hold_pruned={self.hold_pruned}"
            )
        saved = None if state["saved"] is None else self._checked_tensors(state["saved"], self.origs, "saved")
        for name, value, orig in zip(self.names, saved or (), self.origs, strict=False):
            if value.dtype != orig.dtype:
                raise ValueError(f"state['saved'] of {name!r} is {value.dtype}, its weight_orig {orig.dtype}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"state['saved'] of {name!r} holds NaN or infinite values")
        check_optimizer_state(state["optimizer"], self.optimizer, "state['optimizer']")
        _check_scheduler_state(state["scheduler"])
        for key in ("step", "skipped_steps"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"state[{key!r}] must be a count (int >= 0), got {state[key]!r}")
        views = split_like(scores.to(self.flat_scores), self.score_views)
        try:
            expected = self.layout.masks(self.layout.select(views))
        except FloatingPointError as err:
            raise ValueError(f"state['scores'] cannot be ranked: {err}") from err
        for name, keep, element in zip(self.names, keeps, expected, strict=True):
            if not torch.equal(keep.to(element.device) != 0, element):
                if unrecorded and name in earlier_here:
                    raise ValueError(
                        f"state was saved by an earlier version, which did not record the masks of "
                        f"torch.nn.utils.prune before BiP, and its masks of {name!r} keep entries that "
                        f"this model's earlier pruning removed: {_EARLIER_MASKS_ADVICE}"
                    )
                raise ValueError(
                    f"state['masks'] of {name!r} is not the selection of state['scores'] (a damaged or "
                    "edited state): every state_dict() holds the masks its scores select"
                )
        return scores, keeps, saved

    def _load_checked(
        self, state: Mapping[str, Any], scores: Tensor, keeps: list[Tensor], saved: list[Tensor] | None
    ) -> None:
        """The changes of :meth:`load_state_dict`, for a state :meth:`_check_state` passed."""
        before = copy.deepcopy((self.optimizer.state_dict(), self.scheduler.state_dict()))
        try:
            # copies: torch's optimizer keeps the tensors of the state it loads (the momentum)
            # and changes them in place, which would change the caller's state
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
            self.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        except Exception as err:
            self.optimizer.load_state_dict(before[0])
            self.scheduler.load_state_dict(before[1])
            raise ValueError(f"state's optimizer or scheduler state does not load: {err}") from err
        with torch.no_grad():
            self.flat_scores.copy_(scores)
            for mask, keep in zip(self.masks, keeps, strict=True):
                mask.copy_(keep)
            if self.saved is not None and saved is not None:
                for current, value in zip(self.saved, saved, strict=True):
                    current.copy_(value)
            elif self.saved is not None:
                self._store_saved()
        self._remember_weights()
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.zero_grad()

    def _checked_tensors(self, values: object, like: Sequence[Tensor], key: str) -> list[Tensor]:
        """``values`` if it is a list of tensors of ``like``'s shapes, one per pruned tensor."""
        if not isinstance(values, list | tuple) or len(values) != len(like):
            found = len(values) if isinstance(values, list | tuple) else type(values).__name__
            raise ValueError(f"state[{key!r}] must hold {len(like)} tensors (one per name), got {found}")
        for name, value, ref in zip(self.names, values, like, strict=True):
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(ref.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"state[{key!r}] of {name!r} has shape {shape}, expected {tuple(ref.shape)}")
        return list(values)

    def __repr__(self) -> str:
        return (
            f"BiP({len(self.targets)} tensors, layout={self.spec!r}, sparsity={self.sparsity:.4f}, "
            f"step={self.step_count})"
        )


# -- helpers -----------------------------------------------------------------------------------


class _LoadedWeights:
    r"""A ``load_state_dict`` post-hook on a pruned module: the live :class:`BiP` holds what was loaded.

    A model's ``load_state_dict`` (a rollback to a checkpoint) copies into ``weight_orig`` in
    place; the next :meth:`BiP.step` then takes the loaded values as :math:`\theta` and keeps them
    in pruned entries. It holds the :class:`BiP` weakly, and, like
    :class:`~torchbip.method.GradCapture`, it is not copied with the module: ``copy.deepcopy`` and
    pickling of a module (an EMA copy of the model) give it a hook that does nothing.
    """

    def __init__(self, bip: BiP, index: int) -> None:
        self.bip = weakref.ref(bip)
        self.index = index

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        bip = self.bip()
        if bip is not None:
            bip._reload_saved(self.index, module)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_load_hook, ()


def _submodule(model: nn.Module, fqn: str) -> nn.Module | None:
    """``model.get_submodule(fqn)``, or ``None`` where there is no module of that name."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def _ignore_load(module: nn.Module, incompatible_keys: Any) -> None:
    """What a :class:`_LoadedWeights` hook becomes when its module is copied or unpickled."""


def _no_load_hook() -> Callable[[nn.Module, Any], None]:
    return _ignore_load


def check_no_fsdp(
    model: nn.Module, hint: str = "use DistributedDataParallel, or prune before sharding"
) -> None:
    """Refuse a model that FSDP wraps or whose parameters are sharded (``DTensor``).

    Args:
        model: the model.
        hint: what the message tells the user to do instead.

    Raises:
        ValueError: naming the module or parameter.
    """
    for name, module in model.named_modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or any(
            type(c).__name__.startswith("FSDP") for c in type(module).__mro__[1:2]
        ):
            raise ValueError(
                f"module {name or type(model).__name__!r} is wrapped by FSDP ({type(module).__name__}); "
                f"BiP cannot be set up on a model FSDP already wraps (it shards the parameters that the "
                f"masks apply to): {hint}"
            )
    for name, p in model.named_parameters():
        if _is_dtensor(p):
            raise ValueError(
                f"parameter {name!r} is a DTensor (sharded, e.g. by FSDP's fully_shard); BiP cannot be "
                f"set up on sharded parameters: {hint}"
            )


def unwrap_model(model: object, *, parallel: bool = True) -> nn.Module:
    """The module itself: a ``DistributedDataParallel``, ``DataParallel`` or compiled wrapper unwrapped.

    (So that tensor names are the model's own, ``"0.weight"`` rather than
    ``"_orig_mod.0.weight"`` or ``"module.0.weight"``, and a state saved from one loads into the other.)

    Args:
        model: the model, wrapped or not.
        parallel: unwrap data-parallel wrappers too; ``False`` refuses them (for
            :func:`torchbip.global_prune`, which runs its own data-parallel loop).

    Raises:
        TypeError: for a ``model`` that is not a module, or a data-parallel wrapper with
            ``parallel=False``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {model!r} of type {type(model).__name__}")
    module: nn.Module = model
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's wrapper (not imported: costly)
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel) and not parallel:
            raise TypeError(
                f"model is a {type(module).__name__} wrapper: global_prune computes its gradients with "
                "torch.func on the module itself and averages them over process_group on its own; pass "
                "the bare model (model.module)"
            )
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            module = inner
        else:
            return module


def _select(
    model: nn.Module, targets: list[Target], amount: object, exclude: Iterable[str] | None
) -> tuple[list[Target], Amount | list[Amount]]:
    """Apply ``exclude`` and a per-pattern ``amount`` to the resolved targets."""
    if exclude is not None:
        if isinstance(exclude, str):
            exclude = [exclude]
        if not isinstance(exclude, Iterable) or isinstance(exclude, (bytes, bytearray)):
            raise TypeError(f"exclude must be a name pattern (str) or a list of them, got {exclude!r}")
        patterns = list(exclude)
        for p in patterns:
            if not isinstance(p, str):
                raise TypeError(f"exclude must hold name patterns (str), got {p!r}")
        kept = []
        used: set[str] = set()
        for t in targets:
            hits = [p for p in patterns if _matches(t, p)]
            used.update(hits)
            if not hits:
                kept.append(t)
        unused = [p for p in patterns if p not in used]
        if unused:
            raise ValueError(
                f"exclude={patterns!r}: {unused!r} matches none of the tensors to prune "
                f"{[t.fqn for t in targets]}"
            )
        if not kept:
            transposed = transposed_linear_names(model)
            note = (
                f" (the model has nothing else to prune by default: {conv1d_note(transposed)})"
                if transposed
                else ""
            )
            raise ValueError(f"exclude={patterns!r} leaves nothing to prune{note}")
        targets = kept
    if not isinstance(amount, Mapping):
        return targets, validate_amount(amount)
    if not amount:
        raise ValueError("amount is an empty dict; pass a float, an int or {pattern: amount}")
    rules = []
    for pattern, value in amount.items():
        if not isinstance(pattern, str):
            raise TypeError(f"amount's keys must be name patterns (str), got {pattern!r}")
        rules.append((pattern, validate_amount(value, f"amount[{pattern!r}]")))
    chosen, amounts = [], []
    used_rules: set[str] = set()
    for t in targets:
        for pattern, value in rules:
            if _matches(t, pattern):
                chosen.append(t)
                amounts.append(value)
                used_rules.add(pattern)
                break
    unused_rules = [p for p, _ in rules if p not in used_rules]
    shadowed = {p: [q for q, _ in rules[:i] if any(_matches(t, q) for t in targets if _matches(t, p))]
                for i, (p, _) in enumerate(rules) if p in unused_rules}  # fmt: skip
    if any(shadowed.values()):
        pattern, earlier = next((p, q) for p, q in shadowed.items() if q)
        raise ValueError(
            f"amount: the pattern {pattern!r} matches only tensors that the earlier pattern(s) {earlier!r} "
            "already take (the first matching pattern wins): put the more specific pattern first"
        )
    if unused_rules:
        raise ValueError(
            f"amount: the pattern(s) {unused_rules!r} match none of the tensors to prune "
            f"{[t.fqn for t in targets]}"
        )
    return chosen, amounts


def _plain_number(value: object) -> Any:
    """A NumPy (or other ``numbers``) scalar as a Python int or float; anything else as it is.

    Settings are saved in :meth:`BiP.state_dict`, which ``torch.load(weights_only=True)`` reads
    only when they are plain types.
    """
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _matches(target: Target, pattern: str) -> bool:
    return fnmatch.fnmatchcase(target.fqn, pattern) or fnmatch.fnmatchcase(target.module_fqn, pattern)


def _digest(mask: Tensor) -> str:
    """A short fingerprint of a boolean mask (which entries), for states to compare."""
    return f"{mask.numel()}:{int(mask.sum())}:" + _bytes_digest(mask.to(torch.bool))


def _bytes_digest(tensor: Tensor) -> str:
    """A short hash of a tensor's bytes (equal tensors of one dtype give equal hashes)."""
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _current(target: Target) -> Tensor:
    weight = target.weight().detach()
    if target.is_pruned:
        weight = weight * getattr(target.module, target.name + "_mask")
    return weight


def _check_scheduler_state(state: object) -> None:
    """Refuse a saved learning-rate schedule whose rates are not finite numbers."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state['scheduler'] must be a dict, got {describe(state)}")
    for key in ("base_lrs", "_last_lr"):
        rates = state.get(key, [])
        if not isinstance(rates, list | tuple) or not all(
            isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r) for r in rates
        ):
            raise ValueError(f"state['scheduler'][{key!r}] must be finite rates, got {rates!r}")


_EARLIER_MASKS_ADVICE = (
    "build BiP on the model as it was pruned before that run's BiP (the same weight_mask buffers), "
    "then load this state"
)

_ORDER_CHECKS = 2
"""After how many steps that look like ``step()`` before ``optimizer.step()`` the check warns."""
_ORDER_STEPS = 16
"""How many steps :meth:`BiP._check_order` checks at most (weights that never move tell nothing)."""


def _fingerprint(orig: Tensor) -> Tensor:
    """A 0-d float64 sum of a weight's values (no host sync); equal values give equal sums.

    (float32 on MPS devices, which have no float64.)
    """
    return orig.detach().sum(dtype=torch.float32 if orig.device.type == "mps" else torch.float64)


def _keep_or_restore(value: Tensor, mask: Tensor, saved: Tensor) -> None:
    """``value = where(mask, value, saved)`` in place, for a 0/1 ``mask`` of ``value``'s dtype.

    Exact for every value, NaN and infinities included (an optimizer may write those into
    pruned entries: torch's AdamW does in a float16 model). On CPUs, where :func:`torch.where`
    with a boolean condition is several times slower, it is written as
    ``torch.lerp(saved, value, mask)`` when both tensors are finite (one sum of each tells): torch
    computes ``saved + 0 * d`` and ``value - d * 0``, exact at weights 0 and 1 for finite values
    (and differences ``d`` within the dtype's range, i.e. weights below half its largest value).
    """
    fast = (
        value.device.type == "cpu"
        and value.is_floating_point()
        and mask.dtype == value.dtype
        and saved.dtype == value.dtype
    )
    if fast and math.isfinite(float(value.sum()) + float(saved.sum())):
        torch.lerp(saved, value, mask, out=value)
    else:
        torch.where(mask.bool(), value, saved, out=value)


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", t)).__name__ == "DTensor"


def _is_scaler(value: object) -> bool:
    """A :class:`torch.amp.GradScaler`, or an object with the scaler methods :meth:`BiP.step` calls."""
    return isinstance(value, torch.amp.GradScaler) or all(
        callable(getattr(value, name, None)) for name in ("is_enabled", "get_scale")
    )


def grad_scaler_state(scaler: torch.amp.GradScaler, *, unscaled: bool = False) -> tuple[float, bool]:
    """The scale the gradients carry, and whether the scaler skips the optimizer's step.

    Args:
        scaler: a :class:`torch.amp.GradScaler` after ``scaler.step(optimizer)`` and before
            ``scaler.update()``.
        unscaled: also accept a scaler that has unscaled the gradients
            (``scaler.unscale_(optimizer)``) but not stepped yet, as in a trainer's
            before-optimizer-step hook.

    Returns:
        ``(scale, skipped)``.

    Raises:
        RuntimeError: when the scaler is at another stage (the answer would be wrong).
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:  # another scaler implementation: trust the finite check alone
        return float(scaler.get_scale()), False
    stages = ("STEPPED", "UNSCALED") if unscaled else ("STEPPED",)
    stepped = [s for s in states.values() if getattr(s.get("stage"), "name", None) in stages]
    if not stepped:
        raise RuntimeError(
            "BiP.step(scaler=...) was called before scaler.step(optimizer) or after scaler.update(): "
            "call it after scaler.step(optimizer) and before scaler.update(), so that it sees the "
            "scale of this step's gradients and whether the scaler skipped the step"
        )
    found = any(float(v.sum()) > 0 for s in stepped for v in s.get("found_inf_per_device", {}).values())
    return float(scaler.get_scale()), found
