"""Plumbing shared by the example scripts, kept out of them so that they show the training.

(As the helpers beside torchvision's ``references/classification/train.py``.)

- Command-line options with a YAML file of option values (``-c FILE``): the file's values go
  through argparse exactly as if they had been typed on the command line, so they get the same
  types, choices and checks (``epochs: 2.5`` is refused like ``--epochs 2.5``); the command line
  still wins, and a preset (``--smoke``, a stand-in dataset) sits below both::

      args = parse_with_config(parser, sys.argv[1:], presets=lambda probe: SMOKE if probe.smoke else {})
      check_ranges(parser, args, {"lr": (0.0, math.inf), "amount": (0.0, 1.0)})

- Checks made before any work: counts, ranges, seeds, devices, output folders (a file or a
  read-only folder is refused), the class folders of an ImageFolder tree, state_dict files.
- Whether matplotlib can write plots, checked at a run's start; optional outputs whose
  failure only warns.
- A run's log (rank 0 to a file and stdout, the other ranks' warnings to stderr), atomic
  checkpoint writes, sums over the ranks, a check that every rank ends with the same model, and
  a check that a checkpoint was written with the options of the run that resumes from it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

Presets = Callable[[argparse.Namespace], Mapping[str, Any]]


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str], presets: Presets | None = None
) -> argparse.Namespace:
    """Parse ``argv``: defaults < ``presets(probe)`` < the ``-c`` file < the command line.

    Args:
        parser: the example's parser; it has a ``-c/--config FILE`` option.
        argv: the command line (without the program name).
        presets: from a first parse (``probe``), option defaults to use instead of the parser's.

    Returns:
        The options; errors exit through ``parser.error`` with the option and the value.
    """
    argv = list(argv)
    path = parser.parse_known_args(argv)[0].config
    tokens = [*(config_argv(parser, path) if path else []), *argv]
    if presets is not None:
        parser.set_defaults(**presets(parser.parse_known_args(tokens)[0]))
    return parser.parse_args(tokens)


def config_argv(parser: argparse.ArgumentParser, path: str | Path) -> list[str]:
    """The YAML file's ``option: value`` pairs as command-line tokens (``null`` keeps the default)."""
    if not Path(path).is_file():
        parser.error(f"-c/--config: no such file: {path}")
    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        parser.error(f"{path}: not valid YAML ({err})")
    values = {} if values is None else values
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of option: value, got a {type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(str(k) for k in values if str(k).replace("-", "_") not in actions)
    if unknown:
        parser.error(f"{path}: unknown option(s) {unknown}")
    tokens: list[str] = []
    for key, value in values.items():
        action = actions[str(key).replace("-", "_")]
        flag = action.option_strings[0] if action.nargs == 0 else action.option_strings[-1]
        if action.nargs == 0:  # a switch: --smoke, or --progress/--no-progress
            if not isinstance(value, bool):
                parser.error(f"{path}: {key} must be true or false, got {value!r}")
            if value:
                tokens.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                tokens.append("--no-" + flag.removeprefix("--"))
        elif isinstance(value, bool | list | dict):
            parser.error(f"{path}: {key} must be a single number or string, got {value!r}")
        elif value is not None:
            tokens += [flag, str(value)]
    return tokens


def check_ranges(
    parser: argparse.ArgumentParser, args: argparse.Namespace, ranges: Mapping[str, tuple[float, float]]
) -> None:
    """Refuse an option outside its closed range ``[low, high]`` (or not finite); ``None`` is fine."""
    for name, (low, high) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            parser.error(f"--{name.replace('_', '-')} must lie in [{low:g}, {high:g}], got {value}")


def check_seed(parser: argparse.ArgumentParser, seed: int, option: str = "--seed") -> None:
    """Refuse a seed that torch's generators cannot take (offsets per phase and epoch included)."""
    if not -(2**62) <= seed <= 2**62:
        parser.error(f"{option}: must be an integer in [-2**62, 2**62], got {seed}")


def check_folder(parser: argparse.ArgumentParser, option: str, path: Path) -> None:
    """Refuse ``path`` unless it is a folder this process may write into, or one it can create (its
    nearest existing ancestor is such a folder)."""
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        what = "is not a folder" if existing == path else f"cannot be created: {existing} is not a folder"
        parser.error(f"{option}: {path} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"{option}: {path} cannot be written: {existing} is not writable")


def check_device(parser: argparse.ArgumentParser, value: str, option: str = "--device") -> None:
    """Refuse a device name torch does not know, or a device this machine does not have."""
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except RuntimeError:
        parser.error(f"{option}: not a torch device: {value!r} (e.g. 'auto', 'cpu', 'cuda', 'cuda:1')")
    if device.type == "cpu":
        return
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if here is None or here.type != device.type:
        what = "CUDA" if device.type == "cuda" else repr(device.type)
        parser.error(f"{option} {value}: {what} is not available on this machine (use 'cpu' or 'auto')")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        parser.error(
            f"{option} {value}: this machine has {torch.accelerator.device_count()} {device.type} device(s)"
        )


def check_compile_backend(
    parser: argparse.ArgumentParser, backend: str | None, option: str = "--compile-backend"
) -> None:
    """Refuse a ``torch.compile`` backend that torch does not list (``None``: not compiling)."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend is not None and backend not in known:
        parser.error(f"{option}: unknown torch.compile backend {backend!r}; known: {', '.join(known)}")


def plain_options(args: argparse.Namespace, omit: Collection[str] = ()) -> dict[str, Any]:
    """The options as plain values (for ``config.yaml``, checkpoints and reports), without ``config``
    and those in ``omit`` (e.g. ``resume``: how a run was started, which a ``-c`` reuse must not inherit)."""
    skip = {"config", *omit}
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}


def matplotlib_problem() -> str | None:
    """Why matplotlib cannot write plots here, or ``None`` when it can: it is imported now, with the
    Agg backend (files only), so that a run learns at its start, not after its training, whether it
    will plot. Any failure counts: not installed, an import that fails (a NumPy ABI mismatch), an
    invalid ``MPLBACKEND`` (matplotlib refuses it on import)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except Exception as err:
        if isinstance(err, ModuleNotFoundError) and err.name == "matplotlib":
            return "matplotlib is not installed"
        return f"matplotlib cannot be used ({type(err).__name__}: {err})"
    return None


def check_resumable(
    saved: Mapping[str, Any], now: Mapping[str, Any], path: Path, ignore: Collection[str]
) -> None:
    """Refuse to resume from the checkpoint ``path``, written with the options ``saved``, if any of
    the options ``now`` but those in ``ignore`` differs (``ValueError`` listing each change)."""
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in ignore and saved.get(k) != v
    ]
    if changed:
        raise ValueError(f"--resume: {path} was written with other options ({', '.join(changed)})")


def check_resume_files(
    parser: argparse.ArgumentParser, args: argparse.Namespace, now: Mapping[str, Any],
    files: Mapping[Path, Collection[str]],
) -> None:  # fmt: skip
    """With ``--resume``: refuse, before any work, checkpoints in ``files`` (path: the options they
    may differ in) that cannot be read or were written with options other than ``now``."""
    for path, ignore in files.items():
        if not (args.resume and path.is_file()):
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["options"]
        except Exception as err:
            parser.error(f"--resume: {path} cannot be read ({type(err).__name__}: {err})")
        try:
            check_resumable(saved, now, path, ignore)
        except ValueError as err:
            parser.error(str(err))


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, zero_ok: Collection[str]) -> None:
    """Refuse an integer option (but ``seed``) below 1, or below 0 for those in ``zero_ok``."""
    for name, value in vars(args).items():
        low = 0 if name in zero_ok else 1
        if isinstance(value, int) and not isinstance(value, bool) and name != "seed" and value < low:
            parser.error(f"--{name.replace('_', '-')}: must be an integer >= {low}, got {value}")


def image_folder_classes(parser: argparse.ArgumentParser, option: str, root: Path) -> list[str]:
    """The classes of ``root/train`` (one sub-folder each), refused unless ``root/val`` has the same:
    ``ImageFolder`` numbers each split's classes by itself, so other folders would mislabel images."""
    if not all((root / split).is_dir() for split in ("train", "val")):
        parser.error(f"{option}: expected {root}/train and {root}/val, one sub-folder per class")
    from torchvision.datasets.folder import find_classes

    try:
        train, val = (find_classes(str(root / split))[0] for split in ("train", "val"))
    except FileNotFoundError as err:
        parser.error(f"{option}: {err}")
    if train != val:
        differ = sorted(set(train) ^ set(val))
        more = " ..." if len(differ) > 10 else ""
        parser.error(f"{option}: {root}/train and {root}/val have other class folders: {differ[:10]}{more}")
    return train


def check_state_dict(parser: argparse.ArgumentParser, option: str, path: Path, model: nn.Module) -> None:
    """Refuse ``path`` unless it holds a state_dict (or a ``{"state_dict": ...}``) that ``model``
    loads strictly (``model`` takes it: pass a throwaway model of the run's shape)."""
    if not path.is_file():
        parser.error(f"{option}: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, Mapping) else state)
    except Exception as err:
        parser.error(f"{option}: {path} is not a state_dict of this model ({type(err).__name__}: {err})")


def save(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves ``path`` complete or absent, also when interrupted."""
    torch.save(obj, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (as they are without a process group)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.tolist()


def same_model_on_every_rank(model: nn.Module, log: logging.Logger) -> list[str]:
    """Every rank's SHA-256 (16 hex digits) of its whole model state; raises if they differ."""
    state, digests = sorted(model.state_dict().items()), [None] * dist.get_world_size()
    data = b"".join(k.encode() + v.cpu().reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in state)
    dist.all_gather_object(digests, hashlib.sha256(data).hexdigest()[:16])
    if len(set(digests)) > 1:
        raise RuntimeError(f"the ranks' models differ at the end: {digests}")
    log.info(f"all {len(digests)} ranks hold the same model state at the end (sha256 {digests[0]})")
    return digests  # type: ignore[return-value]


@contextlib.contextmanager
def warn_on_error(log: logging.Logger, what: str) -> Iterator[None]:
    """Turn an exception in the block into a warning ``what: error`` (for optional outputs)."""
    try:
        yield
    except Exception as err:
        log.warning(f"{what}: {type(err).__name__}: {err}")


@contextlib.contextmanager
def run_log(log: logging.Logger, out: Path, rank: int, append: bool) -> Iterator[None]:
    """Rank 0 logs to ``out/train.log`` (appended to on a resume) and stdout; the other ranks
    print their warnings to stderr, tagged with their rank. Closed at the end."""
    if rank == 0:
        log.handlers = [
            logging.FileHandler(out / "train.log", "a" if append else "w"),
            logging.StreamHandler(sys.stdout),
        ]
    else:
        log.handlers = [logging.StreamHandler(sys.stderr)]
    tag = f"[rank {rank}] " if rank else ""
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s", "%H:%M:%S"))
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        for handler in log.handlers:
            handler.close()
        log.handlers = []
