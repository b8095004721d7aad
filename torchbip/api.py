r"""``global_prune``: the whole bi-level optimisation on a model and a loader."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchbip._func import Target, resolve_targets
from torchbip._layouts import MaskLayout, default_structured_targets, make_layout
from torchbip._loop import BiPLoop, pruned_tensors
from torchbip._snapshot import ModelSnapshot
from torchbip.config import BiPConfig
from torchbip.data import BatchStream
from torchbip.masks import GlobalTopK, count_from_amount, floor_counts, validate_amount
from torchbip.report import PruneReport

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
    process_group: Any = None,
    structured: str | None = None,
    budget: str = "layer",
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
        process_group: for distributed data-parallel runs (e.g. launched with ``torchrun``):
            the :mod:`torch.distributed` group whose ranks each feed their own shard of the
            data (use a :class:`~torch.utils.data.DistributedSampler`). Gradients, losses and
            floating-point buffers are averaged over the group every step, and every rank
            starts from rank 0's weights, so all ranks end with identical scores, masks and
            weights. ``None`` (default) uses the default group when :mod:`torch.distributed`
            is initialised with more than one process; ``False`` never communicates. Pass the
            bare model, not a ``DistributedDataParallel`` wrapper.
        structured: ``None`` (one score per entry), ``"filter"`` (one learned score per output
            filter, :class:`torchbip.BiPStructured` with ``dim=0``), ``"channel"`` (per input
            channel, ``dim=1``) or an N:M pattern such as ``"2:4"`` (the top ``n`` of every block
            of ``m`` along the input dimension, :class:`torchbip.semistructured.BiPSemiStructured`).
            With ``"filter"``/``"channel"``, ``amount`` counts filters/channels (groups), and a
            group's score moves along the sum of its entries' upper gradients. By default
            ``"filter"`` leaves out the last layer (its filters are the outputs), ``"channel"``
            the first (its channels are the inputs), ``"N:M"`` every layer whose input size is not
            a multiple of ``m``; an N:M run needs ``amount = 1 - n/m``. Slim the result with
            :func:`torchbip.export_slim`.
        budget: for ``"filter"``/``"channel"``: ``"layer"`` prunes the same fraction of groups
            in every tensor (the paper; an int ``amount`` is then a count per tensor),
            ``"global"`` ranks all groups together, with the per-tensor floor ``min_keep``.
        **options: any :class:`torchbip.BiPConfig` field, e.g. ``steps=200, lower_lr=0.05``.

    Returns:
        A :class:`torchbip.PruneReport`.

    Raises:
        ValueError: for a bad ``amount``, ``parameters``, ``loader`` (empty, wrong batches),
            ``structured``/``budget`` combination, ``device`` or option value, a ``loss_fn`` that
            fails on a batch or returns no scalar floating-point loss, and for a
            ``checkpoint_path`` that is truncated or belongs to another model, amount or run.
        TypeError: for an unknown option, a non-callable ``loss_fn``, a ``config`` that is not a
            :class:`BiPConfig` or a ``process_group`` that is not a process group.
        FloatingPointError: when the loss turns NaN or infinite (under ``amp="float16"``, only
            once loss scaling cannot recover).

    Note:
        Whatever is raised, also an exception from the user's ``loader`` or ``loss_fn`` and a
        ``KeyboardInterrupt``, the model is first restored to exactly its state before the call
        (see :doc:`/failure_modes`).

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
    if isinstance(options.get("checkpoint_path"), os.PathLike):
        options["checkpoint_path"] = os.fspath(options["checkpoint_path"])
    if config is not None and not isinstance(config, BiPConfig):
        raise TypeError(
            f"config must be a BiPConfig (or None), got {type(config).__name__}; "
            "for a dict use BiPConfig.from_dict(config)"
        )
    cfg = (config if config is not None else BiPConfig()).replace(**options)
    if cfg.device is not None:
        _check_device(cfg.device)
    amount = validate_amount(amount)
    if loader is None:
        raise ValueError("loader is required: an iterable of (inputs, targets) batches")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if structured is None and budget != "layer":
        raise ValueError(f"budget={budget!r} applies to structured runs; an unstructured run ranks globally")
    if structured is not None and parameters is None:
        parameters = default_structured_targets(model, structured)
    targets = resolve_targets(model, parameters)
    allowed = [_allowed(t) for t in targets]
    selector: GlobalTopK | MaskLayout
    if structured is not None:
        selector = make_layout(structured, targets, amount, budget, cfg.min_keep, allowed)
    else:
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
    attrs = {t.name for t in targets} | {hook._tensor_name for _, _, hook in pruned_tensors(model)}
    snapshot = ModelSnapshot(model, attrs)
    try:
        with _seeded(cfg.seed):
            # The streams start inside the seeded block: a shuffling DataLoader draws its order
            # from torch's RNG when iterated.
            lower_stream = BatchStream(loader, "loader")
            upper_stream = BatchStream(upper_loader, "upper_loader") if upper_loader is not None else None
            return _run(
                model, amount, targets, allowed, selector, steps, cfg, loss_fn,
                lower_stream, upper_stream or lower_stream, _default_group(process_group),
            )  # fmt: skip
    except BaseException:
        snapshot.restore()
        raise


def _run(
    model: nn.Module,
    amount: int | float,
    targets: list[Target],
    allowed: list[Tensor | None],
    selector: GlobalTopK | MaskLayout,
    steps: int,
    cfg: BiPConfig,
    loss_fn: Callable[[Any, Any], Tensor],
    lower_stream: BatchStream,
    upper_stream: BatchStream,
    process_group: Any,
) -> PruneReport:
    start = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]
    if cfg.device is not None:
        model.to(torch.device(cfg.device))
    loop = BiPLoop(
        model, targets, allowed, selector, steps, cfg, loss_fn, lower_stream, upper_stream, process_group
    )
    is_main = process_group is None or dist.get_rank(process_group) == 0
    path = Path(cfg.checkpoint_path) if cfg.checkpoint_path is not None else None
    if cfg.resume and path is not None and path.exists():
        loop.load_state_dict(load_checkpoint(path), source=f"checkpoint_path={str(path)!r}")
    model.train()
    bar = tqdm(
        total=steps,
        initial=loop.step_index,
        desc="BiP",
        unit="step",
        disable=not cfg.progress or not is_main,
        dynamic_ncols=True,
    )
    with bar:
        while loop.step_index < steps:
            loss = loop.step()
            if loop.step_index % cfg.log_every == 1 or loop.step_index == steps:
                bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{loop.sparsity:.2%}", refresh=False)
            bar.update()
            if (
                path is not None
                and is_main
                and (
                    loop.step_index == steps
                    or (cfg.checkpoint_every and loop.step_index % cfg.checkpoint_every == 0)
                )
            ):
                save_checkpoint(loop.state_dict(), path)
    report = loop.finish()
    for module, training in modes:
        module.training = training
    window = loop.window or [math.nan]
    return PruneReport(
        sparsity=report,
        steps=steps,
        wall_time_s=time.perf_counter() - start,
        final_loss=sum(window) / len(window),
        amount=amount,
        config=cfg.to_dict(),
        losses=list(loop.losses),
        skipped_steps=loop.skipped_steps,
    )


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a checkpoint atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; clear errors for bad files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"checkpoint_path={str(path)!r} cannot be read as a torchbip checkpoint "
            f"(truncated, or not written by torchbip): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint_path={str(path)!r} holds a {type(state).__name__}, not a checkpoint")
    return state


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from err
    if parsed.type == "cuda" and (
        not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"device={device!r} is not available here ({torch.cuda.device_count()} CUDA devices)"
        )
    if parsed.type not in ("cpu", "cuda", "mps", "xpu", "meta") or parsed.type == "meta":
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda[:N]'")


def _default_group(process_group: Any) -> Any:
    if process_group is False:
        return None
    if process_group is not None:
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup, None or False, "
                f"got {process_group!r}"
            )
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _allowed(target: Target) -> Tensor | None:
    """Entries that earlier pruning left (``None``: the tensor is not pruned yet)."""
    if not target.is_pruned:
        return None
    return getattr(target.module, target.name + "_mask").detach() != 0


def _resolve_steps(cfg: BiPConfig, loader: Iterable[Any], per_step: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    try:
        n_batches = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("loader has no len(); pass steps= to say how many BiP steps to run") from None
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    return max(1, math.ceil(epochs * n_batches / per_step))


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
