r"""Sparse export formats for unstructured and N:M masks: CSR layers and 2:4 semi-structured.

Unstructured sparsity pays at inference only with sparse kernels, and only at high sparsity:
measure (``benchmarks/bench_export.py``), never assume. Two formats:

- **CSR** (:func:`to_sparse_csr`): each ``nn.Linear`` (and, with ``include_conv=True``, each
  ``nn.Conv2d`` with ``groups=1``) whose weight is at least ``min_sparsity`` zero becomes a
  :class:`SparseCSRLinear` / :class:`SparseCSRConv2d` holding the weight as a
  ``torch.sparse_csr`` tensor and multiplying with it (the convolution through
  :func:`torch.nn.functional.unfold`). Works on CPU and GPU; inference only (no gradients). The
  layers take the inputs of the layers they replace (``(*, in_features)``; ``(N, C, H, W)`` or
  unbatched ``(C, H, W)``).
- **2:4 semi-structured** (:func:`to_semi_structured`): the weights of ``nn.Linear`` layers pruned
  with an N:M mask (:func:`torchbip.masks.nm_mask`, :class:`torchbip.semistructured.BiPSemiStructured`)
  become :func:`torch.sparse.to_sparse_semi_structured` tensors, which torch multiplies with the
  sparse tensor cores of NVIDIA GPUs of compute capability 8.0 or newer (fp16/bf16). On a CPU
  only the mask exists: the pruned model runs with dense kernels and :func:`to_semi_structured`
  raises.

Both functions return a converted copy; the input model is not changed, also when a conversion
fails. A CSR layer loads a saved weight with any number of nonzeros, all or nothing for the layer;
like every torch module, ``model.load_state_dict`` still loads the layers that match before it
raises for the others. For all or nothing across the whole model (nothing changes when one key,
shape or dtype is wrong) load with :func:`torchbip.load_slim_state_dict`.
"""

from __future__ import annotations

import copy
import numbers
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbip.export import baked_copy
from torchbip.method import integer_argument
from torchbip.pruned import pruning_hook

__all__ = [
    "CSRModule",
    "SparseCSRConv2d",
    "SparseCSRLinear",
    "is_nm_sparse",
    "to_semi_structured",
    "to_sparse_csr",
]


def _csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return weight.detach().to_sparse_csr()


def _current(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` as the module computes it now, detached.

    For a pruned tensor that is ``<name>_orig * <name>_mask`` from the module's pruning hook:
    torch's hook writes ``module.<name>`` only in a forward pass, so after an optimizer step or a
    change of masks without one since, the attribute holds the values of the last forward.
    """
    hook = pruning_hook(module, name)
    if hook is not None:
        return hook.apply_mask(module).detach()
    value = getattr(module, name)
    return None if value is None else value.detach()


def _loadable(saved: Tensor, current: Tensor) -> bool:
    """Whether ``saved`` holds values of the kind of ``current`` (floating point, complex, ...)."""
    return (
        not saved.is_meta
        and saved.is_floating_point() == current.is_floating_point()
        and saved.is_complex() == current.is_complex()
    )


def _as_csr(saved: Tensor, current: Tensor) -> Tensor:
    """A saved (CSR or dense) weight as a new CSR tensor of ``current``'s device and dtype."""
    weight = saved.detach() if saved.layout == torch.sparse_csr else _csr(saved)
    return weight.to(device=current.device, dtype=current.dtype)


class CSRModule(nn.Module):
    """The base of the CSR layers: the product with the CSR weight and loading a CSR state dict."""

    weight: Tensor
    bias: Tensor | None

    def _matmul(self, cols: Tensor) -> Tensor:
        """``weight @ cols + bias[:, None]`` (``cols``: one column per output position)."""
        if self.bias is None:
            return torch.mm(self.weight, cols)
        return torch.addmm(self.bias.unsqueeze(1), self.weight, cols)

    def __deepcopy__(self, memo: dict[int, Any]) -> CSRModule:
        """A deep copy whose CSR buffers are clones (torch's deepcopy of a CSR tensor fails).

        Everything else is copied as :func:`copy.deepcopy` copies a module; a tensor held at
        several places is one tensor in the copy, as ``memo`` requires.
        """
        for tensor in self._buffers.values():
            if tensor is not None and tensor.layout != torch.strided and id(tensor) not in memo:
                memo[id(tensor)] = tensor.detach().clone()
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__dict__, memo))
        return twin

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load a CSR (or dense) weight with any number of nonzeros; all or nothing for this layer.

        ``copy_`` between CSR tensors needs equal numbers of nonzeros, so the saved weight is
        taken as this layer's new weight buffer rather than copied into the old one. Whatever
        fails for this layer (an error torch reports, a value of the wrong kind, an exception)
        leaves its buffers as they were: the same objects with the same values.
        """
        key = prefix + "weight"
        buffers = dict(self._buffers)
        bias = self._buffers.get("bias")
        bias_values = None if bias is None else bias.detach().clone()
        n_errors = len(error_msgs)
        saved = state_dict.get(key)
        staged = None
        if isinstance(saved, Tensor) and tuple(saved.shape) == tuple(self.weight.shape):
            # (torch reports a value that is not a tensor or has another shape itself)
            if not _loadable(saved, self.weight):
                error_msgs.append(
                    f"{key}: a {saved.dtype}{' meta' if saved.is_meta else ''} tensor does not load "
                    f"into this layer's {self.weight.dtype} CSR weight"
                )
                return
            staged = _as_csr(saved, self.weight)  # before anything changes
        rest = state_dict if staged is None else {k: v for k, v in state_dict.items() if k != key}
        try:
            super()._load_from_state_dict(
                rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            if staged is not None:
                if key in missing_keys:
                    missing_keys.remove(key)  # it was left out of ``rest`` on purpose
                if len(error_msgs) == n_errors:
                    self._buffers["weight"] = staged
        except BaseException:
            self._restore(buffers, bias_values)
            raise
        if len(error_msgs) > n_errors:
            self._restore(buffers, bias_values)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, all or nothing for this layer.

        Also when torch's strict check fails only at the end (an unexpected or missing key),
        the layer keeps its weight and bias objects and values.
        """
        buffers = dict(self._buffers)
        bias = self._buffers.get("bias")
        bias_values = None if bias is None else bias.detach().clone()
        try:
            return super().load_state_dict(state_dict, strict, assign)
        except BaseException:
            self._restore(buffers, bias_values)
            raise

    def _restore(self, buffers: dict[str, Tensor | None], bias_values: Tensor | None) -> None:
        self._buffers.clear()
        self._buffers.update(buffers)
        bias = buffers.get("bias")
        if bias is not None and bias_values is not None:
            with torch.no_grad():
                bias.copy_(bias_values)


class SparseCSRLinear(CSRModule):
    """An ``nn.Linear`` whose weight is stored and multiplied as a CSR sparse tensor.

    The ``weight`` buffer is a ``torch.sparse_csr`` tensor of shape ``(out, in)``; ``bias`` a
    dense buffer or ``None``. Inference only. Build one with :meth:`from_dense`.

    Args:
        weight: the (mostly zero) dense or CSR weight, ``(out_features, in_features)``.
        bias: optional bias of length ``out_features``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> dense = nn.Linear(8, 3)
        >>> with torch.no_grad():
        ...     _ = dense.weight.mul_(torch.rand(3, 8) > 0.8)
        >>> layer = SparseCSRLinear.from_dense(dense)
        >>> layer.weight.layout, layer.weight.values().numel() == int(dense.weight.count_nonzero())
        (torch.sparse_csr, True)
        >>> x = torch.randn(5, 8)
        >>> torch.allclose(layer(x), dense(x), atol=1e-6)
        True
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(
                f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
            )
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got {got}")
        self.out_features, self.in_features = weight.shape
        csr = weight.detach() if weight.layout == torch.sparse_csr else _csr(weight)
        self.register_buffer("weight", csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseCSRLinear:
        """Convert an ``nn.Linear`` (pruned or not: a pruned weight or bias is taken masked).

        The masked values are computed from ``<name>_orig`` and ``<name>_mask`` when converting,
        not read from the attribute torch's pruning hook last wrote in a forward pass.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = _current(linear, "weight")
        assert weight is not None
        return cls(weight, _current(linear, "bias"))

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` computed as ``(weight_csr @ x.T).T``.

        Takes what ``nn.Linear`` takes: ``(*, in_features)``, any number of leading dimensions
        (none for a single sample).

        Raises:
            RuntimeError: for an input whose last dimension is not ``in_features``.
        """
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise RuntimeError(
                f"SparseCSRLinear(in_features={self.in_features}) takes inputs of shape "
                f"(*, {self.in_features}), got shape {tuple(x.shape)}"
            )
        flat = x.reshape(-1, self.in_features).t().contiguous()
        out = self._matmul(flat)
        return out.t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Sizes and the number of stored nonzeros."""
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


class SparseCSRConv2d(CSRModule):
    """An ``nn.Conv2d`` (``groups=1``, zero padding) computed as a CSR matrix times unfolded input.

    The weight is stored as a ``(out_channels, in_channels * kh * kw)`` CSR tensor; the forward
    pass unfolds the input (:func:`torch.nn.functional.unfold`, im2col) and multiplies. Memory grows
    with the unfolded input, so this pays only at high sparsity: measure. Inference only.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        >>> layer = SparseCSRConv2d.from_dense(conv)
        >>> x = torch.randn(2, 3, 9, 9)
        >>> torch.allclose(layer(x), conv(x), atol=1e-5)
        True
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"SparseCSRConv2d needs groups=1, padding_mode='zeros' and numeric padding, got "
                f"groups={conv.groups}, padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)  # not a string: checked above
        self.dilation = tuple(conv.dilation)
        weight = _current(conv, "weight")
        assert weight is not None
        bias = _current(conv, "bias")
        self.register_buffer("weight", _csr(weight.reshape(conv.out_channels, -1)))
        self.register_buffer("bias", None if bias is None else bias.clone())

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SparseCSRConv2d:
        """Convert an ``nn.Conv2d`` (pruned or not: a pruned weight or bias is taken masked)."""
        return cls(conv)

    def forward(self, x: Tensor) -> Tensor:
        """Unfold, multiply by the CSR weight, fold back to ``(N, out, H', W')``.

        Takes what ``nn.Conv2d`` takes: a batch ``(N, C, H, W)``, or one unbatched sample
        ``(C, H, W)``, for which it returns ``(out, H', W')``.

        Raises:
            RuntimeError: for an input that is neither 3-D nor 4-D, or has another number of
                channels than ``in_channels``.
        """
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise RuntimeError(
                f"SparseCSRConv2d(in_channels={self.in_channels}) takes inputs of shape (N, "
                f"{self.in_channels}, H, W) or unbatched ({self.in_channels}, H, W), got shape "
                f"{tuple(x.shape)}"
            )
        if x.dim() == 3:
            return self._batched(x.unsqueeze(0)).squeeze(0)
        return self._batched(x)

    def _batched(self, x: Tensor) -> Tensor:
        """The forward pass of a 4-D batch."""
        n, _, h, w = x.shape
        out_hw = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                (h, w), self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        ]
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # N, CKK, L
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # CKK, N*L
        out = self._matmul(cols)
        return out.reshape(self.out_channels, n, *out_hw).transpose(0, 1)

    def extra_repr(self) -> str:
        """Sizes, geometry and the number of stored nonzeros."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, nnz={self.weight.values().numel()}"
        )


def _replace(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every child for which ``convert`` returns a module; return how many places.

    A child registered at several places (one layer the model calls twice) is converted once and
    the converted module takes every one of its places, so the places still share one layer.
    (``named_children`` lists a child once per parent, so it is not used here.)
    """
    count = 0
    converted: dict[int, nn.Module | None] = {}
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) not in converted:
                converted[id(child)] = convert(child)
            new = converted[id(child)]
            if new is not None:
                setattr(module, name, new)
                count += 1
    return count


_CSR_CPU_DTYPES = (torch.float32, torch.float64)  # what torch multiplies in CSR on the CPU


def _sparsity(weight: Tensor) -> float:
    return 1.0 - int(weight.count_nonzero()) / weight.numel() if weight.numel() else 0.0


def to_sparse_csr(model: nn.Module, *, min_sparsity: float = 0.9, include_conv: bool = False) -> nn.Module:
    """Return a copy of ``model`` whose sparse layers multiply with CSR weights.

    Pruning masks are made permanent in the copy; then every ``nn.Linear`` whose weight is at
    least ``min_sparsity`` zero becomes a :class:`SparseCSRLinear`, and with ``include_conv``
    every such ``nn.Conv2d`` (``groups=1``, zero padding) a :class:`SparseCSRConv2d`. On a
    2-core CPU CSR beat dense only from about 90-95% sparsity in our measurements; the default
    threshold follows them (see ``benchmarks/results``).

    Args:
        model: the pruned model (not changed).
        min_sparsity: the fraction of zeros from which a layer is converted, in ``[0, 1]``.
        include_conv: also convert 2-D convolutions.

    Returns:
        The converted copy (inference only: the CSR layers hold buffers, not parameters).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``include_conv`` not a bool.
        ValueError: if ``min_sparsity`` is not in ``[0, 1]``, for float16/bfloat16 layers on
            the CPU (torch has no CSR matrix product for them there), or for a pruned tensor
            tied to another module's (``head.weight = emb.weight``, then ``head`` pruned): making
            its mask permanent would mask the other module too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchbip import bip_unstructured
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> _ = bip_unstructured(model[0], "weight", amount=0.95)
        >>> csr = to_sparse_csr(model)
        >>> type(csr[0]).__name__, type(csr[2]).__name__
        ('SparseCSRLinear', 'Linear')
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(csr(x), model(x), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(include_conv, bool):
        raise TypeError(f"include_conv must be a bool, got {include_conv!r}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, numbers.Real):
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity={min_sparsity!r} is outside [0, 1]")
    copied = baked_copy(model)

    def convertible(child: nn.Module) -> bool:
        if type(child) is nn.Linear:
            return _sparsity(child.weight) >= min_sparsity
        return (
            include_conv
            and type(child) is nn.Conv2d
            and child.groups == 1
            and child.padding_mode == "zeros"
            and not isinstance(child.padding, str)
            and _sparsity(child.weight) >= min_sparsity
        )

    chosen = {id(child): (name, child) for name, child in copied.named_modules() if convertible(child)}
    for name, child in chosen.values():
        weight = child.weight
        if weight.device.type == "cpu" and weight.dtype not in _CSR_CPU_DTYPES:
            raise ValueError(
                f"to_sparse_csr: {name!r} holds {weight.dtype} weights, for which torch has no CSR "
                "matrix product on the CPU; convert the model first (model.float())"
            )

    def convert(child: nn.Module) -> nn.Module | None:
        if id(child) not in chosen:
            return None
        if isinstance(child, nn.Linear):
            return SparseCSRLinear.from_dense(child)
        assert isinstance(child, nn.Conv2d)
        return SparseCSRConv2d.from_dense(child)

    _replace(copied, convert)
    root = convert(copied)  # the model may be one layer itself
    return copied if root is None else root


def is_nm_sparse(weight: Tensor, n: int = 2, m: int = 4, dim: int = -1) -> bool:
    """Whether every block of ``m`` entries along ``dim`` holds at most ``n`` nonzeros.

    Example:
        >>> import torch
        >>> is_nm_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]])), is_nm_sparse(torch.ones(1, 4))
        (True, False)

    Raises:
        TypeError: if ``n``, ``m`` or ``dim`` is not an int (NumPy ints are).
        ValueError: for ``m < 1``, ``n`` outside ``[0, m]``, a scalar ``weight`` or ``dim`` out
            of range. (A size along ``dim`` that is not a multiple of ``m`` gives ``False``.)
    """
    n, m, dim = (integer_argument(arg, value) for arg, value in (("n", n), ("m", m), ("dim", dim)))
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"n={n}, m={m}: an N:M pattern needs m >= 1 and 0 <= n <= m")
    if weight.dim() == 0:
        raise ValueError("weight is a scalar; N:M blocks need at least one dimension")
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {weight.dim()} dimensions")
    if weight.shape[dim] % m:
        return False
    nonzero = (weight != 0).movedim(dim, -1)
    blocks = nonzero.reshape(*nonzero.shape[:-1], -1, m).sum(dim=-1)
    return bool((blocks <= n).all())


# the weight dtypes of torch's semi-structured kernels (torch.sparse.semi_structured's
# _DTYPE_SHAPE_CONSTRAINTS) that an nn.Linear computes with; int8 and float8 need other matmuls
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
# torch's refusal of a shape its kernels do not take (SparseSemiStructuredTensor's
# _validate_device_dim_dtype_shape: "Error original_tensor.shape ... is not supported! ...")
_SHAPE_REFUSED = re.compile(r"original_tensor\.shape .* is not supported")


def _on_cuda(weight: Tensor) -> bool:
    return weight.device.type == "cuda"


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Return a copy whose 2:4-sparse ``nn.Linear`` weights are semi-structured sparse tensors.

    Needs a CUDA GPU that torch's semi-structured kernels support (compute capability 8.0 or
    newer) and fp16/bf16 weights on it (``model.half().cuda()``). Each ``nn.Linear`` whose weight
    has at most 2 nonzeros in every block of 4 along the input dimension (e.g. after
    ``global_prune(..., structured="2:4")``) gets
    ``weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(weight))``, torch's documented
    recipe; other layers are left dense. torch's kernels take only weights whose dimensions are
    multiples of a dtype's minimum block (for float16 with CUTLASS, 32 rows and 64 columns): a
    2:4-sparse layer they refuse (a small classifier head) is left dense too, with a warning
    that names it.

    Args:
        model: the pruned model (not changed).

    Returns:
        The converted copy.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for a pruned tensor tied to another module's (``head.weight = emb.weight``,
            then ``head`` pruned): making its mask permanent would mask the other module too.
        RuntimeError: on a CPU or an unsupported GPU (there, keep the masked dense model: the
            mask is all that N:M pruning yields without the sparse kernels); when a 2:4-sparse
            layer's weight is not float16/bfloat16 on a CUDA device (naming the layer); and
            when torch's conversion fails other than by refusing a layer's shape.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> if not torch.cuda.is_available():
        ...     try:
        ...         to_semi_structured(nn.Linear(8, 8))
        ...     except RuntimeError as err:
        ...         print(str(err)[:45])
        ... else:
        ...     print("2:4 semi-structured sparsity needs a CUDA GPU")
        2:4 semi-structured sparsity needs a CUDA GPU
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "2:4 semi-structured sparsity needs a CUDA GPU with compute capability >= 8.0; on "
            "this machine keep the masked model (the N:M mask runs with dense kernels)"
        )
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(
            f"2:4 semi-structured sparsity needs compute capability >= 8.0, this GPU has {major}.x"
        )
    copied = baked_copy(model)
    layers = [
        (name or type(module).__name__, module)
        for name, module in copied.named_modules()
        if type(module) is nn.Linear and is_nm_sparse(module.weight.detach(), 2, 4)
    ]
    for name, module in layers:  # all refused before any is converted
        weight = module.weight
        if not _on_cuda(weight) or weight.dtype not in _SEMI_STRUCTURED_DTYPES:
            raise RuntimeError(
                f"to_semi_structured: the 2:4-sparse layer {name!r} has a {weight.dtype} weight on "
                f"{weight.device}; torch's semi-structured kernels need float16 or bfloat16 weights "
                "on a CUDA GPU (model.half().cuda() or model.to(torch.bfloat16).cuda())"
            )
    left: list[str] = []
    for name, module in layers:
        weight = module.weight.detach()
        try:
            sparse = torch.sparse.to_sparse_semi_structured(weight)
        except RuntimeError as err:
            if not _SHAPE_REFUSED.search(str(err)):  # only torch's shape check leaves a layer dense
                raise
            left.append(f"{name} {tuple(weight.shape)} {weight.dtype} ({err})")
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
    if left:
        warnings.warn(
            f"to_semi_structured left {len(left)} 2:4-sparse layer(s) dense, whose weights torch's "
            f"semi-structured kernels do not take: {'; '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    return copied
