"""``torchbip.Coupled``: one score per coupled channel, against a hand-written coupling.

The small residual net below has two groups, written out by hand (the oracle):

- A (4 channels): ``conv1``'s filters and bias, ``bn1``, ``conv3``'s filters and bias, ``bn3``
  (tied to ``conv1`` by the residual addition), and the inputs of ``conv2`` and of ``fc``
  (after a 2x2 pooling and a flatten, channel ``k`` is ``fc``'s inputs ``4k .. 4k+3``);
- B (6 channels): ``conv2``'s filters and bias, ``bn2`` and ``conv3``'s inputs.

``fc``'s outputs reach the model's output and are never pruned.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.func import functional_call

import torchbip
from torchbip.coupled import find_groups

pytest.importorskip("torch_pruning")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)))
        out = F.relu(a + self.bn3(self.conv3(b)))
        return self.fc(F.adaptive_avg_pool2d(out, 2).flatten(1))


# (tensor, dim, channel of each index along dim); None: index k is channel k
GROUP_A = {
    ("conv1.weight", 0): None,
    ("conv1.bias", 0): None,
    ("bn1.weight", 0): None,
    ("bn1.bias", 0): None,
    ("conv2.weight", 1): None,
    ("conv3.weight", 0): None,
    ("conv3.bias", 0): None,
    ("bn3.weight", 0): None,
    ("bn3.bias", 0): None,
    ("fc.weight", 1): [k // 4 for k in range(16)],
}
GROUP_B = {
    ("conv2.weight", 0): None,
    ("conv2.bias", 0): None,
    ("bn2.weight", 0): None,
    ("bn2.bias", 0): None,
    ("conv3.weight", 1): None,
}
SIZES = {"A": 4, "B": 6}


def _spec(found_group: object, params: list[tuple[nn.Module, str]], names: dict[nn.Module, str]) -> dict:
    out = {}
    for slot in found_group.slots:  # type: ignore[attr-defined]
        module, pname = params[slot.param]
        order = torch.argsort(slot.positions)
        assert slot.positions[order].tolist() == list(range(len(slot.positions)))
        out[(f"{names[module]}.{pname}", slot.dim)] = slot.channels[order].tolist()
    return out


def _expected(group: dict, size: int) -> dict:
    return {k: (list(range(size)) if v is None else v) for k, v in group.items()}


@pytest.fixture
def net(seed: int) -> Residual:
    model = Residual()
    with torch.no_grad():  # BatchNorm parameters away from 1 and 0, so that masking them shows
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


X = torch.Generator().manual_seed(1)


def _inputs(n: int = 4) -> Tensor:
    return torch.randn(n, 3, 6, 6, generator=X)


def test_groups_are_the_hand_written_coupling(net: Residual) -> None:
    before = capture(net)
    found = find_groups(net, _inputs())
    assert_unchanged(before, net)  # tracing ran on a copy: BatchNorm statistics, mode unchanged
    names = {m: n for n, m in net.named_modules()}
    specs = sorted((_spec(g, found.params, names) for g in found.groups), key=len, reverse=True)
    assert specs == [_expected(GROUP_A, 4), _expected(GROUP_B, 6)]
    assert sorted(g.size for g in found.groups) == [4, 6]
    for g in found.groups:  # the root is a layer whose filters the group holds
        assert (f"{g.root}.weight", 0) in _spec(g, found.params, names)
    assert found.skipped == [("fc", "its channels reach the model's output")]
    order = [f"{names[m]}.{p}" for m, p in found.params]
    assert order == [n for n, _ in net.named_parameters() if n != "fc.bias"]  # model order; fc.bias: no group


@pytest.mark.parametrize("frozen", ["all", "conv1"])
def test_frozen_layers_are_found_in_their_groups(net: Residual, frozen: str) -> None:
    """Tracing does not depend on ``requires_grad``: a frozen layer (here the first, which no
    trainable tensor feeds) is in the hand-written groups, and keeps its flags."""
    layers = [net] if frozen == "all" else [net.conv1, net.bn1]
    for layer in layers:
        layer.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    found = find_groups(net, _inputs())
    names = {m: n for n, m in net.named_modules()}
    specs = sorted((_spec(g, found.params, names) for g in found.groups), key=len, reverse=True)
    assert specs == [_expected(GROUP_A, 4), _expected(GROUP_B, 6)]
    assert found.skipped == [("fc", "its channels reach the model's output")]
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags


def test_a_group_with_a_frozen_layer_is_left_dense_with_the_reason(net: Residual) -> None:
    """Group A runs through the frozen conv1/bn1 (traced now): BiP cannot retrain them, so the
    group is left dense, named with its reason, and group B is pruned; all frozen: an error."""
    net.conv1.requires_grad_(False)
    net.bn1.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    pruner = torchbip.BiP(net, 0.5, layout=torchbip.Coupled(_inputs()))
    layout = pruner.layout
    assert [g.root for g in layout.groups] == ["conv2"]  # type: ignore[attr-defined]
    skipped = dict(layout.skipped)  # type: ignore[attr-defined]
    assert skipped.pop("fc") == "its channels reach the model's output"
    assert list(skipped.values()) == [
        "holds a frozen tensor (requires_grad=False)"
    ]  # group A (conv1 + conv3)
    assert sorted(pruner.names) == ["bn2.bias", "bn2.weight", "conv2.bias", "conv2.weight", "conv3.weight"]
    assert int((net.conv3.weight_mask.sum((0, 2, 3)) == 0).sum()) == 3  # its reader: 3 of B's 6 channels
    for name, value in frozen.items():
        assert torch.equal(dict(net.named_parameters())[name], value)
    everything = Residual().requires_grad_(False)
    before = capture(everything)
    with pytest.raises(ValueError, match=r"every group holds a frozen tensor \(requires_grad=False\)"):
        torchbip.BiP(everything, 0.5, layout=torchbip.Coupled(_inputs()))
    assert_unchanged(before, everything)


def test_a_group_search_past_the_index_budget_is_cut_and_left_dense(
    net: Residual, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search whose index lists outgrow the budget (Swin's window partitions multiply them at
    every reshape) is cut: its group is left dense with the reason, instead of running for ever.
    Here the budget is shrunk below the 4 and 6 channels of the two groups."""
    import torchbip._tracing as tracing

    monkeypatch.setattr(tracing, "_MAX_INDICES", 5)
    found = find_groups(net, _inputs())
    assert found.groups == []
    reasons = dict(found.skipped)
    assert reasons.pop("fc") == "its channels reach the model's output"
    assert len(reasons) >= 2  # every root of the two groups (a group may be tried from several)
    assert all("grows without bound" in why for why in reasons.values())


@pytest.mark.slow
def test_coupled_on_swin_t_returns() -> None:
    """torchvision's swin_t: the window partitions made one group's search effectively endless."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=10)
    found = find_groups(model, torch.randn(2, 3, 32, 32))
    mlp_hidden = {g.root for g in found.groups if g.root.endswith("mlp.0")}
    assert len(mlp_hidden) >= 6  # the Linear -> GELU -> Linear groups of the blocks
    assert any("grows without bound" in why for _, why in found.skipped)


def _masks(net: nn.Module, a: Tensor, b: Tensor, whole: bool = False) -> dict[str, Tensor]:
    """Every tensor's relaxed mask: the product of its channel variables (the hand coupling).

    While training a group masks its readers only (the ``dim=1`` entries: conv2's and fc's
    inputs for A, conv3's inputs for B); ``whole``: every tensor of the group.
    """
    out = {}
    for full_name, value in net.named_parameters():
        name = full_name.removesuffix("_orig")  # (a pruned tensor's parameter)
        factor = torch.ones_like(value)
        for group, var in ((GROUP_A, a), (GROUP_B, b)):
            for (tensor, dim), channels in group.items():
                if tensor == name and (whole or dim == 1):
                    index = torch.arange(value.shape[dim]) if channels is None else torch.tensor(channels)
                    shape = [1] * value.dim()
                    shape[dim] = value.shape[dim]
                    factor = factor * var[index].view(shape)
        out[name] = factor
    return out


@pytest.mark.parametrize("implicit_coef", [0.0, 0.5])
def test_score_gradient_is_the_chain_rule_through_the_shared_mask(
    net: Residual, implicit_coef: float
) -> None:
    """Against autograd through relaxed masks: one variable per group channel.

    With ``z = m(a, b) * theta`` and ``g = dl/dz`` there, the element-wise upper gradient is
    ``dl/dm = theta * g - c * m * g * g``, and a channel's gradient is its chain rule through
    ``m(a, b)``: ``d/da [ l(m(a, b) * theta) - c * sum(m(a, b) * (m * g * g)) ]`` with ``m``
    and ``g`` held at the current selection.
    """
    x, y = _inputs(8), torch.randint(0, 5, (8,), generator=X)
    net.eval()  # the same function in both computations (running statistics)
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()), implicit_coef=implicit_coef)
    # the group scores live on the group's root weight: find each group by its size
    owners = {g.size: o for g, o in zip(pruner.layout.groups, pruner.layout.owners, strict=True)}
    keep_a, keep_b = (k.float() for k in _channel_keeps(pruner))
    assert (keep_a.sum(), keep_b.sum()) == (2, 3)  # half of each group
    F.cross_entropy(net(x), y).backward()
    pruner.prepare()
    got_a = pruner.grad_views[owners[4]]
    got_b = pruner.grad_views[owners[6]]

    plain = Residual().eval()
    plain.load_state_dict(
        {k.removesuffix("_orig"): v for k, v in net.state_dict().items() if not k.endswith("_mask")}
    )
    theta = dict(plain.named_parameters())
    fixed = _masks(plain, keep_a, keep_b)
    effective = {k: (v * fixed[k]).detach().requires_grad_() for k, v in theta.items()}
    g = torch.autograd.grad(
        F.cross_entropy(functional_call(plain, effective, (x,)), y), list(effective.values())
    )
    g_of = dict(zip(effective, g, strict=True))
    a, b = keep_a.clone().requires_grad_(), keep_b.clone().requires_grad_()
    masks = _masks(plain, a, b)
    loss = F.cross_entropy(functional_call(plain, {k: theta[k] * masks[k] for k in theta}, (x,)), y)
    # the implicit term of dl/dm is -c * m * g * g at the current m, carried by the chain rule
    implicit = sum((masks[k] * (fixed[k] * g_of[k] * g_of[k])).sum() for k in theta)
    want_a, want_b = torch.autograd.grad(loss - implicit_coef * implicit, (a, b))
    torch.testing.assert_close(got_a, want_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=1e-7)


# -- masks, budgets and the training loop -----------------------------------------------------


def _train(model: nn.Module, pruner: torchbip.BiP, steps: int = 3, **step_kwargs: object) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        x, y = _inputs(8), torch.randint(0, 5, (8,), generator=X)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()


def _channel_keeps(pruner: torchbip.BiP) -> tuple[Tensor, Tensor]:
    """The keeps of group A (4 channels) and group B (6 channels)."""
    keeps = pruner.layout.group_keeps(pruner.score_views)
    by_size = {g.size: k for g, k in zip(pruner.layout.groups, keeps, strict=True)}
    return by_size[4], by_size[6]


def _slices(net: nn.Module, tensor: str, dim: int, channels: list[int] | None) -> tuple[Tensor, Tensor]:
    """A tensor's mask as one row per index along ``dim``, and the group channel of each row."""
    module_name, pname = tensor.split(".")
    mask = getattr(getattr(net, module_name), pname + "_mask")
    index = torch.arange(mask.shape[dim]) if channels is None else torch.tensor(channels)
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1), index


def _outputs(net: nn.Module, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The outputs of the named submodules in one forward pass."""
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> object:
        return lambda module, args, output: acts.__setitem__(name, output)

    hooks = [getattr(net, n).register_forward_hook(keep(n)) for n in names]
    try:
        net(_inputs())
    finally:
        for hook in hooks:
            hook.remove()
    return acts


def test_training_masks_the_readers_and_finish_every_member(net: Residual) -> None:
    """While training a pruned channel's readers are masked, and the model computes what the
    whole-group masks compute; after finish every member slice and the activation are zero."""
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()), upper_lr=1e4)
    seen = []
    x = _inputs()
    for step in range(4):
        _train(net, pruner, steps=1)
        if step % 2:  # a new selection: reverse the order of every group's scores
            for owner in pruner.layout.owners:
                pruner.score_views[owner].copy_(
                    -pruner.score_views[owner] + 1e-3 * torch.arange(len(pruner.score_views[owner]))
                )
            pruner.update_masks()
        keep_a, keep_b = _channel_keeps(pruner)
        seen.append((keep_a.tolist(), keep_b.tolist()))
        assert (int(keep_a.sum()), int(keep_b.sum())) == (2, 3)
        for group, keep in ((GROUP_A, keep_a), (GROUP_B, keep_b)):
            for (tensor, dim), channels in group.items():
                rows, index = _slices(net, tensor, dim, channels)
                if dim == 1:  # a reader: its pruned channels' slices are zero
                    assert (rows[~keep[index]] == 0).all(), tensor
                else:  # a producer: not masked by this group while training
                    assert rows[~keep[index]].any(dim=1).all(), tensor
        whole = copy.deepcopy(net)
        for (module, name), final in zip(
            [(t.module_fqn, t.name) for t in pruner.targets],
            pruner.layout.finish_masks(pruner.score_views),
            strict=True,
        ):
            getattr(whole.get_submodule(module), name + "_mask").copy_(final)
        for mode in (True, False):
            with torch.no_grad():
                torch.testing.assert_close(net.train(mode)(x), whole.train(mode)(x), rtol=0, atol=1e-6)
    assert len(set(map(str, seen))) > 1, "the selection never changed: the test would not see a stale mask"
    keep_a, keep_b = _channel_keeps(pruner)
    pruner.finish()
    for group, keep in ((GROUP_A, keep_a), (GROUP_B, keep_b)):
        for (tensor, dim), channels in group.items():
            rows, index = _slices(net, tensor, dim, channels)
            assert (rows[~keep[index]] == 0).all(), tensor  # every member's pruned slices
            assert rows[keep[index]].any(dim=1).all(), tensor  # the kept ones stay
    for mode in (True, False):  # the activations of pruned channels are exactly zero
        net.train(mode)
        acts = _outputs(net, ("bn1", "bn2", "bn3"))
        assert (acts["bn1"][:, ~keep_a] == 0).all()
        assert (acts["bn3"][:, ~keep_a] == 0).all()
        assert (acts["bn2"][:, ~keep_b] == 0).all()


def test_sparsity_while_training_is_that_of_the_whole_groups(net: Residual) -> None:
    """``pruner.sparsity`` (and its repr) counts every member of a pruned channel, as finishing
    would, not the readers alone that the training masks zero. Oracle: the hand-written groups'
    slices of the pruned channels, zeroed in masks of ones, over the targets' entries."""
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()), upper_lr=1e4)
    for _ in range(2):
        _train(net, pruner, steps=1)
        keep_a, keep_b = _channel_keeps(pruner)
        names = [t.fqn for t in pruner.targets]
        ones = {
            n: torch.ones_like(getattr(net.get_submodule(n.split(".")[0]), n.split(".")[1])) for n in names
        }
        for group, keep in ((GROUP_A, keep_a), (GROUP_B, keep_b)):
            for (tensor, dim), channels in group.items():
                if tensor not in ones:
                    continue
                size = ones[tensor].shape[dim]
                index = torch.arange(size) if channels is None else torch.tensor(channels)
                ones[tensor].movedim(dim, 0)[~keep[index]] = 0
        zeros = sum(int((m == 0).sum()) for m in ones.values())
        expected = zeros / sum(m.numel() for m in ones.values())
        training = 1 - sum(int(m.count_nonzero()) for m in pruner.masks) / sum(
            m.numel() for m in pruner.masks
        )
        assert training < expected  # the training masks alone undercount
        assert pruner.sparsity == pytest.approx(expected, abs=1e-12)
        assert f"sparsity={expected:.4f}," in repr(pruner)
    pruner.finish()
    assert pruner.report().global_sparsity == pytest.approx(expected, abs=1e-12)


def test_a_pruned_channel_gets_a_first_order_gradient(net: Residual) -> None:
    """Its readers are masked, not its producers: its score moves, so it can come back."""
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()))
    F.cross_entropy(net(_inputs(8)), torch.randint(0, 5, (8,), generator=X)).backward()
    pruner.prepare()
    for owner, keep in zip(pruner.layout.owners, pruner.layout.group_keeps(pruner.score_views), strict=True):
        grad = pruner.grad_views[owner]
        assert (grad[~keep] != 0).all()
        assert (grad[keep] != 0).all()


def test_pruned_channels_hold_their_producers_values_under_weight_decay(net: Residual) -> None:
    """A pruned channel's filters, biases and BatchNorm parameters are pruned too (finish() zeroes
    them), though only its readers are masked while training: AdamW's decay and momentum must not
    move them, so a channel that comes back returns with the values it had when it was pruned."""
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()), upper_lr=10.0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    params = dict(net.named_parameters())
    labels = torch.Generator().manual_seed(2)

    def state() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # the selection read off the readers' masks: conv2 reads group A, conv3 group B
        keep_a = net.conv2.weight_mask.sum((0, 2, 3)) > 0
        keep_b = net.conv3.weight_mask.sum((0, 2, 3)) > 0
        whole = _masks(net, keep_a.double(), keep_b.double(), whole=True)
        return whole, {n: p.detach().clone() for n, p in params.items()}

    held = 0
    for _ in range(4):
        masks_before, values_before = state()
        optimizer.zero_grad()
        F.cross_entropy(net(_inputs(8)), torch.randint(0, 5, (8,), generator=labels)).backward()
        optimizer.step()
        pruner.step()
        masks_after, _ = state()
        for name, value in params.items():
            key = name.removesuffix("_orig")
            pruned = (masks_before[key] == 0) & (masks_after[key] == 0)
            held += int(pruned.sum())
            assert torch.equal(value.detach()[pruned], values_before[name][pruned]), name
    assert held > 0


def test_budgets_layer_global_and_macs(net: Residual) -> None:
    x = _inputs()
    layer = torchbip.BiP(Residual(), amount=0.75, layout=torchbip.Coupled(x))
    assert layer.layout.counts == [1, 2] or layer.layout.counts == [2, 1]  # 4 -> 1, 6 -> round(1.5)=2
    assert layer.n_keep == 3
    glob = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(x, budget="global"), min_keep=2)
    keep_a, keep_b = _channel_keeps(glob)
    assert int(keep_a.sum()) + int(keep_b.sum()) == 5  # half of the 10 channels, ranked together
    assert int(keep_a.sum()) >= 2
    assert int(keep_b.sum()) >= 2
    assert glob.n_keep == 5


def test_a_str_subclass_budget_is_kept_as_a_plain_str_and_the_state_loads_weights_only() -> None:
    import io

    import numpy as np

    layout = torchbip.Coupled(_inputs(), budget=np.str_("global"))
    assert type(layout.budget) is str
    pruner = torchbip.BiP(Residual(), amount=0.5, layout=layout)
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["layout"] == pruner.layout.describe()


def test_global_budget_caps_every_group_at_max_keep(net: Residual) -> None:
    """With the highest scores all in group B, the global ranking would keep 5 of B's 6 channels;
    max_keep=3 keeps 3 of them and gives the rest of the budget to group A."""
    x = _inputs()
    capped = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(x, budget="global"), max_keep=3)
    owners = dict(zip((g.size for g in capped.layout.groups), capped.layout.owners, strict=True))
    with torch.no_grad():
        capped.score_views[owners[4]].copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
        capped.score_views[owners[6]].copy_(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
    capped.update_masks()
    keep_a, keep_b = _channel_keeps(capped)
    assert keep_b.tolist() == [True, True, True, False, False, False]
    assert keep_a.tolist() == [True, True, False, False]
    free = torchbip.BiP(Residual(), amount=0.5, layout=torchbip.Coupled(x, budget="global"))
    owners = dict(zip((g.size for g in free.layout.groups), free.layout.owners, strict=True))
    with torch.no_grad():
        free.score_views[owners[4]].copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
        free.score_views[owners[6]].copy_(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
    free.update_masks()
    assert [int(k.sum()) for k in _channel_keeps(free)] == [1, 4]  # A's floor of one channel
    with pytest.raises(ValueError, match=r"max_keep=2 keeps at most 4 channels, fewer than the 5"):
        torchbip.BiP(Residual(), amount=0.5, layout=torchbip.Coupled(x, budget="global"), max_keep=2)


def test_a_group_whose_cap_is_below_its_floor_names_max_keep_and_the_group(seed: int) -> None:
    """0.2 of group '0''s 4 channels is 0, but every group keeps one: the error names max_keep and
    the group (not an index into an internal list), BiP.check() says the same, the model is kept."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    layout = torchbip.Coupled(_inputs(), budget="global")
    before = capture(model)
    match = (
        r"max_keep=0\.2 keeps at most 0 of the 4 channels of the group of '0', but every group keeps "
        r"at least 1 \(one channel\); raise max_keep"
    )
    with pytest.raises(ValueError, match=match):
        torchbip.BiP.check(model, amount=0.9, layout=layout, max_keep=0.2)
    with pytest.raises(ValueError, match=match):
        torchbip.BiP(model, amount=0.9, layout=layout, max_keep=0.2)
    assert_unchanged(before, model)
    pruner = torchbip.BiP(model, amount=0.9, layout=layout, max_keep=0.25)  # a cap of one channel
    roots = [g.root for g in pruner.layout.groups]
    keeps = dict(zip(roots, pruner.layout.group_keeps(pruner.score_views), strict=True))
    assert int(keeps["0"].sum()) == 1
    assert sum(int(k.sum()) for k in keeps.values()) == 76 - round(0.9 * 76)


def test_macs_budget_counts_the_macs_of_the_kept_channels(seed: int) -> None:
    model = Residual()
    x = _inputs(1)
    pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x, budget="macs"))
    keep_a, keep_b = (int(k.sum()) for k in _channel_keeps(pruner))

    # MACs per image by hand: 6x6 maps, 3x3 kernels; fc: 16 inputs per channel group A
    def macs(a: int, b: int) -> int:
        return 36 * 9 * (a * 3 + b * a + a * b) + 5 * 4 * a

    assert pruner.layout.dense_macs == macs(4, 6)
    assert pruner.layout.macs() == macs(4, 6)
    keeps = [pruner.layout.select(pruner.score_views)[o] for o in pruner.layout.owners]
    assert pruner.layout.macs(keeps) == macs(keep_a, keep_b)
    # the counts are those of one common fraction p of the channels nearest to half the MACs
    options = {(max(1, 4 - round(p * 4)), max(1, 6 - round(p * 6))) for p in [i / 1000 for i in range(1001)]}
    best = min(options, key=lambda c: abs(macs(*c) - macs(4, 6) / 2))
    assert (keep_a, keep_b) == best


class CrossAttention(nn.Module):
    """Queries of width 8 attend to a memory whose keys and values have other widths (kdim, vdim)."""

    def __init__(self, kdim: int, vdim: int, bias_kv: bool = False) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(4, 8), nn.Linear(4, kdim), nn.Linear(4, vdim)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=vdim, add_bias_kv=bias_kv)
        self.fc1, self.fc2, self.head = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        q = self.query(x)
        h = q + self.att(q, self.key(memory), self.value(memory), need_weights=False)[0]
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


@pytest.mark.parametrize(("kdim", "vdim", "bias_kv"), [(16, 6, False), (8, 8, True)])
def test_macs_count_attention_s_key_and_value_widths_and_its_bias_key(
    seed: int, kdim: int, vdim: int, bias_kv: bool
) -> None:
    """Only ``fc1``'s 12 channels can go (the rest reaches the attention or the output). By hand,
    for a batch of 3, 5 queries and 7 memory entries (one more key with ``add_bias_kv``): the
    query projection and out_proj read 8 features, the key and value projections ``kdim`` and
    ``vdim``, both attention products span 8 dims; each fc1 channel costs 8 MACs in fc1 and 8
    in fc2 per query."""
    model = CrossAttention(kdim, vdim, bias_kv)
    x, memory = torch.randn(3, 5, 4), torch.randn(3, 7, 4)
    queries, entries, keys = 3 * 5, 3 * 7, 7 + bias_kv
    attention = 2 * queries * 8 * 8 + entries * (kdim + vdim) * 8 + 2 * queries * keys * 8
    linear = queries * 4 * 8 + entries * 4 * (kdim + vdim) + 3 * 8 * 3

    def macs(kept: int) -> int:
        return attention + linear + queries * 2 * 8 * kept

    pruner = torchbip.BiP(model, amount=0.15, layout=torchbip.Coupled((x, memory), budget="macs"))
    assert [g.root for g in pruner.layout.groups] == ["fc1"]
    assert pruner.layout.dense_macs == macs(12)
    assert pruner.layout.macs() == macs(12)
    best = min(range(1, 13), key=lambda kept: abs(macs(kept) - 0.85 * macs(12)))
    assert pruner.layout.counts == [best]
    assert pruner.layout.macs(pruner.layout.group_keeps(pruner.score_views)) == macs(best)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"parameters": "conv1"}, ValueError, "chooses its tensors from the model's dependency graph"),
        ({"amount": {"conv1.weight": 0.5}}, ValueError, "takes one amount"),
        ({"budget": "global"}, ValueError, "budget='global': with layout=Coupled"),
        ({"min_keep": 1}, ValueError, r"min_keep=1 applies to Coupled\(..., budget='global'\)"),
        ({"exclude": ["conv1", "conv2"]}, ValueError, "finds no channel group to prune"),
        ({"amount": 1.5}, ValueError, "amount"),
        (
            {"amount": 5},  # group A has 4 channels
            ValueError,
            r"amount \(a count per group, for 'conv[13]'\)=5 is larger than the number of unpruned "
            r"channels \(4\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument_and_leave_the_model_as_it_was(
    net: Residual, kwargs: dict, error: type, message: str
) -> None:
    if kwargs.get("parameters") == "conv1":
        kwargs = {"parameters": [(net.conv1, "weight")]}
    before = capture(net)
    with pytest.raises(error, match=message):
        torchbip.BiP(net, **{"amount": 0.5, "layout": torchbip.Coupled(_inputs()), **kwargs})
    assert_unchanged(before, net)


def test_global_prune_with_coupled_and_parameters_points_to_an_argument_that_exists(net: Residual) -> None:
    """global_prune has no exclude=: the refusal of parameters= says that torchbip.BiP takes it, and
    the model is left as it was."""
    x = _inputs()
    before = capture(net)
    with pytest.raises(
        ValueError, match=r"leave parameters= out \(to keep layers dense, torchbip\.BiP takes exclude=\)"
    ):
        torchbip.global_prune(
            net, 0.5, [(x, torch.zeros(len(x), dtype=torch.long))], parameters=[(net.conv1, "weight")],
            structured=torchbip.Coupled(x), steps=1, progress=False,
        )  # fmt: skip
    assert_unchanged(before, net)


def test_layout_object_errors_and_the_unreachable_macs_target(net: Residual) -> None:
    with pytest.raises(ValueError, match=r"Coupled\(budget='channels'\): budget must be one of"):
        torchbip.Coupled(_inputs(), budget="channels")
    with pytest.raises(TypeError, match="needs a tensor or a tuple of tensors"):
        torchbip.Coupled([1, 2, 3])
    before = capture(net)
    with pytest.raises(ValueError, match=r"budget='macs': amount=0.999 asks for .* at most amount=0\.\d+"):
        torchbip.BiP(net, amount=0.999, layout=torchbip.Coupled(_inputs(), budget="macs"))
    assert_unchanged(before, net)
    torch.nn.utils.prune.l1_unstructured(net.bn1, "weight", amount=1)
    with pytest.raises(ValueError, match=r"starts from an unpruned model, but \['bn1.weight'\] are pruned"):
        torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()))


def test_exclude_leaves_a_member_s_whole_group_dense(net: Residual) -> None:
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()), exclude=["bn2"])
    assert [g.size for g in pruner.layout.groups] == [4]  # group B held bn2
    assert sorted(pruner.names) == sorted(name for name, _ in GROUP_A)
    assert ("conv2", "excluded") in pruner.layout.skipped or any(
        r == "excluded" for _, r in pruner.layout.skipped
    )
    assert not hasattr(net.bn2, "weight_mask")


def test_state_dict_resume_equals_the_uninterrupted_run(seed: int) -> None:
    """Stop after 2 of 4 steps, rebuild from the state dicts: the same scores, masks and weights."""
    x = _inputs()
    batches = [(_inputs(8), torch.randint(0, 5, (8,), generator=X)) for _ in range(4)]
    start = Residual().state_dict()

    def build() -> tuple[Residual, torchbip.BiP, torch.optim.Optimizer]:
        model = Residual()
        model.load_state_dict(start)
        pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x), upper_lr=1e4, steps=4)
        return model, pruner, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    def run(model: Residual, pruner: torchbip.BiP, optimizer: torch.optim.Optimizer, part: list) -> None:
        for bx, by in part:
            optimizer.zero_grad()
            F.cross_entropy(model(bx), by).backward()
            optimizer.step()
            pruner.step()

    whole = build()
    run(*whole, batches)
    first = build()
    run(*first, batches[:2])
    saved = {k: v.clone() for k, v in first[0].state_dict().items()}
    states = (first[1].state_dict(), first[2].state_dict())
    second = build()
    second[0].load_state_dict(saved)
    second[1].load_state_dict(states[0])
    second[2].load_state_dict(states[1])
    run(*second, batches[2:])
    assert torch.equal(second[1].flat_scores, whole[1].flat_scores)
    for got, want in zip(second[1].keeps, whole[1].keeps, strict=True):
        assert torch.equal(got, want)
    for (name, got), want in zip(second[0].state_dict().items(), whole[0].state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert second[1].step_count == 4


def test_finish_then_prune_remove_gives_a_plain_model_that_reloads_strictly(net: Residual) -> None:
    pruner = torchbip.BiP(net, amount=0.5, layout=torchbip.Coupled(_inputs()))
    _train(net, pruner, steps=2)
    report = pruner.finish()
    assert set(report.tensors) == {name for name, _ in [*GROUP_A, *GROUP_B]}
    net.eval()
    x = _inputs()
    before = net(x)
    torchbip.export.make_permanent(net)
    assert not any(name.endswith(("_mask", "_orig", "_scores")) for name in net.state_dict())
    fresh = Residual().eval()
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(fresh(x), before)


class SplitNet(nn.Module):
    """A conv's channels split in two: one half added to another conv's, the other read by a third."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.ba = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bb = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c, self.bc = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.d, self.fc = nn.Conv2d(10, 6, 1), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.ba(self.a(x)))
        if self.how == "split":
            y1, y2 = torch.split(y, [4, 4], dim=1)
        elif self.how == "chunk":
            y1, y2 = torch.chunk(y, 2, dim=1)
        else:
            y1, y2 = y[:, :4], y[:, 4:]
        z = y1 + F.relu(self.bb(self.b(x)))
        w = F.relu(self.bc(self.c(y2)))
        return self.fc(self.d(torch.cat([z, w], 1)).mean((2, 3)))


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_split_channels_are_left_dense_and_finish_keeps_the_outputs(how: str) -> None:
    """torch.split/chunk: Torch-Pruning maps the pieces' channels wrongly; a slice ``y[:, :4]``
    has bounds the forward fixes, which a removed channel would shift. Either way those groups
    stay dense, with the reason, and finish() computes what the training masks did."""
    torch.manual_seed(0)
    model = SplitNet(how)
    pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(torch.randn(4, 3, 6, 6)))
    names = set(pruner.names)
    assert "a.weight" not in names
    assert "b.weight" not in names  # b's channels are added to a's first half
    assert "c.weight" in names
    reason = dict(pruner.layout.skipped)["a"]
    assert ("y[:, :k]" in reason) == (how == "slice")
    assert ("split" in reason) == (how != "slice")
    model.eval()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    pruner.finish()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_a_model_without_a_group_to_prune_gets_the_reasons_and_is_left_alone() -> None:
    """Every group of the model is left dense: the error says so and why, not that the model
    has no Linear or Conv layer, and the model keeps its tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layout=Coupled finds no channel group to prune") as info:
        torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(torch.randn(2, 3, 6, 6)))
    assert "'2' (ConvTranspose2d) is not a Linear or Conv layer Coupled prunes" in str(info.value)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not model[0]._forward_pre_hooks


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_global_prune_equals_the_same_bip_in_a_plain_sgd_loop(net: Residual, budget: str) -> None:
    """``global_prune`` (SGD, L2 term gamma, fused) and ``BiP`` in a plain loop (SGD with
    ``weight_decay=gamma``) on the same batches leave the same masks and weights: in both, a pruned
    channel's producers are held, not decayed."""
    net = net.double()
    batches = [
        (_inputs(8).double(), torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(i)))
        for i in range(6)
    ]
    lr, gamma, settings = 0.1, 0.05, {"upper_lr": 5.0, "upper_schedule": "constant"}
    ours = copy.deepcopy(net)
    x = _inputs().double()
    torchbip.global_prune(
        net, 0.5, batches, steps=len(batches), structured=torchbip.Coupled(x, budget=budget),
        lower_lr=lr, momentum=0.0, gamma=gamma, lower_schedule="constant", progress=False, **settings,
    )  # fmt: skip
    pruner = torchbip.BiP(ours, 0.5, layout=torchbip.Coupled(x, budget=budget), **settings)
    optimizer = torch.optim.SGD(ours.parameters(), lr=lr, weight_decay=gamma)
    for xb, yb in batches:
        optimizer.zero_grad()
        F.cross_entropy(ours(xb), yb).backward()
        optimizer.step()
        pruner.step()
    pruner.finish()
    theirs, mine = net.state_dict(), ours.state_dict()
    assert theirs.keys() == mine.keys()
    for key, value in theirs.items():
        if key.endswith("_mask"):
            assert torch.equal(mine[key], value), key
        else:
            torch.testing.assert_close(mine[key], value, rtol=1e-9, atol=1e-12, msg=key)
