r"""``global_prune``: the whole bi-level optimisation on a model and a loader."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchbip._arguments import agree_across_ranks, plan_run
from torchbip._checkpoint import (
    check_resume,
    load_checkpoint,
    run_descriptor,
    save_checkpoint,
    save_final_checkpoint,
)
from torchbip._collectives import agree, default_group
from torchbip._func import Target
from torchbip._loop import BiPLoop
from torchbip._snapshot import ModelSnapshot
from torchbip.config import BiPConfig
from torchbip.data import BatchStream, order_generators
from torchbip.layouts import Layout, MaskLayout, as_layout
from torchbip.pruned import pruned_tensors
from torchbip.pruner import unwrap_model
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
    structured: str | Layout | None = None,
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
    The gradients are computed with :mod:`torch.func`: every parameter's ``.grad`` is afterwards
    what it was before the call (the same tensor, the same values, or ``None``).

    With ``seed`` (see :class:`torchbip.BiPConfig`), the run draws only from random number
    generators seeded from it: torch's, CUDA's where the run uses CUDA, and the
    :class:`torch.Generator` objects the loaders draw their order from (a ``DataLoader``'s
    ``generator``, a sampler's), so the same ``seed`` gives the same masks and weights whatever
    state the caller left them in. Afterwards each of them is in the state the caller left it
    in. Without ``seed``, the run draws from them as they are, and a loader's generator advances
    as a loader's does.

    If anything fails (bad input, a non-finite loss, an exception from ``loader``,
    ``KeyboardInterrupt``), the model is restored exactly: parameters (same objects and values),
    gradients, buffers, hooks, ``requires_grad`` and training flags.

    Args:
        model: the model; pruned in place. A ``torch.compile`` wrapper is pruned as the module it
            wraps (under its own tensor names); a ``DistributedDataParallel`` or ``DataParallel``
            wrapper is refused (pass the bare model, see ``process_group``).
        amount: a float in ``[0, 1]``, the fraction of the remaining entries of all chosen
            tensors to prune (ranked globally), or an int, a count.
        loader: an iterable of ``(inputs, targets)`` batches (restarted when exhausted). A plain
            tuple of ``inputs`` is passed as positional arguments, ``model(*inputs)``; anything
            else (a tensor, a namedtuple, a list, a dict) as one, ``model(inputs)``. ``targets``
            reaches ``loss_fn`` as it is (moved to the model's device).
        parameters: ``(module, name)`` pairs to prune, as for
            :func:`torch.nn.utils.prune.global_unstructured`; by default the ``weight`` of every
            ``nn.Linear`` and ``nn.Conv1d/2d/3d``, but computed weights (``weight_norm``,
            ``spectral_norm`` and other parametrizations), which cannot be pruned.
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
            ``"filter"`` leaves out the output layers (their filters are the model's outputs),
            ``"channel"`` the input layers (their channels are the model's inputs), and
            ``"N:M"`` every layer whose input size is not a multiple of ``m``; an N:M run needs
            ``amount = 1 - n/m``. The output and input layers are found by the order in which
            the model calls its layers, traced on a copy of the model with :mod:`torch.fx` (or,
            where it cannot be traced, in one forward pass on the first batch, which changes
            nothing: BatchNorm statistics and random number generators are left alone): the
            layers whose outputs reach the model's outputs without passing through another
            ``nn.Linear``/``nn.Conv*d`` layer, and those called before any other. Slim the result
            with :func:`torchbip.export_slim`.
        budget: for ``"filter"``/``"channel"``: ``"layer"`` prunes the same fraction of groups
            in every tensor (the paper; an int ``amount`` is then a count per tensor),
            ``"global"`` ranks all groups together, with the per-tensor floor ``min_keep``.
        **options: any :class:`torchbip.BiPConfig` field, e.g. ``steps=200, lower_lr=0.05``.

    Returns:
        A :class:`torchbip.PruneReport`.

    Raises:
        ValueError: for a bad ``amount``, ``parameters`` (also a target whose module's forward is
            never called, such as ``nn.MultiheadAttention``'s ``out_proj``, or one the loss does
            not depend on), ``loader`` (empty, wrong batches), ``structured``/``budget``/``min_keep``
            combination, ``device``, ``checkpoint_path`` or option value, a model with module
            backward hooks, a ``loss_fn`` that fails on a batch or returns no scalar
            floating-point loss, a ``checkpoint_path`` that is truncated or was written by
            another run (the message names each difference), and ranks of a process group that
            disagree on the run (every rank raises).
        TypeError: for an unknown option, a non-callable ``loss_fn``, a ``config`` that is not a
            :class:`BiPConfig`, a ``model`` that is not a module or a ``process_group`` that is
            not a process group.
        FloatingPointError: when the loss, a gradient or the scores turn NaN or infinite (the
            message names the step; under ``amp="float16"`` an overflow is skipped until loss
            scaling cannot recover).
        RuntimeError: when called under :func:`torch.inference_mode`, and on the other ranks
            when one rank of a distributed run fails.
        OSError: when a periodic checkpoint cannot be written (a failed last save only warns,
            and the pruned model is kept).

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
    group = default_group(process_group)
    try:
        model = unwrap_model(model, parallel=False)  # (a torch.compile wrapper: the module itself)
        plan = plan_run(
            model, amount, loader, parameters=parameters, loss_fn=loss_fn, upper_loader=upper_loader,
            config=config, group=group, structured=structured, budget=budget, options=options,
        )  # fmt: skip
    except Exception as err:
        agree_across_ranks(None, err, group)  # every rank learns of the refusal, then this rank raises
        raise
    cfg = plan.cfg

    # The attributes that pruning hooks set (``module.weight``) for every pruned tensor.
    attrs = {t.name for t in plan.targets} | {hook._tensor_name for _, _, hook in pruned_tensors(model)}
    snapshot = ModelSnapshot(model, attrs)
    # A failed call also leaves the random number generators as they were: torch's global one and
    # those the loaders draw their order from (they are the caller's objects, as the model is);
    # with a seed, a successful call too (see _seeded).
    loaders = [loader, *([upper_loader] if upper_loader is not None else [])]
    generators = list({id(g): g for lo in loaders for g in order_generators(lo)}.values())
    rng_states = [(g, g.get_state()) for g in generators]
    cpu_rng = torch.get_rng_state()
    # (CUDA's generators too, where CUDA is in use: dropout on a GPU model draws from them.)
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    device = torch.device(cfg.device) if cfg.device is not None else None
    try:
        with _seeded(cfg.seed, generators, device):
            # The streams start inside the seeded block: a shuffling DataLoader draws its order
            # from torch's RNG (or its generator, seeded here too) when iterated.
            try:
                lower_stream = BatchStream(loader, "loader")  # type: ignore[arg-type]
                upper_stream = BatchStream(upper_loader, "upper_loader") if upper_loader is not None else None
                if plan.needs_inputs:  # default filters/channels: the edges are found on the first batch
                    plan = plan_run(
                        model, amount, loader, parameters=parameters, loss_fn=loss_fn,
                        upper_loader=upper_loader, config=config, group=group, structured=structured,
                        budget=budget, options=options, first_inputs=lambda: lower_stream.peek()[0],
                    )  # fmt: skip
            except Exception as err:
                agree_across_ranks(None, err, group)
                raise
            agree_across_ranks(plan, None, group)
            assert plan.layout is not None  # (resolved with the first batch above)
            return _run(
                model, plan.amount, plan.targets, plan.allowed, plan.layout,
                as_layout(structured, budget, arg="structured"), plan.steps, cfg, loss_fn,
                lower_stream, upper_stream or lower_stream, group,
            )  # fmt: skip
    except BaseException:
        snapshot.restore()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for g, state in rng_states:
            g.set_state(state)
        raise


def _run(
    model: nn.Module,
    amount: int | float,
    targets: list[Target],
    allowed: list[Tensor | None],
    layout: MaskLayout,
    spec: Layout,
    steps: int,
    cfg: BiPConfig,
    loss_fn: Callable[[Any, Any], Tensor],
    lower_stream: BatchStream,
    upper_stream: BatchStream,
    process_group: Any,
) -> PruneReport:
    start = time.perf_counter()
    modes = [(m, m.training) for m in model.modules()]
    path = Path(cfg.checkpoint_path) if cfg.checkpoint_path is not None else None
    run: dict[str, Any] = {}  # what defines the run: saved with every checkpoint
    saved = None
    error: Exception | None = None
    if path is not None:
        run = run_descriptor(
            amount, targets, allowed, layout, steps, cfg, lower_stream, upper_stream, process_group
        )
        try:
            if cfg.resume and path.exists():
                saved = load_checkpoint(path)
                check_resume(saved, run, path)  # before anything touches the model
        except Exception as err:
            error = err
    # Every rank resumes from the same step, or every rank raises. (Also on ranks without a
    # checkpoint_path: a run may give it to rank 0 only, which writes the checkpoints.)
    if process_group is not None:
        resumes = {"resume": None if saved is None else int(saved["step"])}
        hint = (
            "; checkpoint_path must name the same checkpoint on every rank (rank 0 writes it: a "
            "shared file system, or a copy of it on every rank)"
        )
        label = {"resume": "step to resume from (None: no checkpoint at checkpoint_path)"}
        agree(resumes, error, process_group, "global_prune", label, {"resume": hint})
    elif error is not None:
        raise error
    if cfg.device is not None:
        model.to(torch.device(cfg.device))
    loop = BiPLoop(
        model, targets, amount, spec, steps, cfg, loss_fn, lower_stream, upper_stream, process_group
    )
    is_main = process_group is None or dist.get_rank(process_group) == 0
    if saved is not None:  # (on every rank, or on none: the step was agreed above)
        load_error: Exception | None = None
        try:
            loop.load_state_dict(saved, source=f"checkpoint_path={str(path)!r}")
        except Exception as err:
            load_error = err
        if process_group is not None:  # a checkpoint refused on one rank is refused on every rank
            agree({}, load_error, process_group, "global_prune", {})
        elif load_error is not None:
            raise load_error
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
            # steps 1, 1 + log_every, 1 + 2 * log_every, ... (as the recorded losses) and the last;
            # the masks' sparsity as it is now (only for a bar that is shown: it reads the masks)
            if not bar.disable and ((loop.step_index - 1) % cfg.log_every == 0 or loop.step_index == steps):
                bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{loop.mask_sparsity():.2%}", refresh=False)
            bar.update()
            if (
                path is not None
                and is_main
                and (
                    loop.step_index == steps
                    or (cfg.checkpoint_every and loop.step_index % cfg.checkpoint_every == 0)
                )
            ):
                state = {**loop.state_dict(), "run": run}
                if loop.step_index < steps:
                    save_checkpoint(state, path)  # fails loudly: the previous checkpoint is intact
                else:
                    save_final_checkpoint(state, path)  # warns: the finished run is returned
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


@contextlib.contextmanager
def _seeded(
    seed: int | None, generators: list[torch.Generator], device: torch.device | None
) -> Iterator[None]:
    """Seed the run's random number generators from ``seed``; the caller's states are restored on exit.

    Seeded: torch's CPU generator; the generators of CUDA when it is initialised, and those of
    the run's ``device`` type (initialised here first, so that they are seeded now and restored
    afterwards, not left with a seed queued for whenever the device starts); and the loaders'
    order ``generators``, each set to a state drawn from ``seed``, so that the order depends on
    ``seed`` alone. Nothing else is seeded: CUDA's pending seed, when CUDA is not initialised and
    the run does not use it, stays the caller's. ``seed=None``: nothing is seeded or restored.
    """
    if seed is None:
        yield
        return
    kinds = ["cuda"] if torch.cuda.is_initialized() else []
    if device is not None and device.type not in ("cpu", "meta", *kinds):
        kinds.append(device.type)
    modules = [torch.get_device_module(kind) for kind in kinds]
    for module in modules:
        init = getattr(module, "init", None)
        if callable(init):
            init()
    states = [(g, g.get_state()) for g in generators]
    try:
        with contextlib.ExitStack() as forks:
            forks.enter_context(torch.random.fork_rng(devices=[], device_type="cuda"))  # (the CPU's)
            for kind, module in zip(kinds, modules, strict=True):
                forks.enter_context(
                    torch.random.fork_rng(devices=range(module.device_count()), device_type=kind)
                )
            torch.default_generator.manual_seed(seed)
            for module in modules:
                getattr(module, "manual_seed_all", module.manual_seed)(seed)
            source = torch.Generator().manual_seed(seed)
            for g in generators:
                g.manual_seed(int(torch.randint(2**63 - 1, (), generator=source)))
            yield
    finally:
        for g, state in states:
            g.set_state(state)
