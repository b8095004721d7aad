"""Coupled groups through layers and operations that are easy to get wrong.

Each model trains a few BiP steps with ``torchbip.Coupled``; then, against counts taken by hand:

- ``finish()`` leaves the outputs as they were in the training form (nothing but a group's
  readers saw a pruned channel), whatever the graph holds between producers and readers;
- every channel whose producers are all zero after ``finish()`` is gone from the slim model,
  which computes what the masked model computes;
- a group that cannot be pruned that way is left dense and named in ``layout.skipped``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbip

pytest.importorskip("torch_pruning")


class SqueezeExcite(nn.Module):
    """The SENet block as its paper's code writes it: the gate expanded to the feature map."""

    def __init__(self, channels: int, expand: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, channels // 4), nn.Linear(channels // 4, channels)
        self.expand = expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))[:, :, None, None]
        return x * (gate.expand_as(x) if self.expand else gate)


class Net(nn.Module):
    """conv-BN-ReLU, an operation ``op`` on its 16 channels, conv-BN-ReLU, pooled linear head."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16, expand=op == "se_expand")
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        if self.op.startswith("se"):
            h = self.se(h)
        elif self.op == "softmax":
            h = h.softmax(1)
        elif self.op == "flip":
            h = h.flip(1)
        elif self.op == "roll":
            h = h.roll(1, dims=1)
        elif self.op == "shuffle":
            h = h.view(h.shape[0], 2, 8, *h.shape[2:]).transpose(1, 2).reshape(h.shape)
        elif self.op == "channel_mean":
            h = h - h.mean(1, keepdim=True)
        h = F.relu(self.b2(self.c2(h)))
        features = h.mean((2, 3))
        if self.op == "normalize":
            features = F.normalize(features, dim=1)
        return self.head(features)


def _train(model: nn.Module, x: torch.Tensor, amount: float = 0.5) -> torchbip.BiP:
    pruner = torchbip.BiP(model, amount=amount, layout=torchbip.Coupled(x), steps=3, upper_lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.arange(x.shape[0]) % 10
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    return pruner


def _zero_filters(weight: torch.Tensor) -> int:
    return int((weight.detach().flatten(1) == 0).all(1).sum())


def _finish_and_export(model: nn.Module, pruner: torchbip.BiP, x: torch.Tensor) -> nn.Module:
    """finish() keeps the outputs; the slim model equals the masked one and drops zero filters."""
    model.eval()
    with torch.no_grad():
        trained = model(x)
    pruner.finish()
    with torch.no_grad():
        finished = model(x)
    torch.testing.assert_close(finished, trained, rtol=1e-5, atol=1e-6)
    slim = torchbip.export_slim(model, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), finished, rtol=1e-4, atol=1e-5)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            kept = module.out_channels - _zero_filters(module.weight)
            assert dict(slim.named_modules())[name].out_channels == kept, name
    return slim


@pytest.mark.parametrize("expand", [True, False], ids=["expand_as", "broadcast"])
def test_squeeze_excite_gate_either_way_removes_the_pruned_channels(expand: bool) -> None:
    torch.manual_seed(0)
    model, x = Net("se_expand" if expand else "se_broadcast"), torch.randn(8, 3, 8, 8)
    pruner = _train(model, x)
    assert {g.root for g in pruner.layout.groups} >= {"c2"}
    slim = _finish_and_export(model, pruner, x)
    assert slim.c1.out_channels == slim.c2.in_channels == 8  # half of c1's group pruned


@pytest.mark.parametrize("op", ["normalize", "softmax", "flip", "roll", "shuffle", "channel_mean"])
def test_channels_mixed_without_parameters_leave_their_group_dense(op: str) -> None:
    torch.manual_seed(0)
    model, x = Net(op), torch.randn(8, 3, 8, 8)
    pruner = _train(model, x)
    mixed = "c2" if op == "normalize" else "c1"  # the group whose channels the operation mixes
    reasons = dict(pruner.layout.skipped)
    assert "mixes them" in reasons[mixed]
    assert mixed not in {g.root for g in pruner.layout.groups}
    assert pruner.layout.groups  # the other conv's group is still pruned
    _finish_and_export(model, pruner, x)


class TransposedNet(nn.Module):
    def __init__(self, up_out: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.up, self.b2 = nn.ConvTranspose2d(16, up_out, 2, stride=2), nn.BatchNorm2d(up_out)
        self.c3 = nn.Conv2d(up_out, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.up(h)))
        return self.head(F.relu(self.c3(h)).mean((2, 3)))


@pytest.mark.parametrize("up_out", [8, 16])
def test_a_transposed_convolution_leaves_its_groups_dense(up_out: int) -> None:
    torch.manual_seed(0)
    model, x = TransposedNet(up_out), torch.randn(4, 3, 8, 8)
    pruner = _train(model, x)
    reasons = dict(pruner.layout.skipped)
    assert "ConvTranspose2d" in reasons["c1"]
    assert all("up" not in g.layers for g in pruner.layout.groups)
    assert [g.root for g in pruner.layout.groups] == ["c3"]
    slim = _finish_and_export(model, pruner, x)
    assert slim.up.in_channels == 16
    assert slim.up.out_channels == up_out
    assert slim.c3.out_channels == 4


class GroupedNet(nn.Module):
    """A grouped conv with ``groups == out_channels`` that reads two channels per group."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g, self.b2 = nn.Conv2d(16, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b2(self.g(F.relu(self.b1(self.c1(x))))))
        return self.head(F.relu(self.c3(h)).mean((2, 3)))


def test_a_grouped_convolution_that_is_not_depthwise_is_not_taken_for_one() -> None:
    torch.manual_seed(0)
    model, x = GroupedNet(), torch.randn(4, 3, 8, 8)
    pruner = _train(model, x)
    assert "grouped convolution that is not depthwise" in dict(pruner.layout.skipped)["g"]
    assert all("g" not in g.layers and "c1" not in g.layers for g in pruner.layout.groups)
    slim = _finish_and_export(model, pruner, x)
    assert slim.c1.out_channels == 16
    assert slim.g.out_channels == 8


def test_export_keeps_the_inputs_of_a_grouped_convolution_labelled_depthwise() -> None:
    """Zero filters feeding ``Conv2d(16, 8, groups=8)`` stay: removing them breaks its groups."""
    torch.manual_seed(0)
    model, x = GroupedNet().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model.c1.weight[::2] = 0.0  # one of the two inputs of every group of g
        model.c1.bias[::2] = 0.0
        model.g.weight[:2] = 0.0  # g's first two filters (its own output channels)
    slim = torchbip.export_slim(model, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), rtol=1e-4, atol=1e-5)
    assert slim.c1.out_channels == 16
    assert slim.g.in_channels == 16
    assert slim.g.out_channels == 8


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True, add_zero_attn=True)
        self.head = nn.Linear(16, 10)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(h, h, h)[0].mean(1))


def test_a_model_the_dependency_graph_cannot_trace_gets_a_named_error() -> None:
    torch.manual_seed(0)
    model, x = _Untraceable(), torch.randn(4, 5, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"export_slim: Torch-Pruning's dependency graph cannot be built"):
        torchbip.export_slim(model, x)
    with pytest.raises(ValueError, match=r"Coupled\(example_inputs=...\): Torch-Pruning's dependency"):
        torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(k.endswith("_orig") for k in after)


class Sampling(nn.Module):
    """Two conv-ReLU blocks with a head; ``sample`` draws noise in every mode (a VAE's latent,
    MC dropout)."""

    def __init__(self, sample: bool) -> None:
        super().__init__()
        self.sample = sample
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        if self.sample:
            h = h + 0.5 * torch.randn_like(h)
            h = F.dropout(h, 0.25, training=True)
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


def test_a_model_whose_eval_forward_is_random_keeps_its_groups_and_the_callers_random_state() -> None:
    from torchbip.coupled import find_groups

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    plain = find_groups(Sampling(sample=False), x)
    model = Sampling(sample=True)
    state = torch.get_rng_state()
    found = find_groups(model, x)
    assert torch.equal(torch.get_rng_state(), state)  # no random number of the caller's drawn
    assert [g.root for g in found.groups] == [g.root for g in plain.groups] == ["c2", "c1"]
    assert found.skipped == plain.skipped


class Halves(nn.Module):
    """A conv's output cut in two (``how``: its channels in halves, or its rows by a spatial
    crop), each piece read by its own conv-BN-ReLU."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        width = 4 if how == "slice" else 8
        self.a, self.ba = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.p, self.bp = nn.Conv2d(width, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.q, self.bq = nn.Conv2d(width, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ba(self.a(x)))
        first, second = (h[:, :4], h[:, 4:]) if self.how == "slice" else (h[:, :, 1:], h[:, :, :-1])
        h = torch.cat([F.relu(self.bp(self.p(first))), F.relu(self.bq(self.q(second)))], 1)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("how", ["slice", "crop"])
def test_a_channel_slice_leaves_its_group_dense_and_the_export_runs(how: str) -> None:
    """``h[:, :4]`` and ``h[:, 4:]`` have bounds the forward fixes: removing a channel of the
    first half would shift the second half. That group is left dense with the reason; a crop of
    the spatial axes keeps every channel, and its group is pruned. Either way the export runs
    and removes every pruned channel."""
    torch.manual_seed(0)
    model = Halves(how)
    x = torch.randn(4, 3, 8, 8)
    pruner = _train(model, x)
    skipped = dict(pruner.layout.skipped)
    if how == "slice":
        assert skipped["a"].startswith("its channels go through a slice such as y[:, :k]")
    assert {g.root for g in pruner.layout.groups} == ({"p", "q"} if how == "slice" else {"a", "p", "q"})
    slim = _finish_and_export(model, pruner, x)
    assert (slim.a.out_channels, slim.p.out_channels, slim.q.out_channels) == (
        8 if how == "slice" else 4,
        3,
        3,
    )
