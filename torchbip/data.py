"""Batch streams over user loaders: cycling, unpacking, moving to a device, and resuming."""

from __future__ import annotations

import copy
import hashlib
from collections import UserDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStream", "describe", "is_namedtuple", "model_args", "order_generators", "to_device"]


class BatchStream:
    """An endless stream of ``(inputs, targets)`` over a loader, restarted at each epoch end.

    A stream can be saved (:meth:`state_dict`) and continued exactly (:meth:`load_state_dict`):
    at every epoch start it records the state of torch's global RNG and of every
    :class:`torch.Generator` the loader draws its order from (:func:`order_generators`), and a
    sampler with ``set_epoch`` (a :class:`~torch.utils.data.DistributedSampler`) is told the
    epoch. Restoring replays the saved epoch up to the saved position and leaves those generators
    in the state they had when the stream was saved.

    What to pass again when continuing from a saved state:

    - a re-iterable loader (a :class:`~torch.utils.data.DataLoader`, a list, any object whose
      ``iter()`` returns a new iterator): the same loader, over the same data with the same batch
      size and sampler. The state its generators are in does not matter: they are restored.
    - a one-shot iterator (``iter(loader) is loader``: a generator, a generator expression,
      ``iter(list)``): a new one that yields the same batches from its start. It has a single
      pass, so it must hold at least ``steps`` batches (two per step in ``mode="two_batch"``
      without ``upper_loader``).

    Not replayed: an order drawn from a random state the stream cannot see (Python's
    :mod:`random`, NumPy, a generator kept inside a wrapper object or a sampler's private
    attribute), a one-shot iterator passed on from where it stopped, or other data. The saved
    state holds a digest of the integer targets of the last batch read, and
    :meth:`load_state_dict` raises ``ValueError`` when the replayed batch has other targets.

    Args:
        loader: any iterable of batches, e.g. a :class:`torch.utils.data.DataLoader`. Each
            batch is a pair ``(inputs, targets)``; ``inputs`` is one argument of the model (a
            tensor, a namedtuple, a list, a dict) or a plain tuple of them (see :func:`model_args`).
        name: the argument name used in error messages.

    Raises:
        ValueError: on construction if the loader yields nothing, or is not iterable.

    Example:
        >>> import torch
        >>> stream = BatchStream([(torch.zeros(2, 3), torch.zeros(2))], "loader")
        >>> x, y = stream.next()
        >>> x.shape, stream.epoch
        (torch.Size([2, 3]), 0)
        >>> _ = stream.next(); stream.epoch
        1

        Saving and continuing, here with a one-shot iterator passed again from its start:

        >>> batches = [(torch.zeros(1), torch.tensor([i])) for i in range(4)]
        >>> stream = BatchStream(iter(batches), "loader")
        >>> _ = stream.next(); saved = stream.state_dict()
        >>> again = BatchStream(iter(batches), "loader")
        >>> again.load_state_dict(saved)
        >>> again.next()[1]
        tensor([1])
    """

    def __init__(self, loader: Iterable[Any], name: str) -> None:
        self.loader = loader
        self.name = name
        self.epoch = 0
        self.position = 0
        self.generators = order_generators(loader)
        self.one_shot = False
        self._last_targets: Any = None
        self._it = self._start()
        self.one_shot = self._it is loader
        try:
            self._peeked: Any = next(self._it)
        except StopIteration:
            raise ValueError(f"{name} is empty: it yielded no batch ({loader!r})") from None
        self._has_peeked = True

    def _start(self) -> Iterator[Any]:
        """A new pass over the loader; remembers the random states its order is drawn from."""
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):  # e.g. DistributedSampler: a new order each epoch
            set_epoch(self.epoch)
        self._epoch_rng = torch.get_rng_state()
        self._epoch_generators = [g.get_state() for g in self.generators]
        try:
            return iter(self.loader)
        except TypeError as err:
            raise TypeError(f"{self.name} must be an iterable of batches, got {self.loader!r}") from err

    def next(self) -> tuple[Any, Any]:
        """The next ``(inputs, targets)`` pair, starting a new epoch when the loader ends."""
        if self._has_peeked:
            self._has_peeked = False
            batch = self._peeked
            self._peeked = None
        else:
            batch = self._fetch()
        self.position += 1
        pair = split_batch(batch, self.name)
        self._last_targets = pair[1]
        return pair

    def peek(self) -> tuple[Any, Any]:
        """The pair :meth:`next` returns next, without consuming it.

        A new stream already holds its first batch, so peeking at it reads nothing more from the
        loader.
        """
        if not self._has_peeked:
            self._peeked = self._fetch()
            self._has_peeked = True
        return split_batch(self._peeked, self.name)

    def _fetch(self) -> Any:
        """The loader's next batch, starting a new epoch when the loader ends."""
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self.position = 0
            self._it = self._start()
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError(f"{self.name} yielded no batch in epoch {self.epoch}") from None

    def signature(self) -> dict[str, Any]:
        """What a continued run must see again.

        ``len(loader)`` (``None`` if unknown) and the number of generators the order is drawn from.
        """
        return {"batches": _length(self.loader), "generators": len(self.generators)}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as tensors and plain types.

        The epoch, the batches read in it, the random states at the epoch's start (torch's global
        RNG and each order generator), the generators' current states and a digest of the last
        batch's integer targets.
        """
        return {
            "epoch": self.epoch,
            "position": self.position,
            "epoch_rng": self._epoch_rng,
            "epoch_generators": list(self._epoch_generators),
            "generators": [g.get_state() for g in self.generators],
            "last_targets": targets_digest(self._last_targets) if self.position else None,
        }

    def load_state_dict(
        self, state: dict[str, Any], source: str = "the saved state", verify: bool = True
    ) -> None:
        """Continue where :meth:`state_dict` was taken.

        A re-iterable loader is iterated again from the saved epoch, with torch's global RNG and
        the order generators set to their states at that epoch's start (so a shuffling loader
        yields the same order), and the batches already read are skipped; a one-shot iterator
        (passed again from its start) is read up to the saved position. The generators are then
        set to their saved states, and torch's global RNG is left as it was.

        Args:
            state: a :meth:`state_dict`.
            source: what ``state`` came from, for error messages.
            verify: check that the last replayed batch has the targets the saved run read last
                (off where each process reads its own shard and only one process saved).

        Raises:
            ValueError: if the loader draws from another number of generators, ends before the
                saved position, is a one-shot iterator asked for another epoch, or (``verify``)
                replays other targets.
        """
        epoch, position = int(state["epoch"]), int(state["position"])
        starts, saved_now = list(state["epoch_generators"]), list(state["generators"])
        if len(starts) != len(self.generators):
            raise ValueError(
                f"{source} was written for a {self.name} that draws its order from {len(starts)} "
                f"torch.Generator(s); this {self.name} draws from {len(self.generators)}"
            )
        rng = torch.get_rng_state()
        before = [g.get_state() for g in self.generators]
        try:
            if self.one_shot:
                if epoch != self.epoch or position < self.position:
                    raise ValueError(
                        f"{source} was written at batch {position} of epoch {epoch} of {self.name}, "
                        f"but {self.name} is a one-shot iterator (one pass, no restart) at batch "
                        f"{self.position} of epoch {self.epoch}; pass a new one from its start"
                    )
            else:
                torch.set_rng_state(state["epoch_rng"])
                for g, s in zip(self.generators, starts, strict=True):
                    g.set_state(s)
                self.epoch, self.position = epoch, 0
                self._has_peeked, self._peeked = False, None
                self._it = self._start()
                # The first batch is read now, under the restored random states, as the saved run
                # read it right after starting the pass: a sampler draws its order when its first
                # batch is asked for (RandomSampler), not when the pass starts.
                self._peeked, self._has_peeked = self._read(position, source), True
            self._advance_to(position, source)
            if verify and position and targets_digest(self._last_targets) != state["last_targets"]:
                raise ValueError(
                    f"{source} was written after batch {position} of epoch {epoch} of {self.name}, "
                    f"and {self.name} now yields another batch there (other targets): pass the "
                    "same data in the same order. The order of a shuffling loader is restored "
                    "when drawn from torch's RNG or the torch.Generator of the DataLoader or its "
                    "sampler; an order from Python's random, NumPy or a generator torchbip cannot "
                    "see is not, and a one-shot iterator must start again from its first batch"
                )
            for g, s in zip(self.generators, saved_now, strict=True):
                g.set_state(s)
        except BaseException:
            for g, s in zip(self.generators, before, strict=True):
                g.set_state(s)
            raise
        finally:
            torch.set_rng_state(rng)

    def _read(self, position: int, source: str) -> Any:
        """The next batch of the current pass, which must reach the saved ``position``."""
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError(
                f"{source} was written after batch {position} of epoch {self.epoch} of "
                f"{self.name}, but {self.name} ends after {self.position} batches there: "
                "pass the same data (a one-shot iterator again from its start)"
            ) from None

    def _advance_to(self, position: int, source: str) -> None:
        """Read batches of the current pass (the peeked one first) until ``position``."""
        while self.position < position:
            if self._has_peeked:
                self._has_peeked = False
                batch, self._peeked = self._peeked, None
            else:
                batch = self._read(position, source)
            self.position += 1
            self._last_targets = split_batch(batch, self.name)[1]


def order_generators(loader: Any) -> list[torch.Generator]:
    """The :class:`torch.Generator` objects a loader draws its order from, each once.

    ``loader.generator`` (a DataLoader's: its shuffling sampler and its workers' base seed),
    ``loader.sampler.generator``, ``loader.batch_sampler.generator`` and
    ``loader.batch_sampler.sampler.generator``.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> g = torch.Generator().manual_seed(0)
        >>> loader = DataLoader(list(range(8)), batch_size=2, shuffle=True, generator=g)
        >>> [x is g for x in order_generators(loader)]
        [True]
        >>> order_generators([1, 2])
        []
    """
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: list[torch.Generator] = []
    for holder in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(holder, "generator", None) if holder is not None else None
        if isinstance(gen, torch.Generator) and not any(gen is g for g in found):
            found.append(gen)
    return found


def targets_digest(targets: Any) -> str | None:
    """A short digest of the integer and boolean tensors in ``targets`` (``None``: there are none).

    Float targets are left out: augmentations may draw them from an RNG that a continued run
    reproduces only from the saved position on.

    Example:
        >>> import torch
        >>> targets_digest(torch.tensor([1, 2])) == targets_digest(torch.tensor([1, 2]))
        True
        >>> targets_digest(torch.tensor([2, 1])) == targets_digest(torch.tensor([1, 2]))
        False
        >>> targets_digest(torch.zeros(2)) is None
        True
    """
    tensors = [
        t
        for t in _leaves(targets)
        if isinstance(t, Tensor) and not t.is_meta and not (t.is_floating_point() or t.is_complex())
    ]
    if not tensors:
        return None
    digest = hashlib.sha256()
    for t in tensors:
        # A nested tensor is digested component by component; a sparse one by its dense values.
        parts = t.detach().unbind() if t.is_nested else [t.detach()]
        for part in parts:
            if part.layout != torch.strided:
                part = part.to_dense()
            flat = part.to("cpu").contiguous().reshape(-1)
            digest.update(f"{flat.dtype}{tuple(part.shape)};".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except Exception:  # no len(), or a DataLoader over an IterableDataset without one
        return None


def split_batch(batch: Any, name: str) -> tuple[Any, Any]:
    """Unpack ``(inputs, targets)``, with a clear error for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"{name} must yield (inputs, targets) pairs, got {describe(batch)}")


def model_args(inputs: Any) -> tuple[Any, ...]:
    """The positional arguments of the model call for a batch's ``inputs``.

    A plain tuple holds several arguments, ``model(*inputs)``; anything else is one argument,
    ``model(inputs)``: a tensor, a list, a dict, and a namedtuple (one structured input, such as
    :func:`torch.utils.data.default_collate` builds from a dataset's namedtuple samples).

    Example:
        >>> from collections import namedtuple
        >>> Pair = namedtuple("Pair", "image mask")
        >>> model_args((1, 2)), model_args([1, 2]), model_args(Pair(1, 2))
        ((1, 2), ([1, 2],), (Pair(image=1, mask=2),))
    """
    return inputs if isinstance(inputs, tuple) and not is_namedtuple(inputs) else (inputs,)


def is_namedtuple(value: Any) -> bool:
    """Whether ``value`` is an instance of a :func:`collections.namedtuple` (or ``typing.NamedTuple``)."""
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, namedtuples, lists and mappings, nested) to ``device``.

    Containers keep their type: a namedtuple is rebuilt from its fields, a tuple or list subclass
    from its items (a plain tuple or list when its constructor does not build one from them),
    and a mutable mapping (``dict``, ``OrderedDict``, ``defaultdict`` with its factory,
    ``UserDict``, ``BatchEncoding``) is rebuilt from its moved items (a ``dict`` when its type
    cannot be); another mapping becomes a ``dict``. The caller's containers are never written to.

    Example:
        >>> import torch
        >>> from collections import namedtuple
        >>> batch = to_device({"x": torch.ones(2), "meta": [torch.zeros(1), "id"]}, torch.device("cpu"))
        >>> batch["x"].device.type, batch["meta"][1]
        ('cpu', 'id')
        >>> Target = namedtuple("Target", "label weight")
        >>> to_device(Target(torch.tensor([1]), torch.tensor([0.5])), torch.device("cpu"))
        Target(label=tensor([1]), weight=tensor([0.5000]))
    """
    if isinstance(value, Tensor):
        # Non-blocking only towards an accelerator: a non-blocking copy to the CPU may be read
        # before it has completed.
        return value.to(device, non_blocking=device.type != "cpu")
    if isinstance(value, (tuple, list)):
        items = [to_device(v, device) for v in value]
        if is_namedtuple(value):
            return type(value)(*items)
        plain = tuple(items) if isinstance(value, tuple) else items
        if type(value) in (tuple, list):
            return plain
        try:
            rebuilt = type(value)(items)
        except Exception:  # a subclass whose constructor takes something else
            return plain
        same = len(rebuilt) == len(items) and all(a is b for a, b in zip(rebuilt, items, strict=True))
        return rebuilt if same else plain
    if isinstance(value, Mapping):
        moved = {k: to_device(v, device) for k, v in value.items()}
        if type(value) is dict or not isinstance(value, MutableMapping):
            return moved
        return _rebuilt_mapping(value, moved)
    return value


def _rebuilt_mapping(value: MutableMapping[Any, Any], moved: dict[Any, Any]) -> Any:
    """A new mapping of ``value``'s type holding ``moved``, or ``moved`` (a ``dict``).

    Nothing of the caller's is written to: ``copy.copy`` of a mapping may share its storage (a
    class over a dict attribute). A ``UserDict`` whose class keeps ``UserDict.__copy__`` is
    copied and given ``moved`` as its ``data`` (a ``BatchEncoding`` keeps its other attributes);
    another type is built from the moved items (a ``defaultdict`` with its factory), and kept if
    it holds exactly them.
    """
    kind: Any = type(value)
    try:
        if isinstance(value, UserDict) and kind.__copy__ is UserDict.__copy__:
            rebuilt: Any = copy.copy(value)
            rebuilt.data = moved  # a data dict of its own, the other attributes kept
        elif isinstance(value, defaultdict):
            rebuilt = kind(value.default_factory, moved)
        else:
            rebuilt = kind(moved)
    except Exception:  # a constructor that takes something else
        return moved
    try:
        same = (
            isinstance(rebuilt, Mapping)
            and len(rebuilt) == len(moved)
            and all(k in rebuilt and rebuilt[k] is v for k, v in moved.items())
        )
    except Exception:
        same = False
    return rebuilt if same else moved


def describe(value: Any) -> str:
    """Short description of a batch for error messages (shapes and dtypes of tensors).

    Example:
        >>> import torch
        >>> describe((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))
        'tuple(Tensor[2, 3] float32, Tensor[2] int64)'
    """
    if isinstance(value, Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        if value.is_nested:  # (no shape of its own: its components have theirs)
            return f"NestedTensor({', '.join(describe(t) for t in value.unbind())})"
        return f"Tensor[{', '.join(map(str, value.shape))}] {dtype}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v) for v in value)})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__}(" + ", ".join(f"{k}={describe(v)}" for k, v in value.items()) + ")"
    return type(value).__name__
