r"""``global_prune``: the whole bi-level optimisation on a model and a loader."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from torchbip._func import Target, make_forward, resolve_targets
from torchbip._snapshot import ModelSnapshot
from torchbip.bilevel import lower_grad, masked_loss_grads, upper_grad
from torchbip.config import BiPConfig
from torchbip.data import BatchStream, describe, to_device
from torchbip.masks import GlobalTopK, count_from_amount, floor_counts, validate_amount
from torchbip.method import BiPPruningMethod, scores_name
from torchbip.report import PruneReport, SparsityReport, TensorSparsity
from torchbip.scores import init_scores

__all__ = ["global_prune"]


def global_prune(
    model: nn.Module,
    amount: int | float = 0.95,
    loader: Iterable[Any] | None = None,
    *,
    parameters: Iterable[tuple[nn.Module, str]] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
    upper_loader: Iterable[Any] | None = None,
    config: BiPConfig | None = None,
    **options: Any,
) -> PruneReport:
    r"""Prune ``model`` globally with BiP, co-training its weights, in torch's pruned form.

    Runs the bi-level loop: each step updates the weights :math:`\theta` on the masked model
    (the lower level) and the scores :math:`s` along the implicit gradient
    :math:`\theta \odot g - c\, m \odot g \odot g` (the upper level), then sets the mask to the
    global top-k of the scores. The mask is at the target sparsity from the first step.

    Afterwards each pruned module holds exactly what torch's methods leave: ``weight_orig`` (the
    co-trained weights, the same Parameter object as before), ``weight_mask`` and a pruning
    hook, so :func:`torch.nn.utils.prune.is_pruned` and :func:`torch.nn.utils.prune.remove`
    work. A tensor pruned before keeps every earlier zero: ``amount`` then counts among the
    remaining entries (torch's :class:`~torch.nn.utils.prune.PruningContainer` semantics).

    If anything fails (bad input, a non-finite loss, an exception from ``loader``,
    ``KeyboardInterrupt``), the model is restored exactly: parameters (same objects and values),
    gradients, buffers, hooks, ``requires_grad`` and training flags.

    Args:
        model: the model; pruned in place.
        amount: a float in ``[0, 1]``, the fraction of the remaining entries of all chosen
            tensors to prune (ranked globally), or an int, a count.
        loader: an iterable of ``(inputs, targets)`` batches (restarted when exhausted).
        parameters: ``(module, name)`` pairs to prune, as for
            :func:`torch.nn.utils.prune.global_unstructured`; by default the ``weight`` of every
            ``nn.Linear`` and ``nn.Conv1d/2d/3d``.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        upper_loader: in ``mode="two_batch"``, the stream of the upper level; by default the
            upper step draws the next batch of ``loader``. Rejected in ``mode="fused"``, where
            one batch feeds both levels.
        config: a :class:`torchbip.BiPConfig`; ``options`` override its fields.
        **options: any :class:`torchbip.BiPConfig` field, e.g. ``steps=200, lower_lr=0.05``.

    Returns:
        A :class:`torchbip.PruneReport`.

    Raises:
        ValueError: for a bad ``amount``, ``parameters``, ``loader`` (empty, wrong batches) or
            option, and ``FloatingPointError`` for a non-finite loss; the model is unchanged.
        TypeError: for an unknown option or a non-callable ``loss_fn``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> x = torch.randn(64, 8)
        >>> data = [(x[i : i + 16], (x[i : i + 16, 0] > 0).long()) for i in range(0, 64, 16)]
        >>> report = global_prune(model, amount=0.75, loader=data, steps=8, progress=False)
        >>> report.global_sparsity
        0.75
        >>> prune.is_pruned(model), hasattr(model[0], "weight_scores")
        (True, False)
        >>> prune.remove(model[0], "weight") is model[0]
        True
    """
    cfg = (config if config is not None else BiPConfig()).replace(**options)
    amount = validate_amount(amount)
    if loader is None:
        raise ValueError("loader is required: an iterable of (inputs, targets) batches")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    targets = resolve_targets(model, parameters)
    allowed = [_allowed(t) for t in targets]
    n_allowed = [
        t.weight().numel() if a is None else int(a.sum()) for t, a in zip(targets, allowed, strict=False)
    ]
    n_prune = count_from_amount(amount, sum(n_allowed))
    floors = floor_counts(n_allowed, cfg.min_keep)
    selector = GlobalTopK(sum(n_allowed) - n_prune, floors if cfg.min_keep is not None else None)
    two_batch = cfg.mode == "two_batch"
    if upper_loader is not None and not two_batch:
        raise ValueError(
            f"upper_loader is used only with mode='two_batch' (got mode={cfg.mode!r}); "
            "a fused step draws one batch from loader for both levels"
        )
    steps = _resolve_steps(cfg, loader, per_step=2 if two_batch and upper_loader is None else 1)

    # The attributes that pruning hooks set (``module.weight``) for every pruned tensor.
    attrs = {t.name for t in targets} | {hook._tensor_name for _, _, hook in _pruned_tensors(model)}
    snapshot = ModelSnapshot(model, attrs)
    try:
        with _seeded(cfg.seed):
            # The streams start inside the seeded block: a shuffling DataLoader draws its order
            # from torch's RNG when iterated.
            lower_stream = BatchStream(loader, "loader")
            upper_stream = BatchStream(upper_loader, "upper_loader") if upper_loader is not None else None
            return _run(
                model, amount, targets, allowed, selector, steps, cfg, loss_fn,
                lower_stream, upper_stream or lower_stream,
            )  # fmt: skip
    except BaseException:
        snapshot.restore()
        raise


def _run(
    model: nn.Module,
    amount: int | float,
    targets: list[Target],
    allowed: list[Tensor | None],
    selector: GlobalTopK,
    steps: int,
    cfg: BiPConfig,
    loss_fn: Callable[[Any, Any], Tensor],
    lower_stream: BatchStream,
    upper_stream: BatchStream,
) -> PruneReport:
    start = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]
    if cfg.device is not None:
        model.to(torch.device(cfg.device))
    device = targets[0].weight().device
    allowed = [None if a is None else a.to(device) for a in allowed]

    # 1. Scores: a scaled copy of the magnitudes of the current (masked) weights.
    scores = [init_scores(_current(t), cfg.score_init) for t in targets]
    # 2. The first mask: the global top-k of the scores, as torch pruning state per tensor.
    for target, s, keep, allow in zip(targets, scores, selector(scores, allowed), allowed, strict=False):
        remaining = s.numel() if allow is None else int(allow.sum())
        BiPPruningMethod.apply(
            target.module, target.name, amount=remaining - int(keep.sum()), importance_scores=s
        )
        mask = getattr(target.module, target.name + "_mask")
        mask.copy_(keep)
    # The scores live in one flat buffer; each module's score buffer is a view into it, so the
    # upper step and the global selection run on one tensor without concatenation.
    flat_scores = torch.cat([getattr(t.module, scores_name(t.name)).reshape(-1) for t in targets])
    flat_grad = torch.zeros_like(flat_scores)
    score_buffers, score_grads, offset = [], [], 0
    for target in targets:
        view = flat_scores[offset : offset + target.weight().numel()].view(target.weight().shape)
        score_grads.append(flat_grad[offset : offset + view.numel()].view(view.shape))
        target.module._buffers[scores_name(target.name)] = view
        score_buffers.append(view)
        offset += view.numel()
    fast_select = all(a is None for a in allowed) and cfg.min_keep is None
    masks = {t.mask_fqn: getattr(t.module, t.name + "_mask") for t in targets}
    theta = [t.weight() for t in targets]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Every trainable pruned tensor moves on its unpruned entries only: the targets, and tensors
    # that earlier pruning left outside this run (their masks stay fixed).
    masked = {t.orig_fqn: (p, mask) for t, p, mask in zip(targets, theta, masks.values(), strict=True)}
    for fqn, module, hook in _pruned_tensors(model):
        p = params.get(fqn + "_orig")
        if p is not None and fqn + "_orig" not in masked:
            masked[fqn + "_orig"] = (p, module._buffers[hook._tensor_name + "_mask"])
    others = [p for n, p in params.items() if n not in masked]
    score_names = {t.fqn + "_scores" for t in targets}
    buffers = {n: b for n, b in model.named_buffers() if n not in masks and n not in score_names}
    # 3. The two optimisers: SGD on the weights (lower), SGD on the scores (upper).
    lower_opt = torch.optim.SGD(
        [
            {"params": [p for p, _ in masked.values()], "weight_decay": 0.0},
            {"params": others, "weight_decay": cfg.gamma},
        ],
        lr=cfg.lower_lr,
        momentum=cfg.momentum,
    )
    upper_opt = torch.optim.SGD([flat_scores], lr=cfg.upper_lr, momentum=cfg.upper_momentum)
    lower_sched = torch.optim.lr_scheduler.LambdaLR(lower_opt, _schedule(cfg.lower_schedule, steps))
    upper_sched = torch.optim.lr_scheduler.LambdaLR(upper_opt, _schedule(cfg.upper_schedule, steps))
    forward = make_forward(model)
    implicit_coef = cfg.effective_implicit_coef
    mask_list = list(masks.values())
    offsets = [0]
    for m in mask_list[:-1]:
        offsets.append(offsets[-1] + m.numel())
    model.train()

    def backward(stream: BatchStream, step: int, with_mask_grads: bool) -> Any:
        inputs, labels = stream.next()
        inputs, labels = to_device(inputs, device), to_device(labels, device)
        try:
            out = masked_loss_grads(
                forward, params, masks, buffers, inputs, labels, loss_fn,
                with_mask_grads=with_mask_grads,
            )  # fmt: skip
        except Exception as err:
            raise ValueError(
                f"the model or loss_fn failed on a batch from {stream.name} at step {step} "
                f"(inputs {describe(inputs)}, targets {describe(labels)}): "
                f"{type(err).__name__}: {err}"
            ) from err
        loss = float(out.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss_fn returned a non-finite loss ({loss}) at step {step} on a batch from "
                f"{stream.name}; the model was restored. Lower lower_lr/upper_lr or check the data."
            )
        with torch.no_grad():
            for name, value in out.buffers.items():
                buffers[name].copy_(value)
        return out, loss

    def lower_step(grads: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, (p, mask) in masked.items():
                p.grad = lower_grad(grads[name], p, mask, cfg.gamma)
                state = lower_opt.state.get(p, {})
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].mul_(mask)
            for name, p in params.items():
                if name not in masked:
                    p.grad = grads[name]
        lower_opt.step()
        lower_sched.step()

    def upper_step(grads: Any) -> None:
        with torch.no_grad():
            for target, g in zip(targets, score_grads, strict=True):
                upper_grad(grads.masks[target.mask_fqn], grads.params[target.orig_fqn], implicit_coef, out=g)
            flat_scores.grad = flat_grad
        upper_opt.step()
        upper_sched.step()
        with torch.no_grad():
            if fast_select:
                keep = selector.select_flat(flat_scores)
                keeps = [
                    keep[o : o + m.numel()].view(m.shape) for o, m in zip(offsets, mask_list, strict=True)
                ]
            else:
                keeps = selector(score_buffers, allowed)
            for mask, kept in zip(mask_list, keeps, strict=True):
                mask.copy_(kept)

    losses: list[tuple[int, float]] = []
    window: list[float] = []
    sparsity = 1.0 - selector.n_keep / sum(m.numel() for m in mask_list)
    bar = tqdm(total=steps, desc="BiP", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    with bar:
        for step in range(steps):
            if cfg.mode == "fused":
                out, loss = backward(lower_stream, step, with_mask_grads=True)
                lower_step(out.params)
                upper_step(out)
            else:
                out, loss = backward(lower_stream, step, with_mask_grads=False)
                lower_step(out.params)
                out, loss = backward(upper_stream, step, with_mask_grads=True)
                upper_step(out)
            window = [*window[-(cfg.log_every - 1) :], loss] if cfg.log_every > 1 else [loss]
            if step % cfg.log_every == 0 or step == steps - 1:
                losses.append((step, loss))
                bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{sparsity:.2%}", refresh=False)
            bar.update()

    # 4. Leave torch's pruned form: drop the scores, refresh the masked weights of every pruned
    #    tensor (the hooks ran inside torch.func and left transformed tensors behind), restore
    #    the modes.
    with torch.no_grad():
        for target in targets:
            delattr(target.module, scores_name(target.name))
        for _, module, hook in _pruned_tensors(model):
            setattr(module, hook._tensor_name, hook.apply_mask(module).detach())
        for p in params.values():
            p.grad = None
    for module, training in modes:
        module.training = training
    report = SparsityReport(
        {
            t.fqn: TensorSparsity(m.numel(), int((m == 0).sum()))
            for t, m in zip(targets, mask_list, strict=False)
        }
    )
    return PruneReport(
        sparsity=report,
        steps=steps,
        wall_time_s=time.perf_counter() - start,
        final_loss=sum(window) / len(window),
        amount=amount,
        config=cfg.to_dict(),
        losses=losses,
    )


def _pruned_tensors(model: nn.Module) -> list[tuple[str, nn.Module, prune.BasePruningMethod]]:
    """``(fqn, module, hook)`` of every tensor of ``model`` that torch's pruning reparametrised."""
    out = []
    for module_fqn, module in model.named_modules():
        prefix = module_fqn + "." if module_fqn else ""
        for hook in module._forward_pre_hooks.values():
            name = getattr(hook, "_tensor_name", None) if isinstance(hook, prune.BasePruningMethod) else None
            if name is not None and name + "_mask" in module._buffers:
                out.append((prefix + name, module, hook))
    return out


def _allowed(target: Target) -> Tensor | None:
    """Entries that earlier pruning left (``None``: the tensor is not pruned yet)."""
    if not target.is_pruned:
        return None
    return getattr(target.module, target.name + "_mask").detach() != 0


def _current(target: Target) -> Tensor:
    weight = target.weight().detach()
    if target.is_pruned:
        weight = weight * getattr(target.module, target.name + "_mask")
    return weight


def _resolve_steps(cfg: BiPConfig, loader: Iterable[Any], per_step: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    try:
        n_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("loader has no len(); pass steps= to say how many BiP steps to run") from None
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    return max(1, math.ceil(epochs * n_batches / per_step))


def _schedule(kind: str, steps: int) -> Callable[[int], float]:
    if kind == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
    if kind == "step":
        return lambda t: 0.1 ** ((t >= steps * 0.5) + (t >= steps * 0.75))
    return lambda t: 1.0


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
