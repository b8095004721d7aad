"""Private: checkpoint files of ``global_prune``.

A checkpoint holds the state of the loop (:meth:`torchbip._loop.BiPLoop.state_dict`) and, under
``"run"``, a descriptor of everything that defines the run (:func:`run_descriptor`). A resume
either continues the same run, and then reproduces the uninterrupted run bitwise, or is refused
by :func:`check_resume` with a ``ValueError`` that names each difference, before the model is
touched.

Writing is atomic (:func:`save_checkpoint`: a temporary file beside the target, flushed, then
renamed), so a failed or interrupted save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import numbers
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchbip._func import Target
from torchbip._loop import CHECKPOINT_FORMAT
from torchbip.config import BiPConfig, is_bool
from torchbip.data import BatchStream, describe
from torchbip.layouts import MaskLayout

__all__ = [
    "check_checkpoint_path",
    "check_resume",
    "load_checkpoint",
    "run_descriptor",
    "save_checkpoint",
    "save_final_checkpoint",
    "special_file_kind",
]

#: Settings that do not change what a run computes (``steps``/``epochs`` and ``device`` enter the
#: descriptor resolved: the number of steps and the device type the run computes on).
UNRECORDED_FIELDS = frozenset(
    {"progress", "log_every", "checkpoint_path", "checkpoint_every", "resume", "steps", "epochs", "device"}
)
#: Fields where an int and a float mean different things (a count and a fraction).
_TYPED_FIELDS = frozenset({"amount", "min_keep"})
_FORMAT_FAMILY = CHECKPOINT_FORMAT.rsplit("/", 1)[0] + "/"


def run_descriptor(
    amount: int | float,
    targets: Sequence[Target],
    allowed: Sequence[Tensor | None],
    layout: MaskLayout,
    steps: int,
    cfg: BiPConfig,
    lower_stream: BatchStream,
    upper_stream: BatchStream,
    process_group: Any,
) -> dict[str, Any]:
    """Everything that defines a run, as plain types (lists, not tuples: they survive a save).

    Args:
        amount: the validated ``amount``.
        targets: the tensors pruned.
        allowed: per target, the entries that earlier pruning left (``None``: not pruned yet).
        layout: the bound mask layout of the run.
        steps: the resolved number of steps.
        cfg: the run's settings; every field but :data:`UNRECORDED_FIELDS` is recorded.
        lower_stream: the stream of ``loader``.
        upper_stream: the stream of ``upper_loader``, or ``lower_stream`` when there is none.
        process_group: the process group of a distributed run, or ``None``.

    Returns:
        A dict of field name to value, in the order errors list them.
    """
    device = torch.device(cfg.device) if cfg.device is not None else targets[0].weight().device
    run: dict[str, Any] = {
        "amount": amount,
        "structured": layout.structured,
        "budget": layout.budget,
        "parameters": [_describe_target(t, a) for t, a in zip(targets, allowed, strict=True)],
        "n_keep": int(layout.n_keep),
        "steps": int(steps),
    }
    for f in dataclasses.fields(cfg):
        if f.name not in UNRECORDED_FIELDS:
            run[f.name] = getattr(cfg, f.name)
    run["device"] = device.type
    run["world_size"] = 1 if process_group is None else int(dist.get_world_size(process_group))
    run["upper_loader"] = upper_stream is not lower_stream
    streams = [("loader", lower_stream)] + ([("upper_loader", upper_stream)] if run["upper_loader"] else [])
    for name, stream in streams:
        for key, value in stream.signature().items():
            run[f"{name}.{key}"] = value
    # torch.load(weights_only=True) reads only plain types back: not a numpy.str_ or a StrEnum
    # member that a layout kept as given, nor a NumPy scalar.
    return {key: _plain(value) for key, value in run.items()}


def _plain(value: Any) -> Any:
    """``value`` in plain Python types, in lists, tuples and dicts too.

    ``str``, ``bool``, ``int`` and ``float`` subclasses (NumPy scalars included) become the base
    type; an int stays an int and a float a float (a count and a fraction differ).
    """
    if value is None or type(value) in (str, bool, int, float):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if is_bool(value):  # (numpy.bool_ too)
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def check_resume(state: dict[str, Any], run: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint that is not of this version, or that another run wrote.

    Args:
        state: the checkpoint, as :func:`load_checkpoint` returns it.
        run: this call's :func:`run_descriptor`.
        path: the checkpoint file, for the messages.

    Raises:
        ValueError: for a checkpoint of another format (an earlier torchbip, or not torchbip),
            or one whose run differs; the message names ``checkpoint_path`` and each differing
            field with both values.
    """
    source = f"checkpoint_path={os.fspath(path)!r}"
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        if isinstance(found, str) and found.startswith(_FORMAT_FAMILY):
            raise ValueError(
                f"{source} was written by another torchbip version (checkpoint format {found!r}; "
                f"this version reads {CHECKPOINT_FORMAT!r}, which records everything that defines "
                "the run, so that a resume is exact); it cannot be resumed: start the run again "
                "without resume=True, or delete the file"
            )
        raise ValueError(
            f"{source} is not a torchbip BiP checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    saved = state.get("run")
    if not isinstance(saved, dict):
        raise ValueError(f"{source} has no run description (format {CHECKPOINT_FORMAT!r}): it is damaged")
    diffs = [d for key in run if key in saved for d in _differences(key, saved[key], run[key])]
    if diffs:
        clauses = [f"{old}, this call has {new}" for old, new in diffs]
        raise ValueError(
            f"{source} was written with " + "; and with ".join(clauses) + ". A resume continues the "
            "same run: pass the arguments of the call that wrote it, or start afresh (resume=False, "
            "or another checkpoint_path)"
        )


def check_checkpoint_path(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a ``checkpoint_path`` that no checkpoint could be saved to.

    Nothing is created: missing directories are made at the first save. A save replaces the
    file at ``path`` (it renames a temporary file ``<path>.tmp`` over it), so an existing path
    must be a regular file: a FIFO, a socket or a device node (``/dev/null``) would be replaced
    by a regular file, and writing the temporary file into a FIFO would block.

    Args:
        path: the ``checkpoint_path`` option.

    Raises:
        ValueError: for an empty path, a directory (an existing one, or a path ending in a
            separator), an existing path (or ``<path>.tmp``) that is not a regular file (a
            FIFO, a socket, a device), or a path whose nearest existing parent is a file or not
            writable.

    Example:
        >>> check_checkpoint_path("runs/bip.ckpt")
        >>> check_checkpoint_path("")
        Traceback (most recent call last):
        ...
        ValueError: checkpoint_path='' is empty; pass a file name such as 'bip.ckpt', or None
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"checkpoint_path={text!r} is empty; pass a file name such as 'bip.ckpt', or None")
    target = Path(text)
    if text.endswith(("/", os.sep)) or target.name in ("", ".", "..") or target.is_dir():
        raise ValueError(
            f"checkpoint_path={text!r} is a directory; pass a file path such as "
            f"{os.path.join(text, 'bip.ckpt')!r}"
        )
    kind = special_file_kind(target)
    if kind is not None:
        raise ValueError(
            f"checkpoint_path={text!r} is {kind}, not a regular file; a checkpoint replaces the file "
            "at checkpoint_path: pass the path of a regular file, or of one to create"
        )
    scratch = _scratch_path(target)
    kind = special_file_kind(scratch)
    if kind is not None:
        raise ValueError(
            f"checkpoint_path={text!r}: {str(scratch)!r}, where a checkpoint is written before it "
            f"replaces checkpoint_path, is {kind}, not a regular file; remove it or pass another "
            "checkpoint_path"
        )
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"checkpoint_path={text!r} cannot be created: {str(parent)!r} is a file, not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"checkpoint_path={text!r} cannot be written: the directory {str(parent)!r} is read-only"
        )


def special_file_kind(path: str | os.PathLike[str]) -> str | None:
    """What an existing ``path`` is when it is not a regular file; ``None`` otherwise.

    Symbolic links are followed. ``None`` also for a missing path (or one that cannot be
    examined: the save itself then names the cause).

    Example:
        >>> special_file_kind("/no/such/file") is None
        True
        >>> special_file_kind("/")
        'a directory'
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _scratch_path(path: Path) -> Path:
    """The temporary file a checkpoint is written to before it is renamed to ``path``."""
    return path.with_name(path.name + ".tmp")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a checkpoint atomically: a temporary file beside ``path``, flushed, then renamed.

    Args:
        state: the checkpoint (tensors and plain types).
        path: the file; missing parent directories are created.

    Raises:
        OSError: when the file cannot be written (a full disk, a quota, permissions), naming
            ``checkpoint_path``, the step and the cause, with the cause's ``errno`` where it has
            one. The temporary file is removed, so are the directories this save created, and
            an earlier file at ``path`` is left as it was. Also (``EINVAL``) when ``path`` or the
            temporary file has become something other than a regular file since the run started
            (a FIFO, a device): it is left alone.
    """
    path = Path(path)
    tmp = _scratch_path(path)
    for where in (path, tmp):
        kind = special_file_kind(where)
        if kind is not None:
            raise OSError(
                errno.EINVAL,
                f"checkpoint_path={str(path)!r}: the checkpoint of step {state.get('step')} was not "
                f"written: {str(where)!r} is {kind}, not a regular file, and was left alone",
            )
    # The directories this save creates, deepest first: a failed save removes them again.
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        for directory in created:
            with contextlib.suppress(OSError):  # (only if still empty)
                directory.rmdir()
        if not isinstance(err, (OSError, RuntimeError)):
            raise
        code = err.errno if isinstance(err, OSError) else None
        full = code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or "unexpected pos" in str(err)
        hint = " - the disk or quota is probably full" if full else ""
        kept = "the earlier checkpoint in that file is unchanged" if path.exists() else "no file was written"
        raise OSError(
            code,
            f"checkpoint_path={str(path)!r}: the checkpoint of step {state.get('step')} could not be "
            f"written ({type(err).__name__}: {err}){hint}; {kept}",
        ) from err


def save_final_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """:func:`save_checkpoint` at the end of a run: a failure warns instead of raising.

    The run is complete, so losing it for its last checkpoint would be worse: ``global_prune``
    returns the pruned model, and a ``RuntimeWarning`` names the file and the cause.

    Returns:
        Whether the checkpoint was written.
    """
    try:
        save_checkpoint(state, path)
    except OSError as err:
        warnings.warn(
            f"{err.strerror or err}. The run finished: global_prune returns the pruned model, but this "
            "checkpoint is lost (a later resume=True call would not find the finished run)",
            RuntimeWarning,
            stacklevel=4,  # the caller of global_prune
        )
        return False
    return True


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; clear errors for bad files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"checkpoint_path={str(path)!r} cannot be read as a torchbip checkpoint "
            f"(truncated, or not written by torchbip): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint_path={str(path)!r} holds a {type(state).__name__}, not a checkpoint")
    return state


def _describe_target(target: Target, allowed: Tensor | None) -> str:
    """``"fqn Tensor[shape] dtype"``, and the entries earlier pruning left, if any."""
    text = f"{target.fqn} {describe(target.weight())}"
    if allowed is None:
        return text
    mask = allowed.detach().to("cpu", torch.uint8).contiguous()
    digest = hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:12]
    return f"{text} pruned before ({int(mask.sum())} of {mask.numel()} left, mask {digest})"


def _differences(key: str, old: Any, new: Any) -> list[tuple[str, str]]:
    """``(old, new)`` descriptions of where ``old`` and ``new`` differ (empty: they agree)."""
    if key.endswith(".batches") and (old is None or new is None):
        return []  # a loader without len(): not comparable
    if isinstance(old, list) and isinstance(new, list):
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            if a != b:
                return [(f"{key}[{i}]={a!r}", f"{key}[{i}]={b!r}")]
        return [] if len(old) == len(new) else [(f"{key}={old!r}", f"{key}={new!r}")]
    same = old == new and (key not in _TYPED_FIELDS or type(old) is type(new))
    return [] if same else [(f"{key}={old!r}", f"{key}={new!r}")]
