"""Reports that read a model's pruning state (they never change it)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchbip._frames import user_stacklevel

__all__ = ["PruneReport", "SparsityReport", "TensorSparsity", "in_model_order", "sparsity_report"]


@dataclass(frozen=True)
class TensorSparsity:
    """Sparsity of one tensor.

    Attributes:
        numel: number of entries.
        zeros: number of pruned entries (zeros of the mask).

    Example:
        >>> TensorSparsity(numel=8, zeros=6).sparsity
        0.75
    """

    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of pruned entries."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor and global sparsity of a model's pruned tensors, keyed by tensor FQN.

    Attributes:
        tensors: one :class:`TensorSparsity` (``numel``, ``zeros``, ``sparsity``) per pruned
            tensor, keyed by its fully qualified name (e.g. ``"layer1.0.conv1.weight"``), in
            the order of ``model.named_modules()``.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = prune.l1_unstructured(model[0], "weight", amount=4)
        >>> report = sparsity_report(model)
        >>> report.tensors["0.weight"].zeros, report.global_sparsity
        (4, 0.25)
    """

    tensors: dict[str, TensorSparsity]

    @property
    def numel(self) -> int:
        """Total number of entries of the reported tensors."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def zeros(self) -> int:
        """Total number of pruned entries."""
        return sum(t.zeros for t in self.tensors.values())

    @property
    def global_sparsity(self) -> float:
        """Pruned fraction over all reported tensors."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def pruned_away(self) -> list[str]:
        """The tensors with every entry pruned (a layer that passes nothing on), in report order.

        Example:
            >>> SparsityReport({"a": TensorSparsity(4, 4), "b": TensorSparsity(4, 1)}).pruned_away
            ['a']
        """
        return [name for name, t in self.tensors.items() if t.numel and t.zeros == t.numel]

    def warn_if_pruned_away(self, ranking: str, remedy: str, *, before: Collection[str] = ()) -> None:
        """Warn (``UserWarning``) when a ranking pruned whole tensors but kept entries elsewhere.

        A tensor with no entry left disconnects the network there, which nothing else reports.
        When every entry of every tensor is pruned, that is what the budget asked for: no warning.

        Args:
            ranking: what ranked the entries, for the message (e.g. ``"BiP's global ranking"``).
            remedy: what keeps a floor in each tensor, for the message.
            before: names of tensors whose every entry was pruned before the ranking ran (an
                earlier round of pruning): not the ranking's doing, so not named.
        """
        gone = [name for name in self.pruned_away if name not in before]
        if gone and self.zeros < self.numel:
            warnings.warn(
                f"{ranking} pruned every entry of {', '.join(map(repr, gone))}: the network passes "
                f"nothing on through {'it' if len(gone) == 1 else 'them'}; {remedy}",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "global_sparsity": self.global_sparsity,
            "numel": self.numel,
            "zeros": self.zeros,
            "tensors": {k: {**asdict(v), "sparsity": v.sparsity} for k, v in self.tensors.items()},
        }

    def to_markdown(self) -> str:
        """A markdown table, one row per tensor and a total row."""
        lines = ["| tensor | entries | pruned | sparsity |", "| --- | ---: | ---: | ---: |"]
        for name, t in self.tensors.items():
            lines.append(f"| {name} | {t.numel:,} | {t.zeros:,} | {t.sparsity:.2%} |")
        lines.append(f"| **total** | {self.numel:,} | {self.zeros:,} | {self.global_sparsity:.2%} |")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, *, title: str | None = None, ax: Any = None) -> Any:
        """Bar chart of every tensor's density (its kept fraction), in model order.

        A dashed line marks the global density. Needs matplotlib (``pip install matplotlib``,
        or the ``examples`` extra).

        Args:
            path: if given, the figure is written there (the format follows the suffix,
                e.g. ``.png``, ``.svg``, ``.pdf``) and closed.
            title: the axes' title (default: the global sparsity).
            ax: a matplotlib ``Axes`` to draw into (default: a new figure sized to the number
                of tensors).

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: matplotlib is not installed, or is installed but cannot be imported.
            ValueError: the report has no tensors.

        Example:
            >>> from torch import nn
            >>> from torch.nn.utils import prune
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> _ = prune.l1_unstructured(model[0], "weight", amount=12)
            >>> fig = sparsity_report(model).plot()
            >>> [float(bar.get_height()) for bar in fig.axes[0].patches]
            [0.25]
            >>> import matplotlib.pyplot as plt
            >>> plt.close(fig)
        """
        if not self.tensors:
            raise ValueError("plot: the report has no tensors (the model has no pruned tensors)")
        try:
            pyplot = importlib.import_module("matplotlib.pyplot") if ax is None else None
        except ImportError as error:  # not installed, or installed but its import fails (say why)
            missing = isinstance(error, ModuleNotFoundError) and str(error.name).split(".")[0] == "matplotlib"
            why = "pip install matplotlib" if missing else "it is installed but cannot be imported"
            cause = f"{type(error).__name__}: {error}"
            raise ImportError(f"SparsityReport.plot needs matplotlib: {why} ({cause})") from error
        names = [name.removesuffix(".weight") for name in self.tensors]
        if ax is None:
            assert pyplot is not None
            fig, ax = pyplot.subplots(figsize=(0.2 * len(names) + 2, 4.8), layout="constrained")
        fig = ax.get_figure()
        ax.bar(range(len(names)), [1 - t.sparsity for t in self.tensors.values()])
        ax.axhline(1 - self.global_sparsity, color="tab:red", linestyle="--", label="global density")
        ax.set(ylabel="density (kept fraction)", ylim=(0, 1.02))
        ax.set_title(f"{self.global_sparsity:.1%} sparse" if title is None else title)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6 if len(names) > 20 else 8)
        ax.legend()
        if path is not None:
            try:
                fig.savefig(path, dpi=120)
            finally:  # also when the path cannot be written: no figure left open
                if pyplot is not None:
                    pyplot.close(fig)
        return fig


def in_model_order(
    model: nn.Module, tensors: Iterable[tuple[nn.Module, str, TensorSparsity]]
) -> SparsityReport:
    """A report of ``(module, fqn, sparsity)`` entries in the order of ``model.named_modules()``.

    Entries are ordered by their module's first place in ``model.named_modules()``, then by
    name within a module, whatever order they come in (a user's ``parameters=`` list). An entry
    whose module is not in ``model`` comes last.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> entries = [
        ...     (model[1], "1.weight", TensorSparsity(8, 2)),
        ...     (model[0], "0.weight", TensorSparsity(16, 4)),
        ... ]
        >>> list(in_model_order(model, entries).tensors)
        ['0.weight', '1.weight']
    """
    place: dict[int, int] = {}
    for index, (_, module) in enumerate(model.named_modules()):
        place.setdefault(id(module), index)
    ordered = sorted(tensors, key=lambda entry: (place.get(id(entry[0]), len(place)), entry[1]))
    return SparsityReport({fqn: sparsity for _, fqn, sparsity in ordered})


def sparsity_report(model: nn.Module, *, include_dense: bool = False) -> SparsityReport:
    """Count the zeros of every pruning mask of ``model``.

    Args:
        model: any module; tensors pruned by torch's or torchbip's methods are reported by their
            ``*_mask`` buffers.
        include_dense: also report unpruned ``nn.Linear``/``nn.Conv*d`` weights (0 zeros counted
            from the values themselves), a computed weight too (``weight_norm``,
            ``spectral_norm`` or another parametrization: the zeros of the weight it computes);
            a weight that several modules share is counted once, under its first name, and an
            uninitialised weight of a lazy layer (``nn.LazyLinear`` before its first forward
            pass), which has no entries yet, is left out.

    Returns:
        A :class:`SparsityReport`, in the order of ``model.named_modules()`` (then by name within
        a module).

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import prune
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = prune.l1_unstructured(model[0], "weight", amount=4)
        >>> report = sparsity_report(model)
        >>> report.tensors["0.weight"].zeros, report.global_sparsity
        (4, 0.25)
    """
    from torchbip._func import PRUNABLE_TYPES, computed_weight
    from torchbip.pruned import pruned_tensors

    entries: list[tuple[nn.Module, str, TensorSparsity]] = []
    for fqn, module, hook in pruned_tensors(model):  # each holds its mask buffer
        mask = module._buffers[hook._tensor_name + "_mask"]
        assert mask is not None
        entries.append((module, fqn, TensorSparsity(mask.numel(), int((mask == 0).sum()))))
    if include_dense:
        reported = {fqn for _, fqn, _ in entries}
        seen: set[int] = set()  # dense weights shared by several modules: counted once
        for module_name, module in model.named_modules():  # (a shared module: once, its first name)
            fqn = f"{module_name}.weight" if module_name else "weight"
            if not isinstance(module, PRUNABLE_TYPES) or fqn in reported:
                continue
            weight: Tensor | None = module._parameters.get("weight")
            if weight is None and computed_weight(module, "weight") is not None:
                weight = _computed_values(module)  # (one per module)
            elif weight is None or nn.parameter.is_lazy(weight) or id(weight) in seen:
                continue
            else:
                seen.add(id(weight))
            entries.append((module, fqn, TensorSparsity(weight.numel(), int((weight == 0).sum()))))
    return in_model_order(model, entries)


def _computed_values(module: nn.Module) -> Tensor:
    """The values of ``module.weight``, computed from other tensors, changing nothing.

    Read in eval mode: in train mode ``parametrizations.spectral_norm`` runs a power iteration
    that updates its buffers. The training flags are restored afterwards.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            weight = module.weight
    finally:
        for m, mode in modes:
            m.training = mode
    assert isinstance(weight, Tensor)
    return weight


@dataclass(frozen=True)
class PruneReport:
    """What :func:`torchbip.global_prune` did.

    Attributes:
        sparsity: per-tensor and global sparsity of the pruned tensors: every zero of their
            masks, so on a model pruned before, the earlier zeros too (``amount`` is a fraction
            of the entries that were left).
        steps: BiP steps run.
        wall_time_s: wall-clock seconds of the run.
        final_loss: mean training loss over the last ``log_every`` steps.
        losses: ``(step, loss)`` pairs recorded every ``log_every`` steps. The loss of a step is
            the one its upper step computes: in the fused mode that of its one batch, in
            ``mode="two_batch"`` that of the second (upper) batch at the weights after the
            lower step.
        amount: the ``amount`` asked for.
        config: the resolved :class:`torchbip.BiPConfig` as a dict.
        skipped_steps: steps skipped because float16 gradients overflowed (``amp="float16"``). In
            ``mode="two_batch"`` a step counts once when its lower or upper pass overflowed (that
            pass's update is skipped, the other one is applied), so it never exceeds ``steps``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchbip
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(2)]
        >>> report = torchbip.global_prune(model, 0.5, data, steps=3, progress=False)
        >>> report.steps, report.global_sparsity, list(report.sparsity.tensors)
        (3, 0.5, ['0.weight', '2.weight'])
        >>> report.to_dict()["sparsity"]["global_sparsity"]
        0.5
    """

    sparsity: SparsityReport
    steps: int
    wall_time_s: float
    final_loss: float
    amount: int | float
    config: dict[str, Any]
    losses: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: int = 0

    @property
    def global_sparsity(self) -> float:
        """Pruned fraction over all pruned tensors."""
        return self.sparsity.global_sparsity

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "method": "bip",
            "amount": self.amount,
            "steps": self.steps,
            "wall_time_s": self.wall_time_s,
            "final_loss": self.final_loss,
            "losses": [list(x) for x in self.losses],
            "skipped_steps": self.skipped_steps,
            "config": self.config,
            "sparsity": self.sparsity.to_dict(),
        }

    def to_markdown(self) -> str:
        """Summary line plus the per-tensor table."""
        head = (
            f"BiP: {self.steps} steps in {self.wall_time_s:.1f} s, final loss "
            f"{self.final_loss:.4f}, global sparsity {self.global_sparsity:.2%}\n\n"
        )
        return head + self.sparsity.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()
