"""The bi-level math: the implicit upper gradient against exact oracles, torch.func against eager."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchbip
from torchbip._func import make_forward
from torchbip.bilevel import lower_grad, masked_loss_grads, upper_grad, upper_grad_from_g

SHAPES = [
    pytest.param([(7,)], 0.5, 0, id="vector"),
    pytest.param([(4, 3)], 0.3, 1, id="matrix"),
    pytest.param([(5, 2, 3, 3), (10, 18)], 0.7, 2, id="conv-and-linear"),
    pytest.param([(1, 1), (3,), (2, 4, 5)], 0.0, 3, id="dense-mask"),
    pytest.param([(6, 6)], 1.0, 4, id="empty-mask"),
]
GAMMAS = [
    pytest.param(1e-4, id="gamma=1e-4"),
    pytest.param(0.5, id="gamma=0.5"),
    pytest.param(3.0, id="gamma=3"),
]


def _problem(
    shapes: list[tuple[int, ...]], drop: float, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random costs ``c`` and binary masks ``m`` (``drop``: fraction of zeros), float64."""
    gen = torch.Generator().manual_seed(seed)
    costs = {f"l{i}.w": torch.randn(s, generator=gen, dtype=torch.float64) for i, s in enumerate(shapes)}
    masks = {
        f"l{i}.w": (torch.rand(s, generator=gen, dtype=torch.float64) >= drop).double()
        for i, s in enumerate(shapes)
    }
    return costs, masks


def _theta_star(c: Tensor, m: Tensor, gamma: float) -> Tensor:
    """Exact lower-level solution of ``min_θ cᵀ(m⊙θ) + gamma/2 ‖θ‖²``."""
    return -(m * c) / gamma


def _linear_forward(tensors: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    return {n: tensors[n + "_orig"] * tensors[n + "_mask"] for n in names}


def _linear_loss(z: dict[str, Tensor], costs: dict[str, Tensor]) -> Tensor:
    return torch.stack([(costs[n] * z[n]).sum() for n in z]).sum()


def _autograd_total_derivative(
    costs: dict[str, Tensor], masks: dict[str, Tensor], gamma: float
) -> dict[str, Tensor]:
    """d/dm of m ↦ L(m⊙θ*(m)) by torch.autograd, θ* written as a function of m."""
    m = {n: v.clone().requires_grad_(True) for n, v in masks.items()}
    value = torch.stack([(costs[n] * (m[n] * _theta_star(costs[n], m[n], gamma))).sum() for n in m]).sum()
    grads = torch.autograd.grad(value, list(m.values()))
    return dict(zip(m, grads, strict=True))


def _library_upper_grad(
    costs: dict[str, Tensor], masks: dict[str, Tensor], gamma: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The library's path: one backward pass at θ = θ*(m), then ``upper_grad`` with c = 1/gamma."""
    names = list(costs)
    thetas = {n + "_orig": _theta_star(costs[n], masks[n], gamma) for n in names}
    mask_t = {n + "_mask": masks[n] for n in names}
    out = masked_loss_grads(
        lambda t, _x: _linear_forward(t, names),
        thetas,
        mask_t,
        {},
        None,
        costs,
        _linear_loss,
    )
    upper = {n: upper_grad(out.masks[n + "_mask"], out.params[n + "_orig"], 1.0 / gamma) for n in names}
    from_g = {
        n: upper_grad_from_g(thetas[n + "_orig"], masks[n], costs[n], 1.0 / gamma)  # g = ∇_z L = c
        for n in names
    }
    return upper, from_g, {n: out.params[n + "_orig"] for n in names}


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize(("shapes", "drop", "seed"), SHAPES)
def test_linear_loss_oracle_matches_autograd_total_derivative(
    shapes: list[tuple[int, ...]], drop: float, seed: int, gamma: float
) -> None:
    costs, masks = _problem(shapes, drop, seed)
    expected = _autograd_total_derivative(costs, masks, gamma)
    upper, from_g, _ = _library_upper_grad(costs, masks, gamma)
    for name in costs:
        # closed form of the oracle: d/dm [-(m² c²)/gamma] = -2 m c²/gamma
        torch.testing.assert_close(expected[name], -2 * masks[name] * costs[name] ** 2 / gamma)
        torch.testing.assert_close(upper[name], expected[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(from_g[name], expected[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(upper[name], from_g[name], rtol=1e-12, atol=1e-12)
        assert upper[name].dtype == torch.float64


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize(("shapes", "drop", "seed"), SHAPES)
def test_theta_star_is_a_stationary_point_of_the_lower_level(
    shapes: list[tuple[int, ...]], drop: float, seed: int, gamma: float
) -> None:
    costs, masks = _problem(shapes, drop, seed)
    _, _, grad_theta = _library_upper_grad(costs, masks, gamma)
    for name in costs:
        theta = _theta_star(costs[name], masks[name], gamma)
        torch.testing.assert_close(grad_theta[name], masks[name] * costs[name], rtol=0, atol=0)
        step = lower_grad(grad_theta[name], theta, masks[name], gamma)
        torch.testing.assert_close(step, torch.zeros_like(step), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed={s}") for s in range(4)])
def test_upper_grad_from_g_is_the_total_derivative_for_real_valued_masks(seed: int) -> None:
    """Off the binary corners only the form θ⊙g - c·m⊙g⊙g stays exact (upper_grad uses m² = m)."""
    gen = torch.Generator().manual_seed(seed)
    gamma = 0.25
    c = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    m = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    expected = _autograd_total_derivative({"w": c}, {"w": m}, gamma)["w"]
    theta = _theta_star(c, m, gamma)
    torch.testing.assert_close(upper_grad_from_g(theta, m, c, 1 / gamma), expected, rtol=1e-12, atol=1e-12)
    via_partials = upper_grad(theta * c, m * c, 1 / gamma)
    torch.testing.assert_close(via_partials, theta * c - (m * c) ** 2 / gamma, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(via_partials, expected)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed={s}") for s in range(3)])
@pytest.mark.parametrize("coef", [pytest.param(0.0, id="coef=0"), pytest.param(1.7, id="coef=1.7")])
def test_upper_grad_equals_upper_grad_from_g_for_binary_masks(seed: int, coef: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    m = (torch.rand(4, 6, generator=gen) > 0.5).double()
    torch.testing.assert_close(
        upper_grad(theta * g, m * g, coef), upper_grad_from_g(theta, m, g, coef), rtol=1e-15, atol=1e-15
    )


def test_upper_grad_with_zero_coef_is_the_mask_gradient() -> None:
    grad_mask = torch.tensor([1.0, -2.0])
    assert upper_grad(grad_mask, torch.tensor([5.0, 5.0]), 0.0) is grad_mask


def test_lower_grad_is_zero_on_pruned_entries_and_adds_l2_elsewhere() -> None:
    grad = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    theta = torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    out = lower_grad(grad, theta, mask, gamma=0.1)
    torch.testing.assert_close(out, torch.tensor([0.6, 0.0, 1.7, 0.0], dtype=torch.float64))
    assert theta.tolist() == [1.0, 2.0, -3.0, 4.0]
    assert grad.tolist() == [0.5, -1.0, 2.0, 3.0]


def test_masked_loss_grads_rejects_a_non_scalar_loss() -> None:
    def forward(t: dict[str, Tensor], x: Tensor) -> Tensor:
        return x * t["w_orig"] * t["w_mask"]

    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(3,\)"):
        masked_loss_grads(
            forward, {"w_orig": torch.ones(3)}, {"w_mask": torch.ones(3)}, {}, torch.ones(3), None,
            lambda y, _: y,
        )  # fmt: skip


# --- torch.func against eager autograd on a small pruned CNN ------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def _pruned_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN().double().train()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and running statistics
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    torchbip.bip_unstructured(model.conv, "weight", amount=0.5)
    torchbip.bip_unstructured(model.fc, "weight", amount=40)
    return model


MASK_NAMES = ("conv.weight_mask", "fc.weight_mask")


def _eager(seed: int, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Plain eager autograd on an identical model: hooks run, masks made differentiable leaves.

    (A model right after torch-style pruning cannot be deep-copied: its ``weight`` attribute is a
    non-leaf, pytorch issue #37322; the copy is built from the same seed instead.)
    """
    eager = _pruned_cnn(seed)
    for name in MASK_NAMES:
        eager.get_buffer(name).requires_grad_(True)
    loss = F.cross_entropy(eager(x), y)
    params = dict(eager.named_parameters())
    masks = {n: eager.get_buffer(n) for n in MASK_NAMES}
    grads = torch.autograd.grad(loss, [*params.values(), *masks.values()])
    named = dict(zip([*params, *masks], grads, strict=True))
    buffers = {n: b.detach() for n, b in eager.named_buffers()}
    return loss.detach(), named, buffers


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed={s}") for s in range(3)])
@pytest.mark.parametrize(
    "with_mask_grads", [pytest.param(True, id="masks"), pytest.param(False, id="no-masks")]
)
def test_torch_func_grads_equal_eager_autograd_on_a_pruned_cnn(seed: int, with_mask_grads: bool) -> None:
    model = _pruned_cnn(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    exp_loss, exp_grads, exp_buffers = _eager(seed, x, y)

    before = {n: b.clone() for n, b in model.named_buffers()}
    params = dict(model.named_parameters())
    assert {"conv.weight_orig", "fc.weight_orig", "bn.weight", "bn.bias", "conv.bias", "fc.bias"} == set(
        params
    )
    masks = {n: model.get_buffer(n) for n in MASK_NAMES}
    buffers = {n: b for n, b in model.named_buffers() if n not in masks and not n.endswith("_scores")}
    out = masked_loss_grads(
        make_forward(model), params, masks, buffers, x, y, F.cross_entropy, with_mask_grads=with_mask_grads
    )

    torch.testing.assert_close(out.loss, exp_loss, rtol=1e-12, atol=1e-12)
    assert set(out.params) == set(params)
    for name in params:
        torch.testing.assert_close(out.params[name], exp_grads[name], rtol=1e-10, atol=1e-12)
    if with_mask_grads:
        assert set(out.masks) == set(MASK_NAMES)
        for name in MASK_NAMES:
            torch.testing.assert_close(out.masks[name], exp_grads[name], rtol=1e-10, atol=1e-12)
    else:
        assert out.masks == {}
    # pruned entries of *_orig get exactly zero gradient (∇_θ L = m ⊙ g)
    for prefix in ("conv", "fc"):
        pruned = model.get_buffer(f"{prefix}.weight_mask") == 0
        assert pruned.any()
        assert (out.params[f"{prefix}.weight_orig"][pruned] == 0).all()
    # BatchNorm running statistics: updated like eager train mode, and the model's own untouched
    assert set(out.buffers) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for name, value in out.buffers.items():
        torch.testing.assert_close(value, exp_buffers[name], rtol=1e-12, atol=1e-12)
        assert not torch.equal(value, before[name])
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name])


def test_torch_func_mask_grad_is_theta_times_output_grad() -> None:
    """∇_m L = θ ⊙ g and ∇_θ L = m ⊙ g with g the gradient of the effective weight."""
    model = _pruned_cnn(7)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    params = dict(model.named_parameters())
    masks = {n: model.get_buffer(n) for n in MASK_NAMES}
    buffers = {n: b for n, b in model.named_buffers() if n not in masks and not n.endswith("_scores")}
    out = masked_loss_grads(make_forward(model), params, masks, buffers, x, y, F.cross_entropy)

    dense = _pruned_cnn(7)
    for prefix in ("conv", "fc"):
        torch.nn.utils.prune.remove(getattr(dense, prefix), "weight")
    loss = F.cross_entropy(dense(x), y)
    g_conv, g_fc = torch.autograd.grad(loss, [dense.conv.weight, dense.fc.weight])
    for prefix, g in (("conv", g_conv), ("fc", g_fc)):
        theta = model.get_parameter(f"{prefix}.weight_orig")
        mask = model.get_buffer(f"{prefix}.weight_mask")
        torch.testing.assert_close(out.masks[f"{prefix}.weight_mask"], theta * g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.params[f"{prefix}.weight_orig"], mask * g, rtol=1e-10, atol=1e-12)


# --- global_prune's loop against an independent eager re-implementation of the update rule ------


def _tiny_mlp() -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _reference_bip(
    data: list[tuple[Tensor, Tensor]], amount: float, steps: int, mode: str, hp: dict[str, float]
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[list[Tensor]]]:
    """BiP written from the method's description with plain tensors and eager autograd.

    Lower level: SGD with momentum on theta with gradient m*(m*g + gamma*theta) (pruned entries
    and their momentum frozen), on the biases with gradient g_b + gamma*b. Upper level: SGD with
    momentum on the scores with gradient theta*g - c*(m*g)^2; then m = global top-k of the scores.
    Scores start as |theta|.
    """
    layers = [m for m in _tiny_mlp() if isinstance(m, nn.Linear)]
    theta = [m.weight.detach().clone() for m in layers]
    bias = [m.bias.detach().clone() for m in layers]
    scores = [t.abs() for t in theta]
    n = sum(t.numel() for t in theta)
    k = n - round(amount * n)

    def top_k(values: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([v.flatten() for v in values])
        keep = torch.zeros_like(flat)
        keep[flat.topk(k).indices] = 1.0
        return [
            part.view_as(v) for part, v in zip(keep.split([v.numel() for v in values]), values, strict=True)
        ]

    def partials(x: Tensor, y: Tensor, mask: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        z = [(m * t).requires_grad_(True) for m, t in zip(mask, theta, strict=True)]
        b = [v.clone().requires_grad_(True) for v in bias]
        h = x
        for i in range(3):
            h = F.linear(h, z[i], b[i])
            h = F.relu(h) if i < 2 else h
        grads = torch.autograd.grad(F.cross_entropy(h, y), [*z, *b])
        return list(grads[:3]), list(grads[3:])

    def sgd(value: Tensor, grad: Tensor, buf: Tensor | None, lr: float, mom: float) -> Tensor:
        buf = grad.clone() if buf is None else mom * buf + grad
        value -= lr * buf
        return buf

    mask = top_k(scores)
    buf_t: list[Tensor | None] = [None] * 3
    buf_b: list[Tensor | None] = [None] * 3
    buf_s: list[Tensor | None] = [None] * 3
    batches = iter(data * (2 * steps))
    history: list[list[Tensor]] = []
    for _ in range(steps):
        g, g_b = partials(*next(batches), mask)
        theta_before = [t.clone() for t in theta]
        for i in range(3):
            if buf_t[i] is not None:
                buf_t[i] = buf_t[i] * mask[i]
            grad = mask[i] * (mask[i] * g[i] + hp["gamma"] * theta[i])
            buf_t[i] = sgd(theta[i], grad, buf_t[i], hp["lower_lr"], hp["momentum"])
            buf_b[i] = sgd(bias[i], g_b[i] + hp["gamma"] * bias[i], buf_b[i], hp["lower_lr"], hp["momentum"])
        if mode == "two_batch":
            theta_before = [t.clone() for t in theta]
            g, _ = partials(*next(batches), mask)
        for i in range(3):
            upper = theta_before[i] * g[i] - hp["implicit_coef"] * (mask[i] * g[i]) ** 2
            buf_s[i] = sgd(scores[i], upper, buf_s[i], hp["upper_lr"], hp["upper_momentum"])
        mask = top_k(scores)
        history.append([v.clone() for v in scores])
    return theta, bias, mask, history


class _ScoreRecorder:
    """A loader that records the score buffers of ``layers`` at every batch draw."""

    def __init__(self, data: list[tuple[Tensor, Tensor]], layers: list[nn.Module]) -> None:
        self.data, self.layers = data, layers
        self.records: list[list[Tensor] | None] = []

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.data:
            found = [m._buffers.get("weight_scores") for m in self.layers]
            self.records.append([v.clone() for v in found if v is not None] or None)
            yield batch


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_global_prune_follows_the_reference_update_rule(mode: str) -> None:
    hp = {
        "lower_lr": 0.3,
        "upper_lr": 2.0,
        "momentum": 0.9,
        "upper_momentum": 0.5,
        "gamma": 0.05,
        "implicit_coef": 3.0,
    }
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    steps, amount = 6, 0.6
    theta, bias, mask, history = _reference_bip(data, amount, steps, mode, hp)

    model = _tiny_mlp()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    loader = _ScoreRecorder(data, layers)
    torchbip.global_prune(
        model, amount, loader, steps=steps, mode=mode, lower_schedule="constant", upper_schedule="constant",
        score_init="magnitude", progress=False, **hp,
    )  # fmt: skip
    for i, layer in enumerate(layers):
        assert torch.equal(layer.weight_mask, mask[i])
        torch.testing.assert_close(layer.weight_orig.detach(), theta[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.detach(), bias[i], rtol=1e-12, atol=1e-12)
    # the scores after each step (seen by the loader at the next lower-level draw)
    seen = loader.records[1:] if mode == "fused" else loader.records[2::2]
    assert len(seen) == steps - 1
    for step, (got, expected) in enumerate(zip(seen, history, strict=False)):
        assert got is not None
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=f"scores after step {step}")
    # the mask did move away from the magnitude mask, so the upper level was exercised
    initial = [m.weight.detach().abs() for m in _tiny_mlp() if isinstance(m, nn.Linear)]
    n = sum(t.numel() for t in initial)
    flat = torch.cat([t.flatten() for t in initial])
    magnitude = torch.zeros_like(flat)
    magnitude[flat.topk(n - round(amount * n)).indices] = 1.0
    assert not torch.equal(torch.cat([m.weight_mask.flatten() for m in layers]), magnitude)


@pytest.mark.parametrize("with_mask_grads", [True, False])
def test_grads_equal_torch_func_grad_bit_for_bit_and_build_no_graph(with_mask_grads: bool) -> None:
    """The vjp without a graph of its own gives exactly what ``torch.func.grad`` gives."""
    model = _pruned_cnn(3).float()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 5, 5, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    params = dict(model.named_parameters())
    masks = {n: model.get_buffer(n) for n in MASK_NAMES}
    buffers = {n: b for n, b in model.named_buffers() if n not in masks and not n.endswith("_scores")}
    forward = make_forward(model)

    def objective(p: dict[str, Tensor], m: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        fresh = {k: v.clone() for k, v in buffers.items()}
        loss = F.cross_entropy(forward({**p, **m, **fresh}, x), y)
        return loss, fresh

    if with_mask_grads:
        (exp_params, exp_masks), exp_buffers = torch.func.grad(objective, argnums=(0, 1), has_aux=True)(
            params, masks
        )
    else:
        exp_params, exp_buffers = torch.func.grad(lambda p: objective(p, masks), has_aux=True)(params)
        exp_masks = {}
    out = masked_loss_grads(
        forward, params, masks, buffers, x, y, F.cross_entropy, with_mask_grads=with_mask_grads
    )
    assert set(out.params) == set(exp_params)
    assert set(out.masks) == set(exp_masks)
    for got, expected in ((out.params, exp_params), (out.masks, exp_masks), (out.buffers, exp_buffers)):
        for name, value in expected.items():
            assert torch.equal(got[name], value), name
    for value in [*out.params.values(), *out.masks.values()]:
        assert value.grad_fn is None
        assert not value.requires_grad
