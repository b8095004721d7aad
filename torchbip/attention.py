r"""Attention with fewer heads: what :func:`torchbip.export_slim` makes of pruned heads.

:class:`torch.nn.MultiheadAttention` ties its inner width to ``embed_dim`` (``num_heads *
head_dim == embed_dim``), so a head cannot be removed from it. :class:`SlimMultiheadAttention`
is the same module with fewer heads of the same ``head_dim``: its ``in_proj_weight`` holds the
kept heads' query, key and value rows (``3 * num_heads * head_dim`` rows of ``embed_dim``
columns) and its ``out_proj`` reads ``num_heads * head_dim`` inputs. Its state dict has the keys
of the module it replaces (and one more, below), and it takes the same call arguments (``key_padding_mask``,
``need_weights``, ``attn_mask``, ``average_attn_weights``, ``is_causal``), so a model that calls
its attention as torchvision's ``VisionTransformer`` or ``nn.TransformerEncoderLayer`` do runs
unchanged. Attention weights (``need_weights=True``) are those of the kept heads. A per-head
``attn_mask`` of shape ``(batch * heads, L, S)`` may hold a row per head of the original module
(the kept heads' rows are used) or a row per kept head. The module records which heads it kept
(:attr:`SlimMultiheadAttention.kept_heads`, of :attr:`SlimMultiheadAttention.original_heads`) in
its state dict under the one more key, ``<prefix>_extra_state``: a tensor ``[original_heads,
*kept_heads]`` that :func:`torchbip.load_slim_state_dict` restores.

A head is removable when its value rows and value bias are zero: its output is then zero
whatever its attention weights, so removing it (with ``out_proj``'s columns for it) leaves the
module's output unchanged. :class:`torchbip.Coupled` masks a pruned head's query, key and value
rows, so every pruned head is removable.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    >>> with torch.no_grad():
    ...     mha.in_proj_weight[16 + 2:16 + 4] = 0  # the value rows of head 1 (head_dim 2)
    ...     mha.in_proj_bias[16 + 2:16 + 4] = 0
    >>> removable_heads(mha)
    [1]
    >>> slim = SlimMultiheadAttention.from_attention(mha, keep=[0, 2, 3])
    >>> x = torch.randn(2, 5, 8)
    >>> slim.num_heads, torch.allclose(slim(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    (3, True)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbip.export import baked_copy
from torchbip.pruned import named_pruning_hooks

__all__ = ["SlimMultiheadAttention", "head_origin", "head_rows", "removable_heads"]


def head_rows(embed_dim: int, head_dim: int, head: int) -> list[int]:
    """The rows of ``in_proj_weight`` that hold one head: its query, key and value rows.

    Example:
        >>> head_rows(8, 2, 1)
        [2, 3, 10, 11, 18, 19]
    """
    return [part * embed_dim + head * head_dim + i for part in range(3) for i in range(head_dim)]


def head_origin(state: object, heads: int, what: str) -> tuple[int, tuple[int, ...]] | None:
    """``(original_heads, kept_heads)`` from a :class:`SlimMultiheadAttention`'s extra state.

    Args:
        state: the tensor ``[original_heads, *kept_heads]``; an empty one records nothing.
        heads: the number of heads the module keeps.
        what: names ``state`` in the error.

    Returns:
        The original number of heads and the kept heads' indices, or ``None`` for an empty tensor.

    Raises:
        ValueError: unless ``state`` is an empty or a 1-D integer tensor of ``heads + 1`` values
            whose kept indices increase within ``0 .. original_heads - 1``.

    Example:
        >>> head_origin(torch.tensor([4, 0, 2, 3]), 3, "state")
        (4, (0, 2, 3))
    """
    integer = isinstance(state, Tensor) and not (state.dtype.is_floating_point or state.is_complex())
    if not isinstance(state, Tensor) or not integer or state.dtype == torch.bool or state.dim() != 1:
        raise ValueError(f"{what} must be a 1-D integer tensor [original_heads, *kept_heads], got {state!r}")
    if state.numel() == 0:
        return None
    original, *kept = (int(v) for v in state.tolist())
    increasing = all(a < b for a, b in itertools.pairwise(kept))
    if len(kept) != heads or not kept or not increasing or kept[0] < 0 or kept[-1] >= original:
        raise ValueError(
            f"{what} {state.tolist()} does not record {heads} kept heads: it must be "
            f"[original_heads, *kept_heads] with {heads} increasing head indices below original_heads"
        )
    return original, tuple(kept)


def removable_heads(module: nn.MultiheadAttention) -> list[int]:
    """The heads of ``module`` whose value rows and value bias are all zero.

    Only attention with one ``in_proj_weight`` (query, key and value of the same width) and
    without ``bias_k``/``bias_v`` is considered; for other modules the list is empty.
    """
    if not (_supported(module) or isinstance(module, SlimMultiheadAttention)):
        return []
    weight, bias = module.in_proj_weight, module.in_proj_bias
    n, d = weight.shape[0] // 3, module.head_dim
    out = []
    for h in range(module.num_heads):
        rows = slice(2 * n + h * d, 2 * n + (h + 1) * d)
        if not weight[rows].any() and (bias is None or not bias[rows].any()):
            out.append(h)
    return out


def _append_zero(t: Tensor, dim: int) -> Tensor:
    """``t`` with one more slice of zeros (``False`` for a boolean mask) at the end of ``dim``."""
    shape = list(t.shape)
    shape[dim] = 1
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _supported(module: nn.MultiheadAttention) -> bool:
    return bool(module._qkv_same_embed_dim) and module.bias_k is None and module.in_proj_weight is not None


class SlimMultiheadAttention(nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` with fewer heads of the same ``head_dim``.

    Build it with :meth:`from_attention`. ``embed_dim`` (the width of its inputs and outputs)
    and ``head_dim`` stay; ``num_heads`` counts the kept heads. It reports
    ``_qkv_same_embed_dim = False`` so that fused fast paths, which assume ``num_heads *
    head_dim == embed_dim`` (``nn.TransformerEncoderLayer``'s), are not taken.
    """

    # TorchScript compiles properties: these two read what forward does not need
    __jit_unused_properties__: ClassVar[list[str]] = ["original_heads", "kept_heads"]

    @classmethod
    def from_attention(cls, module: nn.MultiheadAttention, keep: Sequence[int]) -> SlimMultiheadAttention:
        """A copy of ``module`` with only the heads ``keep`` (at least one).

        A ``module`` in torch's pruned form (``in_proj_weight_orig``, ``in_proj_weight_mask`` and
        a pruning hook, also on ``out_proj``) gives a copy whose pruning is made permanent, as
        :func:`torch.nn.utils.prune.remove` would: it holds the masked values as plain
        parameters. ``module`` itself keeps its pruning.

        Raises:
            ValueError: for an empty or out-of-range ``keep``, or a module with separate query,
                key and value weights or with ``bias_k``/``bias_v``.
        """
        if not _supported(module):
            raise ValueError(
                f"only attention with one in_proj_weight and no bias_k/bias_v can lose heads, got {module!r}"
            )
        heads = sorted({int(h) for h in keep})
        if not heads or heads[0] < 0 or heads[-1] >= module.num_heads:
            raise ValueError(
                f"keep must name 1 to {module.num_heads} heads in 0..{module.num_heads - 1}, got {keep!r}"
            )
        slim = baked_copy(module)
        slim.__class__ = cls
        assert isinstance(slim, SlimMultiheadAttention)
        slim.shrink(heads)
        return slim

    def _record_heads(self, origin: tuple[int, tuple[int, ...]] | None, heads: int = 0) -> None:
        """Record ``(original_heads, kept_heads)``; ``None``: ``heads`` heads of unknown origin.

        Plain ``int`` and ``list`` attributes, which TorchScript reads in :meth:`forward` (an
        unknown origin is recorded as all ``heads`` of ``heads``, which leaves masks as they are).
        """
        self._heads_recorded: bool = origin is not None
        self._original_heads: int = heads if origin is None else origin[0]
        self._kept_heads: list[int] = list(range(heads)) if origin is None else list(origin[1])

    def shrink(self, heads: Sequence[int]) -> None:
        """Keep only ``heads`` (indices of the current heads), in place.

        Raises:
            ValueError: if a tensor of the module is in torch's pruned form (make the pruning
                permanent first, e.g. with :func:`torch.nn.utils.prune.remove`).
        """
        pruned = [
            f"{where}{name}"
            for where, sub in (("", self), ("out_proj.", self.out_proj))
            for name, _ in named_pruning_hooks(sub)
        ]
        if pruned:
            raise ValueError(
                f"cannot shrink an attention module whose tensors {pruned} are pruned in torch's "
                "reparametrised form; call torch.nn.utils.prune.remove on them first"
            )
        if "_kept_heads" not in self.__dict__:  # first shrink: the heads of an nn.MultiheadAttention
            self._record_heads((self.num_heads, tuple(range(self.num_heads))))
        if self._heads_recorded:
            self._kept_heads = [self._kept_heads[h] for h in heads]
        else:  # not known: the heads kept now stand for the original ones
            self._record_heads(None, len(heads))
        d = self.head_dim
        n = self.in_proj_weight.shape[0] // 3
        rows = [part * n + h * d + i for part in range(3) for h in heads for i in range(d)]
        columns = [h * d + i for h in heads for i in range(d)]
        with torch.no_grad():  # each new parameter keeps the requires_grad of the one it replaces
            weight, bias, out = self.in_proj_weight, self.in_proj_bias, self.out_proj
            self.in_proj_weight = nn.Parameter(weight[rows].clone(), weight.requires_grad)
            if bias is not None:
                self.in_proj_bias = nn.Parameter(bias[rows].clone(), bias.requires_grad)
            out.weight = nn.Parameter(out.weight[:, columns].clone(), out.weight.requires_grad)
            out.in_features = len(columns)
        self.num_heads = len(heads)
        self._qkv_same_embed_dim = False

    @property
    def original_heads(self) -> int | None:
        """The number of heads of the attention this module came from (``None``: not recorded)."""
        return self._original_heads if self.__dict__.get("_heads_recorded") else None

    @property
    def kept_heads(self) -> tuple[int, ...] | None:
        """The indices of the kept heads among :attr:`original_heads` (``None``: not recorded).

        A module loaded from a state dict without its ``_extra_state`` key (saved before the
        heads were recorded) does not know them.
        """
        return tuple(self._kept_heads) if self.__dict__.get("_heads_recorded") else None

    def get_extra_state(self) -> Tensor:
        """``[original_heads, *kept_heads]`` as an int64 tensor; empty when they are not known."""
        original, kept = self.original_heads, self.kept_heads
        values = [] if original is None or kept is None else [original, *kept]
        return torch.tensor(values, dtype=torch.int64)

    def set_extra_state(self, state: object) -> None:
        """Restore the heads recorded by :meth:`get_extra_state`.

        Raises:
            ValueError: if ``state`` does not record :attr:`num_heads` increasing head indices.
        """
        self._record_heads(head_origin(state, self.num_heads, "the extra state"), self.num_heads)

    def resize_to(self, rows: int) -> None:
        """Make the attributes agree with an ``in_proj_weight`` of ``rows`` rows (loading)."""
        self.num_heads = rows // (3 * self.head_dim)
        self.out_proj.in_features = self.num_heads * self.head_dim
        self._qkv_same_embed_dim = False

    def _per_head_mask(self, mask: Tensor, batch: int, length: int, source: int) -> Tensor:
        """A ``(batch * heads, L, S)`` mask as ``(batch, kept heads, L, S)``.

        It holds a row per kept head, or a row per head of the original attention (the mask the
        original model was called with), of which the kept heads' rows are taken.
        """
        h, original = self.num_heads, self._original_heads
        if mask.shape[0] == batch * h:
            return mask.reshape(batch, h, length, source)
        if original != h and mask.shape[0] == batch * original:
            index = torch.tensor(self._kept_heads, dtype=torch.long, device=mask.device)
            return mask.reshape(batch, original, length, source).index_select(1, index)
        of_original = ""
        if original != h:
            of_original = (
                f" or batch * {original} = {batch * original} (the heads of the attention it came from)"
            )
        raise ValueError(
            f"attn_mask of shape {list(mask.shape)}: a per-head mask needs batch * num_heads = "
            f"{batch * h} rows (this attention keeps {h} heads){of_original}"
        )

    def _heads(self, x: Tensor, weight: Tensor, bias: Tensor | None, steps: int, batch: int) -> Tensor:
        """``x`` (``(steps, batch, embed_dim)``) projected per head: ``(batch, heads, steps, head_dim)``."""
        out = F.linear(x, weight, bias).reshape(steps, batch, self.num_heads, self.head_dim)
        return out.permute(1, 2, 0, 3)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`, over the kept heads."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch, _ = query.shape
        source = key.shape[0]
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        q = self._heads(query, w_q, b_q, length, batch)
        k = self._heads(key, w_k, b_k, source, batch)
        v = self._heads(value, w_v, b_v, source, batch)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        if self.add_zero_attn:  # a key and value of zeros at the end, as torch's attention adds
            k, v = _append_zero(k, 2), _append_zero(v, 2)
            attn_mask = None if attn_mask is None else _append_zero(attn_mask, -1)
            key_padding_mask = None if key_padding_mask is None else _append_zero(key_padding_mask, -1)
            source += 1
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:
            mask = attn_mask
            if mask.dim() == 3:  # (batch * heads, L, S): each head's own mask
                mask = self._per_head_mask(mask, batch, length, source)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(batch, 1, 1, source)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).permute(2, 0, 1, 3).reshape(length, batch, h * d)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        elif not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        shown = weights.mean(dim=1) if average_attn_weights else weights
        return out, shown if batched else shown.squeeze(0)
