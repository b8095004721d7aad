"""Coupled groups through per-channel layers, and groups the export could not remove.

- torchvision's ``FrozenBatchNorm2d`` (the norm layer of its detection backbones) holds its
  scale and shift in buffers, which Torch-Pruning's tracer does not see: the groups through it
  are pruned, and the export slices those buffers with the channels;
- ``nn.PReLU`` (one shared slope or one per channel) and ``nn.InstanceNorm*d`` are per-channel:
  groups through them are pruned (a per-channel slope and the affine parameters are zeroed
  with their channel, as a BatchNorm's are), except an InstanceNorm with running statistics but
  no affine parameters (a zero channel becomes ``-mean / std`` in eval mode, as with a
  BatchNorm without affine parameters);
- a group whose channels a buffer used per channel in the forward counts (``x * self.scale``)
  cannot be removed: it is left dense, with the reason, before any training.

Each slim model is checked against counts made by hand and against the masked model's outputs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import torchbip

pytest.importorskip("torch_pruning")


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train(model: nn.Module, x: torch.Tensor, steps: int = 2) -> torchbip.BiP:
    pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x), steps=steps, upper_lr=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        images = torch.randn_like(x)
        labels = torch.randint(0, 10, (x.shape[0],))
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        pruner.step()
    return pruner


def _round_trip(slim: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(slim.state_dict(), buffer)
    buffer.seek(0)
    return torchbip.load_slim_state_dict(build(), torch.load(buffer, weights_only=True)).eval()


def _frozen_resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)


def test_coupled_resnet18_with_frozen_batchnorm_exports_every_pruned_channel() -> None:
    torch.manual_seed(0)
    model = _frozen_resnet18()
    with torch.no_grad():  # frozen statistics that are not the identity
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    pruner = _train(model, x)
    assert len(pruner.layout.groups) == 12
    assert pruner.layout.skipped == [("fc", "its channels reach the model's output")]
    pruner.finish()
    model.eval()
    slim = torchbip.export_slim(model, x).eval()
    # FrozenBatchNorm2d holds no parameters: every removed parameter is a zero of the report
    assert _nparams(slim) == _nparams(_frozen_resnet18()) - torchbip.sparsity_report(model).zeros
    assert slim.conv1.out_channels == slim.bn1.weight.shape[0] == slim.bn1.running_var.shape[0] == 32
    assert slim.layer1[0].conv1.out_channels == slim.layer1[0].bn1.running_mean.shape[0] == 32
    y = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slim(y), model(y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_round_trip(slim, _frozen_resnet18)(y), slim(y))


def test_export_removes_zero_filters_before_a_frozen_batchnorm() -> None:
    """Layer by layer (bip_structured): a FrozenBatchNorm2d's buffers go with the filters."""
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            FrozenBatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 4, 3),
            nn.Flatten(),
            nn.Linear(16, 2),
        )

    model = build().eval()
    torchbip.bip_structured(model[0], "weight", amount=3, dim=0)
    x = torch.randn(4, 3, 6, 6)
    slim = torchbip.export_slim(model, x).eval()
    assert slim[0].out_channels == slim[3].in_channels == 5
    assert all(getattr(slim[1], n).shape == (5,) for n in ("weight", "bias", "running_mean", "running_var"))
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))
        torch.testing.assert_close(_round_trip(slim, build)(x), slim(x))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "prelu_shared": lambda: nn.PReLU(),
    "prelu_per_channel": lambda: nn.PReLU(16),
    "instance_norm": lambda: nn.InstanceNorm2d(16),
    "instance_norm_affine": lambda: nn.InstanceNorm2d(16, affine=True),
    "instance_norm_affine_stats": lambda: nn.InstanceNorm2d(16, affine=True, track_running_stats=True),
}


def _net(act: Callable[[], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        act(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_coupled_prunes_groups_through_prelu_and_instance_norm(act: str) -> None:
    torch.manual_seed(0)
    model = _net(ACTIVATIONS[act])
    x = torch.randn(4, 3, 8, 8)
    pruner = _train(model, x)
    assert [g.root for g in pruner.layout.groups] == ["3", "0"], pruner.layout.skipped
    per_channel = act in ("prelu_per_channel", "instance_norm_affine", "instance_norm_affine_stats")
    assert ("2" in pruner.layout.groups[1].layers) == per_channel  # its tensors are in the group
    model.eval()
    with torch.no_grad():
        trained = model(x)
    pruner.finish()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)  # finish keeps the outputs
    if per_channel:  # zeroed with its channel, as a BatchNorm's affine parameters
        assert int((model[2].weight == 0).sum()) == 8
    slim = torchbip.export_slim(model, x).eval()
    assert slim[0].out_channels == slim[3].in_channels == slim[3].out_channels == slim[8].in_features == 8
    # by hand: 8 channels per group; conv 8x3x3x3, BN 2x8, the activation's own, conv 8x8x3x3, BN 2x8,
    # linear 10x8 + 10
    own = {"prelu_shared": 1, "prelu_per_channel": 8, "instance_norm": 0}.get(act, 16)
    assert _nparams(slim) == 8 * 3 * 9 + 16 + own + 8 * 8 * 9 + 16 + 10 * 8 + 10
    if act == "instance_norm_affine_stats":
        assert slim[2].running_mean.shape == slim[2].running_var.shape == (8,)
    y = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(slim(y), model(y), rtol=1e-4, atol=1e-5)
        rebuilt = _round_trip(slim, lambda: _net(ACTIVATIONS[act]))
        with warnings.catch_warnings():
            # an InstanceNorm without tensors keeps num_features=16 (no state dict holds it): torch
            # warns that the input has 8 channels, which it does not use
            warnings.simplefilter("ignore")
            torch.testing.assert_close(rebuilt(y), slim(y))


def test_instance_norm_with_running_statistics_and_no_affine_parameters_leaves_its_group_dense() -> None:
    torch.manual_seed(0)
    model = _net(lambda: nn.InstanceNorm2d(16, track_running_stats=True))
    pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(torch.randn(4, 3, 8, 8)))
    reasons = dict(pruner.layout.skipped)
    assert reasons["0"] == "the InstanceNorm '2' has running statistics but no affine parameters to zero"
    assert [g.root for g in pruner.layout.groups] == ["3"]


class Scaled(nn.Module):
    """A conv whose output is scaled per channel by a buffer: the graph does not see the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x)) * self.scale
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


def test_a_group_counted_by_a_per_channel_buffer_is_left_dense_before_training() -> None:
    torch.manual_seed(0)
    model = Scaled()
    x = torch.randn(4, 3, 6, 6)
    layout = torchbip.Coupled(x)
    pruner = torchbip.BiP(model, amount=0.5, layout=layout)
    reasons = dict(pruner.layout.skipped)
    assert reasons["c1"].startswith("the model fails once its channels are removed (RuntimeError: ")
    assert "a buffer or constant that the forward uses per channel" in reasons["c1"]
    assert [g.root for g in pruner.layout.groups] == ["c2"]
    assert pruner.names == ["c2.weight", "c2.bias", "fc.weight"]
    torch.manual_seed(0)
    model = Scaled()
    pruner = _train(model, x)
    pruner.finish()
    slim = torchbip.export_slim(model.eval(), x).eval()
    assert (slim.c1.out_channels, slim.c2.out_channels, slim.fc.in_features) == (8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))


def test_the_removal_trial_leaves_the_model_and_the_random_state_alone() -> None:
    from torchbip.coupled import find_groups

    torch.manual_seed(0)
    model = Scaled()
    x = torch.randn(4, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    found = find_groups(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert [g.root for g in found.groups] == ["c2"]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Gained(nn.Module):
    """A per-channel Parameter used directly in the forward (no layer holds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x)) * self.gain
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


def test_a_group_through_a_raw_parameter_is_skipped_with_the_parameters_name() -> None:
    from torchbip.coupled import find_groups

    torch.manual_seed(0)
    found = find_groups(Gained(), torch.randn(4, 3, 6, 6))
    reason = dict(found.skipped)["c1"]
    assert reason.startswith("'gain', a parameter that the forward uses directly (not through a layer)")
    assert "tensor(" not in reason
    assert [g.root for g in found.groups] == ["c2"]
