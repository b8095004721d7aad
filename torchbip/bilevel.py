r"""The math of BiP, as pure functions on dictionaries of tensors.

Nothing here touches a module or a loader: a model enters only as a ``forward`` callable that maps
a dictionary of tensors (parameters, masks, buffers by fully-qualified name) and the inputs to the
outputs, as :func:`torch.func.functional_call` does.

With :math:`z = m \odot \theta` and :math:`g = \nabla_z \ell(z)`, one backward pass through the
masked model gives both partial gradients, :math:`\nabla_\theta \ell = m \odot g` and
:math:`\nabla_m \ell = \theta \odot g`. The implicit-function theorem with BiP's Hessian-free
assumption turns them into the total upper-level gradient

.. math::
    \frac{d\ell}{dm} = \theta \odot g - \frac{1}{\gamma}\, m \odot g \odot g
                     = \nabla_m \ell - \frac{1}{\gamma} (\nabla_\theta \ell)^2
    \quad (m \text{ binary}),

with no second derivatives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MaskedGrads",
    "all_finite",
    "lower_grad",
    "masked_loss_grads",
    "tensor_sums",
    "upper_grad",
    "upper_grad_from_g",
]

Forward = Callable[[dict[str, Tensor], Any], Any]
LossFn = Callable[[Any, Any], Tensor]


@dataclass
class MaskedGrads:
    r"""What one backward pass through the masked model yields.

    Attributes:
        loss: the detached scalar loss.
        params: gradients of the trainable tensors (for a pruned tensor, by its ``*_orig`` name:
            :math:`\nabla_\theta \ell = m \odot g`).
        masks: gradients of the masks (:math:`\nabla_m \ell = \theta \odot g`); empty when
            not requested.
        buffers: the buffers after the forward pass (e.g. updated BatchNorm statistics).

    Example:
        >>> import torch
        >>> def forward(t, x):
        ...     return x @ (t["w_orig"] * t["w_mask"])
        >>> out = masked_loss_grads(
        ...     forward, {"w_orig": torch.tensor([2.0, 3.0])}, {"w_mask": torch.tensor([1.0, 0.0])},
        ...     {}, torch.tensor([[1.0, 1.0]]), None, lambda out, _: out.sum(),
        ... )
        >>> out.loss, out.params["w_orig"], out.masks["w_mask"]
        (tensor(2.), tensor([1., 0.]), tensor([2., 3.]))
    """

    loss: Tensor
    params: dict[str, Tensor]
    masks: dict[str, Tensor]
    buffers: dict[str, Tensor]


def masked_loss_grads(
    forward: Forward,
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    with_mask_grads: bool = True,
) -> MaskedGrads:
    """Loss and gradients of the masked model by :func:`torch.func.vjp`, in one backward pass.

    Buffers are passed in explicitly and cloned inside the transformed function, so BatchNorm in
    train mode can update its running statistics; the updated values are returned.

    Args:
        forward: ``forward(tensors, inputs) -> outputs``, e.g. a wrapped ``functional_call``.
        params: trainable tensors by name (differentiated).
        masks: mask tensors by name (differentiated when ``with_mask_grads``).
        buffers: other buffers by name (not differentiated; returned updated).
        inputs: the model inputs.
        targets: the loss targets.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        with_mask_grads: also return the mask gradients.

    Returns:
        A :class:`MaskedGrads`.

    Example:
        >>> import torch
        >>> def forward(t, x):
        ...     return x @ (t["w_orig"] * t["w_mask"])
        >>> theta, mask = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])
        >>> out = masked_loss_grads(
        ...     forward, {"w_orig": theta}, {"w_mask": mask}, {},
        ...     torch.tensor([[1.0, 1.0]]), None, lambda y, _: y.sum(),
        ... )
        >>> out.loss.item(), out.params["w_orig"].tolist(), out.masks["w_mask"].tolist()
        (2.0, [1.0, 0.0], [2.0, 3.0])
    """

    def objective(
        p: dict[str, Tensor], m: dict[str, Tensor], b: dict[str, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        fresh = {k: v.clone() for k, v in b.items()}
        outputs = forward({**p, **m, **fresh}, inputs)
        loss = loss_fn(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        if not loss.is_floating_point():
            raise ValueError(
                f"loss_fn must return a real floating-point loss (got dtype {loss.dtype}): "
                "an integer, boolean or complex loss cannot be minimised by its gradient"
            )
        loss = loss.reshape(())
        return loss, (loss.detach(), fresh)

    p, m, b = dict(params), dict(masks), dict(buffers)
    # torch.func.vjp, its backward pass run without building a graph of its own: torch.func.grad
    # always differentiates with create_graph=True (for nested transforms), which records the
    # backward pass itself (measured: 8% of the gradient computation on LeNet-300-100); the
    # gradients are the same, bit for bit.
    if with_mask_grads:
        found: Any = torch.func.vjp(lambda p_, m_: objective(p_, m_, b), p, m, has_aux=True)
    else:
        found = torch.func.vjp(lambda p_: objective(p_, m, b), p, has_aux=True)
    out, backward, (loss, new_buffers) = found  # (with has_aux: output, vjp function, aux)
    with torch.no_grad():
        grads = backward(torch.ones_like(out), retain_graph=False, create_graph=False)
    return MaskedGrads(loss, _dense(grads[0]), _dense(grads[1]) if with_mask_grads else {}, new_buffers)


def _dense(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sparse gradients (``nn.Embedding(sparse=True)``) as dense tensors: masks and scores are dense."""
    return {k: g.to_dense() if g.layout != torch.strided else g for k, g in grads.items()}


def upper_grad(
    grad_mask: Tensor, grad_theta: Tensor, implicit_coef: float, *, out: Tensor | None = None
) -> Tensor:
    r"""Total upper-level gradient :math:`d\ell/dm` from the two partial gradients.

    Computes :math:`\nabla_m \ell - c\,(\nabla_\theta \ell)^2`, which for a binary mask equals
    :math:`\theta \odot g - c\, m \odot g \odot g` (:func:`upper_grad_from_g`).

    Args:
        grad_mask: :math:`\nabla_m \ell = \theta \odot g`.
        grad_theta: :math:`\nabla_\theta \ell = m \odot g` (without the L2 term).
        implicit_coef: :math:`c`, :math:`1/\gamma` in theory; 0 drops the implicit term.
        out: optional tensor to write the result into.

    Returns:
        The gradient of the scores (straight-through).

    Example:
        >>> import torch
        >>> upper_grad(torch.tensor([0.5]), torch.tensor([0.25]), implicit_coef=4.0)
        tensor([0.2500])
    """
    if implicit_coef == 0:
        return grad_mask if out is None else out.copy_(grad_mask)
    if out is None:
        return torch.addcmul(grad_mask, grad_theta, grad_theta, value=-implicit_coef)
    return torch.addcmul(grad_mask, grad_theta, grad_theta, value=-implicit_coef, out=out)


def upper_grad_from_g(theta: Tensor, mask: Tensor, g: Tensor, implicit_coef: float) -> Tensor:
    r"""The paper's formula :math:`\theta \odot g - c\, m \odot g \odot g` from :math:`g`.

    Args:
        theta: the weights :math:`\theta`.
        mask: the mask :math:`m`.
        g: :math:`\nabla_z \ell` at :math:`z = m \odot \theta`.
        implicit_coef: :math:`c` (:math:`1/\gamma` in theory).

    Returns:
        :math:`d\ell/dm`.

    Example:
        >>> import torch
        >>> upper_grad_from_g(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5]), 4.0)
        tensor([0.])
    """
    return theta * g - implicit_coef * mask * g * g


def lower_grad(grad_theta: Tensor, theta: Tensor, mask: Tensor, gamma: float) -> Tensor:
    r"""Gradient of the lower objective restricted to unpruned entries.

    :math:`m \odot (\nabla_\theta \ell + \gamma \theta)`: pruned entries get exactly zero.

    Args:
        grad_theta: :math:`\nabla_\theta \ell`, the loss gradient of the weights.
        theta: the weights :math:`\theta`.
        mask: the binary mask :math:`m`.
        gamma: the L2 coefficient :math:`\gamma` of the lower objective.

    Returns:
        A new tensor; the inputs are not modified.

    Example:
        >>> import torch
        >>> lower_grad(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 10.0]),
        ...            torch.tensor([1.0, 0.0]), gamma=0.1)
        tensor([2., 0.])
    """
    return torch.add(grad_theta, theta, alpha=gamma).mul_(mask)


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry of every tensor is finite, as a 0-dim boolean tensor (no host sync).

    One reduction per tensor, its sum (float16 and bfloat16 tensors summed in float32): a sum is
    NaN or infinite when the tensor holds a NaN or an infinity, and otherwise finite unless the
    finite entries themselves add up past the dtype's range (about ``3e38`` in float32), which
    gradients worth applying never do. A sum is the cheapest reduction there is (one pass, about
    2 ms over 11M float32 entries on one CPU core), so that a training step can check what it
    applies and read the result with its loss, in one host sync.

    Args:
        tensors: tensors of any shapes, floating dtypes and devices.

    Returns:
        A 0-dim ``torch.bool`` tensor (``True`` for an empty list).

    Example:
        >>> import torch
        >>> bool(all_finite([torch.ones(3), torch.zeros(2, 2)]))
        True
        >>> bool(all_finite([torch.ones(3), torch.tensor([0.0, float("nan")])]))
        False
        >>> bool(all_finite([torch.tensor([1.0, -float("inf")])]))
        False
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(tensor_sums(tensors)).all()


def tensor_sums(tensors: Sequence[Tensor]) -> Tensor:
    """The sum of each tensor, as one float64 tensor on the first tensor's device (no host sync).

    (float32 on MPS devices, which have no float64.)

    Float16 and bfloat16 tensors are summed in float32. See :func:`all_finite`.

    Args:
        tensors: a non-empty sequence of tensors.

    Returns:
        A 1-D float64 tensor with one entry per tensor.

    Example:
        >>> import torch
        >>> tensor_sums([torch.ones(3), torch.tensor([0.5, -0.5])]).tolist()
        [3.0, 0.0]
    """
    device = tensors[0].device
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = [t.detach().sum(dtype=torch.float32) if t.dtype in _NARROW else t.detach().sum() for t in tensors]
    if all(x.device == device and x.dtype == sums[0].dtype for x in sums):  # one conversion for all
        return torch.stack(sums).to(wide)
    return torch.stack([x.to(device, wide) for x in sums])


_NARROW = (torch.float16, torch.bfloat16)
