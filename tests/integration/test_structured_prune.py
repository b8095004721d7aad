"""global_prune(structured=...): group scores, budgets, N:M, the group gradient, slim export."""

from __future__ import annotations

import ast
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip import BiPStructured, export_slim, global_prune
from torchbip._edges import called_edges, traced_edges
from torchbip._func import resolve_targets
from torchbip._loop import BiPLoop
from torchbip.config import BiPConfig
from torchbip.data import BatchStream
from torchbip.layouts import Groups
from torchbip.semistructured import BiPSemiStructured
from torchbip.structured import group_reduce
from torchbip.testing.contract import pruning_hooks


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def batches(n: int = 64) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def kept_groups(mask: Tensor, dim: int) -> int:
    moved = mask.movedim(dim, 0)
    return int((moved.reshape(moved.shape[0], -1).sum(dim=1) > 0).sum())


def is_group_mask(mask: Tensor, dim: int) -> bool:
    moved = mask.movedim(dim, 0).reshape(mask.shape[dim], -1)
    return bool(((moved == 0).all(dim=1) | (moved == 1).all(dim=1)).all())


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_filter_layer_budget_prunes_the_same_fraction_in_every_layer(seed: int) -> None:
    model = cnn()
    report = global_prune(model, 0.5, batches(), steps=6, progress=False, structured="filter")
    convs_and_fc = layers(model)
    for layer in convs_and_fc[:-1]:
        assert isinstance(pruning_hooks(layer, "weight")[0], BiPStructured)
        assert is_group_mask(layer.weight_mask, 0)
        assert kept_groups(layer.weight_mask, 0) == layer.weight_mask.shape[0] // 2
        assert not hasattr(layer, "weight_scores")
    assert not prune.is_pruned(convs_and_fc[-1])  # the output layer is left alone by default
    assert set(report.sparsity.tensors) == {"0.weight", "3.weight", "8.weight"}
    assert report.global_sparsity == pytest.approx(0.5)
    prune.remove(convs_and_fc[0], "weight")
    assert isinstance(convs_and_fc[0].weight, nn.Parameter)


def test_global_budget_with_a_floor(seed: int) -> None:
    model = cnn()
    global_prune(
        model, 0.75, batches(), steps=6, progress=False, structured="filter", budget="global", min_keep=2
    )
    kept = [kept_groups(m.weight_mask, 0) for m in layers(model)[:-1]]
    assert sum(kept) == round((8 + 16 + 32) * 0.25)
    assert min(kept) >= 2


def test_channel_mode_leaves_the_input_layer(seed: int) -> None:
    model = cnn()
    global_prune(model, 3, batches(), steps=4, progress=False, structured="channel")
    first, *rest = layers(model)
    assert not prune.is_pruned(first)
    for layer in rest:
        assert is_group_mask(layer.weight_mask, 1)
        assert kept_groups(layer.weight_mask, 1) == layer.weight_mask.shape[1] - 3


def test_two_four_masks_keep_two_of_every_four_inputs(seed: int) -> None:
    model = cnn()
    global_prune(model, 0.5, batches(), steps=4, progress=False, structured="2:4")
    pruned = [m for m in layers(model) if prune.is_pruned(m)]
    assert len(pruned) == 4 - 1  # the first conv has 1 input channel: not a multiple of 4
    for layer in pruned:
        assert isinstance(pruning_hooks(layer, "weight")[0], BiPSemiStructured)
        mask = layer.weight_mask.movedim(1, -1) if layer.weight_mask.dim() == 4 else layer.weight_mask
        assert bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())


@pytest.mark.parametrize(
    ("pattern", "amount"), [("4:4", 0), ("0:4", 1), ("2:4", 0.9), ("1:3", 0.5), ("2:3", 1), ("0:1", 1)]
)
def test_nm_amount_error_suggests_an_amount_that_is_accepted(pattern: str, amount: float) -> None:
    """The hint of a refused N:M amount is a float literal equal to 1 - n/m, which a run accepts."""
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 4))
    with pytest.raises(ValueError, match=r"; pass amount=") as err:
        global_prune(model, amount, batches(), steps=1, progress=False, structured=pattern)
    hint = str(err.value).rsplit("pass amount=", 1)[1]
    value = ast.literal_eval(hint)
    assert isinstance(value, float)
    assert value == pytest.approx(1 - n / m, abs=1e-12)
    report = global_prune(model, value, batches(), steps=1, progress=False, structured=pattern)
    assert report.sparsity.global_sparsity == pytest.approx(1 - n / m)


def test_structured_run_exports_to_an_equal_slim_model(seed: int) -> None:
    model = cnn()
    global_prune(model, 0.5, batches(), steps=6, progress=False, structured="filter")
    x = batches()[0][0]
    slim = export_slim(model.eval(), x)
    assert slim[0].out_channels < 8 or slim[3].out_channels < 16
    with torch.no_grad():
        torch.testing.assert_close(slim.eval()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"structured": "blocks"}, "structured must be", id="unknown-mode"),
        pytest.param({"structured": "2:4", "amount": 0.9}, r"amount=0.9 .* 1 - n/m", id="nm-amount"),
        pytest.param({"structured": "filter", "budget": "net"}, "budget must be one of", id="bad-budget"),
        pytest.param({"budget": "global"}, "budget='global' applies to structured runs", id="budget-alone"),
        pytest.param(
            {"structured": "filter", "amount": 9}, r"amount \(a count per tensor .*\)=9", id="count-too-large"
        ),
    ],
)
def test_errors_name_the_value_and_leave_the_model(kwargs: dict, match: str) -> None:
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    amount = kwargs.pop("amount", 0.5)
    with pytest.raises(ValueError, match=match):
        global_prune(model, amount, batches(), steps=2, progress=False, **kwargs)
    assert not prune.is_pruned(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nm_parameters_must_tile(seed: int) -> None:
    model = cnn()
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        global_prune(
            model,
            0.5,
            batches(),
            steps=2,
            progress=False,
            structured="2:4",
            parameters=[(model[0], "weight")],
        )


def test_group_score_gradient_is_the_sum_of_element_upper_gradients(seed: int) -> None:
    """One loop step moves each group score by -upper_lr times the summed element gradient."""
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False))
    targets = resolve_targets(model, [(model[0], "weight")])
    cfg = BiPConfig(
        steps=1, upper_lr=0.5, upper_momentum=0.0, lower_lr=1e-3, implicit_coef=2.0, progress=False
    )
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    stream = BatchStream([(x, y)], "loader")
    loop = BiPLoop(model, targets, 2, Groups(dim=0), 1, cfg, F.cross_entropy, stream, stream)
    theta = model[0].weight_orig.detach().clone()
    mask = model[0].weight_mask.detach().clone()
    scores = loop.bip.flat_scores.detach().clone()
    # the element gradient by eager autograd: dl/dm = theta * g - c * m * g * g, summed over each group
    z = (mask * theta).requires_grad_(True)
    loss = F.cross_entropy(model[1](x @ z.t()), y)
    (g,) = torch.autograd.grad(loss, z)
    element = theta * g - 2.0 * mask * g * g
    loop.step()
    torch.testing.assert_close(loop.bip.flat_scores, scores - 0.5 * group_reduce(element, 0))
    assert kept_groups(model[0].weight_mask, 0) == 3


# -- the default layers: which layers are the model's first and last, by how it calls them ------


class HeadFirst(nn.Module):
    """Registers its output layer first and its input layer last (called body, mid, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 4)
        self.mid = nn.Linear(16, 16)
        self.body = nn.Linear(8, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.body(x)))))


class TwoBranchesTwoHeads(nn.Module):
    """Two input branches (``left``, ``right``) and two heads (``logits``, ``aux``, one returned
    after a log-softmax), registered heads first."""

    def __init__(self) -> None:
        super().__init__()
        self.logits, self.aux = nn.Linear(16, 4), nn.Linear(16, 2)
        self.trunk = nn.Linear(16, 16)
        self.left, self.right = nn.Linear(4, 16), nn.Linear(4, 16)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = torch.relu(self.trunk(torch.relu(self.left(x[:, :4]) + self.right(x[:, 4:]))))
        return {"logits": self.logits(h), "aux": self.aux(h).log_softmax(-1)}


class DataDependent(HeadFirst):
    """HeadFirst with control flow on the input's values, which torch.fx cannot trace."""

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.sum() > 1e9):
            x = x.flip(0)
        return super().forward(x)


def flat_batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(4)]


def aux_loss(out: dict[str, Tensor], y: Tensor) -> Tensor:
    return F.cross_entropy(out["logits"], y) + F.nll_loss(out["aux"], y % 2)


# (model, loss, structured, the tensors the defaults prune): the edges by construction
HEAD, TWO = HeadFirst, TwoBranchesTwoHeads
EDGE_CASES = [
    pytest.param(HEAD, F.cross_entropy, "filter", {"body.weight", "mid.weight"}, id="head-first-filter"),
    pytest.param(HEAD, F.cross_entropy, "channel", {"head.weight", "mid.weight"}, id="head-first-channel"),
    pytest.param(
        TWO, aux_loss, "filter", {"left.weight", "right.weight", "trunk.weight"}, id="two-heads-filter"
    ),
    pytest.param(
        TWO, aux_loss, "channel", {"logits.weight", "aux.weight", "trunk.weight"}, id="two-branches"
    ),
]


@pytest.mark.parametrize(("make", "loss_fn", "structured", "pruned"), EDGE_CASES)
def test_defaults_leave_out_the_layers_the_model_calls_first_or_returns(
    seed: int, make, loss_fn, structured: str, pruned: set[str]
) -> None:
    """Not the layers registered first or last: a model may declare its head first."""
    model = make()
    report = global_prune(
        model, 0.5, flat_batches(), steps=2, progress=False, structured=structured, loss_fn=loss_fn
    )
    assert set(report.sparsity.tensors) == pruned
    for name, module in model.named_children():
        assert prune.is_pruned(module) == (f"{name}.weight" in pruned), name
    # BiP in the user's loop (no batch at construction: the model is traced) picks the same
    assert set(torchbip.BiP(make(), 0.5, layout=structured).names) == pruned


def test_head_first_model_keeps_every_output_class(seed: int) -> None:
    """The reported case: every output's weight row survives (no logit reduced to its bias)."""
    model = HeadFirst()
    global_prune(model, 0.5, flat_batches(), steps=4, progress=False, structured="filter")
    assert not prune.is_pruned(model.head)
    assert bool((model.head.weight != 0).any(dim=1).all())
    assert kept_groups(model.body.weight_mask, 0) == 8


def test_global_prune_finds_the_edges_of_a_model_torch_fx_cannot_trace(seed: int) -> None:
    report = global_prune(DataDependent(), 0.5, flat_batches(), steps=2, progress=False, structured="filter")
    assert set(report.sparsity.tensors) == {"body.weight", "mid.weight"}


@pytest.mark.parametrize(("structured", "left_out"), [("filter", "body"), ("channel", "head")])
def test_bip_without_a_trace_leaves_out_the_registered_end_and_says_so(
    structured: str, left_out: str
) -> None:
    """No batch and no trace: the last (filters) or first (channels) registered layer is left
    out, as a guess the warning names (for this head-first model a wrong one: pass parameters)."""
    model = DataDependent()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = (
        r"torch\.fx, which cannot trace DataDependent's forward \(TraceError: .*\)\. .*"
        rf"Linear/Conv layer the model registers, '{left_out}', is taken for that layer and left out"
    )
    with pytest.warns(UserWarning, match=rf"layout='{structured}' leaves out the layers that .*{match}"):
        torchbip.BiP.check(model, 0.5, layout=structured)
    assert not prune.is_pruned(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=match) as caught:
        pruner = torchbip.BiP(model, 0.5, layout=structured)
    assert caught[0].filename == __file__  # the warning points at the user's call
    assert f"{left_out}.weight" not in pruner.names
    assert len(pruner.names) == 2
    # naming the tensors needs no trace
    other = DataDependent()
    pruner = torchbip.BiP(other, 0.5, layout=structured, parameters=[(other.mid, "weight")])
    assert pruner.names == ["mid.weight"]


def test_the_layer_of_a_weight_the_forward_reads_itself_is_an_edge() -> None:
    """``F.linear(h, self.out.weight)``: ``out`` is the output layer although never called."""

    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(torch.relu(self.b(torch.relu(self.a(x)))), self.out.weight, self.out.bias)

    assert torchbip.BiP(TiedHead(), 0.5, layout="filter").names == ["a.weight", "b.weight"]


def test_defaults_see_the_layers_left_out_of_them_and_a_model_that_is_one_layer() -> None:
    """A spectral-norm head (no default target itself) is still the output layer; a model that
    is one Linear has nothing to prune by filters."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model.append(nn.utils.parametrizations.spectral_norm(nn.Linear(8, 2)))
    assert torchbip.BiP(model, 0.5, layout="filter").names == ["0.weight", "2.weight", "4.weight"]
    with pytest.raises(ValueError, match="nothing to prune"):
        torchbip.BiP(nn.Linear(4, 2), 0.5, layout="filter")


def test_tracing_leaves_the_model_s_own_state_alone() -> None:
    """The trace runs a copy's forward: a counter the model keeps does not count it."""

    class Counting(nn.Sequential):
        calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return super().forward(x)

    model = Counting(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torchbip.BiP(model, 0.5, layout="filter")
    assert model.calls == 0
    global_prune(Counting(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5, flat_batches(), steps=2,
                 progress=False, structured="channel")  # fmt: skip


def test_bip_traces_past_a_module_torch_fx_cannot_trace_when_a_layer_stands_after_it() -> None:
    """nn.TransformerEncoderLayer branches on its inputs; the head after it is still found."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    model = nn.Sequential(nn.Linear(8, 16), encoder, nn.Linear(16, 3))
    names = torchbip.BiP(model, 0.5, layout="filter").names
    assert "2.weight" not in names
    assert {"0.weight", "1.layers.0.linear1.weight", "1.layers.0.linear2.weight"} <= set(names)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    head_last = nn.Sequential(nn.Linear(8, 16), encoder)  # its last layers are inside the encoder
    with pytest.warns(
        UserWarning, match=r"cannot trace the module '1', whose outputs reach the model's outputs"
    ):
        names = torchbip.BiP(head_last, 0.5, layout="filter").names
    assert "1.layers.0.linear2.weight" not in names  # the last registered layer, as the warning says


class Counted(list):
    """A list of batches that counts how many it hands out."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__(batches)
        self.read = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.read += 1
            yield batch


@pytest.mark.parametrize("loader", ["list", "one-shot", "shuffled"])
@pytest.mark.parametrize("structured", ["filter", "channel"])
def test_finding_the_edges_changes_nothing_in_the_run(loader: str, structured: str) -> None:
    """The forward pass that finds the edges reads no extra batch, draws no random numbers
    (dropout) and leaves BatchNorm's statistics alone: the run equals one with those tensors
    named in ``parameters``."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4),
        )  # fmt: skip

    def data() -> Any:
        items = batches(96)
        if loader == "one-shot":
            return iter(items)
        if loader == "shuffled":
            x, y = torch.cat([b[0] for b in items]), torch.cat([b[1] for b in items])
            g = torch.Generator().manual_seed(5)
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True, generator=g
            )
        return Counted(items)

    run = {"steps": 5, "progress": False, "seed": 3, "structured": structured}
    by_default, named = make(), make()
    default_loader = data()
    global_prune(by_default, 0.5, default_loader, **run)
    keep = [0, 4] if structured == "filter" else [4, 7]
    global_prune(named, 0.5, data(), parameters=[(named[i], "weight") for i in keep], **run)
    assert [prune.is_pruned(m) for m in by_default] == [prune.is_pruned(m) for m in named]
    for key, value in named.state_dict().items():
        assert torch.equal(by_default.state_dict()[key], value), key
    if loader == "list":
        assert default_loader.read == 5  # one batch per fused step, none more


def test_a_model_that_fails_on_the_first_batch_is_named_and_left_alone() -> None:
    model = DataDependent()  # torch.fx cannot trace it: the first batch shows the calls
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = [(torch.randn(16, 5), torch.zeros(16, dtype=torch.long))]  # 5 features, not 8
    match = r"the model failed on the first batch from loader \(inputs Tensor\[16, 5\] float32\), .*Runtime"
    with pytest.raises(ValueError, match=match):
        global_prune(model, 0.5, wrong, steps=1, progress=False, structured="filter")
    with pytest.raises(ValueError, match=r"the model or loss_fn failed on a batch from loader at step 0"):
        global_prune(HeadFirst(), 0.5, wrong, steps=1, progress=False, structured="filter")  # (traced)
    assert not prune.is_pruned(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_running_and_tracing_find_the_same_ends_of_a_resnet(seed: int) -> None:
    """Residual additions, a downsampling shortcut, BatchNorm, pooling: conv1 reads the inputs,
    fc returns the outputs, whether the calls are seen in a forward pass or traced by torch.fx."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    called = called_edges(model, layers, torch.randn(2, 3, 32, 32), "loader")
    assert called.inputs == [model.conv1]
    assert called.outputs == [model.fc]
    assert traced_edges(model, layers, "layout='channel'", "inputs").inputs == [model.conv1]
    assert traced_edges(model, layers, "layout='filter'", "outputs").outputs == [model.fc]
    assert model.bn1.num_batches_tracked == 0  # the forward pass ran on copies of the buffers
