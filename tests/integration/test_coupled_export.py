"""Structured BiP over coupled channels on torchvision models: every pruned channel is removed.

For resnet18, resnet50, mobilenet_v2 and a VGG-style net (no weights, 32x32 inputs): BiP with
``torchbip.Coupled`` runs a few training steps in a plain loop, ``finish`` leaves torch's pruned
form and :func:`torchbip.export_slim` returns a slim model. Checked against independent counts:

- every pruned channel is gone: each group's root layer keeps exactly the channels the budget
  keeps, and the slim model's parameter count equals the masked model's nonzero count plus the
  entries of the layers outside any group that the slim model holds as they are;
- the slim model computes what the masked model computes (eval mode);
- its MACs, counted by Torch-Pruning's ``count_ops_and_params`` (not by torchbip), are what the
  layout predicts and, with ``budget="macs"``, within 2% of what the budget asks.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import torchbip
from torchbip.attention import SlimMultiheadAttention

tp = pytest.importorskip("torch_pruning")


def vgg_style() -> nn.Module:
    """Conv-BN-ReLU stages with max pooling, a flatten and a two-layer classifier."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (16, 32, "M", 32, 64, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(width, int)
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(64 * 8 * 8, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 10)
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "vgg_style": vgg_style,
}


def _prune(name: str, amount: float, budget: str) -> tuple[nn.Module, torchbip.BiP, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(2, 3, 32, 32)
    pruner = torchbip.BiP(model, amount=amount, layout=torchbip.Coupled(x, budget=budget), steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        pruner.step()
    return model, pruner, x


def _group_keeps(pruner: torchbip.BiP) -> list[torch.Tensor]:
    selection = pruner.layout.select(pruner.score_views)
    return [selection[o] for o in pruner.layout.owners]


@pytest.mark.parametrize("name", list(MODELS))
def test_export_removes_every_pruned_channel_with_equal_outputs(name: str) -> None:
    model, pruner, x = _prune(name, 0.5, "layer")
    keeps = _group_keeps(pruner)
    predicted = pruner.layout.macs(keeps)
    pruner.finish()
    model.eval()
    slim = torchbip.export_slim(model, x)
    modules = dict(slim.named_modules())
    pruned = removed = 0
    for group, keep in zip(pruner.layout.groups, keeps, strict=True):
        root = modules[group.root].weight
        assert root.shape[0] == int(keep.sum()), group.root
        pruned += group.size - int(keep.sum())
        removed += group.size - root.shape[0]
    assert pruned > 0
    assert removed == pruned  # 100% of the pruned channels
    # nothing but pruned channels went: the slim model holds the entries the masks keep, plus
    # every parameter outside the groups (the classifier's bias)
    kept = sum(int(m.count_nonzero()) for n, m in model.named_buffers() if n.endswith("_mask"))
    others = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("_orig"))
    assert sum(p.numel() for p in slim.parameters()) == kept + others
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slim(images), model(images), rtol=1e-4, atol=1e-5)
    # the layout's MACs model against a count of the slim model's conv and linear MACs
    assert _macs(slim, x) == pytest.approx(predicted, rel=1e-9)
    assert _macs(MODELS[name](), x) == pytest.approx(pruner.layout.dense_macs, rel=1e-9)


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates on ``x``, counted from the outputs: every conv and linear layer, and
    each attention module's query, key, value and output projections and its two products over
    its kept heads (its out_proj, which it calls as a function, is counted with it)."""
    total = 0.0
    attentions = _attentions(model)
    inner = {id(a.out_proj) for a in attentions}

    def layer(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if id(module) in inner:
            return
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            assert isinstance(module, nn.Conv2d)
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * kernel

    def attention(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal total
        assert isinstance(module, nn.MultiheadAttention)
        n, length, e = args[0].shape  # batch_first
        width = module.num_heads * module.head_dim
        total += n * (3 * length * e * width + length * width * e) + 2 * n * length * length * width

    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    hooks = [m.register_forward_hook(layer) for m in layers]
    hooks += [a.register_forward_hook(attention) for a in attentions]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


@pytest.mark.parametrize(("name", "amount"), [("resnet18", 0.5), ("resnet50", 0.7), ("mobilenet_v2", 0.5)])
def test_macs_budget_lands_within_two_percent(name: str, amount: float) -> None:
    model, pruner, x = _prune(name, amount, "macs")
    pruner.finish()
    slim = torchbip.export_slim(model.eval(), x)
    assert _macs(slim, x) / _macs(MODELS[name](), x) == pytest.approx(1 - amount, abs=0.02)
    # Torch-Pruning's count (which adds BatchNorm, activations and pooling) agrees as well
    macs, _ = tp.utils.count_ops_and_params(slim, x[:1])
    dense_macs, _ = tp.utils.count_ops_and_params(MODELS[name](), x[:1])
    assert macs / dense_macs == pytest.approx(1 - amount, abs=0.02)


def test_global_budget_ranks_all_channels_with_a_floor() -> None:
    model, pruner, x = _prune("resnet18", 0.6, "global")
    keeps = _group_keeps(pruner)
    sizes = [g.size for g in pruner.layout.groups]
    kept = [int(k.sum()) for k in keeps]
    assert sum(kept) == sum(sizes) - round(0.6 * sum(sizes))
    assert min(kept) >= 1
    assert len({k / s for k, s in zip(kept, sizes, strict=True)}) > 1  # not one fraction everywhere
    pruner.finish()
    slim = torchbip.export_slim(model.eval(), x)
    modules = dict(slim.named_modules())
    for group, k in zip(pruner.layout.groups, kept, strict=True):
        assert modules[group.root].weight.shape[0] == k


def test_global_prune_drives_the_same_layout() -> None:
    """global_prune(structured=Coupled(...)) with its own loop, then the same full export."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    report = torchbip.global_prune(model, 0.5, data, structured=torchbip.Coupled(x), steps=2, progress=False)
    assert report.steps == 2
    bn = model.layer1[0].bn1
    assert int(bn.weight_mask.sum()) == 32  # half of 64 channels
    slim = torchbip.export_slim(model.eval(), x)
    assert slim.layer1[0].conv1.out_channels == 32
    assert slim.layer1[0].bn1.num_features == 32
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slim(images), model(images), rtol=1e-4, atol=1e-5)


def _small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _attentions(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


@pytest.mark.parametrize(
    ("build", "shape", "hidden"),
    [
        (_small_vit, (2, 3, 32, 32), lambda m: [b.mlp[0] for b in m.encoder.layers]),
        (_encoder, (2, 5, 32), lambda m: [b.linear1 for b in m.layers]),
    ],
    ids=["vit", "transformer_encoder"],
)
def test_heads_and_mlp_neurons_are_groups_and_export_removes_them(
    build: Callable[[], nn.Module], shape: tuple[int, ...], hidden: Callable[[nn.Module], list[nn.Linear]]
) -> None:
    """A head's query, key and value rows form one group, an MLP hidden neuron's two weight
    slices (and its bias) another; the export leaves fewer heads and a narrower MLP."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x))
    firsts, attentions = hidden(model), _attentions(model)
    sizes = sorted(g.size for g in pruner.layout.groups)
    assert sizes == sorted([f.out_features for f in firsts] + [a.num_heads for a in attentions])
    # per MLP: the first linear's weight and bias, the second's weight; per attention: in_proj
    assert len(pruner.names) == 3 * len(firsts) + 2 * len(attentions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(*shape)).pow(2).mean().backward()
        optimizer.step()
        pruner.step()
    pruner.finish()
    slim = torchbip.export_slim(model.eval(), x)
    assert [f.out_features for f in hidden(slim)] == [f.out_features // 2 for f in firsts]
    slim_attentions = _attentions(slim)
    assert all(isinstance(a, SlimMultiheadAttention) for a in slim_attentions)
    assert [a.num_heads for a in slim_attentions] == [a.num_heads // 2 for a in attentions]
    inputs = torch.randn(*shape)
    kwargs = {}
    if build is _encoder:  # padding and a causal mask go through the slim attention too
        kwargs = {
            "src_key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2]),
            "mask": torch.ones(5, 5, dtype=torch.bool).triu(1),
        }
    with torch.no_grad():
        want = model(inputs, **kwargs)
        torch.testing.assert_close(slim(inputs, **kwargs), want, rtol=1e-5, atol=1e-5)
    # the slim state dict loads into a freshly built model of the same architecture
    buffer = io.BytesIO()
    torch.save(slim.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = torchbip.load_slim_state_dict(build(), torch.load(buffer, weights_only=True)).eval()
    assert [type(a) for a in _attentions(rebuilt)] == [SlimMultiheadAttention] * len(attentions)
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs, **kwargs), slim(inputs, **kwargs))


def test_macs_budget_counts_attention_and_lands_within_two_percent_on_a_vit() -> None:
    torch.manual_seed(0)
    model = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    pruner = torchbip.BiP(model, amount=0.5, layout=torchbip.Coupled(x, budget="macs"))
    assert pruner.layout.dense_macs == pytest.approx(_macs(_small_vit(), x), rel=1e-9)
    pruner.finish()
    slim = torchbip.export_slim(model.eval(), x)
    assert _macs(slim, x) / _macs(_small_vit(), x) == pytest.approx(0.5, abs=0.02)
