r"""Private: every check of ``global_prune``'s arguments, in one place, before the model changes.

:func:`plan_run` validates all arguments (each error names the argument and its value), resolves
the tensors to prune, the mask layout and the number of steps, and returns them as a
:class:`RunPlan`. Nothing in the model is changed until it has returned. :func:`agree_across_ranks`
then makes every rank of a distributed run agree on that plan (or raise on every rank), so that a
rank never waits forever in a collective that another rank will not join.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_impl

from torchbip._checkpoint import check_checkpoint_path
from torchbip._collectives import agree
from torchbip._func import Target, candidate_targets, check_binary_masks, resolve_targets
from torchbip.bilevel import all_finite
from torchbip.config import BiPConfig
from torchbip.layouts import Groups, Layout, MaskLayout, as_layout
from torchbip.masks import validate_amount
from torchbip.pruner import check_no_fsdp
from torchbip.structured import validate_budget

__all__ = ["RunPlan", "agree_across_ranks", "plan_run"]


@dataclass
class RunPlan:
    """What a checked ``global_prune`` call will do.

    ``needs_inputs``: the default tensors of a ``"filter"``/``"channel"`` run leave out layers
    found by running the model on the first batch, which is not at hand yet; ``targets`` holds
    the unchecked candidates (for the model's snapshot) and ``layout`` is ``None``. Call
    :func:`plan_run` again with ``first_inputs`` once the loader's stream has started.
    """

    cfg: BiPConfig
    amount: int | float
    targets: list[Target]
    allowed: list[Tensor | None]
    layout: MaskLayout | None
    steps: int
    group: Any
    needs_inputs: bool = False


def plan_run(
    model: nn.Module,
    amount: object,
    loader: Iterable[Any] | None,
    *,
    parameters: Iterable[tuple[nn.Module, str]] | None,
    loss_fn: Callable[[Any, Any], Tensor],
    upper_loader: Iterable[Any] | None,
    config: BiPConfig | None,
    group: Any,
    structured: str | Layout | None,
    budget: str,
    options: dict[str, Any],
    first_inputs: Callable[[], Any] | None = None,
) -> RunPlan:
    """Check every argument of ``global_prune`` and resolve what the run will do.

    ``first_inputs`` returns the inputs of the loader's first batch. A ``"filter"`` or
    ``"channel"`` run with the default tensors needs them (its defaults leave out the layers that
    the model calls first or whose outputs it returns); without them the plan comes back with
    ``needs_inputs`` set, the tensors unchecked.

    Raises:
        ValueError, TypeError, RuntimeError: see :func:`torchbip.global_prune`.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "global_prune trains the model and cannot run under torch.inference_mode(): tensors "
            "created there (masks, optimiser states) could never be trained; call it outside the "
            "inference_mode() block"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {model!r} of type {type(model).__name__}")
    if isinstance(options.get("checkpoint_path"), os.PathLike):
        options = {**options, "checkpoint_path": os.fspath(options["checkpoint_path"])}
    if config is not None and not isinstance(config, BiPConfig):
        raise TypeError(
            f"config must be a BiPConfig (or None), got {type(config).__name__}; "
            "for a dict use BiPConfig.from_dict(config)"
        )
    cfg = (config if config is not None else BiPConfig()).replace(**options)
    if cfg.device is not None:
        check_device(cfg.device)
    amount = validate_amount(amount)
    if loader is None:
        raise ValueError("loader is required: an iterable of (inputs, targets) batches")
    if not isinstance(loader, Iterable) and not hasattr(type(loader), "__getitem__"):
        raise TypeError(f"loader must be an iterable of batches, got {loader!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    validate_budget(budget)
    spec = as_layout(structured, budget, arg="structured")
    spec.check_budget(budget, cfg.min_keep, None, arg="structured")
    spec.check_parameters(parameters)
    two_batch = cfg.mode == "two_batch"
    if upper_loader is not None and not two_batch:
        raise ValueError(
            f"upper_loader is used only with mode='two_batch' (got mode={cfg.mode!r}); "
            "a fused step draws one batch from loader for both levels"
        )
    if cfg.checkpoint_path is not None:
        check_checkpoint_path(cfg.checkpoint_path)
    _check_backward_hooks(model)
    check_no_fsdp(model)
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if cfg.optimizer == "adamw" and half:
        raise ValueError(
            f"optimizer='adamw' with float16 parameters ({', '.join(map(repr, half[:3]))}"
            f"{', ...' if len(half) > 3 else ''}): torch's AdamW turns every entry with a zero gradient "
            "into NaN in float16 (its eps rounds to 0), and every pruned entry has one; train a float32 "
            "model with amp='float16', or pass optimizer='sgd'"
        )
    _check_rates_fit(model, cfg)
    _check_amp_applies(model, cfg)
    per_step = 2 if two_batch and upper_loader is None else 1
    defaults = None
    if parameters is None and isinstance(spec, Groups):
        if first_inputs is None:  # the edges come from the first batch: checked once it is read
            targets = candidate_targets(model, None, spec.candidate_parameters(model))
            steps = resolve_steps(cfg, loader, per_step)
            return RunPlan(cfg, amount, targets, [], None, steps, group, needs_inputs=True)
        defaults = spec.called_default_parameters(model, first_inputs(), "loader")
    elif parameters is None:
        defaults = spec.default_parameters(model)
    targets = resolve_targets(model, parameters, defaults)
    check_binary_masks(targets)
    for target in targets:
        if target.weight().is_inference():
            raise ValueError(
                f"parameters names {target.fqn!r}, an inference tensor (created under "
                "torch.inference_mode()), which cannot be trained; create the model outside "
                "inference_mode() or clone its parameters"
            )
    finite = all_finite([t.weight() for t in targets]) if targets else None
    if finite is not None and not bool(finite):
        bad = [t.fqn for t in targets if not bool(all_finite([t.weight()]))]
        raise ValueError(
            f"parameters names {', '.join(map(repr, bad))}, which holds NaN or infinite values; "
            "BiP's scores start from the weights' magnitudes: load or re-initialise the weights first"
        )
    allowed = [t.allowed() for t in targets]
    layout = spec.bind(targets, amount, allowed, cfg.min_keep)  # its errors name min_keep and amount
    steps = resolve_steps(cfg, loader, per_step)
    return RunPlan(cfg, amount, targets, allowed, layout, steps, group)


def _check_rates_fit(model: nn.Module, cfg: BiPConfig) -> None:
    """Refuse a ``lower_lr`` or ``gamma`` that the dtype of a trained parameter cannot hold.

    Torch's optimizers convert them to the parameters' dtype and fail at the first step, naming
    no option (float16 holds at most 65504).
    """
    trained = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    if not trained:
        return
    narrowest = min(trained, key=lambda d: torch.finfo(d).max)
    largest = float(torch.finfo(narrowest).max)
    for name in ("lower_lr", "gamma"):
        if float(getattr(cfg, name)) > largest:
            raise ValueError(
                f"{name}={getattr(cfg, name)!r} is above the largest {narrowest} ({largest:g}), the "
                f"dtype of parameters the weights' optimizer trains, which cannot hold it; pass a "
                f"smaller {name} or train the model in a wider dtype"
            )


def _check_amp_applies(model: nn.Module, cfg: BiPConfig) -> None:
    """Refuse ``amp`` for a float64 model: autocast leaves float64 operations as they are."""
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if cfg.amp is not None and floating and floating <= {torch.float64}:
        raise ValueError(
            f"amp={cfg.amp!r} with a float64 model: torch.autocast leaves float64 operations in float64, "
            f"so the forward pass would not run in {cfg.amp}; convert the model to float32 first "
            "(model.float()) or pass amp=None"
        )


def _check_backward_hooks(model: nn.Module) -> None:
    """Refuse module backward hooks: torch.func, which computes the gradients, cannot run them.

    Gradient hooks on parameters (``p.register_hook``, ``p.register_post_accumulate_grad_hook``)
    are honoured by the loop; module hooks (``register_full_backward_hook``,
    ``register_full_backward_pre_hook``, ``register_backward_hook``, and their global forms) would
    fail inside the transform or be skipped silently.
    """
    if module_impl._global_backward_hooks or module_impl._global_backward_pre_hooks:
        raise ValueError(
            "a global module backward hook is registered (torch.nn.modules.module."
            "register_module_full_backward_hook or ..._pre_hook); global_prune computes gradients "
            "with torch.func, which cannot run module backward hooks: remove it for the run"
        )
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) has a backward hook "
                "(register_full_backward_hook, register_full_backward_pre_hook or "
                "register_backward_hook); global_prune computes gradients with torch.func, which "
                "cannot run module backward hooks: remove it for the run, or hook the parameters "
                "instead (p.register_hook(fn) is honoured)"
            )


def check_device(device: str) -> None:
    """Raise ``ValueError`` unless ``device`` names a usable device of this machine."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from err
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    counts = {
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": 1 if torch.backends.mps.is_available() else 0,
        "xpu": torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0,
    }
    # The index as written: torch keeps it in 8 bits, so "cuda:1000" parses to index -24.
    written = str(device).rpartition(":")[2] if ":" in str(device) else ""
    index = int(written) if written.isdigit() else (parsed.index or 0)
    if parsed.type in counts and (index < 0 or index >= counts[parsed.type]):
        raise ValueError(
            f"device={device!r} is not available here ({counts[parsed.type]} {parsed.type} devices)"
        )


def agree_across_ranks(plan: RunPlan | None, error: BaseException | None, group: Any) -> None:
    """Make every rank of ``group`` agree on the plan, or raise on every rank.

    One ``all_gather_object`` before the first step (:func:`torchbip._collectives.agree`): each
    rank sends either the error its own checks raised or the shape of its run (steps, tensors,
    kept entries). If any rank failed, or the ranks disagree (e.g. shards with different numbers
    of batches), every rank raises, so that no rank is left waiting in the next collective.
    """
    if group is None:
        if error is not None:
            raise error
        return
    mine = None
    if error is None:
        assert plan is not None
        mine = {
            "steps": plan.steps,
            "tensors": [(t.fqn, tuple(t.weight().shape)) for t in plan.targets],
            "n_keep": plan.layout.n_keep if plan.layout is not None else None,
            "amount": plan.amount,
            "settings": {k: v for k, v in plan.cfg.to_dict().items() if k not in _LOCAL_SETTINGS},
        }
    hint = (
        "; shards of different lengths: give every rank the same number of batches "
        "(a DistributedSampler pads them) or pass the same steps= on every rank"
    )
    labels = {"steps": "steps", "tensors": "tensors to prune", "n_keep": "kept entries", "amount": "amount"}
    agree(mine, error, group, "global_prune", {**labels, "settings": "settings"}, {"steps": hint})


# Settings that may differ between ranks: they keep the weights of the ranks equal (a seed per rank
# only changes dropout and other random draws, whose gradients are averaged as in DDP).
_LOCAL_SETTINGS = ("progress", "log_every", "checkpoint_path", "checkpoint_every", "resume", "device", "seed")


def resolve_steps(cfg: BiPConfig, loader: Iterable[Any], per_step: int) -> int:
    """``cfg.steps``, or the steps that ``cfg.epochs`` passes over ``loader`` take."""
    if cfg.steps is not None:
        return cfg.steps
    try:
        n_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("loader has no len(); pass steps= to say how many BiP steps to run") from None
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    return max(1, math.ceil(epochs * n_batches / per_step))
