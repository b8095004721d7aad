"""Baselines that BiP is measured against, each leaving the model in torch's pruned form.

- :func:`imp`: iterative magnitude pruning with weight rewinding (the lottery-ticket recipe).
- :func:`omp_finetune`: one-shot global magnitude pruning, then fine-tuning.
- :func:`random_finetune`: a random mask at the same sparsity, then fine-tuning.
- :func:`score_prune`: BiP with the implicit-gradient term switched off (score learning in the
  spirit of Hydra).

All use :func:`train` for (re)training, and :func:`train`'s defaults are those of BiP's lower
level, the training of the weights (:class:`torchbip.BiPConfig`'s ``lower_lr``, ``momentum`` and
``gamma``, a cosine schedule): with their defaults, a baseline and :func:`torchbip.global_prune`
train the weights with the same SGD recipe, so methods compare like with like. Each baseline
leaves every pruned tensor's ``module.<name>`` equal to ``<name>_orig * <name>_mask`` as a plain
tensor without an autograd graph, so the model can be deep-copied (``copy.deepcopy``).

:func:`imp`, :func:`omp_finetune` and :func:`random_finetune` prune with
:func:`torch.nn.utils.prune.global_unstructured`, which would multiply a mask holding values other
than 0 and 1 (``prune.custom_from_mask`` with ``0.5`` entries) by itself; like
:func:`torchbip.global_prune`, they refuse such a tensor with a ``ValueError`` before they change
anything.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from torchbip._arguments import check_device
from torchbip._func import Target, check_binary_masks, resolve_targets, wholly_pruned
from torchbip._snapshot import ModelSnapshot
from torchbip.api import global_prune
from torchbip.config import FLOAT32_MAX, SEED_MAX, SEED_MIN, BiPConfig, is_bool, is_integral
from torchbip.data import model_args, split_batch, to_device
from torchbip.masks import count_from_amount, exact_fraction, validate_amount
from torchbip.pruned import pruned_tensors
from torchbip.report import PruneReport, SparsityReport, TensorSparsity, in_model_order

__all__ = [
    "IMPRound",
    "IMPResult",
    "imp",
    "omp_finetune",
    "random_finetune",
    "score_prune",
    "train",
]

LossFn = Callable[[Any, Any], Tensor]
Batches = Iterable[Any]

#: BiP's defaults: :func:`train`'s SGD defaults are read from its lower level (``lower_lr``,
#: ``momentum``, ``gamma``), so that the two cannot drift apart.
_BIP_DEFAULTS = BiPConfig()


def train(
    model: nn.Module,
    loader: Batches,
    epochs: float = 1.0,
    *,
    lr: float = _BIP_DEFAULTS.lower_lr,
    momentum: float = _BIP_DEFAULTS.momentum,
    weight_decay: float = _BIP_DEFAULTS.gamma,
    schedule: str = "cosine",
    loss_fn: LossFn = F.cross_entropy,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "train",
) -> float:
    """Train ``model`` with SGD; pruned tensors stay pruned (torch's hooks mask them).

    The defaults are the recipe of BiP's lower level, the training of the weights in
    :func:`torchbip.global_prune` and :class:`torchbip.BiP`: ``lr`` is
    ``BiPConfig().lower_lr``, ``momentum`` is ``BiPConfig().momentum``, ``weight_decay`` is
    ``BiPConfig().gamma`` (BiP's L2 term, added to the gradient as SGD's weight decay adds it),
    and the schedule is cosine, as BiP's default ``lower_schedule``. So every baseline of this
    module, called with its defaults, trains the weights as BiP does with its defaults, and the
    comparison measures the method, not the learning rate. They are read from
    :class:`torchbip.BiPConfig`, so a change of BiP's defaults moves these too.

    When training ends (or fails), each pruned tensor's ``module.<name>`` of the model is
    recomputed as ``<name>_orig * <name>_mask`` without gradients, as torch's pruning hook would
    compute it in the next forward pass: without that, it would hold the values from before the
    last optimizer step, attached to the last step's autograd graph, and ``copy.deepcopy(model)``
    would refuse it.

    Args:
        model: the model (pruned or dense).
        loader: a re-iterable of ``(inputs, targets)`` batches with a ``len``; as in
            :func:`torchbip.global_prune`, a plain tuple of inputs is passed as positional
            arguments (``model(*inputs)``), anything else, a namedtuple included, as one.
        epochs: passes over ``loader`` (a fraction runs part of the last pass).
        lr: initial learning rate; default BiP's ``lower_lr``.
        momentum: SGD momentum; default BiP's ``momentum``.
        weight_decay: L2 coefficient; default BiP's ``gamma``.
        schedule: ``"cosine"`` (from ``lr`` down to 0 over the run's steps) or ``"constant"``.
        loss_fn: ``loss_fn(outputs, targets)``.
        device: where batches go; default the model's device.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        The mean loss of the last epoch.

    Raises:
        ValueError: for bad ``epochs``/``schedule``/``lr``/``momentum``/``weight_decay``/``device``,
            an empty loader, batches that are not ``(inputs, targets)`` pairs, or a ``loss_fn``
            that returns no scalar real floating-point tensor computed with autograd (an integer,
            complex, detached or constant loss; raised before that batch's step).
        TypeError: for a ``loss_fn`` that is not callable, or a loader without a ``len()``.
        FloatingPointError: when the loss is NaN or infinite (raised before that batch's step;
            the baselines then restore the model).
        RuntimeError: when called under :func:`torch.inference_mode`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Linear(2, 2)
        >>> x = torch.randn(32, 2)
        >>> data = [(x, (x[:, 0] > 0).long())]
        >>> train(model, data, epochs=20, lr=0.5) < 0.5
        True
    """
    _check_outside_inference_mode("train")
    return _train(
        model, loader, epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        loss_fn=loss_fn, device=device, progress=progress, desc=desc,
    )  # fmt: skip


def _total_steps(epochs: float, batches: int) -> int:
    """The optimizer steps of ``epochs`` passes over ``batches`` batches (at least one)."""
    return max(1, round(epochs * batches))


def _train(
    model: nn.Module,
    loader: Batches,
    epochs: float,
    *,
    lr: float = _BIP_DEFAULTS.lower_lr,
    momentum: float = _BIP_DEFAULTS.momentum,
    weight_decay: float = _BIP_DEFAULTS.gamma,
    schedule: str = "cosine",
    loss_fn: LossFn = F.cross_entropy,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "train",
    checkpoint: tuple[int, Callable[[], None]] | None = None,
) -> float:
    """:func:`train`, with an optional checkpoint inside the run.

    ``checkpoint``: ``(step, take)``: ``take()`` is called once, after ``step`` optimizer steps
    of this run and before the next one (``0``: before the first), with the run's optimizer and
    schedule unchanged by it; ``step`` must be below the run's step count.
    """
    _check_training(loader, epochs, schedule=schedule)
    _check_option_values(
        {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "loss_fn": loss_fn, "device": device}
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return math.nan
    device = torch.device(device) if device is not None else params[0].device
    total = _total_steps(epochs, len(loader))  # type: ignore[arg-type]
    if checkpoint is not None and not 0 <= checkpoint[0] < total:
        raise ValueError(
            f"{desc}: checkpoint step {checkpoint[0]} is not one of the run's steps 0..{total - 1}"
        )
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        (lambda t: 0.5 * (1 + math.cos(math.pi * t / total))) if schedule == "cosine" else (lambda t: 1.0),
    )
    model.train()
    done, losses = 0, list[float]()
    try:
        with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
            while done < total:
                losses = []
                before = done
                for batch in loader:
                    if checkpoint is not None and done == checkpoint[0]:
                        checkpoint[1]()
                    inputs, targets = split_batch(batch, "loader")
                    inputs, targets = to_device(inputs, device), to_device(targets, device)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(*model_args(inputs)), targets)
                    if not isinstance(loss, Tensor) or loss.numel() != 1:  # (as global_prune words it)
                        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                        raise ValueError(f"{desc}: loss_fn must return a scalar tensor, got {shape}")
                    _check_loss(loss, desc)
                    value = float(loss.detach())
                    if not math.isfinite(value):  # a step on it would spread NaN into every weight
                        raise FloatingPointError(
                            f"{desc}: loss_fn returned a non-finite loss ({value}) at step {done}; lower lr "
                            "or check the data"
                        )
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(value)
                    done += 1
                    bar.update()
                    if done >= total:
                        break
                if done == before:
                    raise ValueError(
                        f"loader yielded no batch in pass {1 + done // len(loader)} (a one-shot "  # type: ignore[arg-type]
                        "iterator?); pass a re-iterable of batches such as a list or a DataLoader"
                    )
    finally:
        _refresh_pruned(model)
    return sum(losses) / max(1, len(losses))


def _check_loss(loss: Tensor, desc: str) -> None:
    """Refuse a scalar loss that a backward pass cannot minimise (``ValueError`` naming ``loss_fn``).

    Worded as :func:`torchbip.global_prune` words the same refusals.
    """
    if not loss.is_floating_point():
        raise ValueError(
            f"{desc}: loss_fn must return a real floating-point loss (got dtype {loss.dtype}): an integer, "
            "boolean or complex loss cannot be minimised by its gradient"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{desc}: loss_fn returned a loss without an autograd graph (dtype {loss.dtype}, "
            "requires_grad=False): does loss_fn return a detached or constant tensor (.detach(), .item(), "
            "torch.tensor(...)), or is gradient computation off (torch.no_grad())? Training needs a loss "
            "computed from the model's outputs"
        )


@torch.no_grad()
def _refresh_pruned(model: nn.Module) -> None:
    """Set every pruned tensor of ``model`` to ``<name>_orig * <name>_mask``, a tensor without a graph.

    What torch's pruning hook would compute in a forward pass without gradients. After training,
    ``module.<name>`` is what the hook computed in the last training forward pass: the values
    from before the optimizer's last step, attached to that step's autograd graph (a non-leaf
    tensor, which ``copy.deepcopy`` refuses). Every pruned tensor of the model is refreshed
    (:func:`torchbip.pruned.pruned_tensors`), not only those a baseline pruned.
    """
    for _, module, hook in pruned_tensors(model):
        setattr(module, hook._tensor_name, hook.apply_mask(module).detach())


def _check_training(
    loader: object, epochs: object, *, schedule: object = "cosine", zero: bool = False, name: str = "epochs"
) -> None:
    """Refuse training arguments that :func:`train` cannot honour, before any work (``ValueError``).

    ``zero``: ``epochs=0`` is allowed (no training). ``name``: the caller's name for ``epochs``
    (``"epochs_per_round"``, ``"rewind_epochs"``), for the message.
    """
    finite = _is_real(epochs) and math.isfinite(epochs)  # type: ignore[arg-type]
    if not finite or epochs < 0 or (epochs == 0 and not zero):  # type: ignore[operator]
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {epochs!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            f"loader must be a re-iterable of batches with a len() (a list or a DataLoader), got "
            f"{type(loader).__name__}"
        ) from err
    if n == 0:
        raise ValueError("loader is empty: it holds no batch")


def _is_real(value: object) -> bool:
    """A real number (NumPy scalars included), not a ``bool`` of either kind."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def _check_option_values(options: Mapping[str, Any]) -> None:
    """Refuse values of :func:`train`'s options that would fail late (or turn the weights NaN).

    Only the options present in ``options`` are checked, before any training. The ranges follow
    :class:`torchbip.BiPConfig` (``momentum`` in ``[0, 1)``); ``lr`` and ``weight_decay`` may be
    0 and, as coefficients of float32 tensors, are at most the largest float32.
    """
    for name in ("lr", "weight_decay"):
        if name in options:
            value = options[name]
            if not _is_real(value) or not math.isfinite(value) or not 0 <= value <= FLOAT32_MAX:
                raise ValueError(
                    f"{name} must be a finite number >= 0 (at most the largest float32, "
                    f"{FLOAT32_MAX:.4g}), got {value!r}"
                )
    if "momentum" in options:
        value = options["momentum"]
        if not _is_real(value) or not 0 <= value < 1:  # (NaN fails the comparison)
            raise ValueError(f"momentum must be a number in [0, 1), got {value!r}")
    if "loss_fn" in options and not callable(options["loss_fn"]):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {options['loss_fn']!r}")
    device = options.get("device")
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise TypeError(
                f"device must be a str such as 'cpu' or 'cuda:0', a torch.device, or None, got {device!r}"
            )
        check_device(device if isinstance(device, str) else str(device))


def _check_train_options(
    loader: object, epochs: object, options: dict[str, Any], *, zero: bool, name: str = "epochs"
) -> None:
    """Check :func:`train`'s arguments as a baseline will pass them, before the model is pruned.

    ``name``: the baseline's name for ``epochs``, for the message.
    """
    if "desc" in options:
        raise TypeError(
            f"train_options: desc={options['desc']!r} cannot be passed: the baseline labels each of "
            "its trainings itself"
        )
    try:
        inspect.signature(train).bind(None, loader, epochs, **options)
    except TypeError as err:
        raise TypeError(f"train_options: {err}") from err
    _check_training(loader, epochs, schedule=options.get("schedule", "cosine"), zero=zero, name=name)
    _check_option_values(options)


def _check_seed(seed: object) -> int:
    """``seed`` as a Python int, if it is an int that :func:`torch.manual_seed` takes (NumPy ints too)."""
    if not is_integral(seed) or not SEED_MIN <= seed <= SEED_MAX:  # type: ignore[operator]
        raise ValueError(
            f"seed must be an int in [-2**63, 2**64 - 1] (the range torch.manual_seed takes), got {seed!r}"
        )
    return int(seed)  # type: ignore[call-overload]


def _check_milestones(milestones: object) -> list[int | float]:
    """``milestones`` as a list of checked amounts (any iterable of amounts, read once)."""
    what = "an iterable of amounts (fractions in [0, 1] or counts) such as [0.5, 0.8]"
    if isinstance(milestones, (str, bytes, Mapping)) or not isinstance(milestones, Iterable):
        raise TypeError(f"milestones must be {what}, got {milestones!r}")
    try:
        values = list(milestones)
    except TypeError as err:  # (a 0-d array is Iterable, but not iterable)
        raise TypeError(f"milestones must be {what}, got {milestones!r}") from err
    return [validate_amount(m, f"milestones[{i}]") for i, m in enumerate(values)]


def _check_binary_masks(targets: Sequence[Target], baseline: str) -> None:
    """Refuse a target whose earlier mask holds values other than 0 and 1, naming ``baseline``.

    The baselines prune with :func:`torch.nn.utils.prune.global_unstructured`, which multiplies
    such a mask by itself (``0.5`` becomes ``0.25``); see :func:`torchbip._func.check_binary_masks`.
    """
    check_binary_masks(
        targets,
        f"{baseline} prunes with torch.nn.utils.prune.global_unstructured, which would multiply those "
        "earlier non-binary values by themselves (0.5 becomes 0.25)",
    )


def _check_outside_inference_mode(baseline: str) -> None:
    """Refuse a baseline called under :func:`torch.inference_mode` (it prunes and trains).

    Masks created there are inference tensors: even a call that trains nothing (``epochs=0``)
    would leave masks that no later training step can use.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{baseline} prunes and trains the model and cannot run under torch.inference_mode(): "
            "tensors created there (masks, optimiser states) could never be trained; call it outside "
            "the inference_mode() block"
        )


def _check_finite(targets: Sequence[Target], baseline: str) -> None:
    """Refuse tensors holding NaN or infinite values where a baseline ranks magnitudes."""
    bad = [t.fqn for t in targets if not bool(torch.isfinite(_current(t)).all())]
    if bad:
        raise ValueError(
            f"parameters names {', '.join(map(repr, bad))}, which holds NaN or infinite values; "
            f"{baseline} ranks the entries by magnitude, which such values make meaningless: load or "
            "re-initialise the weights first"
        )


def _remaining(targets: Sequence[Target]) -> int:
    """The number of unpruned entries of ``targets`` (all entries of a tensor not yet pruned)."""
    total = 0
    for target in targets:
        mask = getattr(target.module, target.name + "_mask", None)
        total += int(mask.sum()) if isinstance(mask, Tensor) else target.weight().numel()
    return total


def _current(target: Target) -> Tensor:
    """The tensor's values now: ``*_orig * *_mask`` for a pruned tensor, else the tensor itself.

    The ``module.<name>`` attribute of a pruned tensor is what torch's pruning hook computed in
    the last forward pass, before the optimizer's last step: ranking on it would be stale.
    """
    if target.is_pruned:
        module, name = target.module, target.name
        orig, mask = getattr(module, name + "_orig").detach(), getattr(module, name + "_mask")
        # (an entry pruned before is 0 whatever its value: inf * 0 would be NaN)
        return torch.where(mask != 0, orig * mask, torch.zeros((), dtype=orig.dtype, device=orig.device))
    return getattr(target.module, target.name).detach()


def _magnitude_prune(targets: Sequence[Target], amount: int | float) -> None:
    """Prune ``amount`` of the unpruned entries of ``targets`` by global magnitude, as torch does.

    :func:`torch.nn.utils.prune.global_unstructured` with ``L1Unstructured``, ranked on the
    current values of the tensors (:func:`_current`), not on the stale ``module.<name>``.
    """
    prune.global_unstructured(
        [(t.module, t.name) for t in targets],
        pruning_method=prune.L1Unstructured,
        importance_scores={(t.module, t.name): _current(t) for t in targets},
        amount=amount,
    )


def _snapshot(model: nn.Module, targets: Sequence[Target]) -> ModelSnapshot:
    """A snapshot of ``model`` that restores a failed baseline's changes, the pruned tensors' too.

    Besides parameters, buffers and hooks it keeps the ``module.<name>`` attributes of the
    tensors the call prunes and of every tensor pruned before it: the training's forward passes
    and :func:`_refresh_pruned` set those.
    """
    names = {t.name for t in targets} | {hook._tensor_name for _, _, hook in pruned_tensors(model)}
    return ModelSnapshot(model, names)


def omp_finetune(
    model: nn.Module,
    amount: int | float,
    loader: Batches,
    epochs: float = 1.0,
    *,
    parameters: Iterable[tuple[nn.Module, str]] | None = None,
    **train_options: Any,
) -> SparsityReport:
    """One-shot global magnitude pruning (OMP) to ``amount``, then :func:`train`.

    The entries are ranked by the magnitude of their current values (``weight_orig *
    weight_mask`` for a tensor pruned before), among the entries not yet pruned.

    Args:
        model: the (trained) model; pruned in place.
        amount: fraction of the remaining entries (float) or a count (int), ranked globally.
        loader: fine-tuning batches.
        epochs: fine-tuning epochs (0 skips fine-tuning).
        parameters: ``(module, name)`` pairs; by default every Linear/Conv weight.
        **train_options: passed to :func:`train` (``lr``, ``momentum``, ``weight_decay``,
            ``schedule``, ``loss_fn``, ``device``, ``progress``; not ``desc``, which the baseline
            sets), all checked before the model is pruned. The defaults are :func:`train`'s,
            BiP's lower-level recipe.

    Returns:
        The sparsity of exactly the tensors this call pruned (``parameters``, or the default
        weights), keyed by their fully qualified names, in the order of ``model.named_modules()``.

    Raises:
        ValueError: for a bad ``amount``, ``epochs`` or training option, a tensor whose earlier
            mask holds values other than 0 and 1, or one that holds NaN or infinite values,
            before the model is changed.
        RuntimeError: when called under :func:`torch.inference_mode`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
        >>> omp_finetune(model, 0.75, data, epochs=1).global_sparsity
        0.75
    """
    _check_outside_inference_mode("omp_finetune")
    amount = validate_amount(amount)  # a Python number: torch would round a float32 product
    _check_train_options(loader, epochs, train_options, zero=True)
    targets = resolve_targets(model, parameters)
    _check_binary_masks(targets, "omp_finetune")
    _check_finite(targets, "omp_finetune")
    before = wholly_pruned(targets)
    with _snapshot(model, targets).restored_on_failure():
        _magnitude_prune(targets, amount)
        if epochs > 0:
            _train(model, loader, epochs, desc="OMP fine-tune", **train_options)
        _refresh_pruned(model)  # (torch's pruning leaves the masked tensors with a graph, too)
        return _report(model, targets, before)  # (its warning may be an error: restored then)


def random_finetune(
    model: nn.Module,
    amount: int | float,
    loader: Batches,
    epochs: float = 1.0,
    *,
    parameters: Iterable[tuple[nn.Module, str]] | None = None,
    seed: int = 0,
    **train_options: Any,
) -> SparsityReport:
    """A uniformly random global mask at ``amount``, then :func:`train`.

    Args:
        model: the model; pruned in place.
        amount: as in :func:`omp_finetune`.
        loader: fine-tuning batches.
        epochs: fine-tuning epochs.
        parameters: ``(module, name)`` pairs; by default every Linear/Conv weight.
        seed: seed of the random scores: an int in ``[-2**63, 2**64 - 1]`` (the range
            :func:`torch.manual_seed` takes; a NumPy int too).
        **train_options: passed to :func:`train` (``lr``, ``momentum``, ``weight_decay``,
            ``schedule``, ``loss_fn``, ``device``, ``progress``; not ``desc``, which the baseline
            sets), all checked before the model is pruned. The defaults are :func:`train`'s,
            BiP's lower-level recipe.

    Returns:
        The sparsity of exactly the tensors this call pruned, as in :func:`omp_finetune`.

    Raises:
        ValueError: for a bad ``amount``, ``seed``, ``epochs`` or training option, or a tensor
            whose earlier mask holds values other than 0 and 1, before the model is changed.
        RuntimeError: when called under :func:`torch.inference_mode`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
        >>> report = random_finetune(model, 10, data, epochs=1, seed=1)
        >>> report.zeros, report.numel
        (10, 48)
    """
    _check_outside_inference_mode("random_finetune")
    amount = validate_amount(amount)  # a Python number, as in omp_finetune
    seed = _check_seed(seed)
    _check_train_options(loader, epochs, train_options, zero=True)
    targets = resolve_targets(model, parameters)
    _check_binary_masks(targets, "random_finetune")
    before = wholly_pruned(targets)
    gen = torch.Generator().manual_seed(seed)
    scores = {
        (t.module, t.name): torch.rand(t.weight().shape, generator=gen).to(t.weight().device) for t in targets
    }
    with _snapshot(model, targets).restored_on_failure():
        prune.global_unstructured(
            [(t.module, t.name) for t in targets],
            pruning_method=prune.L1Unstructured,
            importance_scores=scores,
            amount=amount,
        )
        if epochs > 0:
            _train(model, loader, epochs, desc="random fine-tune", **train_options)
        _refresh_pruned(model)  # (as in omp_finetune)
        return _report(model, targets, before)  # (as in omp_finetune)


def score_prune(model: nn.Module, amount: int | float, loader: Batches, **options: Any) -> PruneReport:
    r"""BiP with the implicit-gradient term off (``implicit_coef=0``): plain score learning.

    A score-learning baseline in the spirit of Hydra: the scores follow :math:`\theta \odot g`
    only, while the weights still train with the mask, as in :func:`torchbip.global_prune`.

    Args:
        model: the model to prune in place.
        amount: the sparsity (float fraction or int count), as in :func:`torchbip.global_prune`.
        loader: re-iterable ``(inputs, targets)`` batches.
        **options: any other argument or option of :func:`torchbip.global_prune`;
            ``implicit_coef`` is overridden with 0.

    Returns:
        The :class:`~torchbip.PruneReport` of the run.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
        >>> score_prune(model, 0.5, data, steps=2, progress=False).global_sparsity
        0.5
    """
    return global_prune(model, amount, loader, **{**options, "implicit_coef": 0.0})


@dataclass
class IMPRound:
    """One IMP round: the sparsity reached, the cumulative wall time and the training loss.

    Attributes:
        round: the round's number, from 1.
        sparsity: the pruned fraction of the entries of the tensors :func:`imp` prunes, after the
            round: every zero of their masks, so on a model pruned before, the earlier zeros too
            (``amount`` and ``milestones`` are fractions of the entries that were left), as
            :class:`~torchbip.PruneReport` and :func:`omp_finetune` count them.
        wall_time_s: IMP's own work since the call started (training, pruning, rewinding), not
            the time spent in ``on_round`` callbacks (an evaluation of each ticket).
        loss: the mean training loss of the round's last epoch.

    Example:
        >>> IMPRound(round=1, sparsity=0.2, wall_time_s=1.5, loss=0.3).sparsity
        0.2
    """

    round: int
    sparsity: float
    wall_time_s: float
    loss: float


@dataclass
class IMPResult:
    """What :func:`imp` did, round by round.

    Example:
        >>> IMPResult([IMPRound(1, 0.2, 1.5, 0.3), IMPRound(2, 0.36, 3.0, 0.2)]).wall_time_s
        3.0
    """

    rounds: list[IMPRound] = field(default_factory=list)

    @property
    def wall_time_s(self) -> float:
        """Total wall time."""
        return self.rounds[-1].wall_time_s if self.rounds else 0.0


def imp(
    model: nn.Module,
    amount: int | float,
    loader: Batches,
    epochs_per_round: float = 1.0,
    *,
    rate: float = 0.2,
    rewind_epochs: float = 0.0,
    milestones: Sequence[float] = (),
    parameters: Iterable[tuple[nn.Module, str]] | None = None,
    on_round: Callable[[IMPRound, nn.Module], None] | None = None,
    progress: bool = False,
    **train_options: Any,
) -> IMPResult:
    """Iterative magnitude pruning with rewinding, to the sparsity that ``amount`` asks for.

    Each round trains for ``epochs_per_round``, prunes ``rate`` of the remaining entries
    (rounded down, at least one) globally by the magnitude of their trained values, and rewinds
    the unpruned weights (all parameters, in fact) to the checkpoint taken after
    ``rewind_epochs`` of the first training (0: the initial weights, the original lottery-ticket
    recipe; more: late rewinding). The first training is round 0's: the checkpoint is the model
    after the first ``round(rewind_epochs * len(loader))`` optimizer steps of that one run, on
    its schedule (no separate training runs before it), and round 0 then goes on to its
    ``epochs_per_round`` epochs. Each later round trains ``epochs_per_round`` epochs from the
    checkpoint, with a fresh optimizer and schedule. ``rate`` counts as the decimal it is
    written as: ``rate=0.45`` prunes exactly 45 of 100 remaining entries (``floor(0.45 *
    100)``). Rounds are clipped so every sparsity in ``milestones`` and the final one are
    reached exactly. A last training round follows the final pruning, so the returned model is
    trained at its final mask.

    When ``amount`` prunes nothing (``amount=0``, or a fraction that rounds to no entry), there is
    no round to run: the model is returned untouched (not trained, not pruned) with an empty
    :class:`IMPResult` (no rounds, ``wall_time_s`` 0.0).

    Args:
        model: the model (dense or pruned); pruned in place.
        amount: final fraction of the currently remaining entries to prune (float), or count.
        loader: training batches.
        epochs_per_round: training epochs per round.
        rate: fraction of the remaining entries pruned per round.
        rewind_epochs: epochs of round 0's training after which the rewind checkpoint is
            taken: a number ``>= 0`` below ``epochs_per_round`` whose step
            (``round(rewind_epochs * len(loader))``) comes before the round's last step.
        milestones: sparsities (fractions of the entries remaining at the start) that must be
            hit exactly (a fraction, or an int count of them), given as a list or any iterable
            (read once); ``on_round`` sees the trained model at each.
        parameters: ``(module, name)`` pairs; by default every Linear/Conv weight.
        on_round: called after each round's training with the round and the model (evaluate
            here; the model is in train mode).
        progress: show a bar over the rounds (the rounds' trainings show none).
        **train_options: passed to :func:`train` (``lr``, ``momentum``, ``weight_decay``,
            ``schedule``, ``loss_fn``, ``device``; not ``desc``, which the baseline sets, nor
            ``progress``, which is ``imp``'s own), all checked before the model is pruned. The
            defaults are :func:`train`'s, BiP's lower-level recipe.

    Returns:
        An :class:`IMPResult` (per round: sparsity, earlier zeros included, cumulative time, loss).

    Raises:
        ValueError: for a bad ``rate``, ``epochs_per_round``, ``rewind_epochs`` (also one at or
            beyond ``epochs_per_round``: no such point in round 0's training), ``milestones``
            or training option, a tensor whose earlier mask holds values other than 0 and 1, or
            one that holds NaN or infinite values, before the model is changed.
        RuntimeError: when called under :func:`torch.inference_mode`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
        >>> # 48 weights; each round prunes floor(0.2 * kept): 39, 32, 26 kept, then 24 (50%)
        >>> result = imp(model, 0.5, data, epochs_per_round=1)
        >>> [round(r.sparsity, 4) for r in result.rounds]
        [0.1875, 0.3333, 0.4583, 0.5]
    """
    _check_outside_inference_mode("imp")
    real = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
    if not real or not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be a number in (0, 1), got {rate!r}")
    _check_train_options(loader, epochs_per_round, train_options, zero=False, name="epochs_per_round")
    _check_training(loader, rewind_epochs, zero=True, name="rewind_epochs")
    rewind_step = _rewind_step(len(loader), rewind_epochs, epochs_per_round)  # type: ignore[arg-type]
    if on_round is not None and not callable(on_round):
        raise TypeError(
            f"on_round must be callable as on_round(round, model) (an IMPRound and the model), or None, "
            f"got {on_round!r}"
        )
    milestones = _check_milestones(milestones)
    targets = resolve_targets(model, parameters)
    _check_binary_masks(targets, "imp")
    _check_finite(targets, "imp")
    before = wholly_pruned(targets)
    start_remaining = _remaining(targets)
    final_keep = start_remaining - count_from_amount(amount, start_remaining)
    milestone_keeps = [
        start_remaining - count_from_amount(m, start_remaining, f"milestones[{i}]")
        for i, m in enumerate(milestones)
    ]
    beyond = [m for m, keep in zip(milestones, milestone_keeps, strict=True) if keep < final_keep]
    if beyond:
        raise ValueError(
            f"milestones {beyond!r} lie beyond the final sparsity of amount={amount!r} "
            f"({1 - final_keep / start_remaining:.4f} of the {start_remaining} remaining entries)"
        )
    if final_keep == start_remaining:  # nothing to prune: no round, no training
        return IMPResult()
    stops = sorted({keep for keep in milestone_keeps if keep < start_remaining} | {final_keep}, reverse=True)
    keeps = _round_keeps(start_remaining, stops, exact_fraction(rate))
    with _snapshot(model, targets).restored_on_failure():
        result = _imp_rounds(
            model, loader, targets, keeps, start_remaining, epochs_per_round, rewind_step, on_round,
            progress, train_options,
        )  # fmt: skip
        _report(model, targets, before)  # (warns when the ranking pruned a whole tensor; as in omp_finetune)
    return result


def _round_keeps(start_remaining: int, stops: Sequence[int], rate: Fraction) -> list[int]:
    """The entries :func:`imp` keeps after each of its rounds, worked out before any round runs.

    Each round prunes :func:`_round_cut` of the remaining entries, clipped at the next of
    ``stops`` (the kept counts of the milestones and of the final sparsity, largest first).

    Example:
        >>> _round_keeps(48, [24], Fraction(1, 5))
        [39, 32, 26, 24]
    """
    keeps, remaining = [], start_remaining
    while remaining > stops[-1]:
        target = max(s for s in stops if s < remaining)
        remaining = max(target, remaining - _round_cut(remaining, rate))
        keeps.append(remaining)
    return keeps


def _imp_rounds(
    model: nn.Module,
    loader: Batches,
    targets: Sequence[Target],
    keeps: Sequence[int],
    start_remaining: int,
    epochs_per_round: float,
    rewind_step: int,
    on_round: Callable[[IMPRound, nn.Module], None] | None,
    progress: bool,
    train_options: dict[str, Any],
) -> IMPResult:
    """The rounds of :func:`imp`, its arguments checked.

    ``keeps``: the entries kept after each round (:func:`_round_keeps`). ``rewind_step``: the
    step of round 0's training after which the rewind checkpoint is taken (:func:`_rewind_step`).
    """
    start = time.perf_counter()
    in_callbacks = 0.0  # seconds spent in on_round: not IMP's time
    result = IMPResult()
    rewind: dict[str, Tensor] = {}

    def take_checkpoint() -> None:
        # Everything but the pruning masks (by identity: a parameter or buffer of the model's own
        # that is named ``*_mask`` is rewound like any other).
        masks = {
            id(module._buffers.get(fqn.rsplit(".", 1)[-1] + "_mask"))
            for fqn, module, _ in pruned_tensors(model)
        }
        state = model.state_dict(keep_vars=True)
        rewind.update({k: v.detach().clone() for k, v in state.items() if id(v) not in masks})

    checkpoint = None
    if rewind_step == 0:
        take_checkpoint()  # the initial weights
    else:
        checkpoint = (rewind_step, take_checkpoint)
    remaining = start_remaining
    entries = sum(t.weight().numel() for t in targets)  # earlier zeros count as pruned, as in PruneReport
    # One step per round, redrawn at each (mininterval=0: a round is seconds, not a tight loop).
    with tqdm(total=len(keeps), desc="IMP", disable=not progress, mininterval=0) as bar:
        loss = _train(
            model, loader, epochs_per_round, desc="IMP round 0", checkpoint=checkpoint, **train_options
        )
        if not rewind:  # (_train takes it at a step that it checked it reaches)
            raise RuntimeError("IMP: round 0's training ended before the rewind checkpoint was taken")
        for round_index, keep in enumerate(keeps, 1):
            _magnitude_prune(targets, remaining - keep)
            remaining = keep
            _rewind(model, rewind)
            loss = _train(model, loader, epochs_per_round, desc=f"IMP round {round_index}", **train_options)
            pruned = (entries - remaining) / entries  # exactly the zeros of the masks over the entries
            record = IMPRound(round_index, pruned, time.perf_counter() - start - in_callbacks, loss)
            result.rounds.append(record)
            bar.update()
            if on_round is not None:
                called = time.perf_counter()
                on_round(record, model)
                in_callbacks += time.perf_counter() - called
    return result


def _rewind_step(batches: int, rewind_epochs: float, epochs_per_round: float) -> int:
    """The step of round 0's training after which :func:`imp` takes its rewind checkpoint.

    ``round(rewind_epochs * batches)`` steps of the round's ``max(1, round(epochs_per_round *
    batches))`` (as :func:`train` counts them); ``0`` takes it before any step (the initial
    weights).

    Args:
        batches: ``len(loader)``.
        rewind_epochs: checked to be a finite number ``>= 0``.
        epochs_per_round: checked to be a finite number ``> 0``.

    Returns:
        The step, below the round's step count.

    Raises:
        ValueError: when ``rewind_epochs`` is not below ``epochs_per_round``, or when, rounded to
            whole batches, it is not before the round's last step: round 0's training has no such
            point.
    """
    if rewind_epochs >= epochs_per_round:
        raise ValueError(
            f"rewind_epochs={rewind_epochs!r} must be below epochs_per_round={epochs_per_round!r}: the "
            "rewind checkpoint is taken inside the first round's training, after rewind_epochs of its "
            "epochs_per_round epochs"
        )
    step, total = round(rewind_epochs * batches), _total_steps(epochs_per_round, batches)
    if step >= total:
        raise ValueError(
            f"rewind_epochs={rewind_epochs!r} with epochs_per_round={epochs_per_round!r} and {batches} "
            f"batches per epoch is step {step} of the first round's {total} steps: the rewind "
            "checkpoint must come before the round's last step; lower rewind_epochs"
        )
    return int(step)


def _round_cut(remaining: int, rate: Fraction) -> int:
    """How many of ``remaining`` entries one IMP round prunes: ``floor(rate * remaining)``, at least one.

    At least one, so that the last few entries (where ``rate * remaining < 1``) are still
    reached. With ``0 < rate < 1`` the count is below ``remaining`` for ``remaining >= 2``.

    Args:
        remaining: the unpruned entries before the round.
        rate: the exact fraction pruned per round (:func:`torchbip.masks.exact_fraction`).

    Returns:
        The number of entries to prune, before clipping at a milestone or the final sparsity.
    """
    return max(1, remaining * rate.numerator // rate.denominator)


@torch.no_grad()
def _rewind(model: nn.Module, rewind: dict[str, Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    for key, value in rewind.items():
        own = key if key in state else key + "_orig"
        if own in state:
            state[own].copy_(value)


def _report(model: nn.Module, targets: Sequence[Target], before: Sequence[str]) -> SparsityReport:
    """The sparsity of exactly ``targets`` (the tensors a baseline pruned), in model order.

    Keyed by their FQNs, in the order of ``model.named_modules()``. Warns when the global
    ranking pruned every entry of one of them, except those in ``before`` (pruned whole before
    the baseline ran, :func:`torchbip._func.wholly_pruned`).
    """
    entries = []
    for target in targets:
        mask = getattr(target.module, target.name + "_mask", None)
        if isinstance(mask, Tensor):
            sparsity = TensorSparsity(mask.numel(), int((mask == 0).sum()))
        else:  # not pruned (yet): every entry kept
            sparsity = TensorSparsity(target.weight().numel(), 0)
        entries.append((target.module, target.fqn, sparsity))
    report = in_model_order(model, entries)
    report.warn_if_pruned_away(
        "the global ranking", "lower amount or leave the tensor out (parameters=...)", before=before
    )
    return report
