"""``torchbip.global_prune`` end to end on tiny models and a synthetic, learnable task."""

from __future__ import annotations

import collections
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

import torchbip
from torchbip import BiPPruningMethod

# Tiny models: one intra-op thread is faster and makes float reductions reproducible.
pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def make_xy(n: int, image: bool = False, seed: int = 1) -> tuple[Tensor, Tensor]:
    """A learnable task: labels are the argmax of a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *((1, 6, 6) if image else (8,)), generator=gen)
    w = torch.randn(x[0].numel(), 3, generator=torch.Generator().manual_seed(1234))
    return x, (x.flatten(1) @ w).argmax(1)


def make_data(
    n_batches: int = 6, batch: int = 16, image: bool = False, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    x, y = make_xy(n_batches * batch, image, seed)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def n_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in prunable(model))


def mask_zeros(model: nn.Module) -> int:
    return sum(int((m.weight_mask == 0).sum()) for m in prunable(model))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


FAST: dict[str, Any] = {"steps": 10, "lower_lr": 0.05, "progress": False, "seed": 0}


class Recorder:
    """A loader that records the pruned state of ``modules`` each time a batch is drawn."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], modules: list[nn.Module]) -> None:
        self.batches = batches
        self.modules = modules
        self.records: list[list[tuple[Tensor, Tensor]]] = []
        self.draws = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            if all(hasattr(m, "weight_mask") for m in self.modules):
                self.records.append(
                    [(m.weight_orig.detach().clone(), m.weight_mask.clone()) for m in self.modules]
                )
            self.draws += 1
            yield batch


# --- sparsity -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount",
    [
        pytest.param(0.0, id="0.0"),
        pytest.param(0.37, id="0.37"),
        pytest.param(0.9, id="0.9"),
        pytest.param(0.999, id="0.999"),
        pytest.param(1.0, id="1.0"),
        pytest.param(0, id="int-0"),
        pytest.param(1000, id="int-1000"),
    ],
)
def test_exact_target_sparsity(amount: float | int) -> None:
    model = make_mlp()
    n = n_weights(model)
    report = torchbip.global_prune(model, amount, make_data(), **FAST)
    expected = amount if isinstance(amount, int) else round(amount * n)
    assert mask_zeros(model) == expected
    assert report.sparsity.zeros == expected
    assert report.sparsity.numel == n
    assert report.global_sparsity == expected / n
    assert torchbip.sparsity_report(model).zeros == expected
    assert report.amount == amount
    assert report.steps == FAST["steps"]


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_mask_is_exact_from_the_first_step_and_pruned_entries_never_move(mode: str) -> None:
    """Record (θ, m) at every batch draw: between draws, θ moves only where m was 1."""
    model = make_mlp()
    layers = prunable(model)
    n_keep = n_weights(model) - round(0.8 * n_weights(model))
    loader = Recorder(make_data(), layers)
    torchbip.global_prune(model, 0.8, loader, mode=mode, steps=12, lower_lr=0.2, upper_lr=2.0, progress=False)
    loader.records.append([(m.weight_orig.detach().clone(), m.weight_mask.clone()) for m in layers])

    assert len(loader.records) == (12 if mode == "fused" else 24)
    changed_masks = 0
    for before, after in zip(loader.records, loader.records[1:], strict=False):
        assert sum(int(mask.sum()) for _, mask in before) == n_keep
        for (theta0, mask0), (theta1, mask1) in zip(before, after, strict=True):
            pruned = mask0 == 0
            assert torch.equal(theta1[pruned], theta0[pruned])
            changed_masks += int(not torch.equal(mask0, mask1))
    assert changed_masks > 0, "the scores never changed the mask: the test would prove nothing"
    moved = [
        not torch.equal(a[0][0], b[0][0]) for a, b in zip(loader.records, loader.records[1:], strict=False)
    ]
    assert any(moved)


def test_entries_pruned_before_never_move_nor_revive() -> None:
    model = make_mlp()
    for layer in prunable(model):
        prune.random_unstructured(layer, "weight", amount=0.5)
    earlier = {id(m): m.weight_mask == 0 for m in prunable(model)}
    values = {id(m): m.weight_orig.detach().clone() for m in prunable(model)}
    torchbip.global_prune(model, 0.5, make_data(), **{**FAST, "steps": 20, "lower_lr": 0.3, "upper_lr": 3.0})
    for layer in prunable(model):
        gone = earlier[id(layer)]
        assert (layer.weight_mask[gone] == 0).all()
        assert torch.equal(layer.weight_orig.detach()[gone], values[id(layer)][gone])
        assert not torch.equal(layer.weight_orig.detach()[~gone], values[id(layer)][~gone])


def test_pruned_tensors_outside_the_run_keep_their_mask_and_values() -> None:
    """A tensor pruned earlier but not passed in ``parameters`` trains on its unpruned entries only."""
    model = make_mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    mask = model[0].weight_mask.clone()
    values = model[0].weight_orig.detach().clone()
    torchbip.global_prune(model, 0.5, make_data(), parameters=[(model[3], "weight")], **FAST, gamma=0.1)
    assert torch.equal(model[0].weight_mask, mask)
    assert torch.equal(model[0].weight_orig.detach()[mask == 0], values[mask == 0])
    assert not torch.equal(model[0].weight_orig.detach()[mask == 1], values[mask == 1])
    # the hook's attribute is a plain, current tensor (not one left behind by torch.func)
    assert type(model[0].weight) is Tensor
    assert model[0].weight.grad_fn is None
    assert torch.equal(model[0].weight, model[0].weight_orig * model[0].weight_mask)
    assert isinstance(next(iter(model[0]._forward_pre_hooks.values())), prune.L1Unstructured)
    assert not prune.is_pruned(model[5])


def _tiny_last_layer(model: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        model[5].weight.mul_(1e-3)
    return model


def test_without_a_floor_a_layer_can_be_pruned_away_and_the_run_warns() -> None:
    model = _tiny_last_layer(make_mlp())
    with pytest.warns(UserWarning, match=r"BiP pruned every entry of '5\.weight': .* set min_keep"):
        report = torchbip.global_prune(model, 0.9, make_data(), **FAST, score_init="magnitude", upper_lr=1e-6)
    assert int(model[5].weight_mask.sum()) == 0
    assert report.sparsity.pruned_away == ["5.weight"]


@pytest.mark.parametrize(
    ("min_keep", "floor"),
    [pytest.param(0.05, math.ceil(0.05 * 96), id="fraction"), pytest.param(7, 7, id="count")],
)
def test_min_keep_floor_is_respected(min_keep: float | int, floor: int) -> None:
    model = _tiny_last_layer(make_mlp())
    n = n_weights(model)
    report = torchbip.global_prune(
        model, 0.9, make_data(), **FAST, score_init="magnitude", upper_lr=1e-6, min_keep=min_keep
    )
    assert report.sparsity.zeros == round(0.9 * n) == mask_zeros(model)
    assert int(model[5].weight_mask.sum()) == floor  # the floor, not more: the ranking is global
    for layer in prunable(model):
        kept = int(layer.weight_mask.sum())
        expected = min_keep if isinstance(min_keep, int) else math.ceil(min_keep * layer.weight.numel())
        assert kept >= expected


# --- learning ------------------------------------------------------------------------------------


def _random_mask_baseline(
    amount: float, data: list[tuple[Tensor, Tensor]], steps: int, lr: float
) -> nn.Module:
    """A random mask of the same sparsity, then the same number of SGD steps on the same data."""
    model = make_mlp()
    torch.manual_seed(5)
    prune.global_unstructured(
        [(m, "weight") for m in prunable(model)], prune.RandomUnstructured, amount=amount
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_modes_learn_and_beat_a_random_mask(mode: str) -> None:
    data = make_data(n_batches=16, batch=32)
    x_test, y_test = make_xy(1000, seed=99)
    model = make_mlp()
    report = torchbip.global_prune(
        model, 0.8, data, mode=mode, steps=80, lower_lr=0.1, upper_lr=1.0, progress=False, seed=0, log_every=5
    )
    assert report.losses[0][0] == 0
    assert report.losses[-1][0] == 79
    assert [s for s, _ in report.losses[:-1]] == list(range(0, 80, 5))
    first, last = report.losses[0][1], report.final_loss
    assert math.isfinite(last)
    assert last < 0.6 * first
    baseline = _random_mask_baseline(0.8, data, 80 * (2 if mode == "two_batch" else 1), 0.1)
    acc_bip, acc_random = accuracy(model, x_test, y_test), accuracy(baseline, x_test, y_test)
    print(f"\n{mode}: BiP {acc_bip:.3f}, random mask + SGD {acc_random:.3f}")
    assert acc_bip > acc_random
    assert acc_bip > 0.75  # chance is 1/3


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"implicit_coef": None}, id="implicit=1/gamma"),
        pytest.param({"implicit_coef": 0.0}, id="implicit=0"),
        pytest.param({"lower_schedule": "step", "upper_schedule": "constant"}, id="schedules"),
        pytest.param({"device": "cpu", "momentum": 0.0, "upper_momentum": 0.0}, id="no-momentum"),
    ],
)
def test_options_run_to_exact_sparsity(options: dict[str, Any]) -> None:
    model = make_mlp()
    report = torchbip.global_prune(model, 0.75, make_data(), **{**FAST, **options})
    assert mask_zeros(model) == round(0.75 * n_weights(model))
    assert math.isfinite(report.final_loss)
    for key, value in options.items():
        assert report.config[key] == value


# --- loaders -------------------------------------------------------------------------------------


class Counting:
    """A re-iterable loader that counts the batches drawn from it."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches
        self.draws = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            self.draws += 1
            yield batch


def test_upper_loader_feeds_the_upper_level() -> None:
    lower, upper = Counting(make_data(6)), Counting(make_data(4, seed=2))
    model = make_mlp()
    report = torchbip.global_prune(
        model, 0.5, lower, upper_loader=upper, mode="two_batch", epochs=2, progress=False, seed=0
    )
    assert report.steps == 12  # epochs count passes over `loader`, one lower batch per step
    assert lower.draws == 12
    assert upper.draws == 12
    assert mask_zeros(model) == round(0.5 * n_weights(model))


def test_upper_loader_changes_the_result() -> None:
    results = []
    for upper in (make_data(6, seed=2), make_data(6, seed=3)):
        model = make_mlp()
        torchbip.global_prune(
            model, 0.5, make_data(6), upper_loader=upper, mode="two_batch", steps=6, upper_lr=2.0,
            progress=False, seed=0,
        )  # fmt: skip
        results.append(torch.cat([m.weight_mask.flatten() for m in prunable(model)]))
    assert not torch.equal(*results)


@pytest.mark.parametrize(
    ("mode", "epochs", "steps", "draws"),
    [
        pytest.param("fused", None, 6, 6, id="fused-1-epoch"),
        pytest.param("fused", 2.5, 15, 15, id="fused-2.5-epochs"),
        pytest.param("two_batch", None, 3, 6, id="two-batch-1-epoch"),
        pytest.param("two_batch", 2, 6, 12, id="two-batch-2-epochs"),
    ],
)
def test_steps_follow_epochs(mode: str, epochs: float | None, steps: int, draws: int) -> None:
    loader = Counting(make_data(6))
    report = torchbip.global_prune(make_mlp(), 0.5, loader, mode=mode, epochs=epochs, progress=False)
    assert report.steps == steps
    assert loader.draws == draws


def test_dataloader_and_tuple_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, xa: Tensor, xb: Tensor) -> Tensor:
            return self.head(F.relu(self.a(xa) + self.b(xb)))

    x, y = make_xy(64)
    loader = DataLoader(TensorDataset(x[:, :4], x[:, 4:], y), batch_size=16)
    batches = [((xa, xb), yb) for xa, xb, yb in loader]
    model = TwoInputs()
    report = torchbip.global_prune(model, 0.5, batches, **FAST)
    assert report.sparsity.zeros == round(0.5 * (32 + 32 + 24))
    assert set(report.sparsity.tensors) == {"a.weight", "b.weight", "head.weight"}


Weighted = collections.namedtuple("Weighted", "label weight")
Views = collections.namedtuple("Views", "left right")


class NamedPairs(torch.utils.data.Dataset):
    """Samples ``(Views(left, right), Weighted(label, weight))``: default_collate keeps the
    namedtuples, so every batch's inputs and targets are namedtuples of batched tensors."""

    def __init__(self, n: int = 48) -> None:
        x, self.y = make_xy(n)
        self.left, self.right = x[:, :4], x[:, 4:]
        self.w = torch.rand(n, generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Views, Weighted]:
        return Views(self.left[i], self.right[i]), Weighted(self.y[i], self.w[i])


class OneViewsArgument(nn.Module):
    """``forward(views)``: one namedtuple argument, as a plain training loop passes it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)
        self.seen: list[type] = []

    def forward(self, views: Views) -> Tensor:
        self.seen.append(type(views))
        return self.head(F.relu(self.a(views.left) + self.b(views.right)))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_namedtuple_inputs_and_targets_from_default_collate(device: str | None) -> None:
    """A namedtuple of inputs is one argument of the model (a plain tuple would be unpacked), and a
    namedtuple of targets reaches loss_fn as the namedtuple, as in a plain training loop."""
    loader = DataLoader(NamedPairs(), batch_size=16)
    inputs, targets = next(iter(loader))
    assert (type(inputs), type(targets)) == (Views, Weighted)  # what torch's collate yields
    torch.manual_seed(0)
    model = OneViewsArgument()
    plain_loss = F.cross_entropy(model(inputs), targets.label)  # a plain loop works
    assert torch.isfinite(plain_loss)
    model.seen.clear()
    received: list[type] = []

    def weighted_loss(out: Tensor, t: Weighted) -> Tensor:
        received.append(type(t))
        return (F.cross_entropy(out, t.label, reduction="none") * t.weight).mean()

    report = torchbip.global_prune(model, 0.5, loader, loss_fn=weighted_loss, device=device, **FAST)
    assert report.sparsity.zeros == round(0.5 * (32 + 32 + 24))
    assert set(model.seen) == {Views}
    assert received
    assert set(received) == {Weighted}


def test_a_module_used_twice_is_pruned_once() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 3))
    report = torchbip.global_prune(model, 0.5, make_data(), **FAST)
    assert set(report.sparsity.tensors) == {"0.weight", "4.weight"}
    assert report.sparsity.zeros == round(0.5 * (64 + 24))
    assert shared.weight_mask is model[2].weight_mask
    x = make_data()[0][0]
    masked = shared.weight_orig * shared.weight_mask
    expected = F.linear(
        F.relu(F.linear(F.relu(F.linear(x, masked, shared.bias)), masked, shared.bias)),
        model[4].weight,
        model[4].bias,
    )
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# --- BatchNorm, modes, seeds -------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "passes"), [("fused", 1), ("two_batch", 2)])
def test_batchnorm_running_stats_are_updated_and_eval_mode_restored(mode: str, passes: int) -> None:
    model = make_cnn().eval()
    bn = model[1]
    torchbip.global_prune(model, 0.7, make_data(image=True), **{**FAST, "mode": mode, "steps": 5})
    assert int(bn.num_batches_tracked) == 5 * passes
    assert not torch.equal(bn.running_mean, torch.zeros(4))
    assert not torch.equal(bn.running_var, torch.ones(4))
    assert not any(m.training for m in model.modules())
    assert not prune.is_pruned(bn)


def test_batchnorm_running_stats_follow_the_batches() -> None:
    """With momentum=None BatchNorm keeps the exact average of the batch statistics it saw."""
    model = make_cnn()
    model[1].momentum = None
    data = make_data(n_batches=3, image=True)
    torchbip.global_prune(model, 0.5, data, **{**FAST, "steps": 3, "lower_lr": 1e-12, "upper_lr": 1e-12})
    # the first layer's weights barely moved, so recompute the conv outputs batch by batch
    conv = model[0]
    means = []
    with torch.no_grad():
        for x, _ in data:
            means.append(conv(x).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model[1].running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda m: m.train(), id="train"),
        pytest.param(lambda m: m.eval(), id="eval"),
        pytest.param(lambda m: (m.train(), m[2].eval(), m[4].eval()), id="mixed"),
    ],
)
def test_training_flags_are_restored(setup: Callable[[nn.Module], object]) -> None:
    model = make_mlp(dropout=0.5)
    setup(model)
    flags = [m.training for m in model.modules()]
    torchbip.global_prune(model, 0.5, make_data(), **FAST)
    assert [m.training for m in model.modules()] == flags


def _seeded_run(seed: int, global_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    model = make_mlp(dropout=0.3)
    x, y = make_xy(96)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    torch.manual_seed(global_seed)
    state = torch.get_rng_state()
    torchbip.global_prune(model, 0.6, loader, steps=12, upper_lr=2.0, lower_lr=0.1, progress=False, seed=seed)
    masks = torch.cat([m.weight_mask.flatten() for m in prunable(model)])
    weights = torch.cat([m.weight_orig.detach().flatten() for m in prunable(model)])
    return masks, weights, state, torch.get_rng_state()


def test_seed_gives_identical_masks_and_weights_and_leaves_the_callers_rng_alone() -> None:
    masks1, weights1, state_before1, state_after1 = _seeded_run(seed=3, global_seed=10)
    masks2, weights2, state_before2, state_after2 = _seeded_run(seed=3, global_seed=11)
    assert torch.equal(masks1, masks2)
    assert torch.equal(weights1, weights2)
    assert torch.equal(state_before1, state_after1)
    assert torch.equal(state_before2, state_after2)
    _masks3, weights3, _, _ = _seeded_run(seed=4, global_seed=10)
    assert not torch.equal(weights1, weights3)


def test_report_is_sane() -> None:
    model = make_cnn()
    report = torchbip.global_prune(model, 0.5, make_data(image=True), **FAST, log_every=3)
    assert set(report.sparsity.tensors) == {"0.weight", "4.weight"}
    for name, t in report.sparsity.tensors.items():
        assert t.numel == model.get_parameter(name + "_orig").numel()
        assert t.zeros == int((model.get_buffer(name + "_mask") == 0).sum())
    assert [s for s, _ in report.losses] == [0, 3, 6, 9]
    assert math.isfinite(report.final_loss)
    assert report.final_loss > 0
    assert report.wall_time_s > 0
    assert report.config["steps"] == 10
    assert report.config["log_every"] == 3
    assert report.to_dict()["sparsity"]["zeros"] == report.sparsity.zeros
    assert isinstance(model[0]._forward_pre_hooks[next(iter(model[0]._forward_pre_hooks))], BiPPruningMethod)


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_callers_grads_are_given_back_unchanged(mode: str, optimizer: str) -> None:
    """global_prune trains with its own gradients: every ``.grad`` the caller had is the same tensor
    with the same values afterwards, and a parameter without one still has none."""
    model = make_cnn()
    x, y = make_xy(16, image=True)
    F.cross_entropy(model(x), y).backward()
    model[4].bias.grad = None  # one parameter without a gradient
    before = {
        name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()
    }
    torchbip.global_prune(
        model, 0.5, make_data(image=True), steps=4, mode=mode, optimizer=optimizer, progress=False
    )
    after = dict(model.named_parameters())
    for name, (grad, values) in before.items():
        p = after[name if name in after else name.replace(".weight", ".weight_orig")]
        if grad is None:
            assert p.grad is None, name
        else:
            assert p.grad is grad, name
            assert torch.equal(p.grad, values), name


@pytest.mark.parametrize("log_every", [1, 2, 3, 12, 20])
def test_progress_bar_postfix_every_log_every_steps(log_every: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar's loss/sparsity postfix is set at steps 1, 1 + log_every, ... and at the last step."""
    positions: list[int] = []

    class CountingBar(torchbip.api.tqdm):
        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            positions.append(self.n)  # steps completed before this one
            super().set_postfix(*args, **kwargs)

    monkeypatch.setattr(torchbip.api, "tqdm", CountingBar)
    steps = 12
    torchbip.global_prune(make_mlp(), 0.5, make_data(), steps=steps, progress=True, log_every=log_every)
    want = sorted({*range(0, steps, log_every), steps - 1})
    assert positions == want


def test_progress_bar_sparsity_is_the_masks_sparsity_at_each_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters of different sizes ranked together change the masks' sparsity from step to step:
    the bar shows the sparsity the masks have when it is updated, not the first step's."""
    shown: list[tuple[str, str]] = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3))
    layers = [model[0], model[2]]  # the default filters: the head's are the model's outputs

    class WatchingBar(torchbip.api.tqdm):
        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            zeros = sum(int((m.weight_mask == 0).sum()) for m in layers)
            total = sum(m.weight_mask.numel() for m in layers)
            shown.append((kwargs["sparsity"], f"{zeros / total:.2%}"))
            super().set_postfix(*args, **kwargs)

    monkeypatch.setattr(torchbip.api, "tqdm", WatchingBar)
    report = torchbip.global_prune(
        model, 0.5, make_data(20), steps=20, structured="filter", budget="global", upper_lr=100.0,
        log_every=1, progress=True, seed=0,
    )  # fmt: skip
    assert len(shown) == 20
    assert [bar for bar, _ in shown] == [masks for _, masks in shown]
    assert shown[-1][0] == f"{report.global_sparsity:.2%}"
    assert len({masks for _, masks in shown}) > 1  # the masks' sparsity did change


def test_progress_bar_sparsity_under_coupled_is_that_of_the_finished_masks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While training, ``Coupled`` masks a pruned channel only where it is read; ``finish`` then
    zeroes all of it. The bar shows the sparsity finishing would leave. By hand: the MLP's two
    groups are the 32 outputs of layer 0 (its 8 weights and bias per channel, a column of layer
    3) and those of layer 3 (its 32 weights and bias per channel, a column of the head, 3
    weights); the training masks zero the pruned channels' columns of layers 3 and 5."""
    pytest.importorskip("torch_pruning")
    shown: list[tuple[str, str]] = []
    model = make_mlp()

    class WatchingBar(torchbip.api.tqdm):
        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            a = int((model[3].weight_mask == 0).all(0).sum())  # pruned channels of layer 0
            b = int((model[5].weight_mask == 0).all(0).sum())  # pruned channels of layer 3
            zeros = 9 * a + (32 * 32 - (32 - a) * (32 - b)) + 4 * b
            shown.append((kwargs["sparsity"], f"{zeros / (9 * 32 + 33 * 32 + 3 * 32):.2%}"))
            super().set_postfix(*args, **kwargs)

    monkeypatch.setattr(torchbip.api, "tqdm", WatchingBar)
    report = torchbip.global_prune(
        model, 0.5, make_data(8), steps=8, structured=torchbip.Coupled(torch.randn(2, 8), budget="global"),
        upper_lr=100.0, log_every=1, progress=True, seed=0,
    )  # fmt: skip
    assert len(shown) == 8
    assert [bar for bar, _ in shown] == [final for _, final in shown]
    assert shown[-1][0] == f"{report.global_sparsity:.2%}"
    assert len({final for _, final in shown}) > 1  # the selection did change


@pytest.mark.parametrize("mode", ["fused", "two_batch"])
def test_float16_overflow_counts_each_skipped_step_once(mode: str) -> None:
    """Every pass overflows float16 until the loss scale has come down: in the two-batch mode both
    passes of a step overflow, and the step counts once (skipped_steps never exceeds steps)."""
    calls = {"n": 0}

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        calls["n"] += 1  # a loss of 1e6 overflows float16 gradients at any loss scale
        return F.cross_entropy(out.float(), y) * (1e6 if calls["n"] <= 4 else 1.0)

    passes = 2 if mode == "two_batch" else 1
    report = torchbip.global_prune(
        make_mlp(), 0.5, make_data(), loss_fn=loss_fn, amp="float16", mode=mode, **{**FAST, "steps": 6}
    )
    # the first four passes are skipped: four fused steps, or two two-batch steps
    assert report.skipped_steps == 4 // passes
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)


def test_a_compiled_model_is_pruned_as_the_module_it_wraps() -> None:
    """``global_prune(torch.compile(model))``: the same run as on the bare model, under its names."""
    xy = make_xy(64)
    data = [(xy[0][i : i + 16], xy[1][i : i + 16]) for i in range(0, 64, 16)]
    bare, wrapped = make_mlp(), make_mlp()
    torchbip.global_prune(bare, 0.7, data, steps=6, progress=False)
    torchbip.global_prune(torch.compile(wrapped, backend="eager"), 0.7, data, steps=6, progress=False)
    assert list(wrapped.state_dict()) == list(bare.state_dict())
    for key, value in bare.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], value), key


@pytest.mark.parametrize(
    "wrap", [nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m), backend="eager")]
)
def test_a_data_parallel_wrapper_is_refused_by_name_and_the_model_kept(
    wrap: Callable[[nn.Module], nn.Module],
) -> None:
    model = make_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xy = make_xy(32)
    with pytest.raises(
        TypeError, match=r"model is a DataParallel wrapper: .* pass the bare model \(model.module\)"
    ):
        torchbip.global_prune(wrap(model), 0.7, [xy], steps=2, progress=False)
    assert not prune.is_pruned(model)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _two_batch_model_and_data() -> tuple[nn.Sequential, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
        for _ in range(3)
    ]
    return model, data


def _two_batch_adamw_oracle(
    model: nn.Sequential, data: list, amount: float, steps: int, lr: float = 0.05, upper_lr: float = 3.0,
    umom: float = 0.9, gamma: float = 5e-4, c: float = 1.0,
) -> list[Tensor]:  # fmt: skip
    """The two-batch loop by hand: AdamW lower step, pruned entries held, then the upper step."""
    W = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    B = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    S = [w.abs() for w in W]
    n = sum(w.numel() for w in W)
    keep = n - round(amount * n)

    def topk(S: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([s.reshape(-1) for s in S])
        m = torch.zeros_like(flat)
        m[torch.topk(flat, keep).indices] = 1
        return [m[: S[0].numel()].view_as(S[0]), m[S[0].numel() :].view_as(S[1])]

    def grads(W: list, B: list, M: list, x: Tensor, y: Tensor) -> tuple[Any, Any]:
        Z = [(m * w).requires_grad_() for m, w in zip(M, W, strict=True)]
        Bv = [b.clone().requires_grad_() for b in B]
        out = F.linear(torch.tanh(F.linear(x, Z[0], Bv[0])), Z[1], Bv[1])
        g = torch.autograd.grad(F.cross_entropy(out, y), Z + Bv)
        return g[:2], g[2:]

    M = topk(S)
    P = [p.clone() for p in W + B]
    opt = torch.optim.AdamW([{"params": P, "weight_decay": gamma}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    sbuf: list[Tensor | None] = [None, None]
    batch = 0
    for _ in range(steps):
        x, y = data[batch % 3]
        batch += 1
        gz, gb = grads(W, B, M, x, y)
        for p, v, gr in zip(P, W + B, [m * g for m, g in zip(M, gz, strict=True)] + list(gb), strict=True):
            p.data.copy_(v)
            p.grad = gr.clone()
        opt.step()
        sched.step()
        W = [torch.where(M[i].bool(), P[i].detach(), W[i]) for i in range(2)]  # pruned entries held
        B = [p.detach().clone() for p in P[2:]]
        x, y = data[batch % 3]
        batch += 1
        gz, _ = grads(W, B, M, x, y)
        for i in range(2):
            ug = W[i] * gz[i] - c * M[i] * gz[i] * gz[i]
            previous = sbuf[i]
            buf = ug if previous is None else previous * umom + ug
            sbuf[i] = buf
            S[i] = S[i] - upper_lr * buf
        M = topk(S)
    return M


@pytest.mark.parametrize("steps", [4, 5, 6])
def test_two_batch_adamw_upper_gradient_uses_the_held_weights(steps: int) -> None:
    """AdamW's decay and moments move pruned entries in the lower step; the upper pass of the
    same step must read them held, as the model has them."""
    model, data = _two_batch_model_and_data()
    expected = _two_batch_adamw_oracle(copy.deepcopy(model), data, 0.6, steps)
    torchbip.global_prune(model, 0.6, data, steps=steps, progress=False, mode="two_batch", optimizer="adamw")
    assert torch.equal(model[0].weight_mask, expected[0])
    assert torch.equal(model[2].weight_mask, expected[1])
