r"""N:M (e.g. 2:4) BiP masks: the top ``n`` scores in every block of ``m`` along the input dim.

:class:`BiPSemiStructured` is a :class:`torch.nn.utils.prune.BasePruningMethod` whose mask keeps,
in every block of ``m`` consecutive entries along ``dim`` (by default the last, the input
dimension of a ``Linear`` weight), the ``n`` entries of highest magnitude of the scores (the weight,
or ``importance_scores``; :func:`torchbip.masks.nm_mask` of ``|t|``). The scores that
``global_prune(structured="2:4")`` learns are ranked by value by its own selection, not through
this method.
The sparsity is ``1 - n/m`` by construction, so there is no ``amount``. Its ``PRUNING_TYPE`` is
``"global"`` so that a :class:`~torch.nn.utils.prune.PruningContainer` hands it the whole tensor
(torch flattens the remaining entries for ``"unstructured"`` methods, which loses the blocks);
entries pruned earlier are never revived.

On NVIDIA GPUs of compute capability 8.0 or newer a 2:4 mask feeds
:func:`torchbip.sparse.to_semi_structured` (torch's semi-structured sparse kernels); on a CPU
only the mask is produced and the model runs with dense kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip.masks import nm_mask
from torchbip.method import (
    BiPMethod,
    attach_scores,
    check_finite,
    check_mask_shape,
    check_scores_device,
    check_scores_slot,
    check_scores_type,
    integer_argument,
    magnitudes,
    named_tensor,
    outside_inference_mode,
    scores_source,
    unchanged_on_failure,
)

__all__ = ["BiPSemiStructured", "bip_semi_structured"]


def _check_nm(n: object, m: object) -> tuple[int, int]:
    """``n`` and ``m`` as Python ints (NumPy integers are accepted), or an error naming them."""
    n, m = integer_argument("n", n), integer_argument("m", m)
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"n={n}, m={m}: need m >= 1 and 0 <= n <= m")
    return n, m


class BiPSemiStructured(BiPMethod):
    """Keep the ``n`` entries of highest magnitude in every block of ``m`` entries along ``dim``.

    :meth:`compute_mask` ranks ``|t|`` in each block, where ``t`` is the weight or the
    ``importance_scores``; ties keep the lower index, an entry pruned earlier is never revived.
    State on the module after :meth:`apply`: ``<name>_orig``, ``<name>_mask``, the pruning
    hook (deep-copyable after a training step, see :class:`~torchbip.method.BiPMethod`), and the
    non-persistent ``<name>_scores`` buffer (the scores as given), which
    :func:`torch.nn.utils.prune.remove` drops, also through a
    :class:`~torch.nn.utils.prune.PruningContainer`.

    Args:
        n: entries kept per block.
        m: block length (the size along ``dim`` must be a multiple of it).
        dim: the block axis: ``-1`` (the default) is the input dimension of a ``Linear`` weight;
            for a convolution weight ``(out, in, kh, kw)`` pass ``dim=1`` (input channels).

    Example:
        >>> import torch
        >>> method = BiPSemiStructured(n=2, m=4)
        >>> scores = torch.tensor([[4.0, 1.0, -3.0, 2.0, 0.5, -0.1, 0.2, -0.9]])
        >>> method.compute_mask(scores, torch.ones(1, 8)).tolist()
        [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]]
    """

    PRUNING_TYPE = "global"

    def __init__(self, n: int = 2, m: int = 4, dim: int = -1) -> None:
        self.n, self.m = _check_nm(n, m)
        self.dim = integer_argument("dim", dim)  # (NumPy integers become Python ints)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """Return ``default_mask`` times the N:M mask of ``|t|`` among the unpruned entries."""
        check_mask_shape(t, default_mask)
        check_finite(t)
        keep = nm_mask(magnitudes(t), self.n, self.m, self.dim, allowed=default_mask != 0)
        # (a soft default_mask keeps its values; empty_like keeps its memory format)
        return torch.empty_like(default_mask).copy_(keep).mul_(default_mask)

    @classmethod
    @outside_inference_mode
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        n: int = 2,
        m: int = 4,
        dim: int = -1,
        importance_scores: Tensor | None = None,
    ) -> prune.BasePruningMethod:
        """Prune ``module.<name>`` to an N:M pattern by the magnitudes of scores (default: the weight).

        Raises:
            ValueError: for bad ``n``, ``m``, ``dim`` or ``importance_scores``, scores (the
                ``importance_scores`` or, without them, the weight) holding NaN or infinite
                values, or a module that already holds an attribute ``<name>_scores`` of its own
                (:func:`~torchbip.method.check_scores_slot`); the module is unchanged.
        """
        n, m = _check_nm(n, m)
        current = named_tensor(module, name)
        check_scores_slot(module, name)
        check_scores_type(importance_scores)
        check_scores_device(importance_scores, current, name)
        scores = current.detach().abs() if importance_scores is None else importance_scores.detach()
        if scores.shape != current.shape:
            raise ValueError(
                f"importance_scores has shape {tuple(scores.shape)} but {name} has shape "
                f"{tuple(current.shape)}"
            )
        dim = integer_argument("dim", dim)  # (a NumPy integer becomes a Python int)
        nm_mask(scores, n, m, dim)  # raise for a bad dim or block size before torch acts
        # and for scores that cannot be ranked: torch's own rollback would drop an earlier pruning
        # hook of this tensor and move a first-time parameter to the end of the module's parameters
        check_finite(scores, scores_source(importance_scores, name))
        with unchanged_on_failure(module, name):
            method = super().apply(module, name, n=n, m=m, dim=dim, importance_scores=scores)
        attach_scores(method, module, name, scores.clone())
        return method


def bip_semi_structured(
    module: nn.Module,
    name: str,
    n: int = 2,
    m: int = 4,
    dim: int = -1,
    importance_scores: Tensor | None = None,
) -> nn.Module:
    """Prune ``module.<name>`` to an N:M pattern (2:4 by default), in torch's functional style.

    Args:
        module: module containing the tensor to prune.
        name: parameter name within ``module``.
        n: entries kept per block of ``m``.
        m: block length along ``dim``.
        dim: the block axis (``-1``: the input dimension of a ``Linear`` weight).
        importance_scores: optional scores of the parameter's shape, ranked by magnitude
            (default: the weight).

    Returns:
        ``module``, modified in place.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(8, 3)
        >>> _ = bip_semi_structured(layer, "weight")
        >>> layer.weight_mask.view(3, 2, 4).sum(dim=-1).tolist()
        [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    BiPSemiStructured.apply(module, name, n=n, m=m, dim=dim, importance_scores=importance_scores)
    return module
