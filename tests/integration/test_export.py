"""Slim export: the exported model computes what the masked model computes, with smaller layers."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils import prune

from torchbip import BiP, bip_structured, bip_unstructured, export_slim, load_slim_state_dict
from torchbip.export import SlimExportWarning, _Planner, make_permanent
from torchbip.sparse import SparseCSRConv2d, SparseCSRLinear, to_sparse_csr

pytest.importorskip("torch_pruning")


def vgg_style() -> nn.Module:
    """Conv-BN-ReLU stacks, a 1x1 convolution without padding, flatten, two linear layers."""

    def block(c_in: int, c_out: int, k: int = 3, p: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, k, padding=p, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        *block(16, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        *block(32, 24, k=1, p=0),
        nn.MaxPool2d(2),
        *block(24, 32),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(64, 10),
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics and biases, so a pruned filter's channel is a nonzero constant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen) * 0.3 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.out_channels, generator=gen) * 0.2)
    return model


def prune_filters(model: nn.Module, amount: float, skip: tuple[nn.Module, ...] = ()) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m not in skip:
            bip_structured(m, "weight", amount=amount, dim=0)
    return model


def kept_filters(conv: nn.Module) -> int:
    return int((conv.weight_mask.sum(dim=(1, 2, 3)) != 0).sum())


def assert_same_outputs(slim: nn.Module, masked: nn.Module, x: Tensor) -> None:
    slim.eval()
    masked.eval()
    with torch.no_grad():
        want = masked(x)
        got = slim(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg_style_removes_masked_filters_and_folds_constants(seed: int) -> None:
    model = prune_filters(randomize(vgg_style()), 0.5).eval()
    slim = export_slim(model, torch.randn(4, 3, 16, 16))
    assert_same_outputs(slim, model, torch.randn(6, 3, 16, 16))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    slim_convs = [m for m in slim if isinstance(m, nn.Conv2d)]
    # Readers without padding (the flatten + Linear and the 1x1 conv) take every dead channel,
    # whatever its constant: the constant is folded into their bias.
    assert slim_convs[2].out_channels == kept_filters(convs[2])  # read by the 1x1 conv
    assert slim_convs[4].out_channels == kept_filters(convs[4])  # read by flatten + Linear
    assert slim[-4].in_features == kept_filters(convs[4]) * 16
    assert slim_convs[3].bias is not None  # created by folding
    # Readers with zero padding take a dead channel only if it is zero after BN + ReLU.
    for dense, small in zip(convs[:2], slim_convs[:2], strict=True):
        assert kept_filters(dense) <= small.out_channels <= dense.weight.shape[0]
    assert count(slim) < 0.6 * count(vgg_style())
    assert prune.is_pruned(model)  # the input model is not changed
    assert isinstance(slim[0].weight, nn.Parameter)
    assert not prune.is_pruned(slim)


def test_vgg_style_input_channel_masks_remove_unused_filters_whatever_the_constant(seed: int) -> None:
    model = randomize(vgg_style())
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for conv in convs[1:]:
        bip_structured(conv, "weight", amount=0.5, dim=1)
    slim = export_slim(model, torch.randn(2, 3, 16, 16))
    assert_same_outputs(slim, model, torch.randn(3, 3, 16, 16))
    slim_convs = [m for m in slim if isinstance(m, nn.Conv2d)]
    for dense, small in zip(convs[1:], slim_convs[1:], strict=True):
        assert small.in_channels == dense.in_channels // 2
    assert slim_convs[0].in_channels == 3  # the model's input channels stay


def bn_constant(bn: nn.BatchNorm2d) -> Tensor:
    """The value a pruned (zero, bias-free) filter's channel has after BatchNorm in eval mode."""
    return (0 - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_resnet18_exact_with_residual_coupling(seed: int) -> None:
    model = prune_filters(randomize(torchvision.models.resnet18(num_classes=10)), 0.5).eval()
    slim = export_slim(model, torch.randn(2, 3, 64, 64))
    assert_same_outputs(slim, model, torch.randn(3, 3, 64, 64))
    assert count(slim) < 0.85 * count(torchvision.models.resnet18(num_classes=10))
    for name in ("layer1.0", "layer3.1", "layer4.0"):
        block, small = model.get_submodule(name), slim.get_submodule(name)
        # conv1's dead channels feed conv2 (3x3, zero padding): removed exactly when zero after ReLU
        dead = block.conv1.weight_mask.sum(dim=(1, 2, 3)) == 0
        positive = bn_constant(block.bn1) > 0
        assert small.conv1.out_channels == kept_filters(block.conv1) + int((dead & positive).sum())
    assert slim.fc.out_features == 10


@pytest.mark.slow
def test_resnet50_bottlenecks_fold_into_the_1x1_convolution(seed: int) -> None:
    model = prune_filters(randomize(torchvision.models.resnet50(num_classes=10)), 0.5).eval()
    slim = export_slim(model, torch.randn(2, 3, 64, 64))
    assert_same_outputs(slim, model, torch.randn(2, 3, 64, 64))
    for name in ("layer1.0", "layer2.3", "layer4.2"):
        block, small = model.get_submodule(name), slim.get_submodule(name)
        # conv2's channels are read by conv3 (1x1, no padding): every dead one is folded and removed
        assert small.conv2.out_channels == kept_filters(block.conv2)
        assert small.conv3.in_channels == kept_filters(block.conv2)
        assert small.conv3.bias is not None
    assert count(slim) < 0.7 * count(torchvision.models.resnet50(num_classes=10))


def test_fresh_batchnorm_makes_every_masked_filter_removable(seed: int) -> None:
    """With BN at its initialisation a pruned channel is exactly zero: everything inside blocks goes."""
    model = prune_filters(torchvision.models.resnet18(num_classes=10), 0.5).eval()
    slim = export_slim(model, torch.randn(2, 3, 32, 32))
    assert_same_outputs(slim, model, torch.randn(2, 3, 32, 32))
    for name in ("layer1.0", "layer2.1", "layer4.1"):
        assert slim.get_submodule(name).conv1.out_channels == kept_filters(model.get_submodule(name).conv1)


@pytest.mark.parametrize(
    ("build", "size"),
    [
        pytest.param(vgg_style, 16, id="vgg"),
        pytest.param(lambda: torchvision.models.resnet18(num_classes=10), 32, id="resnet18"),
    ],
)
def test_state_dict_round_trip_into_a_rebuilt_model(
    build: Callable[[], nn.Module], size: int, seed: int
) -> None:
    model = prune_filters(randomize(build()), 0.5).eval()
    slim = export_slim(model, torch.randn(2, 3, size, size))
    buffer = io.BytesIO()
    torch.save(slim.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = load_slim_state_dict(build(), torch.load(buffer, weights_only=True)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim.eval()(x))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in slim.state_dict().items()
    }


def test_round_trip_into_a_shared_memory_model_fills_unchanged_shapes_in_place(seed: int) -> None:
    model = prune_filters(randomize(vgg_style()), 0.5).eval()
    slim = export_slim(model, torch.randn(2, 3, 16, 16)).eval()
    rebuilt = vgg_style().share_memory()
    kept = {name: p for name, p in rebuilt.named_parameters() if slim.get_parameter(name).shape == p.shape}
    assert kept  # the first convolution's input and the last layer keep their shapes
    pointers = {name: p.data_ptr() for name, p in kept.items()}
    load_slim_state_dict(rebuilt, slim.state_dict()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim(x))
    for name, p in kept.items():
        assert rebuilt.get_parameter(name) is p
        assert p.data_ptr() == pointers[name]
        assert p.is_shared()


def test_output_channels_are_never_removed(seed: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1))
    bip_structured(model[0], "weight", amount=0.5)
    bip_structured(model[3], "weight", amount=0.5)  # the output layer: its channels are the output
    slim = export_slim(model, torch.randn(2, 3, 8, 8))
    assert slim[3].out_channels == 6
    assert slim[0].out_channels < 8
    assert_same_outputs(slim, model, torch.randn(2, 3, 8, 8))


def test_ignored_layers_keep_their_filters(seed: int) -> None:
    model = prune_filters(vgg_style(), 0.5)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    slim = export_slim(model, torch.randn(2, 3, 16, 16), ignored_layers=[convs[1]])
    assert [m for m in slim if isinstance(m, nn.Conv2d)][1].out_channels == 16
    with pytest.raises(ValueError, match="ignored_layers"):
        export_slim(model, torch.randn(2, 3, 16, 16), ignored_layers=[nn.Conv2d(1, 1, 1)])


def test_unstructured_masks_change_no_shape(seed: int) -> None:
    model = vgg_style()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bip_unstructured(m, "weight", amount=0.5)
    slim = export_slim(model, torch.randn(2, 3, 16, 16))
    assert {k: v.shape for k, v in slim.state_dict().items()} == {
        k: v.shape for k, v in make_permanent(vgg_style()).state_dict().items()
    }


def test_verification_catches_a_wrong_removal(seed: int) -> None:
    """If a channel whose constant cannot be folded were removed, the check must say so."""
    model = prune_filters(randomize(vgg_style()), 0.5)

    def accept_everything(self: _Planner, group: object) -> tuple[list[int], dict]:
        return sorted({r for item in group for r in item.root_idxs}), {}

    with (
        mock.patch.object(_Planner, "judge", accept_everything),
        pytest.raises(RuntimeError, match="differ from the masked model"),
    ):
        export_slim(model, torch.randn(2, 3, 16, 16))


def test_model_used_after_a_forward_with_gradients_is_exported(seed: int) -> None:
    """torch leaves a non-leaf ``weight`` after a forward pass with gradients; deepcopy must still work."""
    model = prune_filters(vgg_style(), 0.3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    slim = export_slim(model, torch.randn(2, 3, 16, 16))
    assert_same_outputs(slim, model, torch.randn(2, 3, 16, 16))


@pytest.mark.slow
def test_mobilenet_v2_depthwise_and_inverted_residuals_round_trip(seed: int) -> None:
    def build() -> nn.Module:
        return torchvision.models.mobilenet_v2(num_classes=10)

    model = randomize(build()).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            bip_structured(m, "weight", amount=0.5, dim=0)
    slim = export_slim(model, torch.randn(2, 3, 64, 64))
    assert_same_outputs(slim, model, torch.randn(2, 3, 64, 64))
    assert count(slim) < 0.8 * count(build())
    buffer = io.BytesIO()
    torch.save(slim.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = load_slim_state_dict(build(), torch.load(buffer, weights_only=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim.eval()(x))


def _depthwise_model(second_reader: bool = False) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand = nn.Conv2d(3, 8, 1)
            self.bn1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.bn2 = nn.BatchNorm2d(8)
            self.project = nn.Conv2d(8, 6, 1)
            self.side = nn.Conv2d(8, 6, 1) if second_reader else None
            self.head = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.bn1(self.expand(x)))
            y = self.project(torch.relu(self.bn2(self.dw(h))))
            if self.side is not None:  # a second reader of the channels that feed dw
                y = y + self.side(h)
            return self.head(y.mean((2, 3)))

    return randomize(Net())


def test_zero_depthwise_filters_are_removed_with_the_channels_feeding_them(seed: int) -> None:
    """A zero depthwise filter makes its channel constant whatever feeds it: the expand conv's
    channel, the filter and the project conv's input channel go, the constant folded."""
    model = _depthwise_model()
    bip_structured(model.dw, "weight", amount=3, dim=0)
    slim = export_slim(model, torch.randn(4, 3, 8, 8))
    assert (slim.expand.out_channels, slim.dw.out_channels, slim.dw.groups, slim.project.in_channels) == (
        5,
    ) * 4
    assert_same_outputs(slim, model, torch.randn(6, 3, 8, 8) * 3)  # inputs the export never saw


def test_a_channel_read_elsewhere_too_stays(seed: int) -> None:
    model = _depthwise_model(second_reader=True)
    bip_structured(model.dw, "weight", amount=3, dim=0)
    slim = export_slim(model, torch.randn(4, 3, 8, 8))
    assert slim.expand.out_channels == 8  # side reads those channels: they must stay
    assert_same_outputs(slim, model, torch.randn(6, 3, 8, 8))


def test_a_layer_with_every_filter_zero_keeps_one(seed: int) -> None:
    """More zeros never export larger: a layer whose filters are all zero keeps one (a layer is
    never removed whole), like a layer with all but one zero."""
    sizes = []
    for amount in (7, 8):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                              nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 2))  # fmt: skip
        bip_structured(model[0], "weight", amount, dim=0)
        slim = export_slim(model.eval(), torch.randn(2, 3, 8, 8))
        assert_same_outputs(slim, model, torch.randn(3, 3, 8, 8))
        sizes.append((slim[0].out_channels, sum(p.numel() for p in slim.parameters())))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] == 1


def test_a_batch_of_one_example_is_refused() -> None:
    """With one sample a per-sample constant (a shift by the input's mean) looks constant."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    bip_structured(model[0], "weight", 2, dim=0)
    with pytest.raises(
        ValueError, match=r"example_inputs holds a batch of one sample \(shape \(1, 3, 6, 6\)\)"
    ):
        export_slim(model.eval(), torch.randn(1, 3, 6, 6))


class _TwoBranches(nn.Module):
    """Two convolutions concatenated on the channel axis and read by one 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.c, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def test_a_branch_of_a_concatenation_is_never_emptied(seed: int) -> None:
    """The reader of a concatenation reads one channel only (of the first branch): the second
    branch's filters all go unread, but a layer is never emptied: it keeps one of them."""
    model = _TwoBranches().eval()
    mask = torch.zeros_like(model.c.weight)
    mask[:, 0] = 1
    prune.custom_from_mask(model.c, "weight", mask)
    slim = export_slim(model, torch.randn(2, 3, 8, 8))
    assert (slim.a.out_channels, slim.b.out_channels, slim.c.in_channels) == (1, 1, 2)
    assert_same_outputs(slim, model, torch.randn(3, 3, 8, 8))


class _Pieces(nn.Module):
    """A conv's 8 channels cut in two halves (``how``), each read by its own convolution; the
    two outputs concatenated and read by a 1x1 convolution."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b1, self.b2 = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1)
        self.c, self.head = nn.Conv2d(12, 8, 1), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.a(x)))
        if self.how == "split":
            p, q = torch.split(h, [4, 4], dim=1)
        elif self.how == "chunk":
            p, q = h.chunk(2, dim=1)
        elif self.how == "narrow":
            p, q = h.narrow(1, 0, 4), h.narrow(1, 4, 4)
        else:
            p, q = h[:, :4], h[:, 4:]
        h = torch.cat([self.b1(p), self.b2(q)], 1)
        return self.head(torch.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("how", ["slice", "narrow", "split", "chunk"])
@pytest.mark.parametrize("layout", ["filter", "channel"])
def test_channels_cut_into_pieces_stay(how: str, layout: str) -> None:
    """The forward fixes the pieces' bounds (``h[:, :4]``, ``split(h, 4)``): removing a pruned
    channel of the first half would shift the second half's channels into it. Those channels
    stay; the slim model computes what the masked one computes."""
    torch.manual_seed(0)
    model = randomize(_Pieces(how)).eval()
    pruner = BiP(model, amount=0.5, layout=layout)
    with torch.no_grad():
        for scores in pruner.score_views:
            scores.copy_(torch.randn_like(scores))
    pruner.finish()
    slim = export_slim(model, torch.randn(4, 3, 8, 8))
    assert (slim.a.out_channels, slim.bn.num_features, slim.b1.in_channels, slim.b2.in_channels) == (
        8,
        8,
        4,
        4,
    )
    assert_same_outputs(slim, model, torch.randn(3, 3, 8, 8))


def test_a_crop_of_the_spatial_axes_passes_channels_on(seed: int) -> None:
    """A slice along another axis keeps every channel: the pruned filters still go (their
    constant folds into the 1x1 reader)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    reader = nn.Conv2d(8, 4, 1)

    class Crop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.reader, self.head = model, reader, nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.reader(self.body(x)[:, :, 1:, :-1]).mean((2, 3)))

    net = Crop().eval()
    bip_structured(net.body[0], "weight", amount=3, dim=0)
    slim = export_slim(net, torch.randn(2, 3, 8, 8))
    assert (slim.body[0].out_channels, slim.reader.in_channels) == (5, 5)
    assert_same_outputs(slim, net, torch.randn(3, 3, 8, 8))


# -- what the export could not remove -------------------------------------------------------------


class ResidualPair(nn.Module):
    """Two convolutions added together; only ``a``'s filters are masked, so the sum keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((self.a(x) + self.b(x)).relu().mean((2, 3)))


def zero_filter_weights(conv: nn.Conv2d) -> int:
    """The weights in entirely zero filters of ``conv``, counted from its weight."""
    w = conv.weight.detach()
    zero = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    return int(zero.sum()) * w[0].numel()


def test_an_export_that_keeps_the_zero_filters_warns_naming_the_layer_and_the_counts() -> None:
    torch.manual_seed(0)
    model = ResidualPair().eval()
    bip_structured(model.a, "weight", amount=0.5, dim=0)
    promised = zero_filter_weights(model.a)  # 4 filters of 3 * 3 * 3
    with pytest.warns(SlimExportWarning) as caught:
        slim = export_slim(model, torch.randn(4, 3, 8, 8))
    kept = zero_filter_weights(slim.a)  # the residual sum keeps every channel
    assert (promised, kept) == (108, 108)
    message = str(caught[0].message)
    assert f"still holds {kept:,} of the {promised:,} weights (100%)" in message
    assert "'a' (108)" in message
    assert caught[0].filename == __file__


def test_an_export_that_removes_the_zero_filters_does_not_warn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(64, 2))
    bip_structured(model[0], "weight", amount=0.5, dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimExportWarning)
        slim = export_slim(model.eval(), torch.randn(4, 3, 6, 6))
    assert slim[0].out_channels == 4  # the four zero filters are gone (their constant folded)
    assert zero_filter_weights(slim[0]) == 0


def test_zero_input_columns_read_from_the_models_inputs_are_not_counted() -> None:
    """Unstructured masks leave whole input columns of the first layer zero (an image's border):
    no export can remove what the model's inputs feed, so that is no shortfall to warn about."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[1].weight[:, :20] = 0
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimExportWarning)
        slim = export_slim(model, torch.randn(4, 1, 8, 8))
    assert slim[1].in_features == 64


class ScaledInputs(nn.Module):
    """A model that scales its inputs itself before its first layer (``x / 255``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x / 255)


def test_zero_input_columns_of_inputs_computed_in_the_forward_are_not_counted() -> None:
    """The first layer reads ``x / 255``, a new tensor: its zero input columns are still the model's
    inputs, which no export can remove."""
    torch.manual_seed(0)
    model = ScaledInputs()
    with torch.no_grad():
        model.body[1].weight[:, :20] = 0
    prune.l1_unstructured(model.body[1], "weight", amount=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimExportWarning)
        slim = export_slim(model, torch.randn(4, 1, 8, 8) * 255)
    assert slim.body[1].in_features == 64


class IndexedChannels(nn.Module):
    """Channels picked by a fixed index tensor, which the dependency graph takes as element-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.register_buffer("order", torch.arange(7, -1, -1))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x)[:, self.order]).mean((2, 3))


def test_a_slim_model_that_fails_on_the_example_inputs_is_a_clear_error() -> None:
    torch.manual_seed(0)
    model = IndexedChannels()
    bip_structured(model.a, "weight", amount=0.5, dim=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        RuntimeError, match=r"the slim model fails on example_inputs \(IndexError: .*ignored_layers"
    ):
        export_slim(model, torch.randn(4, 3, 8, 8))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert prune.is_pruned(model)
    # the message's remedy works (and the export says it kept the zero filters it was told to keep)
    with pytest.warns(SlimExportWarning, match="ignored_layers"):
        slim = export_slim(model, torch.randn(4, 3, 8, 8), ignored_layers=[model.a])
    assert_same_outputs(slim, model, torch.randn(2, 3, 8, 8))


class FrozenNet(nn.Module):
    """A stem, a residual block whose sum ties the stem's channels to ``c2``'s, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.head(x.mean((2, 3)))


def frozen_net_pruned() -> FrozenNet:
    """Four of ``c1``'s filters masked, and residual channels 0 and 1 zero in every layer of the sum
    (as ``Coupled``'s ``finish`` leaves a pruned group)."""
    torch.manual_seed(0)
    model = FrozenNet()
    bip_structured(model.c1, "weight", amount=4, dim=0)
    with torch.no_grad():
        for t in (model.stem.weight, model.stem.bias, model.bn.weight, model.bn.bias):
            t[:2] = 0
        for t in (model.c2.weight, model.b2.weight, model.b2.bias):
            t[:2] = 0
        model.head.weight[:, :2] = 0
    return model.eval()


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


FROZEN_X = torch.Generator().manual_seed(3)


@pytest.mark.parametrize("frozen", ["all", "stem", "middle"])
def test_frozen_layers_are_exported_as_trainable_ones(frozen: str) -> None:
    """``requires_grad=False`` changes nothing: the same channels go, and the outputs stay."""
    example = torch.randn(4, 3, 8, 8, generator=FROZEN_X)
    reference = export_slim(frozen_net_pruned(), example)  # every parameter trainable
    assert (reference.c1.out_channels, reference.stem.out_channels) == (4, 6)
    model = frozen_net_pruned()
    layers = {"all": [model], "stem": [model.stem, model.bn], "middle": [model.c1, model.b1]}[frozen]
    for layer in layers:
        layer.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimExportWarning)  # every zero channel can go
        slim = export_slim(model, example)
    assert shapes(slim) == shapes(reference)
    assert_same_outputs(slim, model, torch.randn(5, 3, 8, 8, generator=FROZEN_X))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # model unchanged


def test_the_slim_model_keeps_requires_grad_and_each_modules_training_flag() -> None:
    model = frozen_net_pruned().train()
    model.c1.requires_grad_(False)
    model.b1.requires_grad_(False)
    model.bn.eval()  # a BatchNorm with frozen statistics inside a model being fine-tuned
    want_grad = {n.removesuffix("_orig"): p.requires_grad for n, p in model.named_parameters()}
    want_training = {n: m.training for n, m in model.named_modules()}
    slim = export_slim(model, torch.randn(4, 3, 8, 8, generator=FROZEN_X))
    assert slim.c1.out_channels == 4  # the frozen layer was shrunk: its parameters are new ones
    assert {n: p.requires_grad for n, p in slim.named_parameters()} == want_grad
    assert {n: m.training for n, m in slim.named_modules()} == want_training


@pytest.mark.parametrize("frozen", [False, True])
def test_a_bias_created_by_folding_takes_its_weights_requires_grad(seed: int, frozen: bool) -> None:
    model = randomize(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    )
    bip_structured(model[0], "weight", amount=4, dim=0)
    model[3].requires_grad_(not frozen)
    slim = export_slim(model.eval(), torch.randn(4, 3, 6, 6))
    assert slim[0].out_channels == 4
    assert slim[3].bias is not None  # the constants were folded
    assert slim[3].bias.requires_grad is not frozen
    assert_same_outputs(slim, model, torch.randn(3, 3, 6, 6))


def _round_trip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():  # torch's note that it checks the loaded CSR tensors
        warnings.filterwarnings("ignore", "Validating sparse tensor invariants", UserWarning)
        return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("bias", [True, False])
def test_a_slim_csr_state_dict_loads_into_a_csr_model_with_the_slim_sizes(seed: int, bias: bool) -> None:
    """``in_features``/``out_features`` of the CSR layers follow their loaded weights; a bias that
    the export created by folding is created in the CSR layer too."""

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4, bias=bias))

    model = build()
    bip_structured(model[0], "weight", amount=8, dim=0)
    slim = export_slim(model.eval(), torch.randn(4, 16))
    assert slim[2].bias is not None  # the constants of the dead neurons, folded
    state = _round_trip(to_sparse_csr(slim, min_sparsity=0.0).state_dict())
    rebuilt = load_slim_state_dict(to_sparse_csr(build(), min_sparsity=0.0), state)
    assert isinstance(rebuilt[0], SparseCSRLinear)
    assert isinstance(rebuilt[2], SparseCSRLinear)
    assert (rebuilt[0].in_features, rebuilt[0].out_features) == (16, 24)
    assert (rebuilt[2].in_features, rebuilt[2].out_features) == (24, 4)
    assert_same_outputs(rebuilt, model, torch.randn(5, 16))


def test_a_slim_csr_state_dict_loads_into_a_csr_convolution_with_the_slim_sizes(seed: int) -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3)
        )

    model = build()
    bip_structured(model[0], "weight", amount=3, dim=0)
    slim = export_slim(model.eval(), torch.randn(4, 3, 8, 8))
    assert slim[0].out_channels == 5
    state = _round_trip(to_sparse_csr(slim, min_sparsity=0.0, include_conv=True).state_dict())
    rebuilt = load_slim_state_dict(to_sparse_csr(build(), min_sparsity=0.0, include_conv=True), state)
    assert isinstance(rebuilt[0], SparseCSRConv2d)
    assert isinstance(rebuilt[2], SparseCSRConv2d)
    assert (rebuilt[0].in_channels, rebuilt[0].out_channels) == (3, 5)
    assert (rebuilt[2].in_channels, rebuilt[2].out_channels) == (5, 4)
    assert_same_outputs(rebuilt, model, torch.randn(5, 3, 8, 8))
