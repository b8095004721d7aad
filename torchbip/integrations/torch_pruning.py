"""BiP's learned channel scores as a Torch-Pruning importance: :class:`BiPImportance`.

Torch-Pruning's pruners (``tp.pruner.MetaPruner`` and the pruners built on it) rank each
dependency group's channels by an importance object and remove the lowest. Switching one of
them to BiP is one line: train a :class:`torchbip.BiP` with a :class:`torchbip.Coupled` (or a
filter, ``Groups(dim=0)``) layout, then pass ``importance=BiPImportance(pruner)``:

.. code-block:: python

    import torch_pruning as tp
    from torchbip.integrations.torch_pruning import BiPImportance

    bip = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(example_inputs))
    ...  # the training loop: loss.backward(); optimizer.step(); bip.step()
    importance = BiPImportance(bip)  # was: tp.importance.MagnitudeImportance(p=1)
    bip.finish()
    torchbip.export.make_permanent(model)  # plain weights, as Torch-Pruning expects
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=importance,
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()  # removes the channels BiP pruned

The importance of a channel is its learned score (a higher score is kept). It is read when the
object is built, so build it after training and before :meth:`torchbip.BiP.finish`, which
drops the scores. With the ratio BiP trained at and a per-layer budget
(``Coupled(..., budget="layer")``, Torch-Pruning's default of one ratio per group), Torch-Pruning
removes exactly BiP's pruned channels when the two counts agree: Torch-Pruning keeps
``int(channels * (1 - ratio))`` channels of a group, BiP keeps ``channels - round(amount *
channels)``; for an amount where they differ (0.3 of 8 channels: 5 against 6) it removes one
channel more than BiP did (0.25 and 0.5 of 8 agree). A global budget ranks all
groups together, which Torch-Pruning's per-group ratio does not reproduce. Groups BiP did not
score (the classifier, layers it left dense) get no importance, and Torch-Pruning leaves them
alone.

A filter layout (``Groups(dim=0)``) scores the filters of each layer on its own, and only its
weights' scores rank the channels (a pruned bias's scores are not used). Where Torch-Pruning
removes the same output channels of several layers together (one dependency group: the convs
that feed a residual add, for example), no one ranking reproduces the filters BiP pruned in each
layer: for a group that holds a second layer whose filters BiP scored, the importance raises a
``ValueError`` naming both layers (when Torch-Pruning asks for that group's importance, before it
prunes the group) rather than rank the group by one layer's scores. Train such a model with
``layout=torchbip.Coupled(example_inputs)``, which scores coupled channels jointly.

Needs Torch-Pruning (``pip install "torchbip[export]"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchbip._tracing import torch_pruning
from torchbip.coupled import CoupledLayout
from torchbip.layouts import GroupLayout
from torchbip.pruner import BiP

tp = torch_pruning("torchbip.integrations.torch_pruning")
_Importance: Any = tp.importance.Importance

__all__ = ["BiPImportance"]


class BiPImportance(_Importance):
    """A Torch-Pruning importance that ranks channels by a :class:`torchbip.BiP`'s scores.

    Args:
        pruner: a BiP object with a :class:`torchbip.Coupled` or ``Groups(dim=0)`` layout
            (one score per channel or filter), before :meth:`~torchbip.BiP.finish`.

    Raises:
        TypeError: for another object or layout.
        RuntimeError: after :meth:`~torchbip.BiP.finish`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torch_pruning as tp
        >>> import torchbip
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> bip = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x))
        >>> importance = BiPImportance(bip)
        >>> _ = bip.finish()
        >>> kept = model[1].weight_mask.nonzero().flatten()
        >>> bias = model[1].bias_orig.detach()[kept]
        >>> _ = torchbip.export.make_permanent(model)
        >>> tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=0.5,
        ...                      ignored_layers=[model[3]]).step()
        >>> model[0].out_channels, model[1].num_features, torch.equal(model[1].bias.detach(), bias)
        (4, 4, True)
    """

    def __init__(self, pruner: BiP) -> None:
        if not isinstance(pruner, BiP):
            raise TypeError(f"BiPImportance needs a torchbip.BiP object, got {type(pruner).__name__}")
        if pruner.finished:
            raise RuntimeError(
                "BiPImportance: this BiP object has finished (its scores are gone); build the "
                "importance before pruner.finish()"
            )
        layout = pruner.layout
        # per module whose output channels BiP scores: the score of each output channel
        self.scores: dict[int, Tensor] = {}
        # the names of those modules (for the messages), and whether each layer was scored alone
        self.names: dict[int, str] = {}
        self.per_layer = False
        if isinstance(layout, CoupledLayout):
            for owner, group in zip(layout.owners, layout.groups, strict=True):
                values = pruner.score_views[owner].detach().clone()
                for slot in group.slots:
                    target = pruner.targets[slot.param]
                    if slot.dim == 0 and target.name == "weight":
                        per_channel = torch.empty(target.weight().shape[0], dtype=values.dtype)
                        per_channel[slot.positions] = values[slot.channels.to(values.device)].cpu()
                        self.scores[id(target.module)] = per_channel
                        self.names[id(target.module)] = target.module_fqn
        elif isinstance(layout, GroupLayout) and layout.dim == 0:
            self.per_layer = True
            for target, view in zip(pruner.targets, pruner.score_views, strict=True):
                if target.name == "weight":  # (a pruned bias has filter scores of its own: not these)
                    self.scores[id(target.module)] = view.detach().clone().cpu()
                    self.names[id(target.module)] = target.module_fqn
        else:
            raise TypeError(
                f"BiPImportance needs one score per channel: a BiP with layout=torchbip.Coupled(...) or "
                f"Groups(dim=0) ('filter'), got layout {pruner.spec!r}"
            )

    def __call__(self, group: Any) -> Tensor | None:
        """The BiP scores of the group's root channels (``None``: BiP did not score this group).

        Raises:
            ValueError: with a filter layout, for a group whose output channels are also those of
                another layer whose filters BiP scored (see the module's documentation).
            RuntimeError: for a layer whose channels changed since the scores were read.
        """
        root = group[0]
        module = root.dep.target.module
        if self.per_layer:
            self._refuse_layers_scored_apart(group, module)
        scores = self.scores.get(id(module))
        if scores is None:
            return None
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.shape[0] != scores.numel():
            raise RuntimeError(
                f"BiPImportance: the {type(module).__name__} has {weight.shape[0]} output channels now, "
                f"BiP scored {scores.numel()}: the pruner removed channels since the scores were read "
                "(iterative_steps > 1?); BiP's scores rank the model as BiP trained it: prune in one "
                "step (iterative_steps=1)"
            )
        return scores[torch.as_tensor(list(root.idxs), dtype=torch.long)]

    def _refuse_layers_scored_apart(self, group: Any, root: Any) -> None:
        """Refuse a group that removes the output channels of several layers BiP scored apart."""
        layers = [root]
        for dep, _ in group:
            other = dep.target.module
            if (
                id(other) in self.scores
                and all(other is not m for m in layers)
                and _prunes_outputs(group, dep)
            ):
                layers.append(other)
        if len(layers) == 1:  # (the root alone, scored or not)
            return
        graph_names = getattr(getattr(group, "_DG", None), "_module2name", None) or {}
        names = [
            repr(self.names[id(m)]) if id(m) in self.names
            else f"{graph_names.get(m, type(m).__name__)!r} (not pruned by BiP)"
            for m in layers
        ]  # fmt: skip
        raise ValueError(
            f"BiPImportance: Torch-Pruning removes the same output channels of {', '.join(names[:-1])} "
            f"and {names[-1]} together (one dependency group, e.g. the layers that feed a residual add), "
            "but BiP's filter layout (Groups(dim=0)) scored the filters of each layer on its own, so no "
            "one ranking of the group keeps the filters BiP kept in each; train with "
            "layout=torchbip.Coupled(example_inputs), which scores coupled channels jointly"
        )


def _prunes_outputs(group: Any, dep: Any) -> bool:
    """Whether the dependency ``dep`` of ``group`` removes its layer's output channels."""
    graph = getattr(group, "_DG", None)
    if graph is not None and hasattr(graph, "is_out_channel_pruning_fn"):
        return bool(graph.is_out_channel_pruning_fn(dep.handler))
    return getattr(dep.handler, "__name__", None) == "prune_out_channels"
