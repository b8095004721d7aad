"""A failed call leaves the model exactly as it was, down to the memory its tensors live in.

``global_prune`` restores the model on any failure by writing the saved values back into the
original storage: a ``share_memory()`` model stays shared, pinned, ``channels_last``, strided
and tied or sliced parameters keep their storage, offsets, strides and sharing, gradients are
the same objects with the same bytes. ``load_slim_state_dict``, ``export_slim``, the CSR
conversion and the CSR layers' loading check everything first and change nothing when they
fail, also when an exception comes in the middle of the copying.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_state import assert_same_memory, assert_unchanged, capture, capture_memory
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip import bip_structured, export_slim, load_slim_state_dict
from torchbip._snapshot import ModelSnapshot, _same_view
from torchbip.export import _Planner
from torchbip.sparse import SparseCSRConv2d, SparseCSRLinear, to_sparse_csr

pytestmark = pytest.mark.usefixtures("one_thread")

RUN: dict[str, Any] = {"amount": 0.5, "steps": 6, "progress": False, "lower_lr": 0.1, "upper_lr": 1.0}


# --- models and data -----------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )


def data_for(model: nn.Module, n: int = 4, batch: int = 8) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    shape = (3, 6, 6) if isinstance(model[0], nn.Conv2d) else (8,)  # type: ignore[index]
    return [
        (torch.randn(batch, *shape, generator=gen), torch.randint(0, 3, (batch,), generator=gen))
        for _ in range(n)
    ]


def with_grads(model: nn.Module) -> nn.Module:
    """One backward pass, so that gradients exist and are checked too."""
    x, y = data_for(model)[0]
    F.cross_entropy(model(x), y).backward()
    return model


class FailingLoader:
    """Good batches, then at draw ``at``: ``before()`` (e.g. a change to the model), then ``exc``."""

    def __init__(self, batches: list[Any], at: int, exc: BaseException, before: Callable[[], Any] = list):
        self.batches, self.at, self.exc, self.before, self.draws = batches, at, exc, before, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.draws += 1
            if self.draws == self.at:
                self.before()
                raise self.exc
            yield batch


def failing_loss(at: int, exc: BaseException) -> Callable[[Tensor, Tensor], Tensor]:
    calls = [0]

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        calls[0] += 1
        if calls[0] == at:
            raise exc
        return F.cross_entropy(outputs, targets)

    return loss_fn


def nan_loss(at: int) -> Callable[[Tensor, Tensor], Tensor]:
    calls = [0]

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        calls[0] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if calls[0] >= at else loss

    return loss_fn


# Each failure: (keyword arguments of global_prune given the model's data, exception, message).
FAILURES = [
    pytest.param(
        lambda d: {"loader": FailingLoader(d, 3, RuntimeError("disk on fire"))},
        RuntimeError,
        "^disk on fire$",
        id="loader-raises-at-step-3",
    ),
    pytest.param(
        lambda d: {"loader": FailingLoader(d, 3, KeyboardInterrupt())},
        KeyboardInterrupt,
        "^$",
        id="loader-interrupt",
    ),
    pytest.param(
        lambda d: {"loader": d, "loss_fn": failing_loss(4, KeyError("label"))},
        ValueError,
        "loss_fn failed on a batch from loader at step 3",
        id="loss-fn-raises",
    ),
    pytest.param(
        lambda d: {"loader": d, "loss_fn": failing_loss(2, KeyboardInterrupt())},
        KeyboardInterrupt,
        "^$",
        id="loss-fn-interrupt",
    ),
    pytest.param(
        lambda d: {"loader": d, "loss_fn": nan_loss(3)},
        FloatingPointError,
        "non-finite loss",
        id="nan-loss",
    ),
]
MODELS = [pytest.param(mlp, id="mlp-bn"), pytest.param(cnn, id="cnn-bn")]


def fail_and_check(
    model: nn.Module, kwargs: dict[str, Any], exc: type[BaseException], match: str
) -> dict[str, dict[str, Any]]:
    """Run a failing ``global_prune``; check objects, values and memory are as before."""
    before, memory = capture(model), capture_memory(model)
    with pytest.raises(exc, match=match):
        torchbip.global_prune(model, **{**RUN, **kwargs})
    assert_unchanged(before, model)
    assert_same_memory(memory, model)
    return memory


def train_step(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    """One ordinary SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def assert_next_step_as_if_nothing_happened(model: nn.Module, untouched: nn.Module) -> None:
    """The next training step gives bitwise what it gives on a copy that never saw the failure."""
    batch = data_for(model)[1]
    train_step(model, batch)
    train_step(untouched, batch)
    for (name, got), want in zip(model.state_dict().items(), untouched.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    for (name, p), q in zip(model.named_parameters(), untouched.parameters(), strict=True):
        assert p.grad is not None, name
        assert q.grad is not None, name
        assert torch.equal(p.grad, q.grad), name


# --- global_prune: memory after a failure --------------------------------------------------------


@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize(("kwargs", "exc", "match"), FAILURES)
def test_shared_memory_model_stays_shared(
    build: Callable[[], nn.Module], kwargs: Callable[[Any], dict[str, Any]], exc: type, match: str
) -> None:
    model = with_grads(build()).share_memory()
    untouched = copy.deepcopy(model)
    fail_and_check(model, kwargs(data_for(model)), exc, match)
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())]
    assert all(t is not None and t.is_shared() for t in tensors)
    assert_next_step_as_if_nothing_happened(model, untouched)
    assert all(p.is_shared() for p in model.parameters())  # the step ran in the shared memory


@pytest.mark.parametrize(("kwargs", "exc", "match"), FAILURES[:3])
def test_channels_last_conv_keeps_its_memory_format(
    kwargs: Callable[[Any], dict[str, Any]], exc: type, match: str
) -> None:
    model = with_grads(cnn().to(memory_format=torch.channels_last))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert all(not c.weight.is_contiguous() for c in convs)  # channels_last is not the default layout
    untouched = copy.deepcopy(model)
    fail_and_check(model, kwargs(data_for(model)), exc, match)
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert conv.weight.grad is not None
        assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert_next_step_as_if_nothing_happened(model, untouched)


class Views(nn.Module):
    """Parameters that are views of one flat tensor: sliced, transposed (strided) and tied."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flat = torch.randn(16 * 8 + 16 + 16 * 3)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 3)
        self.a.weight = nn.Parameter(self.flat[:128].view(16, 8))
        self.a.bias = nn.Parameter(self.flat[128:144])
        self.b.weight = nn.Parameter(self.flat[144:].view(16, 3).t())  # strides (1, 3)
        self.tied = nn.Linear(16, 3)
        self.tied.weight = self.b.weight
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        return self.frozen(self.b(h) + self.tied(h))


def test_views_of_one_tensor_keep_their_storage_strides_and_sharing() -> None:
    model = Views()
    batches = [(torch.randn(8, 8), torch.randint(0, 3, (8,))) for _ in range(4)]
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    untouched = copy.deepcopy(model)
    loader = FailingLoader(batches, 3, RuntimeError("stop"))
    memory = fail_and_check(
        model, {"loader": loader, "parameters": [(model.a, "weight")]}, RuntimeError, "stop"
    )
    assert loader.draws == 3
    base = model.flat.untyped_storage().data_ptr()
    for key in ("a.weight", "a.bias", "b.weight", "tied.weight"):
        assert memory[key]["storage"] == base, key
    assert model.b.weight.stride() == (1, 3)
    assert model.tied.weight is model.b.weight
    assert model.frozen.weight.requires_grad is False
    assert torch.equal(model.flat, untouched.flat)
    with torch.no_grad():
        model.flat[144] = 123.0  # still views: a write to the flat tensor shows in the parameter
    assert model.b.weight[0, 0] == 123.0


def test_device_cpu_on_a_cpu_model_then_a_failure() -> None:
    model = with_grads(mlp()).share_memory()
    loader = FailingLoader(data_for(model), 3, RuntimeError("after the no-op move"))
    fail_and_check(model, {"loader": loader, "device": "cpu"}, RuntimeError, "no-op move")
    assert all(p.is_shared() for p in model.parameters())


def test_memory_swapped_during_the_run_is_put_back() -> None:
    """The loader moves the model to float64 (new storage for every tensor), then raises."""
    model = with_grads(mlp()).share_memory()
    untouched = copy.deepcopy(model)
    loader = FailingLoader(data_for(model), 3, RuntimeError("moved"), before=model.double)
    fail_and_check(model, {"loader": loader}, RuntimeError, "moved")
    assert loader.draws == 3
    assert all(p.dtype == torch.float32 and p.is_shared() for p in model.parameters())
    assert_next_step_as_if_nothing_happened(model, untouched)


def test_grads_are_the_same_objects_with_the_same_bytes() -> None:
    model = with_grads(mlp())
    grads = {n: p.grad for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight.grad[0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    memory = capture_memory(model)  # bitwise: NaN equals NaN, -0.0 differs from 0.0
    with pytest.raises(RuntimeError, match="x"):
        torchbip.global_prune(model, **RUN, loader=FailingLoader(data_for(model), 3, RuntimeError("x")))
    assert_same_memory(memory, model)
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert torch.signbit(model[0].weight.grad[0, 1])  # -0.0 stays -0.0


class Scaled(nn.Parameter):
    """A Parameter subclass (e.g. of a quantisation or sharding library)."""


def test_parameter_subclasses_and_flags_survive() -> None:
    model = with_grads(mlp())
    model[3].bias = Scaled(model[3].bias.detach().clone())
    model[1].weight.requires_grad_(False)
    fail_and_check(model, {"loader": FailingLoader(data_for(model), 4, ValueError("v"))}, ValueError, "v")
    assert type(model[3].bias) is Scaled
    assert model[1].weight.requires_grad is False


def test_snapshot_holds_one_copy_of_the_values() -> None:
    model = Views()
    F.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
    distinct: dict[int, Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        distinct[id(t)] = t
        if t.grad is not None:
            distinct[id(t.grad)] = t.grad
    want = sum(t.numel() * t.element_size() for t in distinct.values())
    snapshot = ModelSnapshot(model)
    assert snapshot.nbytes == want  # the tied weight once, its gradient once
    # and restoring allocates no new memory for the model: it copies into what is there
    memory = capture_memory(model)
    with torch.no_grad():
        model.a.weight.add_(1.0)
        model.b.weight.grad = None
    snapshot.restore()
    assert_same_memory(memory, model)


class Wrapper(Tensor):
    """A wrapper tensor subclass: its metadata is a strided tensor's, its storage holds no data."""

    @staticmethod
    def __new__(cls, elem: Tensor) -> Wrapper:
        return Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, elem.shape, strides=elem.stride(), dtype=elem.dtype, device=elem.device
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # A wrapper that holds no data: the check under test must answer from metadata alone.
        # An AssertionError, which the check does not catch (it handles NotImplementedError).
        raise AssertionError(f"the check ran {func} on a tensor that holds no data")


class BrokenStorage(Tensor):
    """A tensor whose storage fails for a reason other than having none."""

    def untyped_storage(self) -> Any:
        raise RuntimeError("the storage is broken")


class RefusedStorage(Tensor):
    """A tensor whose storage raises NotImplementedError for a reason other than having none."""

    def untyped_storage(self) -> Any:
        # Deliberate test double: the refusal is the behaviour under test.
        raise NotImplementedError("this subclass refuses storage access")


def test_same_view_of_a_tensor_subclass_without_a_storage_is_false() -> None:
    plain = torch.zeros(3)
    wrapped = Wrapper(plain)
    assert wrapped.layout == torch.strided
    assert wrapped.shape == plain.shape
    with pytest.raises(RuntimeError, match="invalid python storage"):
        wrapped.untyped_storage().data_ptr()
    assert _same_view(plain, plain.data)
    assert not _same_view(wrapped, wrapped)
    assert not _same_view(wrapped, plain)
    assert not _same_view(plain, wrapped)


def test_same_view_of_functorch_wrappers_is_false() -> None:
    seen: list[bool] = []

    def probe(x: Tensor) -> Tensor:
        seen.append(_same_view(x, x))
        return x.sum()

    torch.func.grad(probe)(torch.zeros(3))
    torch.func.vmap(probe)(torch.zeros(2, 3))
    assert seen == [False, False]


def test_same_view_lets_other_storage_errors_through() -> None:
    broken = torch.zeros(3).as_subclass(BrokenStorage)
    with pytest.raises(RuntimeError, match="the storage is broken"):
        _same_view(broken, torch.zeros(3))
    refused = torch.zeros(3).as_subclass(RefusedStorage)
    with pytest.raises(NotImplementedError, match="refuses storage access"):
        _same_view(refused, torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_memory_and_a_move_to_the_gpu_are_undone() -> None:
    model = with_grads(mlp())
    for p in model.parameters():
        p.data = p.data.pin_memory()
    assert all(p.is_pinned() for p in model.parameters())
    loader = FailingLoader(data_for(model), 3, RuntimeError("gpu"))
    fail_and_check(model, {"loader": loader, "device": "cuda"}, RuntimeError, "gpu")
    assert all(p.is_pinned() and p.device.type == "cpu" for p in model.parameters())


# --- load_slim_state_dict -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slim_state() -> dict[str, Tensor]:
    """The state dict of a slim export of :func:`cnn` (half the filters of both convolutions)."""
    pytest.importorskip("torch_pruning")
    with torch.random.fork_rng(devices=[]):
        model = cnn()
        for conv in (model[0], model[3]):
            bip_structured(conv, "weight", amount=0.5, dim=0)
        slim = export_slim(model.eval(), torch.randn(2, 3, 6, 6))
    return {k: v.clone() for k, v in slim.state_dict().items()}


def with_(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(state)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del out[key]
        else:
            out[key] = value(out.get(key)) if callable(value) else value
    return out


LOAD_FAILURES = [
    pytest.param(
        lambda s: {**s, "9.weight": torch.ones(1)},
        ValueError,
        r"state_dict has unexpected key\(s\) \['9.weight'\]",
        id="unexpected-key",
    ),
    pytest.param(
        lambda s: with_(s, **{"1__running_var": None}),
        ValueError,
        r"state_dict is missing key\(s\) \['1.running_var'\]",
        id="missing-key",
    ),
    pytest.param(
        lambda s: with_(s, **{"0__weight": lambda w: w[0]}),
        ValueError,
        r"state_dict\['0.weight'\] has shape \(3, 3, 3\) with 3 dimensions",
        id="wrong-rank",
    ),
    pytest.param(
        lambda s: with_(s, **{"7__weight": torch.zeros(3, 999)}),
        ValueError,
        r"state_dict\['7.weight'\] has shape \(3, 999\), which export_slim cannot produce",
        id="larger-than-the-model",
    ),
    pytest.param(
        lambda s: with_(s, **{"1__running_mean": lambda t: t[:2]}),
        ValueError,
        r"do not make a BatchNorm2d: weight, bias, running_mean and running_var need one length",
        id="inconsistent-batchnorm",
    ),
    pytest.param(
        lambda s: with_(s, **{"3__weight": lambda w: w[:, :, :1, :1]}),
        ValueError,
        r"do not make a Conv2d: the kernel size must stay \(3, 3\)",
        id="kernel-size",
    ),
    pytest.param(
        lambda s: with_(s, **{"7__bias": torch.zeros(2)}),
        ValueError,
        r"do not make a Linear: the bias must have shape \(3,\)",
        id="bias-shape",
    ),
    pytest.param(
        lambda s: with_(s, **{"0__weight": lambda w: w.long()}),
        ValueError,
        r"state_dict\['0.weight'\] has dtype torch.int64, the model's tensor torch.float32",
        id="int-into-float",
    ),
    pytest.param(
        lambda s: with_(s, **{"1__num_batches_tracked": torch.tensor(1.5)}),
        ValueError,
        r"floating-point values do not load into integer ones",
        id="float-into-int-buffer",
    ),
    pytest.param(
        lambda s: with_(s, **{"0__weight": lambda w: w.to("meta")}),
        ValueError,
        r"state_dict\['0.weight'\] is a meta tensor",
        id="meta-value",
    ),
    pytest.param(
        lambda s: with_(s, **{"7__weight": lambda w: w.to_sparse_csr()}),
        ValueError,
        r"state_dict\['7.weight'\] is a sparse_csr tensor, the model's is dense",
        id="sparse-into-dense",
    ),
    pytest.param(
        lambda s: with_(s, **{"0__bias": [0.0] * 4}),
        TypeError,
        r"state_dict\['0.bias'\] must be a tensor, got list",
        id="non-tensor-value",
    ),
    pytest.param(
        lambda s: {**s, 7: torch.ones(1)},
        TypeError,
        r"state_dict keys must be strings, got 7 of type int",
        id="non-string-key",
    ),
    pytest.param(
        lambda s: list(s.items()),
        TypeError,
        r"state_dict must be a mapping of names to tensors, got list",
        id="not-a-mapping",
    ),
]


def fresh_cnn() -> nn.Module:
    return with_grads(cnn()).share_memory()


def check_then_load_good(
    model: nn.Module, state: dict[str, Tensor], want: dict[str, Tensor] | None = None
) -> None:
    """After the failure the same model loads the good state dict (and then holds ``want``)."""
    load_slim_state_dict(model, state)
    want = state if want is None else want
    assert set(model.state_dict()) == set(want)
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize(("change", "exc", "match"), LOAD_FAILURES)
def test_load_slim_state_dict_that_fails_changes_nothing(
    slim_state: dict[str, Tensor], change: Callable[[dict[str, Any]], Any], exc: type, match: str
) -> None:
    model = fresh_cnn()
    before, memory = capture(model), capture_memory(model)
    with pytest.raises(exc, match=match):
        load_slim_state_dict(model, change(slim_state))
    assert_unchanged(before, model)
    assert_same_memory(memory, model)
    assert (model[0].out_channels, model[1].num_features, model[7].in_features) == (8, 8, 128)
    check_then_load_good(model, slim_state)


def test_load_slim_state_dict_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got dict"):
        load_slim_state_dict({}, {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc", [RuntimeError("copy failed"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_an_exception_in_the_middle_of_the_copying_is_undone(
    slim_state: dict[str, Tensor], exc: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fresh_cnn()
    before, memory = capture(model), capture_memory(model)
    copy_ = torch.Tensor.copy_
    calls = [0]

    def failing_copy(self: Tensor, src: Tensor, non_blocking: bool = False) -> Tensor:
        calls[0] += 1
        if calls[0] == 6:  # a few tensors are in: the resized ones and some values
            raise exc
        return copy_(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(type(exc)):
        load_slim_state_dict(model, slim_state)
    monkeypatch.undo()
    assert calls[0] >= 6
    assert_unchanged(before, model)
    assert_same_memory(memory, model)
    check_then_load_good(model, slim_state)


def test_a_layer_that_fails_to_load_is_undone(
    slim_state: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception from a module's own loader (here the second BatchNorm's) after others loaded."""
    model = fresh_cnn()
    before, memory = capture(model), capture_memory(model)
    load = nn.BatchNorm2d._load_from_state_dict

    def failing(self: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        if prefix == "4.":
            raise KeyboardInterrupt
        load(self, state_dict, prefix, *args)

    monkeypatch.setattr(nn.BatchNorm2d, "_load_from_state_dict", failing)
    with pytest.raises(KeyboardInterrupt):
        load_slim_state_dict(model, slim_state)
    monkeypatch.undo()
    assert_unchanged(before, model)
    assert_same_memory(memory, model)


def test_a_model_with_its_own_key_hooks_fails_as_torch_says_and_changes_nothing(
    slim_state: dict[str, Tensor],
) -> None:
    """A load pre-hook may rename keys: the key check is then torch's, the undo still ours."""
    model = fresh_cnn()

    def rename(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "legacy_bias" in state_dict:
            state_dict[prefix + "bias"] = state_dict.pop(prefix + "legacy_bias")

    model[7]._register_load_state_dict_pre_hook(rename)
    renamed = {("7.legacy_bias" if k == "7.bias" else k): v for k, v in slim_state.items()}
    before, memory = capture(model), capture_memory(model)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_slim_state_dict(model, {**renamed, "extra": torch.ones(1)})
    assert_unchanged(before, model)
    assert_same_memory(memory, model)
    check_then_load_good(model, renamed, slim_state)  # the hook's renaming is honoured


def test_a_successful_load_keeps_the_memory_of_unchanged_shapes() -> None:
    """Tensors whose shape stays are filled in place: shared memory and storages are kept."""
    model = with_grads(mlp()).share_memory()
    memory = capture_memory(model)
    source = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    load_slim_state_dict(model, source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    after = capture_memory(model)
    assert all(after[k]["storage"] == memory[k]["storage"] and after[k]["shared"] for k in memory)


class TiedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(8, 6)
        self.b.weight = self.a.weight


def test_a_tied_weight_stays_tied_when_resized() -> None:
    model = TiedPair()
    weight = torch.randn(4, 8)
    state = {"a.weight": weight, "a.bias": torch.zeros(4), "b.weight": weight, "b.bias": torch.ones(4)}
    load_slim_state_dict(model, state)
    assert model.b.weight is model.a.weight
    assert torch.equal(model.a.weight, weight)
    assert (model.a.out_features, model.b.out_features) == (4, 4)


def test_a_tied_weight_with_two_shapes_is_rejected() -> None:
    model = TiedPair()
    before, memory = capture(model), capture_memory(model)
    state = {"a.weight": torch.randn(4, 8), "a.bias": torch.zeros(4)}
    state |= {"b.weight": torch.randn(5, 8), "b.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"state_dict\['b.weight'\] has shape \(5, 8\) but .*'a.weight'"):
        load_slim_state_dict(model, state)
    assert_unchanged(before, model)
    assert_same_memory(memory, model)


# --- export_slim ------------------------------------------------------------------------------------


def pruned_after_a_backward() -> nn.Module:
    """Torch's own structured pruning, then a forward and backward pass: non-leaf ``weight``s."""
    model = cnn()
    for conv in (model[0], model[3]):
        prune.ln_structured(conv, "weight", amount=0.5, n=1, dim=0)
    return with_grads(model)


def test_export_slim_reads_the_model_and_writes_nothing() -> None:
    pytest.importorskip("torch_pruning")
    model = pruned_after_a_backward()
    assert model[0].weight.grad_fn is not None
    before, memory = capture(model), capture_memory(model)
    slim = export_slim(model, torch.randn(2, 3, 6, 6))
    assert slim[0].out_channels == 4
    assert_unchanged(before, model)  # also the non-leaf ``weight`` attributes: the same objects
    assert_same_memory(memory, model)


@pytest.mark.parametrize("where", ["fold", "verify"])
def test_export_slim_failing_in_the_middle_changes_nothing(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch_pruning")
    model = pruned_after_a_backward()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)  # nonzero constants: the plan folds them
    before, memory = capture(model), capture_memory(model)
    if where == "fold":

        def fold(plan: Any) -> None:
            raise RuntimeError("fold failed")

        monkeypatch.setattr("torchbip.export._fold", fold)
        match = "fold failed"
    else:

        def accept_everything(self: _Planner, group: Any) -> tuple[list[int], dict[Any, Any]]:
            return sorted({r for item in group for r in item.root_idxs}), {}

        monkeypatch.setattr(_Planner, "judge", accept_everything)
        match = "differ from the masked model"
    with pytest.raises(RuntimeError, match=match):
        export_slim(model.eval(), torch.randn(2, 3, 6, 6))
    model.train()
    assert_unchanged(before, model)
    assert_same_memory(memory, model)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        pytest.param({"model": "net"}, TypeError, "model must be an nn.Module, got str", id="model"),
        pytest.param(
            {"example_inputs": [torch.ones(1)]},
            TypeError,
            "example_inputs must be a tensor or a tuple",
            id="inputs",
        ),
        pytest.param(
            {"ignored_layers": [3]}, TypeError, "ignored_layers must hold modules, got 3", id="ignored"
        ),
        pytest.param(
            {"ignored_layers": nn.Linear(1, 1)},
            TypeError,
            "ignored_layers must be an iterable",
            id="ignored-module",
        ),
        pytest.param({"verify": "yes"}, TypeError, "verify must be a bool, got 'yes'", id="verify"),
        pytest.param({"rtol": -1.0}, ValueError, r"rtol must be a finite number >= 0, got -1\.0", id="rtol"),
        pytest.param(
            {"atol": float("nan")}, ValueError, "atol must be a finite number >= 0, got nan", id="atol"
        ),
        pytest.param(
            {"rtol": np.bool_(True)},
            ValueError,
            "rtol must be a finite number >= 0, got",
            id="rtol-numpy-bool",
        ),
    ],
)
def test_export_slim_bad_arguments(kwargs: dict[str, Any], exc: type, match: str) -> None:
    model = pruned_after_a_backward()
    before, memory = capture(model), capture_memory(model)
    call = {"model": model, "example_inputs": torch.randn(2, 3, 6, 6), **kwargs}
    with pytest.raises(exc, match=match):
        export_slim(call.pop("model"), call.pop("example_inputs"), **call)
    assert_unchanged(before, model)
    assert_same_memory(memory, model)


def test_export_slim_takes_numpy_tolerances() -> None:
    model = pruned_after_a_backward()
    x = torch.randn(2, 3, 6, 6)
    slim = export_slim(model, x, rtol=np.float32(1e-4), atol=np.float64(1e-5))
    model.eval()
    slim.eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), rtol=1e-4, atol=1e-5)


# --- CSR: conversion and loading -----------------------------------------------------------------


def test_to_sparse_csr_reads_the_model_and_writes_nothing() -> None:
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.95)
    with_grads(model)
    before, memory = capture(model), capture_memory(model)
    csr = to_sparse_csr(model)
    assert isinstance(csr[0], SparseCSRLinear)
    assert_unchanged(before, model)
    assert_same_memory(memory, model)


def csr_layer(seed: int = 0) -> SparseCSRLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 8, generator=gen) * (torch.rand(4, 8, generator=gen) > 0.7)
    return SparseCSRLinear(weight, torch.randn(4, generator=gen))


CSR_FAILURES = [
    pytest.param(
        lambda s: {**s, "bias": torch.zeros(5)}, RuntimeError, "size mismatch for bias", id="bias-shape"
    ),
    pytest.param(
        lambda s: {**s, "weight": s["weight"].to_dense().long()},
        RuntimeError,
        "weight: a torch.int64 tensor does not load into this layer's torch.float32 CSR weight",
        id="int-weight",
    ),
    pytest.param(
        lambda s: {**s, "weight": torch.zeros(4, 9).to_sparse_csr()},
        RuntimeError,
        "size mismatch for weight",
        id="weight-shape",
    ),
    pytest.param(
        lambda s: {**s, "extra": torch.ones(1)}, RuntimeError, "Unexpected key", id="unexpected-key"
    ),
]


@pytest.mark.parametrize(("change", "exc", "match"), CSR_FAILURES)
def test_csr_layer_that_fails_to_load_keeps_its_buffers(
    change: Callable[[dict[str, Tensor]], dict[str, Tensor]], exc: type, match: str
) -> None:
    """A CSR layer on its own: every failure leaves its weight and bias as they were."""
    layer = csr_layer()
    state = csr_layer(seed=1).state_dict()
    before, memory = capture(layer), capture_memory(layer)
    with pytest.raises(exc, match=match):
        layer.load_state_dict(change(state))
    assert_unchanged(before, layer)
    assert_same_memory(memory, layer)


def test_csr_layer_loading_interrupted_in_the_middle(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = csr_layer()
    before, memory = capture(layer), capture_memory(layer)
    copy_ = torch.Tensor.copy_
    calls = [0]

    def failing_copy(self: Tensor, src: Tensor, non_blocking: bool = False) -> Tensor:
        calls[0] += 1
        if calls[0] == 1:  # the bias, after the new weight was staged
            raise KeyboardInterrupt
        return copy_(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        layer.load_state_dict(csr_layer(seed=1).state_dict())
    monkeypatch.undo()
    assert_unchanged(before, layer)
    assert_same_memory(memory, layer)


def test_load_slim_state_dict_into_a_csr_model_is_all_or_nothing() -> None:
    """A whole CSR model: a bad key anywhere changes no layer; the good state dict loads."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    source = copy.deepcopy(model)
    for m in (model, source):
        prune.l1_unstructured(m[0], "weight", amount=0.95 if m is model else 0.97)
    csr, other = to_sparse_csr(model), to_sparse_csr(source)
    assert isinstance(csr[0], SparseCSRLinear)
    assert isinstance(other[0], SparseCSRLinear)
    before, memory = capture(csr), capture_memory(csr)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['2.extra'\]"):
        load_slim_state_dict(csr, {**other.state_dict(), "2.extra": torch.ones(1)})
    assert_unchanged(before, csr)
    assert_same_memory(memory, csr)
    load_slim_state_dict(csr, other.state_dict())  # another number of nonzeros
    x = torch.randn(5, 8)
    assert torch.equal(csr(x), other(x))


def csr_cnn() -> nn.Module:
    """Every layer of a small CNN as a CSR layer (convolutions and the linear head)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    return to_sparse_csr(model, min_sparsity=0.0, include_conv=True)


def csr_sizes(model: nn.Module) -> list[tuple[int, int]]:
    return [
        (m.in_channels, m.out_channels) if isinstance(m, SparseCSRConv2d) else (m.in_features, m.out_features)
        for m in model
        if isinstance(m, SparseCSRConv2d | SparseCSRLinear)
    ]


def _csr_weight(columns: int) -> Callable[[Tensor], Tensor]:
    return lambda w: w.to_dense()[:, :columns].to_sparse_csr()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(
            lambda s: with_(s, **{"2__weight": _csr_weight(70)}),
            r"do not make a SparseCSRConv2d: the kernel size must stay \(3, 3\): 70 weight columns",
            id="conv-columns",
        ),
        pytest.param(
            lambda s: with_(s, **{"0__bias": lambda b: b[:5]}),
            r"do not make a SparseCSRConv2d: the bias must have shape \(8,\)",
            id="conv-bias",
        ),
        pytest.param(
            lambda s: with_(s, **{"4__bias": lambda b: b[:2]}),
            r"do not make a SparseCSRLinear: the bias must have shape \(3,\)",
            id="linear-bias",
        ),
        pytest.param(
            lambda s: with_(s, **{"2__weight": _csr_weight(45), "4__weight": _csr_weight(40)}),
            "interrupted",
            id="interrupted-after-resizing",
        ),
    ],
)
def test_load_slim_state_dict_into_csr_layers_checks_their_shapes_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[dict[str, Any]], Any], match: str
) -> None:
    """The CSR layers' shapes are checked as the dense layers' are; a load that fails leaves their
    tensors and their sizes as they were."""
    model = csr_cnn()
    state = change(csr_cnn().state_dict())
    if match == "interrupted":  # shapes a slim export gives: the load fails after the resizing

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            assert csr_sizes(model) == [(3, 8), (5, 4), (40, 3)]  # resized by then
            raise KeyboardInterrupt("interrupted")

        monkeypatch.setattr(model, "load_state_dict", interrupted)
    before, sizes = capture(model), csr_sizes(model)
    with pytest.raises(KeyboardInterrupt if match == "interrupted" else ValueError, match=match):
        load_slim_state_dict(model, state)
    assert_unchanged(before, model)
    assert csr_sizes(model) == sizes == [(3, 8), (8, 4), (64, 3)]


# --- make_permanent --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [RuntimeError("remove failed"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_make_permanent_that_fails_halfway_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    from torchbip.export import make_permanent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    torchbip.bip_unstructured(model[2], "weight", amount=0.25)
    prune.l1_unstructured(torchbip.bip_unstructured(model[4], "weight", amount=3), "weight", amount=2)
    model(torch.randn(2, 8)).sum().backward()
    before, memory = capture(model), capture_memory(model)
    original = prune.remove
    calls = {"n": 0}

    def flaky(module: nn.Module, name: str) -> nn.Module:
        calls["n"] += 1
        if calls["n"] == 2:  # the first tensor is already permanent by then
            raise exc
        return original(module, name)

    monkeypatch.setattr(prune, "remove", flaky)
    with pytest.raises(type(exc)):
        make_permanent(model)
    assert calls["n"] == 2
    assert_unchanged(before, model)
    assert_same_memory(memory, model)
    monkeypatch.setattr(prune, "remove", original)
    make_permanent(model)  # and it works afterwards
    assert not any(prune.is_pruned(m) for m in model.modules())


def test_make_permanent_rejects_a_non_module() -> None:
    from torchbip.export import make_permanent

    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got dict"):
        make_permanent({})  # type: ignore[arg-type]


# --- ModelSnapshot: module classes, hooks and their flags ---------------------------------------


def test_restore_puts_back_a_lazy_layer_that_a_forward_pass_materialised() -> None:
    """Oracle: a fresh lazy model, which infers its sizes from the next input it sees."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    weight = model[0].weight
    snapshot = ModelSnapshot(model)
    model(torch.randn(2, 5))  # LazyLinear -> Linear, its initialisation hook removes itself
    snapshot.restore()
    assert type(model[0]) is nn.LazyLinear
    assert model[0].weight is weight
    assert type(weight) is nn.UninitializedParameter
    assert model(torch.randn(2, 7)).shape == (2, 2)  # sizes inferred again, from the new input
    assert model[0].in_features == 7
    assert type(model[0]) is nn.Linear


def test_restore_of_an_uninitialised_lazy_layer_keeps_it_lazy() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    snapshot = ModelSnapshot(model)
    model[0].weight.requires_grad = False
    snapshot.restore()  # (torch refuses to read an uninitialised parameter's memory)
    assert type(model[0].weight) is nn.UninitializedParameter
    assert model[0].weight.requires_grad


def test_restore_keeps_the_flags_of_a_hook_that_removed_itself() -> None:
    """A ``with_kwargs`` hook put back without its flag would be called with other arguments."""
    layer = nn.Linear(4, 2)
    seen: list[dict[str, Any]] = []

    def once(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(kwargs)
        handle.remove()

    handle = layer.register_forward_pre_hook(once, with_kwargs=True)
    always = layer.register_forward_hook(lambda *_: None, always_call=True)
    snapshot = ModelSnapshot(layer)
    layer(torch.randn(1, 4))
    always.remove()
    snapshot.restore()
    assert list(layer._forward_pre_hooks) == list(layer._forward_pre_hooks_with_kwargs) == [handle.id]
    assert list(layer._forward_hooks) == list(layer._forward_hooks_always_called) == [always.id]
    layer(torch.randn(1, 4))  # the hook is called with its keyword arguments, and removes itself
    assert seen == [{}, {}]
    assert not layer._forward_pre_hooks


def test_restore_drops_backward_state_dict_and_gradient_hooks_added_during_the_run() -> None:
    torch.manual_seed(0)
    model = mlp()
    weight = model[0].weight
    kept = weight.register_hook(lambda g: g)
    snapshot = ModelSnapshot(model)
    model[0].register_full_backward_hook(lambda *_: None)
    model[1].register_full_backward_pre_hook(lambda *_: None)
    model.register_state_dict_pre_hook(lambda *_: None)
    model[3].register_load_state_dict_post_hook(lambda *_: None)
    weight.register_hook(lambda g: g * 0)
    model[3].bias.register_post_accumulate_grad_hook(lambda p: None)
    snapshot.restore()
    for module in model.modules():
        assert not module._backward_hooks
        assert not module._backward_pre_hooks
        assert not module._state_dict_pre_hooks
        assert not module._load_state_dict_post_hooks
    assert list(weight._backward_hooks) == [kept.id]
    assert not model[3].bias._post_accumulate_grad_hooks
    F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    assert weight.grad is not None
    assert weight.grad.abs().sum() > 0


def test_restore_puts_back_submodules_and_parametrizations() -> None:
    """Oracle: a deep copy taken before, compared on classes, children, parameters and outputs."""
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.triu() + x.triu(1).t()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    parametrize.register_parametrization(model[2], "weight", Symmetric())
    parametrize.register_parametrization(model[2], "bias", nn.Identity())
    before = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    params = list(model.parameters())
    x = torch.randn(3, 4)
    snapshot = ModelSnapshot(model)
    model[1] = nn.Tanh()
    model.add_module("extra", nn.Linear(4, 1))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    parametrize.remove_parametrizations(model[2], "weight")  # its class loses the property
    snapshot.restore()
    assert [type(m) for m in model.modules()] == classes
    assert list(model.parameters()) == params
    assert [n for n, _ in model.named_modules()] == [n for n, _ in before.named_modules()]
    assert parametrize.is_parametrized(model[2], "weight")
    assert not parametrize.is_parametrized(model[0])
    assert torch.equal(model[2].weight, before[2].weight)
    assert torch.equal(model(x), before(x))
