"""``torchbip.data``: moving batches to a device and passing their inputs to the model.

Oracles: the container types and field values built by hand, the ``meta`` device (every tensor
leaf must land there, whatever container holds it), and the arguments a model records.
"""

from __future__ import annotations

import collections
import collections.abc
import types
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from torchbip.data import BatchStream, describe, model_args, targets_digest, to_device

META = torch.device("meta")
Pair = collections.namedtuple("Pair", "label weight")


class Typed(NamedTuple):
    image: Tensor
    name: str


class Tagged(tuple):
    """A tuple subclass whose constructor takes no iterable of items."""

    def __new__(cls, tag: str, *items: Any) -> Tagged:
        return super().__new__(cls, items)


class Items(list):
    pass


def leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in leaves(v)]
    if isinstance(value, collections.abc.Mapping):
        return [leaf for v in value.values() for leaf in leaves(v)]
    return [value]


def t(*values: float) -> Tensor:
    return torch.tensor(values)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        pytest.param(Pair(t(1), t(0.5)), Pair, id="namedtuple"),
        pytest.param(Typed(t(1, 2), "a"), Typed, id="typing-NamedTuple"),
        pytest.param((t(1), [t(2), "x"]), tuple, id="tuple-of-list"),
        pytest.param(Items([t(1), 3]), Items, id="list-subclass"),
        pytest.param(collections.OrderedDict(b=t(1), a=t(2)), collections.OrderedDict, id="OrderedDict"),
        pytest.param(collections.UserDict(x=t(1)), collections.UserDict, id="UserDict"),
        pytest.param(types.MappingProxyType({"x": t(1)}), dict, id="read-only-mapping"),
        pytest.param(Tagged("tag", t(1), t(2)), tuple, id="tuple-subclass-other-constructor"),
        pytest.param(
            {"inputs": [Pair(t(1), {"w": t(2)})], "targets": (Typed(t(3), "b"),)}, dict, id="nested"
        ),
    ],
)
def test_to_device_moves_every_tensor_and_keeps_the_containers(value: Any, kind: type) -> None:
    moved = to_device(value, META)
    assert type(moved) is kind
    before, after = leaves(value), leaves(moved)
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        if isinstance(old, Tensor):
            assert new.is_meta
            assert (new.shape, new.dtype) == (old.shape, old.dtype)
        else:
            assert new is old
    if isinstance(value, collections.abc.Mapping):
        assert list(moved) == list(value)  # the keys in their order
    if hasattr(kind, "_fields"):
        assert moved._fields == kind._fields


def test_to_device_keeps_a_defaultdicts_factory() -> None:
    value = collections.defaultdict(list, x=t(1))
    moved = to_device(value, META)
    assert type(moved) is collections.defaultdict
    assert moved.default_factory is list
    assert moved["x"].is_meta
    assert moved["missing"] == []
    assert "missing" not in value  # a copy: the caller's batch is left as it was
    assert not value["x"].is_meta


class Store(collections.abc.MutableMapping):
    """A user mapping over a dict attribute: ``copy.copy`` shares that dict."""

    def __init__(self, items: Any) -> None:
        self._d = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._d[key] = value

    def __delitem__(self, key: str) -> None:
        del self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class NoItems(Store):
    """A mapping whose constructor takes something else."""

    def __init__(self, tag: str, **items: Any) -> None:
        super().__init__(items)


class Encoding(collections.UserDict):
    """Like transformers' BatchEncoding: a UserDict with attributes of its own."""

    def __init__(self, data: Any = None, encodings: Any = None) -> None:
        super().__init__(data)
        self.encodings = encodings


def test_to_device_never_writes_into_the_callers_mapping() -> None:
    """A mapping whose shallow copy shares its storage was moved in place (the caller's batch
    ended on the device); it is rebuilt from the moved items instead."""
    batch = Store({"x": t(1), "id": "a"})
    moved = to_device(batch, META)
    assert type(moved) is Store
    assert moved["x"].is_meta
    assert moved["id"] == "a"
    assert not batch["x"].is_meta  # the caller's batch is unchanged
    assert batch._d is not moved._d
    other = NoItems("tag", x=t(1))
    moved_other = to_device(other, META)
    assert type(moved_other) is dict
    assert moved_other["x"].is_meta
    assert not other["x"].is_meta


def test_to_device_keeps_a_userdicts_attributes_without_sharing_its_data() -> None:
    encodings = ["enc"]
    batch = Encoding({"input_ids": t(1, 2)}, encodings=encodings)
    moved = to_device(batch, META)
    assert type(moved) is Encoding
    assert moved.encodings is encodings
    assert moved["input_ids"].is_meta
    assert moved.data is not batch.data
    assert not batch["input_ids"].is_meta


def test_to_device_nested_namedtuples() -> None:
    Outer = collections.namedtuple("Outer", "pair items")
    moved = to_device(Outer(Pair(t(1), t(2)), [Pair(t(3), t(4))]), META)
    kinds = [type(moved), type(moved.pair), type(moved.items), type(moved.items[0])]
    assert kinds == [Outer, Pair, list, Pair]
    assert moved.pair.weight.is_meta
    assert moved.items[0].label.is_meta


@pytest.mark.parametrize(
    ("device", "non_blocking"),
    [(torch.device("cpu"), False), (META, True)],
    ids=["to-the-cpu-blocking", "to-another-device-non-blocking"],
)
def test_to_device_copies_to_the_cpu_blocking(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, non_blocking: bool
) -> None:
    """A non-blocking copy to the CPU may be read before it completes; elsewhere it may overlap."""
    calls: list[dict[str, Any]] = []
    move = Tensor.to

    def recording_to(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(kwargs)
        return move(self, *args, **kwargs)

    monkeypatch.setattr(Tensor, "to", recording_to)
    to_device({"x": t(1), "y": [t(2)]}, device)
    assert [call.get("non_blocking", False) for call in calls] == [non_blocking, non_blocking]


@pytest.mark.parametrize(
    ("inputs", "args"),
    [
        pytest.param(t(1), 1, id="tensor"),
        pytest.param((t(1), t(2)), 2, id="tuple: positional arguments"),
        pytest.param(Pair(t(1), t(2)), 1, id="namedtuple: one argument"),
        pytest.param(Typed(t(1), "a"), 1, id="typing-NamedTuple: one argument"),
        pytest.param([t(1), t(2)], 1, id="list: one argument"),
        pytest.param({"x": t(1)}, 1, id="dict: one argument"),
    ],
)
def test_model_args(inputs: Any, args: int) -> None:
    got = model_args(inputs)
    assert type(got) is tuple
    expected = (inputs,) if args == 1 else inputs
    assert len(got) == len(expected)
    assert all(a is b for a, b in zip(got, expected, strict=True))


def test_mappings_are_described_and_digested() -> None:
    targets = collections.UserDict(label=torch.tensor([1, 2]))
    assert describe(targets) == "UserDict(label=Tensor[2] int64)"
    assert targets_digest(targets) == targets_digest({"label": torch.tensor([1, 2])})
    assert targets_digest(targets) != targets_digest({"label": torch.tensor([2, 1])})


# -- BatchStream: continuing at the start of an epoch ----------------------------------------------


@pytest.mark.parametrize("own_generator", [False, True], ids=["global-rng", "loader-generator"])
def test_a_stream_saved_at_an_epochs_start_replays_that_epochs_order(own_generator: bool) -> None:
    """A shuffling sampler draws its order when the first batch is asked for, not at ``iter()``.

    Saved after a peek into a new epoch (position 0), the continued stream must read that first
    batch under the restored random states: the oracle is the order the saved stream goes on with.
    """
    torch.manual_seed(0)
    data = [(torch.tensor([float(i)]), torch.tensor(i)) for i in range(6)]

    def loader(seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if own_generator else None
        return DataLoader(data, batch_size=2, shuffle=True, generator=generator)

    stream = BatchStream(loader(0), "loader")
    for _ in range(3):
        stream.next()
    stream.peek()  # the next epoch starts: its first batch is read, nothing consumed yet
    saved = stream.state_dict()
    assert (saved["epoch"], saved["position"]) == (1, 0)
    expected = [stream.next()[1].tolist() for _ in range(3)]  # the saved epoch (the next one draws
    # its order from the global RNG as the caller's run leaves it)

    torch.manual_seed(123)  # the caller's RNG is elsewhere, the new loader's generator too
    again = BatchStream(loader(99), "loader")
    rng = torch.get_rng_state()
    again.load_state_dict(saved)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [again.next()[1].tolist() for _ in range(3)] == expected


def test_a_fresh_streams_state_replays_its_first_epoch() -> None:
    torch.manual_seed(0)
    data = [(torch.tensor([float(i)]), torch.tensor(i)) for i in range(8)]
    generator = torch.Generator().manual_seed(5)
    stream = BatchStream(DataLoader(data, batch_size=2, shuffle=True, generator=generator), "loader")
    saved = stream.state_dict()  # position 0 of epoch 0: the first batch is only peeked
    expected = [stream.next()[1].tolist() for _ in range(4)]
    again = BatchStream(DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator()), "loader")
    again.load_state_dict(saved)
    assert [again.next()[1].tolist() for _ in range(4)] == expected


# -- nested and sparse tensors --------------------------------------------------------------------


def test_nested_tensors_are_described_by_their_components() -> None:
    nested = torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(4, 3)])
    assert describe(nested) == "NestedTensor(Tensor[2, 3] float32, Tensor[4, 3] float32)"
    assert describe((nested, torch.zeros(2, dtype=torch.long))).startswith("tuple(NestedTensor(")


def test_nested_and_sparse_targets_are_digested_by_their_values() -> None:
    dense = torch.tensor([[0, 2], [1, 0]])
    assert targets_digest(dense.to_sparse()) == targets_digest(dense)
    assert targets_digest(dense.to_sparse_csr()) == targets_digest(dense)
    assert targets_digest(torch.tensor([[0, 2], [1, 1]]).to_sparse()) != targets_digest(dense)
    first = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])])
    split_elsewhere = torch.nested.nested_tensor([torch.tensor([1]), torch.tensor([2, 3])])
    assert targets_digest(first) == targets_digest([torch.tensor([1, 2]), torch.tensor([3])])
    assert targets_digest(first) != targets_digest(split_elsewhere)
