"""Targets whose module's forward never runs are refused; attention is pruned where the mask applies.

``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``
without calling ``out_proj``, so a pruning hook on ``out_proj`` never runs: it is left out of the
default targets and refused when named. ``in_proj_weight`` is read in the attention's own
forward, so it can be pruned, also inside ``nn.TransformerEncoderLayer``. Other parents whose
source reads a child's weight and never calls the child (torchvision's Swin attention) are found
the same way. The general case: a named target whose module's forward is never called in the first
step (an unused layer, a parent that reads a child's weight directly and whose source is not
available) is an error, and the model is restored.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from failure_cases import raises_and_restores
from model_state import assert_unchanged, capture
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip

pytestmark = pytest.mark.usefixtures("one_thread")

RUN: dict[str, Any] = {"steps": 5, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0, "seed": 0}


class Attention(nn.Module):
    """Linear embedding, one self-attention, a classifier over the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.view(x.shape[0], 2, 4).repeat(1, 1, 2))
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x.view(x.shape[0], 2, 4))).mean(1))


def data(n: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16 * n, 8, generator=g)
    y = x[:, :3].argmax(1)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]


def make(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()


# --- attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Attention, Encoder])
def test_default_targets_leave_out_proj_out_and_every_target_trains(cls: type[nn.Module]) -> None:
    model = make(cls)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torchbip.global_prune(model, 0.5, data(), **RUN)
    pruned = {n[: -len("_orig")] for n, _ in model.named_parameters() if n.endswith("_orig")}
    assert not any("out_proj" in n for n in pruned)
    out_proj = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention)).out_proj
    assert not prune.is_pruned(out_proj)
    for name in pruned:  # every pruned tensor received gradients: its kept entries moved
        moved = (getattr_path(model, name + "_orig") - before[name]).abs()
        mask = getattr_path(model, name + "_mask").bool()
        assert moved[mask].max() > 1e-4, name


def getattr_path(model: nn.Module, fqn: str) -> Tensor:
    module_name, _, attr = fqn.rpartition(".")
    value = getattr(model.get_submodule(module_name), attr)
    assert isinstance(value, Tensor)
    return value


@pytest.mark.parametrize(
    ("cls", "path"),
    [
        pytest.param(Attention, "attn.out_proj", id="mha"),
        pytest.param(Encoder, "layer.self_attn.out_proj", id="encoder-layer"),
    ],
)
def test_out_proj_named_explicitly_is_refused_up_front(cls: type[nn.Module], path: str) -> None:
    model = make(cls)
    raises_and_restores(
        model,
        ValueError,
        rf"parameters names '{path}\.weight': nn\.MultiheadAttention .* reads out_proj\.weight without "
        r"calling out_proj's forward",
        loader=data(),
        parameters=[(model.get_submodule(path), "weight")],
    )


@pytest.mark.parametrize(
    ("cls", "path"),
    [pytest.param(Attention, "attn", id="mha"), pytest.param(Encoder, "layer.self_attn", id="encoder-layer")],
)
def test_in_proj_weight_is_trained_and_its_mask_applies_in_the_forward(
    cls: type[nn.Module], path: str
) -> None:
    model = make(cls)
    attn = model.get_submodule(path)
    assert isinstance(attn, nn.MultiheadAttention)
    before = attn.in_proj_weight.detach().clone()
    report = torchbip.global_prune(model, 0.7, data(), parameters=[(attn, "in_proj_weight")], **RUN)
    mask = attn.in_proj_weight_mask
    assert report.sparsity.zeros == round(0.7 * mask.numel()) == int((mask == 0).sum())
    assert (attn.in_proj_weight_orig - before)[mask.bool()].abs().max() > 1e-4
    # Oracle: an unpruned copy whose in_proj_weight holds orig * mask gives the same outputs.
    oracle = make(cls)
    oracle.load_state_dict(
        {k.replace("in_proj_weight_orig", "in_proj_weight"): v for k, v in model.state_dict().items()},
        strict=False,
    )
    oracle_attn = oracle.get_submodule(path)
    with torch.no_grad():
        oracle_attn.in_proj_weight.copy_(attn.in_proj_weight_orig * mask)
    x = data(1)[0][0]
    model.eval()
    oracle.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x))


def test_transformer_defaults_skip_every_out_proj() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, dim_feedforward=32, dropout=0.0, batch_first=True)
    targets = torchbip._func.default_targets(model)  # the defaults global_prune uses
    names = {n for n, m in model.named_modules() for t, _ in targets if t is m}
    assert names
    assert not any(n.endswith("out_proj") for n in names)
    assert {n for n in names if n.endswith("linear1")} == {
        "encoder.layers.0.linear1",
        "decoder.layers.0.linear1",
    }


# --- modules whose forward never runs --------------------------------------------------------------


class UnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.spare = nn.Linear(8, 3)  # held, never called

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class FcProj(nn.Module):
    """Two layers, ``fc`` and ``proj``; the subclasses below differ in how they use ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 3)


class ReadsChildWeight(FcProj):
    """A parent that uses a child's weight directly (as attention does with out_proj)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.relu(self.fc(x)), self.proj.weight, self.proj.bias)


def _reads_child_weight_forward(self: nn.Module, x: Tensor) -> Tensor:
    return F.linear(torch.relu(self.fc(x)), self.proj.weight, self.proj.bias)


# The same parent, made by type(): inspect finds no source of the class (FcProj's reads
# nothing), so the defaults cannot tell that it bypasses proj's forward; the first step finds it.
ReadsChildWeightNoSource = type(
    "ReadsChildWeightNoSource", (FcProj,), {"forward": _reads_child_weight_forward}
)


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
@pytest.mark.parametrize(
    ("cls", "child"),
    [
        pytest.param(UnusedLayer, "spare", id="unused-layer"),
        pytest.param(ReadsChildWeightNoSource, "proj", id="parent-reads-no-source"),
    ],
)
def test_target_whose_forward_never_runs_is_an_error(cls: type[nn.Module], child: str, mode: str) -> None:
    model = make(cls)
    raises_and_restores(
        model,
        ValueError,
        rf"parameters names '{child}\.weight' \(Linear\), "
        r"whose module's forward is never called \(at step 0\)",
        loader=data(),
        mode=mode,
        parameters=[(model.fc, "weight"), (model.get_submodule(child), "weight")],
    )


def test_the_first_step_names_a_bypassed_layer_whatever_was_given() -> None:
    """Defaults: the advice is to pass parameters= without it (there is no list to edit)."""
    model = make(ReadsChildWeightNoSource)
    raises_and_restores(
        model,
        ValueError,
        r"'proj\.weight' \(Linear\), whose module's forward is never called .*leave it out: pass "
        r"parameters= naming the tensors to prune without it",
        loader=data(),
    )


# --- parents whose source bypasses a child's forward (as torchvision's Swin attention) -----------


class CallsAndReadsMetadata(FcProj):
    """Reads proj.weight's dtype and calls proj: proj's mask applies, it is a default target."""

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).to(self.proj.weight.dtype))


class CallsAndReadsValues(FcProj):
    """Calls proj and reads its weight (a penalty kept on the side): proj's mask applies."""

    def __init__(self) -> None:
        super().__init__()
        self.penalty = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        self.penalty = self.proj.weight.square().sum().detach()
        return self.proj(torch.relu(self.fc(x)))


class WindowAttention(nn.Module):
    """As torchvision's ShiftedWindowAttention: the weights go to a function, no child is called."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return F.linear(out, self.proj.weight, self.proj.bias)


class WindowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = WindowAttention()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(self.embed(x.view(x.shape[0], 2, 4))).mean(1))


@pytest.mark.parametrize("cls", [ReadsChildWeight, WindowNet])
def test_defaults_leave_out_layers_their_parent_bypasses_with_a_warning(cls: type[nn.Module]) -> None:
    model = make(cls)
    bypassed = {"proj"} if cls is ReadsChildWeight else {"attn.qkv", "attn.proj"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(
        UserWarning, match=r"pruned without \d layer\(s\) .* reads their weight without calling"
    ) as rec:
        report = torchbip.global_prune(model, 0.5, data(), **RUN)
    message = next(str(w.message) for w in rec if "reads their weight" in str(w.message))
    assert all(repr(n) in message for n in bypassed)
    pruned = {n.removesuffix(".weight") for n in report.sparsity.tensors}
    expected = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - bypassed
    assert pruned == expected
    for name in bypassed:
        assert not prune.is_pruned(model.get_submodule(name))
    for name in pruned:  # every pruned tensor trained: its kept entries moved
        moved = (getattr_path(model, name + ".weight_orig") - before[name + ".weight"]).abs()
        assert moved[getattr_path(model, name + ".weight_mask").bool()].max() > 1e-4, name


def test_bip_in_a_users_loop_leaves_out_bypassed_layers_too() -> None:
    model = make(WindowNet)
    with pytest.warns(UserWarning, match="reads their weight without calling"):
        pruner = torchbip.BiP(model, amount=0.5, steps=2)
    assert set(pruner.names) == {"embed.weight", "head.weight"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    pruner.finish()
    zeros = sum(int((m.weight == 0).sum()) for m in (model.embed, model.head))
    assert zeros == round(0.5 * (8 * 4 + 3 * 8))


@pytest.mark.parametrize(("cls", "child"), [(ReadsChildWeight, "proj"), (WindowNet, "attn.qkv")])
def test_a_bypassed_layer_named_explicitly_is_refused_up_front(cls: type[nn.Module], child: str) -> None:
    model = make(cls)
    parent = type(model.get_submodule(child.rpartition(".")[0])).__name__
    raises_and_restores(
        model,
        ValueError,
        rf"parameters names '{child}\.weight': {parent} .* reads {child.rpartition('.')[2]}\.weight without "
        rf"calling .* a pruning mask on it would never be applied .*leave {child} out",
        loader=data(),
        parameters=[(model.get_submodule(child), "weight")],
    )


@pytest.mark.parametrize("cls", [CallsAndReadsMetadata, CallsAndReadsValues])
def test_a_parent_that_calls_its_child_keeps_it_among_the_defaults(cls: type[nn.Module]) -> None:
    model = make(cls)
    names = [n for n, m in model.named_modules() for t, _ in torchbip._func.default_targets(model) if t is m]
    assert names == ["fc", "proj"]
    report = torchbip.global_prune(model, 0.5, data(), **RUN)
    assert set(report.sparsity.tensors) == {"fc.weight", "proj.weight"}


def test_torchvision_swin_defaults_leave_out_the_attention_projections() -> None:
    """torchvision's Swin passes qkv.weight and proj.weight to its attention function."""
    from torchvision.models import swin_t

    torch.manual_seed(0)
    model = swin_t(num_classes=3)
    names = {n for n, m in model.named_modules() for t, _ in torchbip._func.default_targets(model) if t is m}
    attention = {n for n, m in model.named_modules() if type(m).__name__ == "ShiftedWindowAttention"}
    assert len(attention) == 12
    assert not any(n.endswith((".attn.qkv", ".attn.proj")) for n in names)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    assert names == linears - {f"{a}.{c}" for a in attention for c in ("qkv", "proj")}


def test_default_targets_with_an_unused_layer_are_refused_with_its_name() -> None:
    model = make(UnusedLayer)
    raises_and_restores(model, ValueError, r"'spare\.weight' \(Linear\)", loader=data())


def test_a_layer_disconnected_by_its_mask_is_not_an_error() -> None:
    """At high sparsity the first step can leave a called layer without gradient: that is allowed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    n = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    before = capture(model)
    report = torchbip.global_prune(model, n, data(), **RUN)  # every entry pruned
    assert report.sparsity.zeros == n
    with pytest.raises(AssertionError):  # the model was pruned, not restored
        assert_unchanged(before, model)


# --- modules that run but on which the loss does not depend ----------------------------------------


class DetachedBranch(nn.Module):
    """A layer whose output is detached before it reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.side = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + 0.1 * self.side(x).detach()


class AuxHead(nn.Module):
    """Two heads; the loss below uses only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.body(x))
        return self.head(h), self.aux(h)


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
@pytest.mark.parametrize(
    ("cls", "loss_fn", "dead"),
    [
        pytest.param(DetachedBranch, F.cross_entropy, "side", id="detached"),
        pytest.param(AuxHead, lambda out, y: F.cross_entropy(out[0], y), "aux", id="unused-head"),
    ],
)
def test_target_the_loss_does_not_depend_on_is_an_error(
    cls: type[nn.Module], loss_fn: Any, dead: str, mode: str
) -> None:
    raises_and_restores(
        make(cls),
        ValueError,
        rf"parameters names '{dead}\.weight', on which the loss does not depend .*with every mask set to one",
        loader=data(),
        loss_fn=loss_fn,
        mode=mode,
    )


def test_a_layer_cut_off_by_a_mask_only_is_not_an_error() -> None:
    """Layer 2 pruned away entirely (earlier, by torch) cuts layer 0 off from the loss: no error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    prune.custom_from_mask(model[2], "weight", torch.zeros(16, 16))
    report = torchbip.global_prune(
        model, 0.5, data(), parameters=[(model[0], "weight"), (model[4], "weight")], **RUN
    )
    assert report.sparsity.zeros == round(0.5 * (16 * 8 + 3 * 16))


def test_the_only_target_never_called_is_an_error_too() -> None:
    """No target gets a gradient at all: still refused (not pruned by its initial scores alone)."""
    model = make(UnusedLayer)
    raises_and_restores(
        model,
        ValueError,
        r"'spare\.weight' \(Linear\), whose module's forward is never called",
        loader=data(),
        parameters=[(model.spare, "weight")],
    )


def test_a_loss_that_depends_on_no_target_is_an_error() -> None:
    model = make(DetachedBranch)
    raises_and_restores(
        model,
        ValueError,
        r"parameters names 'side\.weight', on which the loss does not depend",
        loader=data(),
        parameters=[(model.side, "weight")],
    )


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out, y: F.cross_entropy(out, y).detach(),
        lambda out, y: torch.tensor(float(F.cross_entropy(out, y))),
    ],
    ids=["detached", "constant"],
)
def test_a_loss_fn_that_ignores_the_outputs_is_named_as_the_cause(loss_fn) -> None:
    """Every tensor looks unused when the loss itself is detached: the message says so."""
    model = make(DetachedBranch)
    raises_and_restores(
        model,
        ValueError,
        r"the loss depends on none of the 2 pruned tensors .* does loss_fn return a detached or constant",
        loader=data(),
        loss_fn=loss_fn,
    )
