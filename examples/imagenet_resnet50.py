"""Prune torchvision's ResNet-50 to 95% sparsity with BiP, in a plain PyTorch training loop.

Written like torchvision's ``references/classification/train.py``: plain functions and one
training loop for every phase (dense warm-up, BiP, fine-tuning with the mask fixed), each
followed by an evaluation. BiP adds three lines to that loop::

    pruner = torchbip.BiP(model, amount=0.95, steps=total_steps)  # before DDP wraps the model
        ...
        scaler.step(optimizer)
        pruner.step(scaler=scaler)  # after the optimizer's step, before scaler.update()
        scaler.update()
    pruner.finish()  # torch's pruned form; prune.remove then makes the zeros permanent

Run it without arguments (an MNIST stand-in, minutes on a CPU); ``--help`` and ``examples/README.md``
show ``--smoke`` (seconds), ``--data /datasets/imagenet``, ``torchrun``, ``--amp``, ``--compile`` and
``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import script_utils
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, models, transforms
from tqdm.auto import tqdm

import torchbip
from torchbip.datasets import mnist_image_folder
from torchbip.export import make_permanent

LOG = logging.getLogger("imagenet_resnet50")
AMP = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
PHASES = ("warmup", "bip", "finetune")
MAY_CHANGE_ON_RESUME = {"resume", "progress", "device", "out", "standin_dir"}  # workers: they draw the crops
# a checkpoint does not depend on the options of later phases (a resume may change them)
BIP_OPTIONS = {"amount", "epochs", "lower_lr", "upper_lr", "gamma", "implicit_coef", "min_keep"}
FINETUNE = {"finetune_epochs", "finetune_lr"}
# fmt: off
STANDIN_PRESET = {"image_size": 64, "batch_size": 32, "workers": 0, "crop_scale": 0.5, "hflip": False,
                  "warmup_epochs": 5, "warmup_lr": 0.05, "epochs": 2, "lower_lr": 0.05, "min_keep": 0.02,
                  "finetune_epochs": 1}
SMOKE_PRESET = {"image_size": 32, "batch_size": 8, "workers": 0, "warmup_epochs": 1, "epochs": 2,
                "finetune_epochs": 1, "limit_batches": 2, "standin_train_per_class": 4,
                "standin_val_per_class": 2}
RANGES = {"amount": (0.0, 1.0), "momentum": (0.0, 1.0), "crop_scale": (1e-6, 1.0), "min_keep": (0.0, 1.0),
          **dict.fromkeys(("warmup_lr", "lower_lr", "upper_lr", "finetune_lr", "weight_decay", "gamma",
                           "implicit_coef"), (0.0, math.inf))}  # checked before any training
# fmt: on


def build_parser() -> argparse.ArgumentParser:
    epilog = f"Without --data, the stand-in preset replaces these defaults: {STANDIN_PRESET}"
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=epilog)
    add, flag = parser.add_argument, argparse.BooleanOptionalAction
    add("-c", "--config", metavar="FILE", help="YAML file of option defaults (the command line wins)")
    add("--data", type=Path, help="folder with train/ and val/ (none: the MNIST stand-in)")
    add("--image-size", type=int, default=224, help="crop side (validation: resize to side*256/224)")
    add("--batch-size", type=int, default=128, help="images per process and step")
    add("--workers", type=int, default=8, help="DataLoader worker processes")
    add("--crop-scale", type=float, default=0.08, help="smallest area fraction of RandomResizedCrop")
    add("--hflip", action=flag, default=True, help="random horizontal flips")
    add("--limit-batches", type=int, help="at most this many batches per epoch and evaluation")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchbip" / "mnist-imagenet"
    add("--standin-dir", type=Path, default=cache, help="cache folder of the stand-in")
    add("--standin-train-per-class", type=int, default=100, help="stand-in training images per class")
    add("--standin-val-per-class", type=int, default=30, help="stand-in validation images per class")
    add("--pretrained", type=Path, help="dense ResNet-50 state_dict file (same number of classes)")
    add("--warmup-epochs", type=int, default=0, help="dense training epochs before pruning")
    add("--warmup-lr", type=float, default=0.1, help="warm-up learning rate (cosine)")
    add("--weight-decay", type=float, default=1e-4, help="weight decay of warm-up and fine-tuning")
    add("--amount", type=float, default=0.95, help="fraction of all conv/linear weights to prune")
    add("--epochs", type=int, default=5, help="BiP epochs")
    add("--lower-lr", type=float, default=0.01, help="BiP: the weights' learning rate (cosine)")
    add("--upper-lr", type=float, default=0.1, help="BiP: the scores' learning rate (x0.1 at 50%% and 75%%)")
    add("--momentum", type=float, default=0.9, help="SGD momentum of weights and scores")
    add("--gamma", type=float, default=1e-4, help="BiP: the weights' weight decay")
    add("--implicit-coef", type=float, default=1.0, help="BiP: coefficient of the implicit gradient")
    add("--min-keep", type=float, help="BiP: fraction of every tensor that is always kept")
    add("--finetune-epochs", type=int, default=0, help="epochs of training with the mask fixed")
    add("--finetune-lr", type=float, default=0.01, help="fine-tuning learning rate (cosine)")
    add("--out", type=Path, default=Path("runs/imagenet_resnet50"), help="output folder")
    add("--seed", type=int, default=0, help="seed of the model, the data order and the augmentations")
    add("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:0', ...")
    add("--progress", action=flag, default=True, help="tqdm progress bars")
    add("--smoke", action=flag, default=False, help="tiny sizes: every phase in seconds")
    add("--amp", choices=list(AMP), default="none", help="autocast dtype (float16 with a GradScaler)")
    add("--compile", action=flag, default=False, help="torch.compile the model")
    add("--compile-backend", default="inductor", help="torch.compile backend")
    add("--resume", action=flag, default=False, help="continue the interrupted run in --out")
    return parser


def presets(probe: argparse.Namespace) -> dict[str, Any]:
    """The stand-in preset without ``--data``, the smoke preset with ``--smoke``."""
    return {**(STANDIN_PRESET if probe.data is None else {}), **(SMOKE_PRESET if probe.smoke else {})}


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, str]:
    """The options (defaults < stand-in or smoke preset < ``-c`` file < command line), the preset."""
    parser = build_parser()
    args = script_utils.parse_with_config(parser, sys.argv[1:] if argv is None else argv, presets)
    script_utils.check_counts(parser, args, zero_ok=("workers", "warmup_epochs", "finetune_epochs"))
    script_utils.check_ranges(parser, args, RANGES)
    script_utils.check_seed(parser, args.seed)
    script_utils.check_device(parser, args.device)
    script_utils.check_compile_backend(parser, args.compile_backend if args.compile else None)
    if args.batch_size < 2:  # BatchNorm needs two images per batch and process in training
        parser.error(f"--batch-size: must be >= 2 (BatchNorm statistics), got {args.batch_size}")
    script_utils.check_folder(parser, "--out", args.out)  # a file or a read-only folder: refused now
    if args.data is None and not standin_root(args).is_dir():  # the stand-in, written unless it is there
        script_utils.check_folder(parser, "--standin-dir", args.standin_dir)
    classes = 10 if args.data is None else len(script_utils.image_folder_classes(parser, "--data", args.data))
    model = models.resnet50(num_classes=classes)  # BiP's own checks on a model of the run's shape,
    if args.pretrained is not None:  # with the run's weights (BiP refuses NaN ones): before any work
        script_utils.check_state_dict(parser, "--pretrained", args.pretrained, model)
    try:
        torchbip.BiP.check(model, **bip_settings(args, steps=1))
    except (ValueError, TypeError) as err:
        weights = f"/--pretrained {args.pretrained}" if args.pretrained else ""
        parser.error(f"--amount/--min-keep/--upper-lr/--momentum/--implicit-coef{weights}: {err}")
    keep = MAY_CHANGE_ON_RESUME | FINETUNE  # what a resume may change (checked once, here)
    files = {args.out / "dense.pth": keep | BIP_OPTIONS} if args.warmup_epochs else {}
    files[args.out / "bip_state.pt"] = keep
    script_utils.check_resume_files(parser, args, saved_options(args), files)
    return args, "smoke" if args.smoke else "standin" if args.data is None else "imagenet"


def saved_options(args: argparse.Namespace) -> dict[str, Any]:  # a checkpoint's: a resume needs the same
    return script_utils.plain_options(args) | {"processes": int(os.environ.get("WORLD_SIZE", "1"))}


def standin_root(args: argparse.Namespace) -> Path:
    return args.standin_dir / f"train{args.standin_train_per_class}-val{args.standin_val_per_class}-64px"


def bip_settings(args: argparse.Namespace, steps: int) -> dict[str, Any]:  # the scores: the weights' momentum
    return {"amount": args.amount, "steps": steps, "upper_lr": args.upper_lr, "upper_momentum": args.momentum,
            "implicit_coef": args.implicit_coef, "min_keep": args.min_keep, "upper_schedule": "step",
            "score_init": "scaled_magnitude"}  # fmt: skip


def make_loaders(root: Path, args: argparse.Namespace, rank: int, world: int) -> tuple[DataLoader, ...]:
    """torchvision's ImageNet transforms over ``ImageFolder``; each rank reads its own shard."""
    tail = [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    crop = [transforms.RandomResizedCrop(args.image_size, scale=(args.crop_scale, 1.0))]
    flip = [transforms.RandomHorizontalFlip()] if args.hflip else []
    resize = [transforms.Resize(round(args.image_size * 256 / 224)), transforms.CenterCrop(args.image_size)]
    train_set = datasets.ImageFolder(root / "train", transforms.Compose(crop + flip + tail))
    val_set = datasets.ImageFolder(root / "val", transforms.Compose(resize + tail))
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)  # order: seed, epoch
    kw = {"batch_size": args.batch_size, "num_workers": args.workers, "pin_memory": torch.cuda.is_available()}
    train = DataLoader(train_set, sampler=sampler, drop_last=len(sampler) > args.batch_size, **kw)
    return train, DataLoader(Subset(val_set, range(rank, len(val_set), world)), **kw)  # unpadded shards


def wrap(model: nn.Module, args: argparse.Namespace, device: torch.device, training: bool) -> nn.Module:
    """What a phase calls on a batch: DDP for training under torchrun, then ``torch.compile``."""
    if training and dist.is_initialized():
        # masks and scores are buffers: not synced before every forward (BatchNorm: see train)
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, ids, forward_sync_buffers=False)
    return torch.compile(model, backend=args.compile_backend) if args.compile else model


def train(model: nn.Module, loader: DataLoader, args: argparse.Namespace, device: torch.device, phase: str,
          pruner: torchbip.BiP | None = None) -> list[float]:  # fmt: skip
    """SGD, cosine schedule (``pruner``: BiP, saved after every epoch for --resume); epoch losses."""
    settings = {"warmup": (args.warmup_epochs, args.warmup_lr, args.weight_decay),
                "bip": (args.epochs, args.lower_lr, args.gamma),
                "finetune": (args.finetune_epochs, args.finetune_lr, args.weight_decay)}  # fmt: skip
    epochs, lr, decay = settings[phase]
    per_epoch = min(len(loader), args.limit_batches or len(loader))
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=args.momentum, weight_decay=decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * per_epoch, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "float16")
    parts = {"model": model, "optimizer": optimizer, "scheduler": sched, "scaler": scaler, "pruner": pruner}
    path, first, losses = args.out / "bip_state.pt", 0, []
    if pruner is not None and args.resume and path.is_file():  # its options: checked by parse_args
        state = torch.load(path, map_location=device, weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        first, losses = state["epoch"], state["losses"]
        LOG.info(f"resuming BiP from epoch {first} of {path}")
    if first == epochs:  # nothing to train: no DDP, no compilation
        return losses
    runner, rank = wrap(model, args, device, training=True), dist.get_rank() if dist.is_initialized() else 0
    quiet = rank > 0 or not args.progress
    model.train()
    for epoch in range(first, epochs):
        # each epoch seeds its crops, flips and workers: a resumed run draws what an uninterrupted one draws
        torch.manual_seed(args.seed + 100_000 * PHASES.index(phase) + 1000 * epoch + rank)
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        batches = itertools.islice(loader, per_epoch)
        total, seen = 0.0, 0
        for images, labels in tqdm(batches, f"{phase} {epoch + 1}/{epochs}", per_epoch, disable=quiet):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, AMP[args.amp], enabled=args.amp != "none"):
                loss = F.cross_entropy(runner(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            if pruner is not None:
                pruner.step(scaler=scaler)  # after the optimizer's step, before scaler.update()
            scaler.update()
            sched.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
        total, seen = script_utils.all_sum([total, seen], device)
        losses.append(total / seen)
        if dist.is_initialized():  # each rank's BatchNorm statistics saw its own shard: average them
            for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                for stat in (bn.running_mean, bn.running_var):
                    dist.all_reduce(stat.div_(dist.get_world_size()))  # the sum of the ranks' shares
        LOG.info(f"{phase} epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.4f}")
        if pruner is not None and rank == 0:
            state = {"epoch": epoch + 1, "losses": losses, "options": saved_options(args)}
            script_utils.save(state | {k: p.state_dict() for k, p in parts.items()}, path)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, args: argparse.Namespace, device: torch.device,
             name: str) -> dict[str, float]:  # fmt: skip
    """Top-1 and top-5 accuracy and mean loss on the validation set (all ranks' shards)."""
    runner = wrap(model, args, device, training=False)
    model.eval()
    top1 = top5 = loss = seen = 0.0
    for images, labels in itertools.islice(loader, args.limit_batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, AMP[args.amp], enabled=args.amp != "none"):
            logits = runner(images).float()
        best = logits.topk(min(5, logits.shape[1])).indices
        top1 += float((best[:, 0] == labels).sum())
        top5 += float((best == labels[:, None]).any(1).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        seen += len(labels)
    top1, top5, loss, seen = script_utils.all_sum([top1, top5, loss, seen], device)
    out = {"top1": top1 / seen, "top5": top5 / seen, "loss": loss / seen, "images": int(seen)}
    LOG.info(f"eval {name}: top-1 {out['top1']:.2%}, top-5 {out['top5']:.2%}, loss {out['loss']:.4f}")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every phase and write the outputs; returns the report (also in ``report.json``)."""
    args, preset = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one process per device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with script_utils.run_log(LOG, args.out, rank, append=args.resume):
            return run(args, preset, device, rank, dist.get_world_size() if dist.is_initialized() else 1)
    finally:
        if dist.is_initialized():
            gc.collect()  # the run's DDP model (reference cycles) lets go of the group: freed below
            dist.destroy_process_group()


def run(args: argparse.Namespace, preset: str, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    start, times = time.perf_counter(), {}
    if no_plot := script_utils.matplotlib_problem():  # imported now (Agg), not after the training
        LOG.warning(f"{no_plot}: density.png will not be written")
    config = script_utils.plain_options(args, omit={"resume"})  # how this run started: not for -c reuse
    barrier = dist.barrier if world > 1 else lambda: None
    if rank == 0:  # an earlier run's outputs in --out would describe that run: gone until written anew
        for name in ("report.json", "resnet50_pruned.pth", "density.png"):
            (args.out / name).unlink(missing_ok=True)
        header = f"# examples/imagenet_resnet50.py, preset {preset}; reuse with -c\n"
        (args.out / "config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    LOG.info(f"preset {preset}, device {device}, {world} process(es), torch {torch.__version__}; {config}")

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        begin = time.perf_counter()
        yield
        times[name] = round(time.perf_counter() - begin, 3)
        LOG.info(f"phase {name}: {times[name]:.1f} s")

    # 1. Data: ImageFolder over --data, or over the MNIST stand-in (written once, by rank 0).
    with phase("data"):
        root = args.data or standin_root(args)
        if args.data is None and rank == 0:  # written once, then reused
            mnist_image_folder(root, train_per_class=args.standin_train_per_class,
                               val_per_class=args.standin_val_per_class)  # fmt: skip
        barrier()
        train_loader, val_loader = make_loaders(root, args, rank, world)
    classes, sets = train_loader.dataset.classes, (train_loader.dataset, val_loader.dataset.dataset)  # type: ignore
    LOG.info(f"{len(classes)} classes, {len(sets[0])} training / {len(sets[1])} validation images in {root}")

    # 2. Dense warm-up and evaluation (a resumed run reads both from dense.pth).
    torch.manual_seed(args.seed)
    # zero-initialised residual branches: a ResNet-50 from scratch trains stably at small batch sizes
    model = models.resnet50(num_classes=len(classes), zero_init_residual=True).to(device)
    if args.pretrained is not None:
        state = torch.load(args.pretrained, map_location=device, weights_only=True)
        model.load_state_dict(state.get("state_dict", state))  # dense.pth or a plain state_dict
    steps = args.epochs * min(len(train_loader), args.limit_batches or len(train_loader))
    settings = bip_settings(args, steps)
    torchbip.BiP.check(model, **settings)  # the weights' checks (--pretrained): not after the warm-up
    dense_path, state_path = args.out / "dense.pth", args.out / "bip_state.pt"
    warm = args.resume and args.warmup_epochs > 0 and dense_path.is_file()
    resumed = {"warmup": warm, "bip_from_epoch": None}
    if resumed["warmup"]:
        dense = torch.load(dense_path, map_location=device, weights_only=True)  # options: see parse_args
        model.load_state_dict(dense.pop("state_dict"))
        times["warmup"] = times["eval_dense"] = 0.0
        LOG.info(f"resumed: the dense warm-up and its evaluation from {dense_path}")
    else:
        with phase("warmup"):
            losses = train(model, train_loader, args, device, "warmup")
        with phase("eval_dense"):
            accuracy = evaluate(model, val_loader, args, device, "dense")
        dense = {"accuracy": accuracy, "warmup_losses": losses, "options": saved_options(args)}
        if rank == 0 and args.warmup_epochs > 0:
            script_utils.save(dense | {"state_dict": model.state_dict()}, dense_path)

    # 3. BiP: built on the bare model (before DDP wraps it), stepped in the training loop.
    pruner = torchbip.BiP(model, **settings)
    if args.resume and state_path.is_file():
        resumed["bip_from_epoch"] = torch.load(state_path, weights_only=True, mmap=True)["epoch"]
    with phase("bip"):
        bip_losses = train(model, train_loader, args, device, "bip", pruner)
        masks = pruner.finish()  # torch's pruned form; the mask is fixed from here on
        sparsity = masks.to_dict()
    LOG.info(f"BiP: {pruner.step_count} steps ({pruner.skipped_steps} skipped: loss-scale overflows), "
             f"global sparsity {sparsity['global_sparsity']:.4f}")  # fmt: skip
    with phase("eval_pruned"):
        acc_pruned = evaluate(model, val_loader, args, device, "pruned")

    # 4. Fine-tuning: torch's pruning hook multiplies by the fixed mask in every forward pass.
    with phase("finetune"):
        finetune_losses = train(model, train_loader, args, device, "finetune")
    acc_finetuned = None
    if args.finetune_epochs > 0:
        with phase("eval_finetuned"):
            acc_finetuned = evaluate(model, val_loader, args, device, "fine-tuned")
    digests = script_utils.same_model_on_every_rank(model, LOG) if world > 1 else None

    # 5. prune.remove makes the zeros permanent; the plain state_dict loads into a fresh resnet50.
    with phase("save"), torch.no_grad():
        model.eval()  # the probe: validation images, or training ones where this rank's val shard is empty
        probe = next(iter(val_loader if len(val_loader) else train_loader))[0].to(device)
        before = model(probe)
        make_permanent(model)  # prune.remove on every pruned tensor
        outputs_equal = script_utils.all_sum([float(torch.equal(before, model(probe)))], device)[0] == world
        weights = torchbip.sparsity_report(model, include_dense=True)  # every conv/linear weight
        if rank == 0:
            torch.save(model.state_dict(), args.out / "resnet50_pruned.pth")
    zeros, total = weights.zeros, weights.numel
    LOG.info(f"prune.remove on {len(pruner.names)} tensors; outputs unchanged: {outputs_equal}; "
             f"zero weights {zeros} / {total} ({zeros / total:.4f})")  # fmt: skip

    acc_dense, acc_final = dense["accuracy"], acc_finetuned or acc_pruned
    ddp = {"world_size": world, "backend": dist.get_backend(), "state_digests": digests} if digests else None
    removal = {"zero_weights": zeros, "prunable_weights": total, "outputs_equal_after_remove": outputs_equal}
    report = {
        "preset": preset, "data": {"root": str(root), "standin": args.data is None, "classes": len(classes)},
        "accuracy_before": acc_dense["top1"], "accuracy_after": acc_final["top1"],
        "accuracy": {"dense": acc_dense, "pruned": acc_pruned, "finetuned": acc_finetuned},
        "sparsity": sparsity, "checkpoint": removal, "resumed": resumed, "distributed": ddp, "config": config,
        "losses": {"warmup": list(dense["warmup_losses"]), "bip": bip_losses, "finetune": finetune_losses},
        "bip": {"steps": pruner.step_count, "skipped_steps": pruner.skipped_steps,
                "settings": pruner.settings},
        "precision": {"amp": args.amp, "compile": args.compile_backend if args.compile else None},
        "wall_time_s": times | {"total": round(time.perf_counter() - start, 3)},
        "environment": {"device": str(device), "torch": torch.__version__, "torchbip": torchbip.__version__},
    }  # fmt: skip
    if rank == 0:
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        state_path.unlink(missing_ok=True)  # the run is complete: nothing left to resume
        if not no_plot:  # last: a failing plot costs only the plot (the kept fraction of every tensor)
            with script_utils.warn_on_error(LOG, "density.png not written"):
                masks.plot(args.out / "density.png", title=f"ResNet-50, {masks.global_sparsity:.1%} sparse")
    tuned = "" if acc_finetuned is None else f" -> fine-tuned {acc_finetuned['top1']:.2%}"
    LOG.info(f"top-1 accuracy: dense {acc_dense['top1']:.2%} -> BiP {acc_pruned['top1']:.2%}{tuned} at "
             f"{sparsity['global_sparsity']:.2%} sparsity; {report['wall_time_s']['total']:.1f} s in all; "
             f"outputs in {args.out}")  # fmt: skip
    barrier()  # rank 0's files are complete before any process leaves
    return report


if __name__ == "__main__":
    main()
