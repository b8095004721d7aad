"""Batch streams over user loaders: cycling, unpacking and moving to a device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchStream", "describe", "to_device"]


class BatchStream:
    """An endless stream of ``(inputs, targets)`` over a loader, restarted at each epoch end.

    Args:
        loader: any re-iterable of batches, e.g. a :class:`torch.utils.data.DataLoader`. Each
            batch is a pair ``(inputs, targets)``; ``inputs`` is a tensor or a tuple of tensors.
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
    """

    def __init__(self, loader: Iterable[Any], name: str) -> None:
        self.loader = loader
        self.name = name
        self.epoch = 0
        self.position = 0
        self._it = self._start()
        try:
            self._peeked: Any = next(self._it)
        except StopIteration:
            raise ValueError(f"{name} is empty: it yielded no batch ({loader!r})") from None
        self._has_peeked = True

    def _start(self) -> Iterator[Any]:
        """A new pass over the loader; remembers the RNG state a shuffling loader draws from."""
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):  # e.g. DistributedSampler: a new order each epoch
            set_epoch(self.epoch)
        self._epoch_rng = torch.get_rng_state()
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
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch += 1
                self.position = 0
                self._it = self._start()
                try:
                    batch = next(self._it)
                except StopIteration:
                    raise ValueError(f"{self.name} yielded no batch in epoch {self.epoch}") from None
        self.position += 1
        return split_batch(batch, self.name)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: epoch, batches read in it, the RNG state at the epoch's start."""
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where :meth:`state_dict` was taken.

        Re-iterates the loader from the saved epoch with the RNG state it started from (so a
        shuffling loader yields the same order) and skips the batches already read.
        """
        current = torch.get_rng_state()
        self.epoch = int(state["epoch"])
        torch.set_rng_state(state["epoch_rng"])
        self._it = self._start()
        self._has_peeked, self._peeked = False, None
        for _ in range(int(state["position"])):
            next(self._it)
        self.position = int(state["position"])
        torch.set_rng_state(current)


def split_batch(batch: Any, name: str) -> tuple[Any, Any]:
    """Unpack ``(inputs, targets)``, with a clear error for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"{name} must yield (inputs, targets) pairs, got {describe(batch)}")


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``.

    Example:
        >>> import torch
        >>> batch = to_device({"x": torch.ones(2), "meta": [torch.zeros(1), "id"]}, torch.device("cpu"))
        >>> batch["x"].device.type, batch["meta"][1]
        ('cpu', 'id')
    """
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def describe(value: Any) -> str:
    """Short description of a batch for error messages (shapes and dtypes of tensors).

    Example:
        >>> import torch
        >>> describe((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))
        'tuple(Tensor[2, 3] float32, Tensor[2] int64)'
    """
    if isinstance(value, Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"Tensor[{', '.join(map(str, value.shape))}] {dtype}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v) for v in value)})"
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={describe(v)}" for k, v in value.items()) + ")"
    return type(value).__name__
