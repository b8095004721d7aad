"""The examples run end to end in their ``--smoke`` mode and leave outputs that parse.

The flagship also runs under AMP, ``torch.compile``, ``--resume`` after an interruption, without
matplotlib, and as two ``torchrun`` processes (gloo).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torchvision
import yaml
from example_scripts import load_example
from torch import nn
from torchvision.models import resnet50

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def imagenet_example() -> ModuleType:
    return load_example("imagenet_resnet50")


@pytest.fixture(scope="module")
def lenet_example() -> ModuleType:
    return load_example("mnist_lenet")


@pytest.fixture(scope="module")
def smoke_run(imagenet_example: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One no-``--data`` smoke run of the flagship (stand-in data), shared by several tests."""
    root = tmp_path_factory.mktemp("imagenet_smoke")
    report = imagenet_example.main(_smoke_args(root / "out", root / "standin"))
    return root, report


def _smoke_args(out: Path, standin: Path, *extra: str) -> list[str]:
    return ["--smoke", "--out", str(out), "--standin-dir", str(standin), "--no-progress", *extra]


def _prunable_zeros(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    model = resnet50(num_classes=10)
    model.load_state_dict(state, strict=True)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def _assert_complete(out: Path, report: dict[str, Any], *, plot: bool = True) -> None:
    names = ["resnet50_pruned.pth", "report.json", "config.yaml", "train.log"]
    for name in [*names, "density.png"] if plot else names:
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["sparsity"]["global_sparsity"] == pytest.approx(0.95, abs=1e-6)
    assert report["checkpoint"]["outputs_equal_after_remove"] is True
    state = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    assert all(v.dtype != torch.bfloat16 and v.dtype != torch.float16 for v in state.values())
    zeros, total = _prunable_zeros(state)
    assert 0 <= zeros - round(0.95 * total) <= 10
    assert (zeros, total) == (report["checkpoint"]["zero_weights"], report["checkpoint"]["prunable_weights"])
    for name in ("dense", "pruned", "finetuned"):
        if report["accuracy"][name] is not None:
            assert 0.0 <= report["accuracy"][name]["top1"] <= 1.0
            assert torch.isfinite(torch.tensor(report["accuracy"][name]["loss"]))
    assert not (out / "bip_state.pt").exists()  # deleted once the run completes


def test_imagenet_smoke_outputs(smoke_run: tuple[Path, dict]) -> None:
    root, report = smoke_run
    out = root / "out"
    _assert_complete(out, report)
    assert report["preset"] == "smoke"
    assert report["data"] == {"root": report["data"]["root"], "standin": True, "classes": 10}
    assert set(report["accuracy"]) == {"dense", "pruned", "finetuned"}
    assert report["accuracy_before"] == report["accuracy"]["dense"]["top1"]
    assert report["accuracy_after"] == report["accuracy"]["finetuned"]["top1"]
    for phase in ("data", "warmup", "eval_dense", "bip", "eval_pruned", "finetune", "eval_finetuned", "save"):
        assert report["wall_time_s"][phase] >= 0.0, phase
    assert report["wall_time_s"]["total"] >= sum(v for k, v in report["wall_time_s"].items() if k != "total")
    assert report["distributed"] is None
    assert report["resumed"] == {"warmup": False, "bip_from_epoch": None}
    assert report["precision"] == {"amp": "none", "compile": None}
    assert report["accuracy"]["dense"]["images"] == 16  # --limit-batches 2 of 8 images
    # 2 BiP epochs of 2 batches: 4 steps; the pruner's schedule spans exactly those
    settings = report["bip"]["settings"]
    assert (report["bip"]["steps"], report["bip"]["skipped_steps"], settings["steps"]) == (4, 0, 4)
    assert (settings["amount"], settings["upper_lr"], settings["min_keep"]) == (0.95, 0.1, 0.02)
    assert [len(report["losses"][k]) for k in ("warmup", "bip", "finetune")] == [1, 2, 1]
    tensors = report["sparsity"]["tensors"]
    assert len(tensors) == 54  # 53 convolutions + fc
    assert "layer1.0.conv1.weight" in tensors
    assert "fc.weight" in tensors
    assert min(1 - t["sparsity"] for t in tensors.values()) >= 0.02 - 1e-3  # --min-keep 0.02
    assert report["config"]["amount"] == 0.95
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "train.log").read_text()
    assert "top-1 accuracy" in log
    assert "matplotlib" not in log
    dense = torch.load(out / "dense.pth", weights_only=True)
    assert dense["accuracy"] == report["accuracy"]["dense"]
    assert dense["warmup_losses"] == report["losses"]["warmup"]
    assert _prunable_zeros(dense["state_dict"])[0] < 100  # dense


def test_imagenet_smoke_checkpoint_is_plain_and_95_percent_sparse(
    imagenet_example: ModuleType, smoke_run: tuple[Path, dict]
) -> None:
    """The saved state_dict loads strictly into a fresh resnet50 and scores what the report says."""
    root, report = smoke_run
    state = torch.load(root / "out" / "resnet50_pruned.pth", weights_only=True)
    assert not any(k.endswith(("_orig", "_mask", "_scores")) for k in state)
    zeros, total = _prunable_zeros(state)
    assert total == report["sparsity"]["numel"] == 23_475_392
    expected = round(0.95 * total)
    assert 0 <= zeros - expected <= 10  # the mask's zeros, plus any weight that is exactly 0
    assert zeros / total == pytest.approx(0.95, abs=1e-6)
    model = resnet50(num_classes=10).eval()
    model.load_state_dict(state, strict=True)
    args, _ = imagenet_example.parse_args(["-c", str(root / "out" / "config.yaml")])
    _, val_loader = imagenet_example.make_loaders(Path(report["data"]["root"]), args, 0, 1)
    correct = seen = 0
    with torch.no_grad():
        for images, labels in itertools.islice(val_loader, 2):
            correct += int((model(images).argmax(1) == labels).sum())
            seen += len(labels)
    assert correct / seen == report["accuracy"]["finetuned"]["top1"]


def test_imagenet_standin_is_imagenet_layout(smoke_run: tuple[Path, dict]) -> None:
    root, report = smoke_run
    folder = Path(report["data"]["root"])
    assert folder.parent == root / "standin"
    for split, per_class in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (folder / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        for c in classes:
            assert len(list((folder / split / c).glob("*.png"))) == per_class
    assert not list((root / "standin").glob(".*building-*"))


def test_imagenet_validation_shards_read_every_image_once(
    imagenet_example: ModuleType, smoke_run: tuple[Path, dict]
) -> None:
    root, report = smoke_run
    args, _ = imagenet_example.parse_args(["-c", str(root / "out" / "config.yaml")])
    shards = [imagenet_example.make_loaders(Path(report["data"]["root"]), args, r, 3)[1] for r in range(3)]
    indices = [list(loader.dataset.indices) for loader in shards]
    assert [len(i) for i in indices] == [7, 7, 6]  # 20 images, no padding
    assert sorted(itertools.chain(*indices)) == list(range(20))


def test_imagenet_config_yaml_round_trip(imagenet_example: ModuleType, smoke_run: tuple[Path, dict]) -> None:
    root, _ = smoke_run
    config = root / "out" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    args, preset = imagenet_example.parse_args(["-c", str(config)])
    assert preset == "smoke"
    resolved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "config"}
    assert resolved == saved | {"resume": False}  # how a run started is not saved: -c never resumes
    args, _ = imagenet_example.parse_args(["-c", str(config), "--amount", "0.5", "--image-size", "48"])
    assert (args.amount, args.image_size, args.batch_size) == (0.5, 48, saved["batch_size"])


def test_imagenet_presets(imagenet_example: ModuleType, tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "a_class").mkdir(parents=True)
    real, preset = imagenet_example.parse_args(["--data", str(tmp_path)])
    assert preset == "imagenet"
    assert (real.image_size, real.lower_lr, real.upper_lr, real.momentum, real.gamma) == (
        224, 0.01, 0.1, 0.9, 1e-4,
    )  # fmt: skip
    assert (real.epochs, real.warmup_epochs, real.finetune_epochs, real.min_keep) == (5, 0, 0, None)
    standin, preset = imagenet_example.parse_args([])
    assert preset == "standin"
    assert (standin.image_size, standin.batch_size, standin.epochs, standin.min_keep) == (64, 32, 2, 0.02)
    assert standin.amount == 0.95
    override, _ = imagenet_example.parse_args(["--image-size", "80"])
    assert override.image_size == 80


LENET_BAD = {  # command line: what the error says
    "--batch-size 0": "--batch-size: must be an integer >= 1, got 0",
    "--dense-epochs -1": "--dense-epochs: must be an integer >= 0, got -1",
    "--train-per-class 0": "--train-per-class: must be an integer >= 1, got 0",
    "--test-per-class 0": "--test-per-class: must be an integer >= 1, got 0",
    "--lower-lr 0": "--lower-lr must be > 0, got 0.0",
    "--upper-lr 0": "--upper-lr must be > 0, got 0.0",
    "--amount 1.0": "--amount must lie in [0, 1), got 1.0",
    f"--seed {2**64}": f"--seed: must be an integer in [-2**62, 2**62], got {2**64}",
    "--mnist no/such.npz": "--mnist: MNIST file not found: no/such.npz",
}


@pytest.mark.parametrize(
    ("example", "argv", "message"),
    [("lenet_example", line.split(), message) for line, message in LENET_BAD.items()]
    + [
        ("imagenet_example", argv, message)
        for argv, message in [
            (["--amount", "1.5"], "--amount must lie in [0, 1], got 1.5"),
            (["--lower-lr", "-1"], "--lower-lr must lie in [0, inf], got -1.0"),
            (["--momentum", "1.5"], "--momentum must lie in [0, 1], got 1.5"),
            (["--crop-scale", "2"], "--crop-scale must lie in [1e-06, 1], got 2.0"),
            (["--implicit-coef", "nan"], "--implicit-coef must lie in [0, inf], got nan"),
            (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
            (["--warmup-epochs", "-1"], "--warmup-epochs: must be an integer >= 0, got -1"),
            (["--pretrained", "no/such.pth"], "--pretrained: no such file: no/such.pth"),
            (["--amp", "float8"], "invalid choice: 'float8'"),
            (["--device", "foo"], "--device: not a torch device: 'foo'"),
            (["--batch-size", "1"], "--batch-size: must be >= 2 (BatchNorm statistics), got 1"),
            (["--compile", "--compile-backend", "nosuch"], "unknown torch.compile backend 'nosuch'"),
            (["--amount", "1.0"], "min_keep=0.02 keeps at least 469529 entries"),  # the stand-in's floor
            (["--min-keep", "0.9"], "min_keep=0.9 keeps at least 21127879 entries"),
            (["--seed", str(2**70)], f"--seed: must be an integer in [-2**62, 2**62], got {2**70}"),
        ]
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    example: str,
    argv: list[str],
    message: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        request.getfixturevalue(example).parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_imagenet_cuda_device_without_cuda_is_refused_before_any_work(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        imagenet_example.main(["--device", "cuda:0", "--out", str(out)])
    assert "--device cuda:0: CUDA is not available on this machine" in capsys.readouterr().err
    assert not out.exists()  # no log, no config, no stand-in


def test_imagenet_a_float_min_keep_of_zero_is_no_floor(imagenet_example: ModuleType) -> None:
    args, _ = imagenet_example.parse_args(["--amount", "1.0", "--min-keep", "0"])
    assert (args.amount, args.min_keep) == (1.0, 0.0)


def test_imagenet_resume_with_other_options_is_refused_before_anything_in_out_changes(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    first, _ = imagenet_example.parse_args(["--smoke", "--out", str(out)])
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(first).items() if k != "config"}
    options["processes"] = 1  # the options as the run saves them, and the number of processes
    torch.save({"options": options, "epoch": 1}, out / "bip_state.pt")
    (out / "config.yaml").write_text("# the interrupted run's\n")
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--smoke", "--out", str(out), "--resume", "--amount", "0.9"])
    err = capsys.readouterr().err
    assert f"--resume: {out / 'bip_state.pt'} was written with other options (amount: 0.95 -> 0.9)" in err
    assert (out / "config.yaml").read_text() == "# the interrupted run's\n"
    imagenet_example.parse_args(["--smoke", "--out", str(out), "--resume"])  # the same options resume
    (out / "bip_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--smoke", "--out", str(out), "--resume"])
    assert f"--resume: {out / 'bip_state.pt'} cannot be read" in capsys.readouterr().err


def test_imagenet_resume_with_other_workers_or_processes_is_refused(
    imagenet_example: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The number of DataLoader workers draws the random crops, the number of processes the
    batches: a checkpoint resumed with other numbers would not continue the run it comes from."""
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--smoke", "--out", str(out), "--warmup-epochs", "0"]
    options = imagenet_example.saved_options(imagenet_example.parse_args(argv)[0])
    assert options["processes"] == 1
    torch.save({"options": options, "epoch": 1}, out / "bip_state.pt")
    imagenet_example.parse_args([*argv, "--resume"])  # the same options, one process: resumes
    with pytest.raises(SystemExit):
        imagenet_example.parse_args([*argv, "--resume", "--workers", "2"])
    assert "bip_state.pt was written with other options (workers: 0 -> 2)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it
    with pytest.raises(SystemExit):
        imagenet_example.parse_args([*argv, "--resume"])
    assert "bip_state.pt was written with other options (processes: 1 -> 2)" in capsys.readouterr().err


def test_imagenet_workers_draw_the_crops(imagenet_example: ModuleType, smoke_run: tuple[Path, dict]) -> None:
    """Why a resume may not change --workers: the same epoch seed gives other crops with them."""
    root, report = smoke_run
    crops = []
    for workers in ("0", "1"):
        args, _ = imagenet_example.parse_args(["-c", str(root / "out" / "config.yaml"), "--workers", workers])
        train_loader, _ = imagenet_example.make_loaders(Path(report["data"]["root"]), args, 0, 1)
        torch.manual_seed(0)
        crops.append(next(iter(train_loader))[0])
    assert not torch.equal(*crops)


@pytest.mark.parametrize("option", ["--out", "--standin-dir"])
@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_imagenet_output_folders_that_cannot_be_made_are_refused_before_any_work(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, where: str
) -> None:
    file = tmp_path / "file"
    file.write_text("not a folder")
    path = file if where == "a-file" else file / "sub"
    out = path if option == "--out" else tmp_path / "out"
    standin = path if option == "--standin-dir" else tmp_path / "standin"
    with pytest.raises(SystemExit):
        imagenet_example.main(_smoke_args(out, standin))
    err = capsys.readouterr().err
    if where == "a-file":
        assert f"{option}: {path} is not a folder" in err
    else:
        assert f"{option}: {path} cannot be created: {file} is not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written
    assert file.read_text() == "not a folder"


def test_mnist_lenet_out_that_is_a_file_is_refused_before_the_training(
    lenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "file"
    file.write_text("not a folder")
    with pytest.raises(SystemExit):
        lenet_example.parse_args(["--smoke", "--out", str(file)])
    assert f"--out: {file} is not a folder" in capsys.readouterr().err


def test_imagenet_data_whose_val_classes_differ_is_refused(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ImageFolder numbers each split's class folders by itself: val/ without a class of train/
    would give every later class the wrong label."""
    for folder in ("train/cat", "train/dog", "train/owl", "val/dog", "val/owl"):
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--data: {tmp_path}/train and {tmp_path}/val have other class folders: ['cat']" in err
    (tmp_path / "val" / "cat").mkdir()
    args, preset = imagenet_example.parse_args(["--data", str(tmp_path)])
    assert (args.data, preset) == (tmp_path, "imagenet")


def test_imagenet_pretrained_weights_with_nan_are_refused_before_any_work(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """BiP's scores start from the weights' magnitudes: NaN weights are refused before the run
    rewrites anything in --out (its log and config stay those of the earlier run)."""
    state = resnet50(num_classes=10).state_dict()
    state["fc.weight"][3, 5] = float("nan")
    path, out = tmp_path / "nan.pth", tmp_path / "out"
    torch.save(state, path)
    out.mkdir()
    (out / "train.log").write_text("an earlier run's log\n")
    with pytest.raises(SystemExit):
        imagenet_example.main(_smoke_args(out, tmp_path / "standin", "--pretrained", str(path)))
    err = capsys.readouterr().err
    assert f"--pretrained {path}: parameters names 'fc.weight', which holds NaN" in err
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]
    assert (out / "train.log").read_text() == "an earlier run's log\n"
    assert not (tmp_path / "standin").exists()


@pytest.mark.parametrize("content", ["other-classes", "not-a-state-dict"])
def test_imagenet_pretrained_weights_of_another_model_are_refused_before_any_work(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path, out = tmp_path / "weights.pth", tmp_path / "out"
    if content == "other-classes":
        torch.save(torchvision.models.resnet50(num_classes=1000).state_dict(), path)
    else:
        torch.save({101: torch.zeros(3)}, path)
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--smoke", "--out", str(out), "--pretrained", str(path)])
    err = capsys.readouterr().err
    assert f"--pretrained: {path} is not a state_dict of this model" in err
    assert ("size mismatch for fc.weight" in err) == (content == "other-classes")
    assert not out.exists()
    good = tmp_path / "good.pth"
    torch.save({"state_dict": torchvision.models.resnet50(num_classes=10).state_dict()}, good)
    args, _ = imagenet_example.parse_args(["--smoke", "--out", str(out), "--pretrained", str(good)])
    assert args.pretrained == good


def test_imagenet_bad_data_folder_and_config_file(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--data", str(tmp_path)])  # no train/ and val/
    assert f"--data: expected {tmp_path}/train and {tmp_path}/val" in capsys.readouterr().err
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--data", str(tmp_path)])  # no class folders
    assert f"--data: Couldn't find any class folder in {tmp_path / 'train'}" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["-c", str(bad)])
    assert "unknown option(s) ['no_such_option']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("amp: float8\n", "argument --amp: invalid choice: 'float8'"),
        ("epochs: 2.5\n", "argument --epochs: invalid int value: '2.5'"),
        ("epochs: true\n", "epochs must be a single number or string, got True"),
        ("lower_lr: [1, 2]\n", "lower_lr must be a single number or string, got [1, 2]"),
        ("lower_lr: -1\n", "--lower-lr must lie in [0, inf], got -1.0"),
        ("hflip: maybe\n", "hflip must be true or false, got 'maybe'"),
        ("5\n", "expected a mapping of option: value, got a int"),
        ("amount: [\n", "not valid YAML"),
    ],
)
def test_imagenet_config_file_values_are_checked_like_the_command_line(
    imagenet_example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    """A ``-c`` file's values go through argparse: refused before any work, naming the option."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["-c", str(config)])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["-c", str(tmp_path / "missing.yaml")])
    assert f"-c/--config: no such file: {tmp_path / 'missing.yaml'}" in capsys.readouterr().err


def test_imagenet_config_file_switches_and_the_command_line_wins(
    imagenet_example: ModuleType, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("hflip: false\nprogress: false\nepochs: 3\nsmoke: true\npretrained: null\n")
    args, preset = imagenet_example.parse_args(["-c", str(config), "--epochs", "4"])
    assert (args.hflip, args.progress, args.epochs, preset, args.pretrained) == (
        False,
        False,
        4,
        "smoke",
        None,
    )
    assert args.image_size == 32  # the smoke preset, which the file chose


def test_imagenet_with_data_and_pretrained(
    imagenet_example: ModuleType, smoke_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """The ``--data`` path (ImageFolder on a user's folder) starting from a dense checkpoint."""
    root, first = smoke_run
    out = tmp_path / "out"
    args = [
        "--data",
        first["data"]["root"],
        "--pretrained",
        str(root / "out" / "dense.pth"),
        "--amount",
        "0.9",
    ]
    report = imagenet_example.main(
        [
            *args,
            "--smoke",
            "--warmup-epochs",
            "0",
            "--finetune-epochs",
            "0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert report["data"]["standin"] is False
    assert report["accuracy"]["finetuned"] is None
    assert report["accuracy_after"] == report["accuracy"]["pruned"]["top1"]
    # the dense evaluation is the smoke run's: the same weights (dense.pth) on the same images
    assert report["accuracy"]["dense"] == first["accuracy"]["dense"]
    assert not (out / "dense.pth").exists()  # no warm-up
    state = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    zeros, total = _prunable_zeros(state)
    assert 0 <= zeros - round(0.9 * total) <= 10


def test_imagenet_without_matplotlib_warns_and_skips_the_plot(
    imagenet_example: ModuleType,
    smoke_run: tuple[Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """matplotlib is optional: a run without it says so before any work and writes everything else."""
    root, _ = smoke_run
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "out"
    out.mkdir()
    (out / "density.png").write_bytes(b"an earlier run's plot")  # would describe another run
    args = ["--warmup-epochs", "0", "--finetune-epochs", "0", "--epochs", "1", "--limit-batches", "1"]
    report = imagenet_example.main(_smoke_args(out, root / "standin", *args))
    _assert_complete(out, report, plot=False)
    assert not (out / "density.png").exists()
    warning = "WARNING matplotlib is not installed: density.png will not be written"
    log = (out / "train.log").read_text().splitlines()
    assert warning in log[0]  # the first line: before any work
    assert warning in capsys.readouterr().out
    assert report["bip"]["steps"] == 1


def test_mnist_lenet_smoke(lenet_example: ModuleType, tmp_path: Path) -> None:
    report = lenet_example.main(["--smoke", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "config.yaml").is_file()
    methods = [row["method"] for row in saved["results"]]
    assert methods[0] == "dense"
    assert methods[-1].startswith("BiP")
    assert len(methods) == 6
    assert saved["results"][0]["sparsity"] == 0.0
    for row in saved["results"][1:]:
        assert row["sparsity"] == pytest.approx(0.9, abs=1e-5), row
        assert 0.0 <= row["accuracy"] <= 1.0
    assert saved["train_images"] == 500
    assert saved["test_images"] == 200


# -- AMP, torch.compile, resume, torchrun ---------------------------------------------------


def test_imagenet_amp_bfloat16_and_compile(
    imagenet_example: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--amp bfloat16 --compile`` (dynamo's ``eager`` backend, which compiles in seconds).

    AMP: every forward pass (BiP's included) under ``torch.autocast``. Compile: BiP, fine-tuning
    and evaluation run through ``torch.compile`` (warm-up too, skipped here); ``prune.remove`` and
    saving act on the original module (no ``_orig_mod.`` keys). One run covers both to keep the
    default suite short; ``test_imagenet_compile_inductor`` (slow) compiles with inductor.
    """
    used: list[tuple[str, Any, bool]] = []
    real_autocast = torch.autocast

    def autocast_spy(device_type: str, dtype: Any = None, enabled: bool = True, **kwargs: Any) -> Any:
        used.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype, enabled, **kwargs)

    monkeypatch.setattr(imagenet_example.torch, "autocast", autocast_spy)
    compiled: list[str] = []
    real_compile = torch.compile

    def compile_spy(module: Any, **kwargs: Any) -> Any:
        compiled.append(type(module).__name__)
        assert kwargs == {"backend": "eager"}
        return real_compile(module, **kwargs)

    monkeypatch.setattr(imagenet_example.torch, "compile", compile_spy)
    out = tmp_path / "out"
    # no warm-up (fine-tuning runs the same loop) and one BiP step: bfloat16 is slow on CPU
    args = ["--amp", "bfloat16", "--compile", "--compile-backend", "eager", "--limit-batches", "1"]
    report = imagenet_example.main(
        _smoke_args(out, tmp_path / "standin", *args, "--warmup-epochs", "0", "--epochs", "1")
    )
    _assert_complete(out, report)
    assert report["precision"] == {"amp": "bfloat16", "compile": "eager"}
    assert report["bip"]["steps"] == 1
    # one batch each: dense evaluation, BiP, pruned evaluation, fine-tuning, fine-tuned evaluation
    assert used == [("cpu", torch.bfloat16, True)] * 5
    assert compiled == ["ResNet"] * 5
    state = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    assert not any("_orig_mod" in k for k in state)


@pytest.mark.slow
def test_imagenet_compile_inductor(imagenet_example: ModuleType, tmp_path: Path) -> None:
    """``--compile`` with the default inductor backend: minutes of compilation on a 2-core CPU."""
    out = tmp_path / "out"
    args = _smoke_args(out, tmp_path / "standin", "--compile", "--limit-batches", "1", "--amp", "bfloat16")
    report = imagenet_example.main(args)
    _assert_complete(out, report)
    assert report["precision"] == {"amp": "bfloat16", "compile": "inductor"}


def test_imagenet_resume_after_interruption_equals_uninterrupted(
    imagenet_example: ModuleType,
    smoke_run: tuple[Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run stopped in BiP's second epoch and continued with ``--resume`` saves the same model,
    bit for bit, as the uninterrupted ``smoke_run`` (same options)."""
    root, reference = smoke_run
    out = tmp_path / "out"
    args = _smoke_args(out, root / "standin")
    real_step = imagenet_example.torchbip.BiP.step

    def interrupted(self: Any, *a: Any, **kw: Any) -> Any:
        if self.step_count == 2:  # the first step of the second epoch (2 steps per epoch)
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    out.mkdir()
    for name in ("report.json", "resnet50_pruned.pth", "density.png"):  # an earlier run's outputs
        (out / name).write_text("an earlier run's")
    with monkeypatch.context() as patch:
        patch.setattr(imagenet_example.torchbip.BiP, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            imagenet_example.main(args)
    assert not any((out / name).exists() for name in ("report.json", "resnet50_pruned.pth", "density.png"))
    assert (out / "dense.pth").is_file()
    saved = torch.load(out / "bip_state.pt", weights_only=True)
    assert (saved["epoch"], saved["pruner"]["step"], len(saved["losses"])) == (1, 2, 1)
    assert set(saved) == {"epoch", "losses", "model", "optimizer", "scheduler", "scaler", "pruner", "options"}
    assert not (out / "report.json").exists()
    # each checkpoint carries the options it was written with: a resume that changes them is refused
    # (config.yaml is rewritten by every run, so it cannot tell), options of later phases may change
    # (refused before any work: the log and config.yaml stay the interrupted run's)
    log, config = (out / "train.log").read_text(), (out / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        imagenet_example.main([*args, "--resume", "--warmup-lr", "0.2"])
    assert "dense.pth was written with other options (warmup_lr: 0.05 -> 0.2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        imagenet_example.main([*args, "--resume", "--upper-lr", "0.2"])
    assert "bip_state.pt was written with other options (upper_lr: 0.1 -> 0.2)" in capsys.readouterr().err
    assert (out / "train.log").read_text() == log
    assert (out / "config.yaml").read_text() == config

    report = imagenet_example.main([*args, "--resume"])
    _assert_complete(out, report)
    assert report["resumed"] == {"warmup": True, "bip_from_epoch": 1}
    assert report["wall_time_s"]["warmup"] == 0.0
    log = (out / "train.log").read_text()
    assert "resuming BiP from epoch 1" in log
    assert "bip epoch 1/2" in log  # the interrupted run's lines are kept: a resume appends
    got = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    want = torch.load(root / "out" / "resnet50_pruned.pth", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert report["accuracy"] == reference["accuracy"]
    assert report["losses"] == reference["losses"]
    assert report["sparsity"] == reference["sparsity"]

    # a finished run leaves dense.pth: --resume with another BiP budget reuses the warm-up, which
    # does not depend on it, and prunes anew; an option of the warm-up is refused
    other = imagenet_example.main([*args, "--resume", "--amount", "0.9"])
    assert other["resumed"] == {"warmup": True, "bip_from_epoch": None}
    assert other["accuracy"]["dense"] == reference["accuracy"]["dense"]
    assert other["sparsity"]["global_sparsity"] == pytest.approx(0.9, abs=1e-6)
    with pytest.raises(SystemExit):
        imagenet_example.main([*args, "--resume", "--seed", "1"])
    assert "dense.pth was written with other options (seed: 0 -> 1)" in capsys.readouterr().err


def test_imagenet_torchrun_two_gloo_processes(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2``: both ranks end with the same model; rank 0 writes."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(EXAMPLES / "imagenet_resnet50.py"), *_smoke_args(out, tmp_path / "standin"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    _assert_complete(out, report)
    ddp = report["distributed"]
    assert (ddp["world_size"], ddp["backend"]) == (2, "gloo")
    digests = ddp["state_digests"]
    assert len(digests) == 2
    assert digests[0] == digests[1]
    # every validation image is counted once: 10 per rank in two batches of at most 8
    assert report["accuracy"]["dense"]["images"] == 20
    # 40 training images, 20 per rank: 2 steps per epoch, 2 BiP epochs
    assert report["bip"]["steps"] == 4
    log = (out / "train.log").read_text()
    assert "all 2 ranks hold the same model state at the end" in log
    assert "[rank 1]" not in log
