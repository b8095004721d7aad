"""Prune ResNet-50 to 95% sparsity with BiP on ImageNet-layout data, end to end.

What it demonstrates: the whole life of a BiP ticket with torchvision's ``ImageFolder`` and the
standard ImageNet transforms: (optional) dense warm-up of ``torchvision.models.resnet50``,
evaluation, ``torchbip.global_prune(model, amount=0.95, loader=...)`` (weights and mask
optimised together, the mask at 95% from the first step), optional fine-tuning with the mask
fixed, evaluation, ``torch.nn.utils.prune.remove`` on every pruned module, and a plain
``state_dict`` that loads strictly into a fresh ``resnet50``. It runs on one process or on N
with ``torchrun``, under AMP and ``torch.compile``, and resumes an interrupted run.

Commands::

    # No arguments: a small ImageNet-layout stand-in built once from the MNIST split shipped
    # with torchbip (10 class folders of 64 px RGB PNGs), then the same ImageFolder pipeline.
    # A few minutes on a 2-core CPU; nothing is downloaded.
    python examples/imagenet_resnet50.py

    # Seconds: tiny sizes, what the integration tests run.
    python examples/imagenet_resnet50.py --smoke --out /tmp/bip-smoke

    # Real ImageNet (train/ and val/ with one sub-folder per class) from a dense checkpoint
    # (a state_dict file, e.g. torchvision's ResNet50_Weights.IMAGENET1K_V1 saved beforehand):
    python examples/imagenet_resnet50.py --data /datasets/imagenet \\
        --pretrained resnet50-dense.pth --epochs 5 --finetune-epochs 0 --workers 8

    # Distributed data parallel on the 8 GPUs of one machine (NCCL), bfloat16 autocast,
    # compiled fine-tuning and evaluation; --batch-size is per process (global batch 8 x 128):
    torchrun --nproc_per_node=8 examples/imagenet_resnet50.py --data /datasets/imagenet \\
        --pretrained resnet50-dense.pth --amp bfloat16 --compile

    # Two CPU processes (gloo), e.g. to try the distributed path on a laptop:
    torchrun --nproc_per_node=2 --standalone examples/imagenet_resnet50.py --smoke --out /tmp/ddp

    # Continue an interrupted run (same options, same --out):
    python examples/imagenet_resnet50.py --data /datasets/imagenet --resume

    # Any option can come from a YAML file (keys are the option names); the command line wins:
    python examples/imagenet_resnet50.py -c runs/imagenet_resnet50/config.yaml --amount 0.9

Defaults. Without ``--data`` the stand-in preset applies: ``--image-size 64 --batch-size 32
--workers 0 --crop-scale 0.5 --no-hflip`` (digits are not mirror images), a dense warm-up
(``--warmup-epochs 5 --warmup-lr 0.05``), 2 BiP epochs with ``--lower-lr 0.05 --min-keep 0.02``
(a 2% per-layer floor) and ``--finetune-epochs 1``; ``--help`` shows each preset value next to
the real-run default. ``--smoke`` shrinks everything further. Precedence, lowest first: the
real-run defaults, the stand-in or smoke preset, the ``-c`` YAML file, the command line.

The BiP hyperparameters of a real run follow the paper (Zhang et al., NeurIPS 2022):
lower-level (weights) learning rate 0.01 with a cosine schedule, upper-level (scores) learning
rate 0.1 with step decay (x0.1 at 50% and 75% of the steps), SGD momentum 0.9, lower-level L2
coefficient gamma = 1e-4 for ImageNet. The number of BiP epochs (5), the batch size (128) and
the absence of a per-layer floor are a starting point of ours, not values from the paper; the
implicit-gradient coefficient defaults to torchbip's ``BiPConfig().implicit_coef``.

A dense ResNet-50 trained here from scratch starts with zero-initialised residual branches
(``zero_init_residual=True``), which keeps it stable at small batch sizes.

Distributed data parallel. Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment), every process joins the default process group (NCCL on
CUDA, with the device ``cuda:LOCAL_RANK``; gloo on CPU) and reads its own shard of both
splits through a :class:`~torch.utils.data.DistributedSampler` (validation shards are not
padded, so every image is counted once). Warm-up and fine-tuning wrap the model in
``DistributedDataParallel``; the BiP phase passes the bare model to ``global_prune``, which
averages gradients, losses and BatchNorm statistics over the default group itself (its
``process_group`` argument names another group) and calls ``sampler.set_epoch`` as its data
stream starts each pass. Evaluation all-reduces the correct counts. ``--batch-size`` is per
process and the learning rates are not rescaled. After BiP and at the end, every rank hashes
its whole model state (weights, masks, BatchNorm statistics); the run stops if the ranks
disagree, and ``report.json`` lists the hashes. Only rank 0 writes files and logs to
``train.log``; ``--out`` must be on a file system every rank can read for ``--resume``.

Checkpoint and resume. The dense model after warm-up and its evaluation go to ``dense.pth``
(``{"state_dict": ..., "accuracy": ..., "warmup_losses": ...}``; also usable as
``--pretrained``). The BiP phase saves its whole bi-level state (weights, scores, both
optimisers and schedules, step, data-stream positions, RNG) to ``bip_state.pt`` every
``--checkpoint-every`` steps and at its end (``BiPConfig.checkpoint_path``); both files are
written with ``torch.save`` of tensors and plain types and read with
``torch.load(weights_only=True)``. ``--resume`` (same options, same ``--out``) skips the
warm-up and the dense evaluation when ``dense.pth`` exists and continues BiP from
``bip_state.pt``; fine-tuning is not checkpointed (an interrupted one restarts). Each phase seeds
its own random number generators, so with ``--workers 0`` a resumed run ends with the same
weights as an uninterrupted one (with worker processes, data order is still resumed exactly
but augmentation draws are not). ``bip_state.pt`` (about 20 bytes per weight) is deleted when
the run completes, unless ``--keep-state``.

AMP and compilation. ``--amp bfloat16`` or ``--amp float16`` runs every forward pass under
:func:`torch.autocast` (bfloat16 is the one to use on CPUs); BiP gets ``amp=`` of
``global_prune`` (with its own loss scaling for float16), warm-up and fine-tuning use a
:class:`torch.amp.GradScaler` for float16. Weights stay float32. ``--compile`` runs warm-up,
fine-tuning and evaluation through ``torch.compile`` (``--compile-backend``, default
``inductor``); BiP runs eagerly (``torch.func``), and ``prune.remove`` and saving act on the
original module, so the saved keys carry no ``_orig_mod.`` prefix.

Outputs, in ``--out`` (default ``runs/imagenet_resnet50``): ``resnet50_pruned.pth`` (the
``state_dict`` after ``prune.remove``: plain ``weight`` keys), ``report.json`` (accuracy before and
after, per-layer sparsity, wall time and, on CUDA, peak memory per phase, the resolved config,
the distributed setup), ``density.png`` (kept fraction per layer), ``config.yaml`` (the
resolved options, reusable with ``-c``), ``train.log`` and ``dense.pth``.
"""

# %%
# Imports
# -------
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, models, transforms
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import torchbip
from torchbip.datasets import load_mnist

LOG = logging.getLogger("imagenet_resnet50")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDIN_PIXELS = 64  # side of the stand-in PNGs
DENSE_FILE = "dense.pth"  # the dense model after warm-up, with its evaluation
BIP_STATE_FILE = "bip_state.pt"  # the whole bi-level state of the BiP phase
# Options that a resumed run may change (everything else must match the interrupted run).
RESUME_MAY_CHANGE = frozenset(
    {"resume", "progress", "checkpoint_every", "keep_state", "workers", "device", "standin_dir",
     "out", "compile", "compile_backend"}
)  # fmt: skip
AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

# %%
# Command line: real-run defaults, presets, YAML, overrides
# ---------------------------------------------------------
# The stand-in preset replaces the real-run defaults when no ``--data`` is given, the smoke
# preset replaces both with tiny sizes; a ``-c`` YAML file then overrides the defaults, and the
# command line overrides everything.

STANDIN_PRESET: dict[str, Any] = {
    "image_size": 64,
    "batch_size": 32,
    "workers": 0,
    "crop_scale": 0.5,
    "hflip": False,
    "warmup_epochs": 5,
    "warmup_lr": 0.05,
    "epochs": 2.0,
    "lower_lr": 0.05,
    "min_keep": 0.02,
    "finetune_epochs": 1,
    "checkpoint_every": 20,
}
SMOKE_PRESET: dict[str, Any] = {
    "image_size": 32,
    "batch_size": 8,
    "workers": 0,
    "warmup_epochs": 1,
    "epochs": 1.0,
    "steps": 2,
    "finetune_epochs": 1,
    "limit_batches": 2,
    "standin_train_per_class": 4,
    "standin_val_per_class": 2,
    "checkpoint_every": 0,
}


def build_parser() -> argparse.ArgumentParser:
    """All options, grouped, with their real-run defaults."""
    bip_defaults = torchbip.BiPConfig()
    parser = argparse.ArgumentParser(
        description="BiP pruning of torchvision's ResNet-50 on ImageNet-layout data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-c", "--config", default=None, metavar="FILE",
        help="YAML file of option defaults (keys: option names); the command line overrides them",
    )  # fmt: skip

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", type=Path, default=None, metavar="DIR",
        help="ImageNet-layout folder with train/ and val/, one sub-folder per class; "
        "none: a stand-in built from the MNIST split shipped with torchbip",
    )  # fmt: skip
    data.add_argument(
        "--image-size", type=int, default=224,
        help="crop side: RandomResizedCrop(s) for training, Resize(s*256/224) + CenterCrop(s) "
        "for validation",
    )  # fmt: skip
    data.add_argument("--batch-size", type=int, default=128, help="minibatch size of every phase")
    data.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
    data.add_argument(
        "--crop-scale", type=float, default=0.08,
        help="smallest area fraction of RandomResizedCrop (torchvision's ImageNet default 0.08)",
    )  # fmt: skip
    data.add_argument(
        "--hflip", action=argparse.BooleanOptionalAction, default=True,
        help="random horizontal flips in training (part of the ImageNet recipe)",
    )  # fmt: skip
    data.add_argument(
        "--limit-batches", type=int, default=None,
        help="use at most this many batches per epoch and per evaluation (none: all)",
    )  # fmt: skip
    data.add_argument(
        "--standin-dir", type=Path, default=_cache_root() / "mnist-imagenet",
        help="cache folder of the MNIST stand-in (written once, reused)",
    )  # fmt: skip
    data.add_argument(
        "--standin-train-per-class", type=int, default=100,
        help="stand-in training images per class (from MNIST's training split)",
    )  # fmt: skip
    data.add_argument(
        "--standin-val-per-class", type=int, default=30,
        help="stand-in validation images per class (from MNIST's test split)",
    )  # fmt: skip

    model = parser.add_argument_group("model and dense warm-up")
    model.add_argument(
        "--pretrained", type=Path, default=None, metavar="PATH",
        help="dense ResNet-50 state_dict file (read with torch.load(weights_only=True)); "
        "a classifier of another size is replaced by a fresh one",
    )  # fmt: skip
    model.add_argument(
        "--warmup-epochs", type=int, default=0,
        help="dense training epochs before pruning (0: start from --pretrained as it is)",
    )  # fmt: skip
    model.add_argument("--warmup-lr", type=float, default=0.1, help="dense warm-up learning rate (cosine)")
    model.add_argument(
        "--weight-decay", type=float, default=1e-4, help="weight decay of warm-up and fine-tuning"
    )

    bip = parser.add_argument_group("BiP (torchbip.global_prune)")
    bip.add_argument(
        "--amount", type=float, default=0.95,
        help="fraction of all conv/linear weights to prune, ranked globally",
    )  # fmt: skip
    bip.add_argument("--epochs", type=float, default=5.0, help="BiP passes over the training set")
    bip.add_argument("--steps", type=int, default=None, help="BiP steps; overrides --epochs when given")
    bip.add_argument(
        "--mode", choices=["fused", "two_batch"], default=bip_defaults.mode,
        help="fused: one minibatch and one backward pass per step feed both levels; "
        "two_batch: the paper's alternation with a minibatch per level",
    )  # fmt: skip
    bip.add_argument(
        "--lower-lr", type=float, default=0.01, help="weights' learning rate alpha (cosine schedule)"
    )
    bip.add_argument(
        "--upper-lr", type=float, default=0.1,
        help="scores' learning rate beta (step decay: x0.1 at 50%% and 75%% of the steps)",
    )  # fmt: skip
    bip.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of both levels")
    bip.add_argument(
        "--gamma", type=float, default=1e-4, help="lower-level L2 coefficient gamma (paper: 1e-4 on ImageNet)"
    )
    bip.add_argument(
        "--implicit-coef", type=_optional_float, default=bip_defaults.implicit_coef,
        help="coefficient of the implicit-gradient term; 'none' for the theoretical 1/gamma, "
        "0 switches it off",
    )  # fmt: skip
    bip.add_argument(
        "--min-keep", type=_optional_float, default=None,
        help="fraction of every tensor always kept (per-layer floor of the global ranking)",
    )  # fmt: skip

    finetune = parser.add_argument_group("fine-tuning (mask fixed)")
    finetune.add_argument(
        "--finetune-epochs", type=int, default=0,
        help="epochs of training the pruned model, mask fixed",
    )  # fmt: skip
    finetune.add_argument(
        "--finetune-lr", type=float, default=0.01, help="fine-tuning learning rate (cosine)"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("runs/imagenet_resnet50"), help="output folder")
    run.add_argument("--seed", type=int, default=0, help="seed of every random number generator")
    run.add_argument(
        "--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ..."
    )
    run.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars"
    )
    run.add_argument(
        "--smoke", action="store_true", help="tiny sizes: a seconds-long run of every phase (for tests)"
    )

    scale = parser.add_argument_group("precision, compilation, checkpoints (torchrun: see the docstring)")
    scale.add_argument(
        "--amp", choices=list(AMP_DTYPES), default="none",
        help="autocast dtype of every forward pass (bfloat16 on CPU; float16 or bfloat16 on GPU)",
    )  # fmt: skip
    scale.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile the model for warm-up, fine-tuning and evaluation (BiP runs eagerly)",
    )  # fmt: skip
    scale.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend ('inductor'; 'aot_eager' or 'eager' compile faster)",
    )  # fmt: skip
    scale.add_argument(
        "--resume", action="store_true",
        help=f"continue an interrupted run in --out: reuse {DENSE_FILE}, resume BiP from {BIP_STATE_FILE}",
    )  # fmt: skip
    scale.add_argument(
        "--checkpoint-every", type=int, default=500,
        help=f"BiP steps between two saves of {BIP_STATE_FILE} (0: only at the end of BiP)",
    )  # fmt: skip
    scale.add_argument(
        "--keep-state", action=argparse.BooleanOptionalAction, default=False,
        help=f"keep {BIP_STATE_FILE} when the run completes (it is deleted by default)",
    )  # fmt: skip
    for action in parser._actions:  # show the stand-in preset next to each default it replaces
        if action.dest in STANDIN_PRESET and action.help is not None:
            action.help += f" [stand-in preset: {STANDIN_PRESET[action.dest]}]"
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, str]:
    """Two-stage parse: presets and the ``-c`` YAML give defaults, the command line wins.

    Returns:
        The resolved options and the name of the preset in use (``imagenet``, ``standin``,
        ``smoke``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default=None)
    known, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    file_defaults = _read_yaml_defaults(parser, known.config) if known.config else {}
    parser.set_defaults(**file_defaults)
    probe, _ = parser.parse_known_args(remaining)
    preset = "imagenet" if probe.data is not None else "standin"
    if preset == "standin":
        parser.set_defaults(**STANDIN_PRESET)
    if probe.smoke:
        preset = "smoke"
        parser.set_defaults(**SMOKE_PRESET)
    parser.set_defaults(**file_defaults)
    args = parser.parse_args(remaining)
    args.config = known.config
    _check_args(parser, args)
    return args, preset


def _read_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    dests = {a.dest for a in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - dests)
    if unknown:
        parser.error(f"{path}: unknown option(s) {unknown}")
    for key in ("data", "pretrained", "out", "standin_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return values


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.amount <= 1.0:
        parser.error(f"--amount must lie in [0, 1], got {args.amount}")
    for name in ("image_size", "batch_size", "standin_train_per_class", "standin_val_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_epochs", "finetune_epochs", "workers", "checkpoint_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.limit_batches is not None and args.limit_batches < 1:
        parser.error(f"--limit-batches must be >= 1, got {args.limit_batches}")
    if args.pretrained is not None and not args.pretrained.is_file():
        parser.error(f"--pretrained: no such file: {args.pretrained}")
    if args.data is not None:
        for split in ("train", "val"):
            if not (args.data / split).is_dir():
                parser.error(f"--data: expected {args.data / split} (ImageNet layout: train/ and val/)")


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "null") else float(text)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchbip"


# %%
# Data: the MNIST stand-in and the ImageFolder loaders
# ----------------------------------------------------
# The stand-in is a real ImageNet-layout folder (``train/<class>/*.png``, ``val/<class>/*.png``),
# so the code path below is the one a real ImageNet run takes.


def build_standin(root: Path, train_per_class: int, val_per_class: int, progress: bool) -> Path:
    """Write (once) an ImageNet-layout folder of RGB PNGs made from the packaged MNIST split.

    Training images come from MNIST's training split, validation images from its test split
    (the first ``*_per_class`` of each digit). The folder is built in a temporary sibling and
    renamed into place, so an interrupted run never leaves a half-written cache.
    """
    from PIL import Image

    folder = root / f"train{train_per_class}-val{val_per_class}-{STANDIN_PIXELS}px"
    if (folder / "DONE").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        for split, source, per_class in (
            ("train", "train", train_per_class),
            ("val", "test", val_per_class),
        ):
            images, labels = load_mnist(split=source, per_class=per_class).tensors
            pixels = (images[:, 0] * 255).round().to(torch.uint8).numpy()
            counters: dict[int, int] = {}
            for image, label in tqdm(
                list(zip(pixels, labels.tolist(), strict=True)),
                desc=f"stand-in {split}", unit="img", disable=not progress, leave=False,
            ):  # fmt: skip
                index = counters.get(label, 0)
                counters[label] = index + 1
                target = tmp / split / str(label)
                target.mkdir(parents=True, exist_ok=True)
                rgb = Image.fromarray(image, mode="L").convert("RGB")
                rgb = rgb.resize((STANDIN_PIXELS, STANDIN_PIXELS), Image.Resampling.BILINEAR)
                rgb.save(target / f"mnist_{source}_{label}_{index:05d}.png")
        (tmp / "README.txt").write_text(
            "ImageNet-layout stand-in written by torchbip's examples/imagenet_resnet50.py from "
            "MNIST (Yann LeCun, Corinna Cortes, Christopher J. C. Burges; CC BY-SA 3.0).\n"
        )
        (tmp / "DONE").write_text("complete\n")
        if (folder / "DONE").is_file():  # another process finished the same folder meanwhile
            shutil.rmtree(tmp)
            return folder
        if folder.exists():  # left incomplete by something else: replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def imagenet_transforms(image_size: int, crop_scale: float, hflip: bool) -> tuple[Any, Any]:
    """torchvision's standard ImageNet transforms, with the 256/224 ratio kept for other sizes."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    flip = [transforms.RandomHorizontalFlip()] if hflip else []
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1.0)),
            *flip,
            transforms.ToTensor(),
            normalize,
        ]
    )
    val = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, val


class ShardSampler(DistributedSampler):
    """The ``rank``-th of ``num_replicas`` interleaved shards of a dataset, in order, unpadded.

    For evaluation: unlike :class:`~torch.utils.data.DistributedSampler` (which pads the shards
    to equal length with repeated samples), every sample is read by exactly one rank, so the
    all-reduced counts are exact. Shards may differ in length by one.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = range(rank, len(dataset), num_replicas)
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


def make_loaders(
    root: Path, args: argparse.Namespace, world: int = 1, rank: int = 0
) -> tuple[DataLoader, DataLoader, list[str]]:
    """``ImageFolder`` loaders of ``root/train`` (shuffled) and ``root/val``, sharded by rank.

    Training uses a :class:`~torch.utils.data.DistributedSampler` (also with one process): its
    order depends only on ``--seed`` and the epoch passed to ``set_epoch``, so every phase, and
    a resumed run, sees the same order. Validation uses :class:`ShardSampler`.
    """
    train_tf, val_tf = imagenet_transforms(args.image_size, args.crop_scale, args.hflip)
    train_set = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val_set = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    if train_set.classes != val_set.classes:
        raise ValueError(f"{root}: train/ and val/ hold different class folders")
    common = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": args.workers > 0,
    }
    train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(
        train_set, sampler=train_sampler, drop_last=len(train_sampler) > args.batch_size, **common
    )
    val_loader = DataLoader(val_set, sampler=ShardSampler(val_set, world, rank), **common)
    return train_loader, val_loader, train_set.classes


# %%
# Model, training and evaluation
# ------------------------------


def build_model(num_classes: int, pretrained: Path | None) -> nn.Module:
    """``torchvision.models.resnet50`` (no download), optionally from a dense state_dict file."""
    # Residual branches start at zero (their last BatchNorm's weight is 0): a from-scratch
    # ResNet-50 then trains stably at small batch sizes. Loaded weights overwrite this.
    model = models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)
    if pretrained is None:
        return model
    state = torch.load(pretrained, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != num_classes:
        LOG.warning(
            "%s has a %d-class classifier; the data has %d classes: fc is re-initialised",
            pretrained, fc.shape[0], num_classes,
        )  # fmt: skip
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"{pretrained}: not a ResNet-50 state_dict ({missing=}, {unexpected=})")
    else:
        model.load_state_dict(state, strict=True)
    LOG.info("loaded dense weights from %s", pretrained)
    return model


def limited(loader: Any, limit: int | None) -> Iterator[Any]:
    """The first ``limit`` batches of ``loader`` (all of them for ``None``)."""
    return iter(loader) if limit is None else itertools.islice(loader, limit)


def n_batches(loader: Any, limit: int | None) -> int:
    return len(loader) if limit is None else min(limit, len(loader))


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` with the ``--amp`` dtype, or nothing for ``--amp none``."""
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    device: torch.device,
    limit: int | None,
    desc: str,
    progress: bool,
    runner: nn.Module | None = None,
    amp: str = "none",
    ctx: DistContext | None = None,
) -> list[float]:
    """SGD with momentum and a cosine schedule; returns the mean loss of each epoch.

    ``runner`` is what is called on a batch: ``model`` itself, its ``DistributedDataParallel``
    wrapper or a compiled one (they share ``model``'s parameters). Each epoch calls the
    sampler's ``set_epoch``. Under ``--amp float16`` a :class:`torch.amp.GradScaler` scales
    the loss. With several processes the epoch losses are averaged over the ranks and, at the
    end, the BatchNorm statistics too (each rank updated them on its own shard), so every rank
    ends with the same model.

    On a pruned model this trains ``weight_orig``: the pruning hooks multiply by the mask in
    every forward pass, so the gradient of a pruned entry is zero and its effective weight
    stays zero (weight decay may move ``weight_orig`` there, which the mask hides).
    """
    ctx = ctx or DistContext()
    runner = model if runner is None else runner
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = max(1, epochs * n_batches(loader, limit))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "float16")
    losses = []
    runner.train()
    for epoch in range(epochs):
        set_epoch = getattr(loader.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        running, seen = 0.0, 0
        bar = tqdm(
            limited(loader, limit), total=n_batches(loader, limit), desc=f"{desc} {epoch + 1}/{epochs}",
            unit="batch", disable=not progress, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = runner(images)
            loss = F.cross_entropy(logits.float(), labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{desc}: non-finite loss {loss.item()}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():  # a float16 step skipped for overflow: still advance
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                schedule.step()
            running += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(
                loss=f"{running / seen:.4f}", lr=f"{schedule.get_last_lr()[0]:.4g}", refresh=False
            )
        running, seen = ctx.sum([running, seen], device)
        losses.append(running / max(seen, 1))
        LOG.info("%s epoch %d/%d: train loss %.4f", desc, epoch + 1, epochs, losses[-1])
    optimizer.zero_grad(set_to_none=True)
    ctx.average_buffers(model)
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    limit: int | None,
    desc: str,
    progress: bool,
    amp: str = "none",
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean loss on ``loader`` (summed over the ranks' shards)."""
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    bar = tqdm(
        limited(loader, limit), total=n_batches(loader, limit), desc=desc, unit="batch",
        disable=not progress, leave=False, dynamic_ncols=True,
    )  # fmt: skip
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        seen += len(labels)
    model.train(was_training)
    correct1, correct5, seen, loss_sum = ctx.sum([correct1, correct5, seen, loss_sum], device)
    seen = int(seen)
    result = {
        "top1": correct1 / seen,
        "top5": correct5 / seen,
        "loss": loss_sum / seen,
        "images": seen,
    }
    LOG.info(
        "%s: top-1 %.2f%%, top-5 %.2f%%, loss %.4f",
        desc,
        100 * result["top1"],
        100 * result["top5"],
        result["loss"],
    )
    return result


def remove_pruning(model: nn.Module) -> int:
    """``prune.remove`` on every pruned tensor of ``model``; returns how many were removed."""
    removed = 0
    for module in model.modules():
        for name, _ in list(module.named_buffers(recurse=False)):
            if name.endswith("_mask") and hasattr(module, name[: -len("_mask")] + "_orig"):
                prune.remove(module, name[: -len("_mask")])
                removed += 1
    return removed


# %%
# Outputs: density chart, report
# ------------------------------


def plot_density(sparsity: dict[str, Any], path: Path, title: str) -> None:
    """Bar chart of the kept fraction (density) of every pruned tensor, in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n.removesuffix(".weight") for n in sparsity["tensors"]]
    density = [1.0 - t["sparsity"] for t in sparsity["tensors"].values()]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.2 * len(names) + 2), 4.8), layout="constrained")
    ax.bar(range(len(names)), density, color="tab:blue")
    ax.axhline(1.0 - sparsity["global_sparsity"], color="tab:red", linestyle="--",
               label=f"global density {1.0 - sparsity['global_sparsity']:.2%}")  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("density (kept fraction)")
    ax.set_ylim(0, max([*density, 0.05]) * 1.1)
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


class PhaseTimer:
    """Wall-clock seconds of named phases and, on CUDA, their peak allocated memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_memory_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.peak_memory_mb[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            self.seconds[name] = round(time.perf_counter() - start, 3)
            LOG.info("phase %s: %.1f s", name, self.seconds[name])

    def skipped(self, name: str) -> None:
        """A phase that a resumed run did not need to repeat."""
        self.seconds[name] = 0.0
        LOG.info("phase %s: skipped (resumed)", name)


def _setup_logging(out: Path, ctx: DistContext) -> list[logging.Handler]:
    """Rank 0 logs to ``train.log`` and stdout; other ranks print only warnings, to stderr."""
    if ctx.is_main:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        handlers: list[logging.Handler] = [logging.FileHandler(out / "train.log", mode="w")]
        handlers.append(logging.StreamHandler(sys.stdout))
    else:
        formatter = logging.Formatter(f"%(asctime)s %(levelname)s [rank {ctx.rank}] %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stderr)]
    for handler in handlers:
        handler.setFormatter(formatter)
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    LOG.propagate = False
    return handlers


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _phase_seed(seed: int, phase: str, rank: int) -> int:
    """Each training phase seeds itself: its random draws do not depend on earlier phases
    (a resumed run that skips a phase draws the same numbers), and differ between ranks."""
    return seed + 1000 * {"warmup": 1, "finetune": 2}[phase] + rank


def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "config"}


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


# %%
# Distributed data parallel (torchrun)
# ------------------------------------
# One process per device. ``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; the default process
# group is then what ``torchbip.global_prune`` averages over (its ``process_group=None``).


@dataclasses.dataclass
class DistContext:
    """This process's place in a ``torchrun`` launch; one process: rank 0 of 1, no group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed over the ranks (one all-reduce)."""
        if not self.distributed:
            return [float(v) for v in values]
        on = device if self.backend == "nccl" else torch.device("cpu")
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
        dist.all_reduce(total)
        return total.tolist()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``DistributedDataParallel(model)`` under torchrun, else ``model``.

        Buffers are synchronised when wrapping but not before every forward pass: the masks
        (buffers, identical on every rank) are not sent again and again; BatchNorm statistics
        are averaged once a phase ends instead (:meth:`average_buffers`).
        """
        if not self.distributed:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        # ``forward_sync_buffers`` replaces ``broadcast_buffers`` in recent torch releases
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(model, device_ids=device_ids, **no_sync)

    @torch.no_grad()
    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm statistics) over the ranks."""
        if not self.distributed:
            return
        buffers = [b for n, b in model.named_buffers() if b.is_floating_point() and not n.endswith("_mask")]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def check_agreement(self, model: nn.Module, when: str) -> list[str]:
        """Hash the whole model state on every rank; raise unless all ranks hold the same."""
        if not self.distributed:
            return []
        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, state_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks' models differ {when}: state digests {digests}")
        LOG.info("all %d ranks hold the same model state %s (sha256 %s)", self.world, when, digests[0])
        return digests

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the default process group when launched by ``torchrun`` with several processes.

    The backend is NCCL on CUDA (each process takes ``cuda:LOCAL_RANK``) and gloo on CPU. A
    process group that the caller initialised already is used as it is (and not destroyed).
    """
    device = _resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world < 2:
        return DistContext(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:  # env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE from torchrun
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        backend = dist.get_backend()
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, owns), device


def state_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of every tensor in ``model.state_dict()`` and its name."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def make_runner(
    model: nn.Module, args: argparse.Namespace, ctx: DistContext, device: torch.device, *, training: bool
) -> nn.Module:
    """What a phase calls on a batch: DDP for training under torchrun, compiled with --compile.

    Both wrappers share ``model``'s parameters and buffers; pruning, ``prune.remove`` and saving
    act on ``model`` itself.
    """
    runner = ctx.wrap(model, device) if training else model
    if args.compile:
        runner = torch.compile(runner, backend=args.compile_backend)
    return runner


# %%
# Checkpoints and resume
# ----------------------


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_resume_options(saved_config: Path, config: dict[str, Any]) -> None:
    """``--resume`` continues the run that ``saved_config`` describes: the options must match."""
    if not saved_config.is_file():
        return
    saved = yaml.safe_load(saved_config.read_text()) or {}
    changed = {
        k: (saved[k], v)
        for k, v in config.items()
        if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v
    }
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"--resume: these options differ from the run in {saved_config.parent} ({details}); "
            "pass the same options, or start a new run without --resume or in another --out"
        )


def _load_dense(path: Path, model: nn.Module) -> dict[str, Any] | None:
    """The warm-up result of an interrupted run (``None`` if there is none)."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"], strict=True)
    return saved


def _checkpoint_step(path: Path) -> int | None:
    """The step a BiP checkpoint was saved at (read lazily; ``None`` if unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # global_prune reports what is wrong with the file
        return None


# %%
# The pipeline
# ------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every phase and write the outputs; returns the report (also in ``report.json``).

    Under ``torchrun`` every process runs this; only rank 0 writes files.
    """
    args, preset = parse_args(argv)
    ctx, device = init_distributed(args.device)
    try:
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        handlers = _setup_logging(out, ctx)
        try:
            with logging_redirect_tqdm(loggers=[LOG]):
                return _pipeline(args, preset, out, ctx, device)
        finally:
            for handler in handlers:
                LOG.removeHandler(handler)
                handler.close()
    finally:
        ctx.close()


def _pipeline(
    args: argparse.Namespace, preset: str, out: Path, ctx: DistContext, device: torch.device
) -> dict[str, Any]:
    start = time.perf_counter()
    timer = PhaseTimer(device)
    progress = args.progress and ctx.is_main
    config = _config_dict(args)
    if args.resume:
        _check_resume_options(out / "config.yaml", config)
    ctx.barrier()  # every rank has read the previous config.yaml before rank 0 replaces it
    if ctx.is_main:
        with open(out / "config.yaml", "w") as f:
            f.write(
                f"# resolved options of examples/imagenet_resnet50.py (preset: {preset}); reuse with -c\n"
            )
            yaml.safe_dump(config, f, sort_keys=False)
    LOG.info(
        "preset %s, device %s, torch %s, torchbip %s", preset, device, torch.__version__, torchbip.__version__
    )
    if ctx.distributed:
        LOG.info(
            "distributed data parallel: %d processes (%s), %d images per process and step, %d in all",
            ctx.world, ctx.backend, args.batch_size, ctx.world * args.batch_size,
        )  # fmt: skip
    LOG.info("options: %s", json.dumps(config))
    _seed_everything(args.seed)

    # 1. Data: ImageFolder over --data, or over the MNIST stand-in (built once, then reused).
    with timer("data"):
        if args.data is None:
            standin = (args.standin_dir, args.standin_train_per_class, args.standin_val_per_class)
            if ctx.is_main:
                build_standin(*standin, progress)
            ctx.barrier()  # rank 0 has written the folder; the others find it complete
            root = build_standin(*standin, progress)
            LOG.info("stand-in ImageNet-layout data (MNIST, CC BY-SA 3.0) in %s", root)
        else:
            root = args.data
        train_loader, val_loader, classes = make_loaders(root, args, ctx.world, ctx.rank)
    LOG.info(
        "%d classes, %d training / %d validation images, %d px crops",
        len(classes), len(train_loader.dataset), len(val_loader.dataset), args.image_size,  # type: ignore[arg-type]
    )  # fmt: skip

    # 2. Dense model: a fresh or a loaded ResNet-50, optionally trained densely first. A resumed
    #    run takes the warm-up result (and its evaluation) from dense.pth.
    model = build_model(len(classes), args.pretrained).to(device)

    def train_phase(phase: str, epochs: float, lr: float, desc: str) -> list[float]:
        """Warm-up or fine-tuning: SGD over ``train_loader``, seeded per phase and rank."""
        _seed_everything(_phase_seed(args.seed, phase, ctx.rank))
        return train(
            model, train_loader, epochs=epochs, lr=lr, momentum=args.momentum,
            weight_decay=args.weight_decay, device=device, limit=args.limit_batches, desc=desc,
            progress=progress, runner=make_runner(model, args, ctx, device, training=True),
            amp=args.amp, ctx=ctx,
        )  # fmt: skip

    def evaluate_phase(desc: str) -> dict[str, Any]:
        """Top-1 accuracy and loss of ``model`` on ``val_loader``."""
        runner = make_runner(model, args, ctx, device, training=False)
        return evaluate(runner, val_loader, device, args.limit_batches, desc, progress, args.amp, ctx)

    dense_path = out / DENSE_FILE
    dense = _load_dense(dense_path, model) if args.resume and args.warmup_epochs > 0 else None
    resumed: dict[str, Any] = {"warmup": dense is not None, "bip_from_step": None}
    if dense is not None:
        warmup_losses, acc_dense = list(dense["warmup_losses"]), dict(dense["accuracy"])
        LOG.info("resumed: the dense warm-up result and its evaluation from %s", dense_path)
        timer.skipped("warmup")
        timer.skipped("eval_dense")
    else:
        warmup_losses = []
        with timer("warmup"):
            if args.warmup_epochs > 0:
                warmup_losses = train_phase("warmup", args.warmup_epochs, args.warmup_lr, "dense warm-up")
            elif args.pretrained is None:
                LOG.warning("pruning a randomly initialised model: pass --pretrained or --warmup-epochs")
        with timer("eval_dense"):
            acc_dense = evaluate_phase("eval dense")
        if args.warmup_epochs > 0 and ctx.is_main:
            dense_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            _save_atomic(
                {"state_dict": dense_state, "warmup_losses": warmup_losses, "accuracy": acc_dense},
                dense_path,
            )

    # 3. BiP: weights and a 95%-sparse mask optimised together (torch pruning state afterwards).
    #    Under torchrun, global_prune averages over the default process group by itself.
    bip_state = out / BIP_STATE_FILE
    if args.resume and bip_state.is_file():
        resumed["bip_from_step"] = _checkpoint_step(bip_state)
        LOG.info("resuming BiP from step %s of %s", resumed["bip_from_step"], bip_state)
    bip_config = torchbip.BiPConfig(
        steps=args.steps,
        epochs=None if args.steps is not None else args.epochs,
        mode=args.mode,
        lower_lr=args.lower_lr,
        lower_schedule="cosine",
        upper_lr=args.upper_lr,
        upper_schedule="step",
        momentum=args.momentum,
        gamma=args.gamma,
        implicit_coef=args.implicit_coef,
        min_keep=args.min_keep,
        seed=args.seed,
        progress=progress,
        amp=None if args.amp == "none" else args.amp,
        checkpoint_path=str(bip_state),
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    bip_loader: Any = train_loader
    if args.limit_batches is not None and args.steps is None:
        bip_loader = _Limited(train_loader, args.limit_batches)
    with timer("bip"):
        bip = torchbip.global_prune(model, amount=args.amount, loader=bip_loader, config=bip_config)
    LOG.info(
        "BiP: %d steps in %.1f s, global sparsity %.4f, final loss %.4f",
        bip.steps, bip.wall_time_s, bip.global_sparsity, bip.final_loss,
    )  # fmt: skip
    digests = {"bip": ctx.check_agreement(model, "after BiP")}
    with timer("eval_pruned"):
        acc_pruned = evaluate_phase("eval pruned")

    # 4. Optional fine-tuning with the mask fixed (torch's hooks keep pruned entries at zero).
    acc_finetuned = None
    finetune_losses: list[float] = []
    masks_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    with timer("finetune"):
        if args.finetune_epochs > 0:
            finetune_losses = train_phase("finetune", args.finetune_epochs, args.finetune_lr, "fine-tune")
    masks_after = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}
    if any(not torch.equal(masks_before[k], masks_after[k]) for k in masks_before):
        raise RuntimeError("a pruning mask changed during fine-tuning")
    if args.finetune_epochs > 0:
        with timer("eval_finetuned"):
            acc_finetuned = evaluate_phase("eval fine-tuned")
    digests["final"] = ctx.check_agreement(model, "at the end")

    # 5. Per-layer sparsity (read from the masks), then make the pruning permanent and save.
    #    Everything here acts on the original module, never on a DDP or compiled wrapper.
    sparsity = torchbip.sparsity_report(model).to_dict()
    with timer("save"):
        val_set = val_loader.dataset
        probe = torch.stack([val_set[i][0] for i in range(min(args.batch_size, len(val_set)))])  # type: ignore[arg-type]
        probe = probe.to(device)
        model.eval()
        with torch.no_grad():
            logits_masked = model(probe)
            removed = remove_pruning(model)
            logits_removed = model(probe)
        outputs_equal = bool(torch.equal(logits_masked, logits_removed))
        prunable = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        zeros = sum(int((w == 0).sum()) for w in prunable)
        total = sum(w.numel() for w in prunable)
        if ctx.is_main:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save(state, out / "resnet50_pruned.pth")
            plot_density(
                sparsity, out / "density.png", f"ResNet-50 after BiP, {bip.global_sparsity:.1%} sparse"
            )
    LOG.info(
        "prune.remove on %d tensors; outputs unchanged: %s; zero weights %d / %d (%.4f)",
        removed, outputs_equal, zeros, total, zeros / total,
    )  # fmt: skip

    acc_final = acc_finetuned if acc_finetuned is not None else acc_pruned
    bip_dict = bip.to_dict()
    bip_dict.pop("sparsity")
    report: dict[str, Any] = {
        "example": "imagenet_resnet50",
        "preset": preset,
        "model": "torchvision.models.resnet50",
        "data": {
            "root": str(root),
            "standin": args.data is None,
            "classes": len(classes),
            "train_images": len(train_loader.dataset),  # type: ignore[arg-type]
            "val_images": len(val_loader.dataset),  # type: ignore[arg-type]
            "image_size": args.image_size,
        },
        "amount": args.amount,
        "accuracy_before": acc_dense["top1"],
        "accuracy_after": acc_final["top1"],
        "accuracy": {"dense": acc_dense, "pruned": acc_pruned, "finetuned": acc_finetuned},
        "sparsity": sparsity,
        "checkpoint": {
            "path": "resnet50_pruned.pth",
            "removed": removed,
            "zero_weights": zeros,
            "prunable_weights": total,
            "outputs_equal_after_remove": outputs_equal,
        },
        "losses": {"warmup": warmup_losses, "finetune": finetune_losses},
        "bip": bip_dict,
        "resumed": resumed,
        "distributed": None
        if not ctx.distributed
        else {
            "world_size": ctx.world,
            "backend": ctx.backend,
            "global_batch_size": ctx.world * args.batch_size,
            "state_digests": digests,
            "ranks_agree": True,  # check_agreement raised otherwise
        },
        "precision": {"amp": args.amp, "compile": args.compile_backend if args.compile else None},
        "wall_time_s": {**timer.seconds, "total": round(time.perf_counter() - start, 3)},
        "peak_memory_mb": timer.peak_memory_mb or None,
        "config": config,
        "environment": {
            "device": str(device),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "torchbip": torchbip.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "processes": ctx.world,
            "peak_rss_mb": _peak_rss_mb(),
        },
    }
    if ctx.is_main:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep_state:
            bip_state.unlink(missing_ok=True)
    LOG.info(
        "top-1 accuracy: dense %.2f%% -> BiP %.2f%%%s at %.2f%% sparsity; %.1f s in all; outputs in %s",
        100 * acc_dense["top1"], 100 * acc_pruned["top1"],
        "" if acc_finetuned is None else f" -> fine-tuned {100 * acc_finetuned['top1']:.2f}%",
        100 * bip.global_sparsity, report["wall_time_s"]["total"], out,
    )  # fmt: skip
    ctx.barrier()  # rank 0's files are complete before any process leaves
    return report


class _Limited:
    """A re-iterable view of the first ``limit`` batches of a loader (``len`` included).

    It exposes the loader's ``sampler``, so ``global_prune``'s data stream still calls
    ``sampler.set_epoch`` at every pass.
    """

    def __init__(self, loader: DataLoader, limit: int) -> None:
        self.loader, self.limit = loader, limit
        self.sampler = loader.sampler

    def __iter__(self) -> Iterator[Any]:
        return limited(self.loader, self.limit)

    def __len__(self) -> int:
        return n_batches(self.loader, self.limit)


if __name__ == "__main__":
    main()
