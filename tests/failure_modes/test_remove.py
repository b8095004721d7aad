"""After ``prune.remove`` (or ``make_permanent``) nothing of torchbip remains on a module.

Each scenario prunes one tensor with a sequence of methods (a BiP method alone, a BiP method and
torch's methods in a ``PruningContainer`` in either order, three methods), trains a step and makes
the pruning permanent. The oracle is the same scenario with torch's methods only: every BiP step
is replaced by ``prune.custom_from_mask`` with the mask that the BiP step left, and random steps
draw from the same seed. Afterwards both modules must hold the same parameters, buffers,
non-persistent buffer set, hooks of every kind and attributes, the same values; ``torch.jit.script``
must work and give the same outputs, and the ``state_dict`` must load strictly into a fresh,
never-pruned module.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip import bip_structured, bip_unstructured
from torchbip.export import make_permanent
from torchbip.semistructured import bip_semi_structured

pytestmark = pytest.mark.usefixtures("one_thread")


# --- modules, methods and the oracle ---------------------------------------------------------------


def make_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 6)


def make_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(8, 6, kernel_size=2)


def make_input(module: nn.Module) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (4, 8) if isinstance(module, nn.Linear) else (4, 8, 5, 5)
    return torch.randn(*shape, generator=gen)


def input_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


BIP: dict[str, Callable[[nn.Module], Any]] = {
    "unstructured": lambda m: bip_unstructured(m, "weight", amount=0.3),
    "filter": lambda m: bip_structured(m, "weight", amount=1, dim=0),
    "channel": lambda m: bip_structured(m, "weight", amount=2, dim=1),
    "2:4": lambda m: bip_semi_structured(m, "weight", n=2, m=4, dim=input_dim(m)),
}

TORCH: dict[str, Callable[[nn.Module], Any]] = {
    "l1": lambda m: prune.l1_unstructured(m, "weight", amount=0.2),
    "random": lambda m: prune.random_unstructured(m, "weight", amount=0.2),
    "ln": lambda m: prune.ln_structured(m, "weight", amount=1, n=2, dim=0),
}

SEQUENCES = [
    pytest.param(("bip",), id="bip-alone"),
    pytest.param(("l1", "bip"), id="l1-then-bip"),
    pytest.param(("bip", "l1"), id="bip-then-l1"),
    pytest.param(("bip", "l1", "random"), id="bip-l1-random"),
    pytest.param(("random", "bip", "l1"), id="random-bip-l1"),
    pytest.param(("ln", "random", "bip"), id="ln-random-bip"),
    pytest.param(("bip", "bip"), id="bip-twice"),
]
MODULES = [pytest.param(make_linear, id="linear"), pytest.param(make_conv, id="conv")]


def train_step(module: nn.Module) -> None:
    module.zero_grad()
    module(make_input(module)).square().mean().backward()


def run(module: nn.Module, steps: tuple[str, ...], bip: str) -> list[Tensor]:
    """Apply ``steps`` (``"bip"`` is the BiP method ``bip``); return the mask after each step."""
    out = []
    for i, step in enumerate(steps):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + i)
            (BIP[bip] if step == "bip" else TORCH[step])(module)
        out.append(module.weight_mask.clone())
    return out


def torch_only(module: nn.Module, steps: tuple[str, ...], bip_masks: list[Tensor]) -> nn.Module:
    """The oracle: the same steps with torch's methods only (BiP steps as ``custom_from_mask``)."""
    for i, step in enumerate(steps):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + i)
            if step == "bip":
                prune.custom_from_mask(module, "weight", bip_masks[i])
            else:
                TORCH[step](module)
        assert torch.equal(module.weight_mask, bip_masks[i])
    return module


def state(module: nn.Module) -> dict[str, Any]:
    """Everything a module holds: tensors by name and value, hooks by type, plain attributes."""
    out: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key in ("_parameters", "_buffers"):
            out[key] = {n: (type(t), t.detach().clone()) for n, t in value.items() if t is not None}
        elif key == "_modules":
            out[key] = list(value)
        elif isinstance(value, dict):  # hooks of every kind: keys are handle ids, compare the hooks
            out[key] = [type(h) for h in value.values()]
        elif isinstance(value, set):
            out[key] = sorted(value)
        elif isinstance(value, Tensor):
            out[key] = ("tensor", value.detach().clone())
        else:
            out[key] = value
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_same_state(module: nn.Module, oracle: nn.Module) -> None:
    got, want = state(module), state(oracle)
    assert got.keys() == want.keys()
    for key in want:
        assert same(got[key], want[key]), f"{key}: {got[key]!r} != {want[key]!r}"


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, not gone
        return torch.jit.script(module)


def assert_plain_and_scriptable(module: nn.Module, factory: Callable[[], nn.Module]) -> None:
    """The state_dict loads strictly into a fresh module; scriptable, with equal outputs."""
    x = make_input(module)
    with torch.no_grad():
        expected = module(x)
    fresh = factory()
    assert sorted(module.state_dict()) == sorted(fresh.state_dict())  # torch re-registers it last
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert_same_state(module, fresh)  # values too: the never-pruned module holds orig * mask now
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        assert torch.equal(scripted(module)(x), expected)  # (scripting adds __overloads__)


# --- prune.remove and make_permanent, against the torch-only oracle -------------------------------


@pytest.mark.parametrize("bip", list(BIP))
@pytest.mark.parametrize("steps", SEQUENCES)
@pytest.mark.parametrize("factory", MODULES)
def test_remove_leaves_what_torch_only_pruning_leaves(
    factory: Callable[[], nn.Module], steps: tuple[str, ...], bip: str
) -> None:
    module = factory()
    weight = module.weight
    bip_masks = run(module, steps, bip)
    oracle = torch_only(factory(), steps, bip_masks)
    for m in (module, oracle):
        train_step(m)
    assert prune.remove(module, "weight") is module
    prune.remove(oracle, "weight")
    assert module.weight is weight
    assert_same_state(module, oracle)
    assert_plain_and_scriptable(module, factory)


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


@pytest.mark.parametrize("bip", list(BIP))
@pytest.mark.parametrize("steps", SEQUENCES)
def test_make_permanent_leaves_what_torch_only_pruning_leaves(steps: tuple[str, ...], bip: str) -> None:
    model, oracle = make_mlp(), make_mlp()
    torch_only(oracle[0], steps, run(model[0], steps, bip))
    torch_only(oracle[2], steps[::-1], run(model[2], steps[::-1], bip))
    x = torch.randn(3, 8)
    for m in (model, oracle):
        m.zero_grad()
        m(x).square().mean().backward()
    assert make_permanent(model) is model
    make_permanent(oracle)
    assert not prune.is_pruned(model)
    for got, want in zip(model.modules(), oracle.modules(), strict=True):
        assert_same_state(got, want)
    with torch.no_grad():
        assert torch.equal(scripted(model)(x), oracle(x))
    fresh = make_mlp()
    fresh.load_state_dict(model.state_dict(), strict=True)


# --- other ways in --------------------------------------------------------------------------------


@pytest.mark.parametrize("bip", list(BIP))
def test_remove_after_a_pickle_round_trip_of_a_torch_container(bip: str) -> None:
    """The copy's container (torch's, around a BiP method) still leaves nothing behind."""
    module = make_linear()
    bip_masks = run(module, ("bip", "l1"), bip)
    clone = pickle.loads(pickle.dumps(module))
    assert "weight_scores" in clone._buffers
    prune.remove(clone, "weight")
    oracle = torch_only(make_linear(), ("bip", "l1"), bip_masks)
    prune.remove(oracle, "weight")
    assert_same_state(clone, oracle)
    assert_plain_and_scriptable(clone, make_linear)


@pytest.mark.parametrize("structured", [None, "filter", "2:4"])
@pytest.mark.parametrize("before", [None, "l1"])
@pytest.mark.parametrize("after", [None, "l1"])
def test_remove_after_global_prune(structured: str | None, before: str | None, after: str | None) -> None:
    """global_prune alone, on top of torch's l1, or under it: remove leaves torch's state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if before:
        prune.l1_unstructured(model[0], "weight", amount=0.25)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 8, generator=gen)
    batches = [(x[:16], x[:16, :4].argmax(1)), (x[16:], x[16:, :4].argmax(1))]
    options: dict[str, Any] = {"structured": structured} if structured else {}
    torchbip.global_prune(model, 0.5, batches, steps=2, progress=False, seed=0, **options)
    if after:
        prune.l1_unstructured(model[0], "weight", amount=0.25)
    F.cross_entropy(model(x[:16]), x[:16, :4].argmax(1)).backward()
    layer = model[0]
    mask = layer.weight_mask.clone()
    oracle = nn.Linear(8, 16)
    with torch.no_grad():
        oracle.weight.copy_(layer.weight_orig)
        oracle.bias.copy_(layer.bias)
    prune.custom_from_mask(oracle, "weight", mask)
    prune.remove(layer, "weight")
    prune.remove(oracle, "weight")
    assert_same_state(layer, oracle)
    assert_plain_and_scriptable(layer, lambda: nn.Linear(8, 16))


def test_a_users_own_scores_buffer_survives_torch_pruning_and_remove() -> None:
    """The cleanup drops only torchbip's buffer, never a user's buffer of the same name."""

    class Scored(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 3)
            self.register_buffer("weight_scores", torch.arange(12.0).view(3, 4))

    module = Scored()
    assert "weight_scores" in module._buffers  # registered before torch re-registered weight
    prune.l1_unstructured(module, "weight", amount=0.5)
    prune.random_unstructured(module, "weight", amount=0.5)
    prune.remove(module, "weight")
    assert torch.equal(module.weight_scores, torch.arange(12.0).view(3, 4))
    module.weight = nn.Parameter(torch.zeros(3, 4))  # a plain re-registration
    assert "weight_scores" in module._buffers


def test_remove_of_one_tensor_keeps_the_other_tensors_bip_state() -> None:
    layer = make_linear()
    bip_unstructured(layer, "weight", amount=0.5)
    bip_unstructured(layer, "bias", amount=2)
    prune.l1_unstructured(layer, "bias", amount=1)  # torch's container on the bias
    prune.remove(layer, "bias")
    assert sorted(layer._buffers) == ["weight_mask", "weight_scores"]
    prune.remove(layer, "weight")
    assert not layer._buffers
    assert not layer._non_persistent_buffers_set
    assert_plain_and_scriptable(layer, make_linear)
