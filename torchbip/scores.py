"""Initial BiP scores: a per-layer scaled copy of the weight magnitudes (never aliased)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["init_scores", "score_dtype"]


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BiP keeps the scores of a weight of ``dtype`` in: at least float32.

    Example:
        >>> import torch
        >>> score_dtype(torch.bfloat16), score_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def init_scores(weight: Tensor, method: str = "scaled_magnitude") -> Tensor:
    r"""Initial scores for ``weight``, as a new tensor that shares no storage with it.

    ``"magnitude"`` gives :math:`|\theta|`; ``"scaled_magnitude"`` gives
    :math:`|\theta| \cdot \sqrt{6/\mathrm{fan\_in}} / \max|\theta|`, the magnitudes rescaled so
    each layer's scores span the range of a Kaiming-uniform initialisation of that layer. The
    ranking inside a layer is the magnitude ranking either way; the scaling sets how layers
    compete in the global ranking.

    Scores are kept in float32 for weights of lower precision (bfloat16, float16): rescaled in
    those, distinct magnitudes would round to ties, and the small steps the scores take would
    round away.

    Args:
        weight: the (masked) weight tensor.
        method: ``"scaled_magnitude"`` or ``"magnitude"``.

    Returns:
        A float tensor of ``weight``'s shape, in :func:`score_dtype` of its dtype.

    Example:
        >>> import torch
        >>> w = torch.tensor([[3.0, -6.0]])
        >>> init_scores(w, "magnitude").tolist()
        [[3.0, 6.0]]
        >>> [round(v, 4) for v in init_scores(w).flatten().tolist()]
        [0.866, 1.7321]
    """
    scores = weight.detach().abs().to(score_dtype(weight.dtype))  # (abs: a new tensor already)
    if method == "magnitude":
        return scores
    if method != "scaled_magnitude":
        raise ValueError(f"score_init must be 'scaled_magnitude' or 'magnitude', got {method!r}")
    fan_in = weight.numel() // weight.shape[0] if weight.dim() > 1 else weight.numel()
    peak = float(scores.max()) if scores.numel() else 0.0
    if peak > 0:
        scores.mul_(math.sqrt(6.0 / max(fan_in, 1)) / peak)
    return scores
