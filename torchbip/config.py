"""Hyperparameters of a BiP run, validated when constructed."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["BiPConfig"]

Schedule = Literal["cosine", "step", "constant"]
Mode = Literal["fused", "two_batch"]
ScoreInit = Literal["scaled_magnitude", "magnitude"]
Amp = Literal["bfloat16", "float16"]
Optimizer = Literal["sgd", "adamw"]

_SCHEDULES = ("cosine", "step", "constant")
_MODES = ("fused", "two_batch")
_SCORE_INITS = ("scaled_magnitude", "magnitude")
_OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class BiPConfig:
    r"""Settings of :func:`torchbip.global_prune` (BiP's bi-level loop).

    Notation of the paper (NeurIPS 2022) next to each argument: the lower level minimises
    :math:`\ell(m \odot \theta) + \frac{\gamma}{2}\|\theta\|^2` over the weights
    :math:`\theta` with learning rate :math:`\alpha` (``lower_lr``); the upper level updates the
    mask scores with learning rate :math:`\beta` (``upper_lr``) along
    :math:`\theta \odot g - c\, m \odot g \odot g`, where :math:`c` is ``implicit_coef``
    (:math:`1/\gamma` in theory).

    The defaults were chosen on a validation split, never on test data, by
    ``benchmarks/bench_accuracy.py --sweep`` (MNIST: 55,000 training images, 5,000 held out for
    validation; 90%, 96.4% and 98% sparsity; two seeds; one factor at a time around a center
    setting; results in ``benchmarks/results/``). On LeNet-300-100 (BiP for 2.5 epochs from a
    dense model trained 10 epochs with SGD at learning rate 0.05), the earlier defaults
    (``lower_lr=0.01``, ``upper_lr=10``, ``upper_schedule="step"``,
    ``score_init="scaled_magnitude"``) scored 96.40% mean validation accuracy; today's defaults
    97.25%, and 97.31% followed by a 1-epoch fine-tuning (which :func:`~torchbip.global_prune`
    does not run). ``lower_lr`` matters most there: 0.2 scored 97.55%. On LeNet-5 (20,000 training
    images, BiP for 1.25 epochs, then the fine-tuning), today's defaults score 97.46%, level with the
    best setting (97.47%), and ``lower_lr=0.2`` at 97.05%, so the default stays 0.05, the
    learning rate the dense models trained with; for a pretrained or a large model, pass the
    learning rate its own fine-tuning uses. ``upper_lr`` of 30 or more made LeNet-5 collapse to
    chance accuracy in some runs. ``mode="fused"`` beat ``"two_batch"`` on both models (97.31%
    vs 97.12%, 97.46% vs 95.68%); the implicit term (``implicit_coef=1``) was level with ``0``
    on LeNet-300-100 (97.31% and 97.36%) and ahead of it on LeNet-5 (97.46% and 97.33%).
    Checked again on LeNet-300-100 from a dense model trained at its validated learning rate
    (0.2): ``upper_lr=3`` and ``implicit_coef=1`` stay within 0.02 points of the best value of
    their factor, and ``lower_lr=0.2`` (the dense model's learning rate) is best there.

    Args:
        steps: number of BiP steps (one upper update each). ``None``: derived from ``epochs``.
        epochs: passes over the loader, used when ``steps`` is ``None`` (default 1 pass).
        mode: ``"fused"`` (one minibatch and one backward pass per step feed both levels) or
            ``"two_batch"`` (the paper: the lower and the upper step each draw a minibatch).
        lower_lr: learning rate :math:`\alpha` of the weights (of ``optimizer``).
        lower_schedule: ``"cosine"``, ``"step"`` (x0.1 at 50% and 75% of the steps) or
            ``"constant"``.
        upper_lr: learning rate :math:`\beta` of the scores.
        upper_schedule: schedule of ``upper_lr``, as ``lower_schedule``.
        momentum: SGD momentum of the weights (``optimizer="sgd"``; AdamW uses torch's default
            betas ``(0.9, 0.999)``).
        upper_momentum: SGD momentum of the scores.
        gamma: :math:`\gamma`, the lower level's L2 coefficient (weight decay of the weights).
        implicit_coef: coefficient :math:`c` of the implicit-gradient term. ``None`` uses the
            theoretical :math:`1/\gamma`; ``0.0`` switches the term off (plain score learning).
        min_keep: per-layer floor of the global ranking: ``None``, an int count or a float
            fraction of each tensor that is always kept.
        score_init: ``"scaled_magnitude"`` (:math:`|\theta|` scaled per layer by
            :math:`\sqrt{6/\mathrm{fan\_in}} / \max|\theta|`) or ``"magnitude"`` (:math:`|\theta|`).
        seed: seeds the run's random number generators: torch's, CUDA's where the run uses CUDA,
            and the ``torch.Generator`` objects the loaders draw their order from (so the same
            seed gives the same masks and weights); afterwards each is as the caller left it.
        device: where to run; ``None`` keeps the model where it is. The model is moved there
            (parameter identities are kept) and batches follow.
        progress: show a tqdm progress bar.
        log_every: steps between two progress-bar updates and two recorded losses.
        amp: ``None`` (full precision), ``"bfloat16"`` or ``"float16"``: run the forward pass
            under :func:`torch.autocast` (float16 with dynamic loss scaling). Weights, scores
            and optimiser states stay in their own dtype.
        checkpoint_path: file where the whole bi-level state is saved (weights, scores, both
            optimisers and schedules, step, data-stream positions, RNG); ``None``: no
            checkpoints.
        checkpoint_every: save every this many steps (0: only when the run ends).
        resume: continue from ``checkpoint_path`` if that file exists.
        optimizer: the weights' optimiser: ``"sgd"`` (:class:`torch.optim.SGD` with ``momentum``;
            the L2 term :math:`\gamma\theta` is part of the gradient, as in the paper) or
            ``"adamw"`` (:class:`torch.optim.AdamW` with ``lr=lower_lr`` and decoupled weight
            decay ``weight_decay=gamma``; pruned entries keep their values, whatever Adam's
            state or the decay would do to them). A parameter with a gradient hook of its own
            (``p.register_hook``) gets the L2 term in its gradient under both, so that the hook
            sees it.

    Example:
        >>> cfg = BiPConfig(steps=100, lower_lr=0.05)
        >>> cfg.steps, cfg.mode
        (100, 'fused')
        >>> BiPConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> BiPConfig(lower_lr=-1)
        Traceback (most recent call last):
        ...
        ValueError: lower_lr must be a finite number > 0, got -1
    """

    steps: int | None = None
    epochs: float | None = None
    mode: Mode = "fused"
    lower_lr: float = 0.05
    lower_schedule: Schedule = "cosine"
    upper_lr: float = 3.0
    upper_schedule: Schedule = "constant"
    momentum: float = 0.9
    upper_momentum: float = 0.9
    gamma: float = 5e-4
    implicit_coef: float | None = 1.0
    min_keep: int | float | None = None
    score_init: ScoreInit = "magnitude"
    seed: int | None = None
    device: str | None = None
    progress: bool = True
    log_every: int = field(default=10)
    amp: Amp | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    optimizer: Optimizer = "sgd"

    def __post_init__(self) -> None:
        self._normalise_strings()
        self._normalise_numbers()
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"steps must be an int >= 1 or None, got {self.steps!r}")
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        for name, allowed in (
            ("mode", _MODES),
            ("lower_schedule", _SCHEDULES),
            ("upper_schedule", _SCHEDULES),
            ("score_init", _SCORE_INITS),
            ("optimizer", _OPTIMIZERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _positive("lower_lr", self.lower_lr)
        _positive("upper_lr", self.upper_lr)
        for name in ("momentum", "upper_momentum"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        _positive("gamma", self.gamma)
        if self.gamma > FLOAT32_MAX:
            raise ValueError(
                f"gamma={self.gamma!r} is above the largest float32 ({FLOAT32_MAX!r}), which the weight "
                "decay of float32 weights cannot exceed; pass a smaller gamma"
            )
        if self.implicit_coef is not None and (
            not _is_number(self.implicit_coef)
            or not math.isfinite(self.implicit_coef)
            or not self.implicit_coef >= 0
        ):
            raise ValueError(
                f"implicit_coef must be a finite number >= 0 or None, got {self.implicit_coef!r}"
            )
        if self.implicit_coef is not None and self.implicit_coef > FLOAT32_MAX:
            raise ValueError(
                f"implicit_coef={self.implicit_coef!r} is above the largest float32 ({FLOAT32_MAX!r}), "
                "which a coefficient of float32 gradients cannot exceed; pass a smaller implicit_coef"
            )
        if self.implicit_coef is None and 1.0 / self.gamma > FLOAT32_MAX:
            raise ValueError(
                f"gamma={self.gamma!r} with implicit_coef=None makes the implicit coefficient 1/gamma = "
                f"{1.0 / self.gamma!r}, above the largest float32 ({FLOAT32_MAX!r}); pass a gamma of at "
                f"least {_GAMMA_MIN_FOR_INVERSE:.3g}, or a number as implicit_coef"
            )
        if self.min_keep is not None:
            if isinstance(self.min_keep, bool) or not _is_number(self.min_keep):
                raise ValueError(f"min_keep must be an int, a float or None, got {self.min_keep!r}")
            if isinstance(self.min_keep, int) and self.min_keep < 0:
                raise ValueError(f"min_keep must be >= 0, got {self.min_keep!r}")
            if isinstance(self.min_keep, float) and not 0.0 <= self.min_keep <= 1.0:
                raise ValueError(f"min_keep as a float must lie in [0, 1], got {self.min_keep!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise ValueError(
                f"seed must be an int in [-2**63, 2**64 - 1] (the range torch.manual_seed takes) or None, "
                f"got {self.seed!r}"
            )
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every must be an int >= 1, got {self.log_every!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be a bool, got {self.progress!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a str such as 'cpu' or 'cuda:0', or None, got {self.device!r}")
        if self.amp not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp must be None, 'bfloat16' or 'float16', got {self.amp!r}")
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path, str):
            raise ValueError(f"checkpoint_path must be a str or None, got {self.checkpoint_path!r}")
        if self.checkpoint_path is not None and not self.checkpoint_path.strip():
            raise ValueError(
                f"checkpoint_path={self.checkpoint_path!r} is empty; "
                "pass a file path such as 'bip.pt', or None"
            )
        if (
            isinstance(self.checkpoint_every, bool)
            or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 0
        ):
            raise ValueError(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}")
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be a bool, got {self.resume!r}")
        if self.resume and self.checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path (the file to resume from)")
        if self.checkpoint_every and self.checkpoint_path is None:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} needs checkpoint_path (the file to save to); "
                "without it no checkpoint would be written"
            )

    def _normalise_strings(self) -> None:
        """Accept ``str`` subclasses (``numpy.str_``, ``enum.StrEnum``), stored as plain ``str``.

        The settings go into checkpoints and states, which ``torch.load(weights_only=True)`` reads
        only when they hold plain types.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and type(value) is not str:
                object.__setattr__(self, f.name, str.__str__(value))

    def _normalise_numbers(self) -> None:
        """Accept NumPy and other ``numbers`` scalars (as torch's optimisers do), stored as Python types.

        (``numpy.bool_`` for the flags too.)
        """
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if is_bool(value) and type(value) is not bool:
                object.__setattr__(self, name, bool(value))
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if is_integral(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))
        for name in (*_FLOAT_FIELDS, "min_keep"):  # min_keep: an int count or a float fraction
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not is_bool(value) and type(value) not in (int, float):
                object.__setattr__(self, name, round(value) if is_integral(value) else float(value))

    @property
    def effective_implicit_coef(self) -> float:
        """The implicit-term coefficient in use (``1/gamma`` when ``implicit_coef`` is None)."""
        return 1.0 / self.gamma if self.implicit_coef is None else float(self.implicit_coef)

    def replace(self, **changes: Any) -> BiPConfig:
        """Return a copy with ``changes`` applied (unknown names raise ``TypeError``).

        Example:
            >>> BiPConfig().replace(steps=5).steps
            5
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown BiP option(s) {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BiPConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls().replace(**data)


_INT_FIELDS = ("steps", "seed", "log_every", "checkpoint_every")
_BOOL_FIELDS = ("progress", "resume")
_FLOAT_FIELDS = ("epochs", "lower_lr", "upper_lr", "momentum", "upper_momentum", "gamma", "implicit_coef")
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: The largest float32 (``torch.finfo(torch.float32).max``): coefficients that scale float32
#: tensors must not exceed it (torch refuses to convert them, late, naming no argument).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_GAMMA_MIN_FOR_INVERSE = 1.0 / FLOAT32_MAX


def is_bool(value: object) -> bool:
    """Whether ``value`` is a Python or NumPy bool (``numpy.bool_``, named ``bool`` in NumPy 2)."""
    return isinstance(value, (bool, np.bool_))


def is_integral(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not is_bool(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value: object) -> None:
    if not _is_number(value) or not math.isfinite(float(value)) or not float(value) > 0:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
