"""``copy.deepcopy``, ``pickle`` and ``torch.save`` of models under BiP hooks, after training steps.

torch's own pruning leaves a non-leaf ``module.weight`` after a forward pass with gradients on,
which ``copy.deepcopy`` rejects (pytorch issue #37322). BiP's pruning pre-hook (and the container
that a BiP method builds on top of an earlier method) makes the copy work without changing what
``module.weight`` is, so gradients stay exactly torch's; nothing else is registered on the module.
A container that torch builds (a torch method on top of BiP) behaves as torch's own.
"""

from __future__ import annotations

import copy
import io
import os
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
from torchbip.method import BiPContainer, BiPPruningMethod, bip_unstructured
from torchbip.semistructured import bip_semi_structured

# Tiny models: one intra-op thread is faster and makes float reductions reproducible.
pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make_data() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=gen)
    y = x[:, :3].argmax(1)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def bip_pruned_mlp() -> nn.Sequential:
    model = make_mlp()
    torchbip.global_prune(model, 0.6, make_data(), steps=3, progress=False, seed=0)
    return model


def train_step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def extras(module: nn.Module) -> dict[str, Any]:
    """What a module holds besides torch's pruning state: forward hooks and score buffers."""
    return {
        "forward_hooks": list(module._forward_hooks.values()),
        "scores": [n for n in module._buffers if n.endswith("_scores")],
    }


NOTHING = {"forward_hooks": [], "scores": []}


def assert_same_model(clone: nn.Module, model: nn.Module, x: Tensor) -> None:
    assert list(clone.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


# --- deepcopy ---------------------------------------------------------------------------------------


def test_torch_alone_cannot_deepcopy_after_a_training_step() -> None:
    """The trap that the guard removes (if torch fixes it, this test can go)."""
    model = make_mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    train_step(model, *make_data()[0])
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)


def test_deepcopy_after_forward_and_backward() -> None:
    model = bip_pruned_mlp()
    x, y = make_data()[0]
    train_step(model, x, y)
    assert not model[0].weight.is_leaf  # what torch's pre-hook leaves: the guard changes nothing here

    clone = copy.deepcopy(model)

    assert clone[0].weight.is_leaf
    assert not clone[0].weight.requires_grad
    assert torch.equal(clone[0].weight, model[0].weight.detach())
    assert clone[0].weight_orig is not model[0].weight_orig
    assert_same_model(clone, model, x)
    # the copy trains, and is copied again after its own step
    train_step(clone, x, y)
    assert clone[0].weight_orig.grad is not None
    copy.deepcopy(clone)
    assert extras(clone[0]) == NOTHING  # global_prune dropped the scores; no forward hook
    assert [type(h) for h in clone[0]._forward_pre_hooks.values()] == [BiPPruningMethod]


def test_deepcopy_in_eval_and_no_grad_modes() -> None:
    model = bip_pruned_mlp().eval()
    x = make_data()[0][0]
    with torch.no_grad():
        model(x)
    assert_same_model(copy.deepcopy(model), model, x)
    model(x)  # gradients on, eval mode
    assert_same_model(copy.deepcopy(model), model, x)


def test_deepcopy_after_bip_on_top_of_l1_a_bip_container() -> None:
    """torch's l1, then BiP on top: the container BiP builds is deep-copyable after a training step."""
    model = make_mlp()
    layer = model[0]
    x, y = make_data()[0]
    prune.l1_unstructured(layer, "weight", amount=0.3)
    bip_unstructured(layer, "weight", amount=0.4)
    (hook,) = layer._forward_pre_hooks.values()
    assert type(hook) is BiPContainer
    assert [type(m) for m in hook] == [prune.L1Unstructured, BiPPruningMethod]
    train_step(model, x, y)
    assert not layer.weight.is_leaf
    assert_same_model(copy.deepcopy(model), model, x)
    prune.l1_unstructured(layer, "weight", amount=0.2)  # torch adds to BiP's container
    assert pruning_hook_types(layer) == [BiPContainer]
    train_step(model, x, y)
    assert_same_model(copy.deepcopy(model), model, x)
    prune.remove(layer, "weight")
    assert extras(layer) == NOTHING
    assert isinstance(layer._parameters["weight"], nn.Parameter)


def test_torch_container_on_top_of_bip_deep_copies_like_torchs() -> None:
    """BiP, then torch's l1 on top (torch's own PruningContainer, whose pre-hook BiP cannot change).

    After a training step the masked weight is a non-leaf there, as with torch's methods alone
    (pytorch issue #37322): deepcopy fails the same way, and works after a forward pass under
    ``torch.no_grad()`` or after ``prune.remove``, which leaves nothing of torchbip behind.
    """
    model = bip_pruned_mlp()
    layer = model[0]
    x, y = make_data()[0]
    prune.l1_unstructured(layer, "weight", amount=0.3)
    assert pruning_hook_types(layer) == [prune.PruningContainer]
    train_step(model, x, y)
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    with torch.no_grad():
        model(x)
    assert_same_model(copy.deepcopy(model), model, x)

    train_step(model, x, y)
    prune.remove(layer, "weight")
    param = layer.weight
    assert isinstance(param, nn.Parameter)
    assert extras(layer) == NOTHING
    train_step(model, x, y)
    assert layer.weight is param
    assert layer._parameters["weight"] is param
    assert "weight" not in vars(layer)
    assert param.grad is not None
    prune.remove(model[2], "weight")
    assert_same_model(copy.deepcopy(model), model, x)

    BiPPruningMethod.apply(layer, "weight", amount=0.2)  # pruned again: BiP's own hook, nothing else
    assert pruning_hook_types(layer) == [BiPPruningMethod]
    assert extras(layer) == {"forward_hooks": [], "scores": ["weight_scores"]}


def pruning_hook_types(module: nn.Module) -> list[type]:
    return [type(h) for h in module._forward_pre_hooks.values()]


def test_remove_leaves_torchs_state_and_state_dict_keys_are_torchs() -> None:
    model = bip_pruned_mlp()
    assert prune.is_pruned(model)
    assert sorted(model[0].state_dict()) == ["bias", "weight_mask", "weight_orig"]
    assert extras(model[0]) == NOTHING
    for layer in (model[0], model[2]):
        prune.remove(layer, "weight")
        assert extras(layer) == NOTHING
        assert not layer._forward_pre_hooks
    assert not prune.is_pruned(model)
    assert sorted(model[0].state_dict()) == ["bias", "weight"]


def test_failed_apply_adds_nothing() -> None:
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="larger than"):
        bip_unstructured(layer, "weight", amount=13)
    assert extras(layer) == NOTHING
    assert not prune.is_pruned(layer)


# --- gradients are torch's ---------------------------------------------------------------------------


class TiedByAttribute(nn.Module):
    """Reads ``emb.weight`` after ``emb``'s forward pass (an output layer sharing the embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(idx).mean(1)))
        return h @ self.emb.weight.T  # the masked embedding, read after the pre-hook ran


@pytest.mark.parametrize("kind", ["mlp", "tied-by-attribute"])
def test_training_gives_the_same_gradients_as_a_torch_pruned_twin(kind: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: nn.Module = make_mlp() if kind == "mlp" else TiedByAttribute()
    twin = copy.deepcopy(model)
    layers = [("0", "2")] if kind == "mlp" else [("emb", "mix")]
    for name in layers[0]:
        bip_unstructured(model.get_submodule(name), "weight", amount=0.5)
        prune.custom_from_mask(
            twin.get_submodule(name), "weight", model.get_submodule(name).weight_mask.clone()
        )
    gen = torch.Generator().manual_seed(2)
    if kind == "mlp":
        x, y = torch.randn(16, 8, generator=gen), torch.randint(3, (16,), generator=gen)
    else:
        x, y = torch.randint(12, (16, 4), generator=gen), torch.randint(12, (16,), generator=gen)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    for _ in range(3):
        for m, opt in zip((model, twin), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for (name, p), (tname, tp) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
            assert name == tname
            assert torch.equal(p.grad, tp.grad), name
            assert torch.equal(p, tp), name
    copy.deepcopy(model)


# --- pickle and torch.save ---------------------------------------------------------------------------


def test_pickle_round_trip_after_a_training_step() -> None:
    model = bip_pruned_mlp()
    x, y = make_data()[0]
    train_step(model, x, y)
    clone = pickle.loads(pickle.dumps(model))
    assert_same_model(clone, model, x)
    assert extras(clone[2]) == NOTHING
    assert [type(h) for h in clone[2]._forward_pre_hooks.values()] == [BiPPruningMethod]
    train_step(clone, x, y)
    copy.deepcopy(clone)


def test_torch_save_of_the_whole_module() -> None:
    model = bip_pruned_mlp()
    x, y = make_data()[0]
    train_step(model, x, y)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)  # hooks are code: the safe loader refuses them
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)  # a file this test wrote itself
    assert_same_model(clone, model, x)
    train_step(clone, x, y)
    copy.deepcopy(clone)


def test_state_dict_round_trip_with_weights_only() -> None:
    model = bip_pruned_mlp()
    x, y = make_data()[0]
    train_step(model, x, y)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sorted(state) == sorted(model.state_dict())
    fresh = make_mlp()
    for layer in (fresh[0], fresh[2]):
        prune.identity(layer, "weight")
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda m: torchbip.bip_structured(m, "weight", amount=0.5, dim=0), id="filter"),
        pytest.param(lambda m: torchbip.bip_structured(m, "weight", amount=1, dim=1), id="channel"),
        pytest.param(lambda m: bip_semi_structured(m, "weight", 2, 4), id="2:4"),
    ],
)
def test_deepcopy_and_pickle_of_structured_methods_after_a_training_step(how: Any) -> None:
    model = make_mlp()
    how(model[0])
    x, y = make_data()[0]
    train_step(model, x, y)
    assert not model[0].weight.is_leaf  # what torch's own deepcopy rejects
    assert extras(model[0]) == {"forward_hooks": [], "scores": ["weight_scores"]}
    assert_same_model(copy.deepcopy(model), model, x)
    assert_same_model(pickle.loads(pickle.dumps(model)), model, x)
    prune.remove(model[0], "weight")
    assert extras(model[0]) == NOTHING
    assert sorted(model[0].state_dict()) == ["bias", "weight"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_model_under_a_live_bip_takes_a_new_bip_and_leaves_the_first_alone(how: str) -> None:
    """The copy's hooks carry no capture: a new BiP builds on the copy, and training the copy
    hands the first BiP no gradient."""
    model = make_mlp()
    pruner = torchbip.BiP(model, 0.6)
    (x, y), (x2, y2) = make_data()
    train_step(model, x, y)
    pruner.step()
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    train_step(clone, x2, y2)
    assert not pruner.has_grad  # the copy's backward pass reached only the copy
    second = torchbip.BiP(clone, 0.5)
    assert second.names == ["0.weight", "2.weight"]
    train_step(clone, x2, y2)
    assert second.has_grad
    assert not pruner.has_grad
    second.step()
    train_step(model, x2, y2)
    assert pruner.has_grad
    pruner.step()


# --- torch.compile and torch.jit.trace ---------------------------------------------------------------


def dense_twin(model: nn.Sequential) -> nn.Sequential:
    """The oracle: an unpruned copy of the MLP whose weights are ``weight_orig * weight_mask``."""
    twin = make_mlp()
    with torch.no_grad():
        for layer, plain in zip(model, twin, strict=True):
            if isinstance(layer, nn.Linear):
                pruned = hasattr(layer, "weight_mask")
                plain.weight.copy_(layer.weight_orig * layer.weight_mask if pruned else layer.weight)
                plain.bias.copy_(layer.bias)
    return twin


def has_cxx() -> bool:
    """Whether a C++ compiler is on PATH (inductor needs one on a CPU)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return any(os.access(os.path.join(d, "g++"), os.X_OK) for d in dirs)


BACKENDS = [
    "eager",
    "aot_eager",
    pytest.param(
        "inductor", marks=pytest.mark.skipif(not has_cxx(), reason="inductor on CPU needs a C++ compiler")
    ),
]


def prune_for_compile(model: nn.Sequential, how: str) -> torchbip.BiP | None:
    """Prune both layers; return the BiP that still steps (``live``), else ``None``."""
    if how == "bip_unstructured":
        for layer in (model[0], model[2]):
            bip_unstructured(layer, "weight", amount=0.6)
        return None
    pruner = torchbip.BiP(model, 0.6)
    if how == "finished":
        train_step(model, *make_data()[0])
        pruner.step()
        pruner.finish()
        return None
    return pruner


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["live", "finished", "bip_unstructured"])
def test_deepcopy_after_compiled_training_steps(backend: str, how: str) -> None:
    """own_model.rst: deepcopy works after training steps; in_loop.rst: torch.compile works.

    Without a live BiP the compiled model is one graph (``fullgraph=True``), as before; the copy
    computes what a dense model holding ``weight_orig * weight_mask`` computes.
    """
    torch._dynamo.reset()
    model = make_mlp()
    pruner = prune_for_compile(model, how)
    compiled = torch.compile(model, backend=backend, fullgraph=pruner is None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in make_data():
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        if pruner is not None:
            pruner.step()
    assert not model[0].weight.is_leaf  # what copy.deepcopy rejects without the guard

    clone = copy.deepcopy(model)

    assert clone[0].weight.is_leaf
    x, y = make_data()[1]
    oracle = dense_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), oracle(x), rtol=0, atol=0)
        torch.testing.assert_close(compiled(x), oracle(x))
    assert list(clone.state_dict()) == list(model.state_dict())
    # the copy trains (eagerly) and is copied again
    train_step(clone, x, y)
    assert clone[0].weight_orig.grad is not None
    copy.deepcopy(clone)
    torch._dynamo.reset()


def bip_on_top_of_l1(model: nn.Sequential) -> None:
    for layer in (model[0], model[2]):
        prune.l1_unstructured(layer, "weight", amount=0.3)
    torchbip.BiP(model, 0.6).finish()


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda m: bip_unstructured(m[0], "weight", amount=0.5), id="bip_unstructured"),
        pytest.param(lambda m: torchbip.bip_structured(m[2], "weight", amount=1, dim=1), id="bip_structured"),
        pytest.param(lambda m: bip_semi_structured(m[0], "weight", 2, 4), id="2:4"),
        pytest.param(lambda m: torchbip.BiP(m, 0.6).finish(), id="BiP-finished"),
        pytest.param(bip_on_top_of_l1, id="BiP-on-l1-container"),
    ],
)
def test_jit_trace_with_its_check_gives_the_dense_models_outputs(how: Callable[[nn.Sequential], Any]) -> None:
    """torch.jit.trace (check_trace=True, its default) works as on torch's own pruned form."""
    model = make_mlp()
    how(model)
    (x, _), (x2, _) = make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (TracerWarnings of torch's own code)
        traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x2), dense_twin(model)(x2), rtol=0, atol=0)
    # the module still deep-copies after an eager training step
    train_step(model, *make_data()[0])
    assert_same_model(copy.deepcopy(model), model, x2)
