"""The examples run end to end in their ``--smoke`` mode and leave outputs that parse."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from torch import nn
from torchvision.models import resnet50

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"torchbip_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def imagenet_example() -> ModuleType:
    return _load_example("imagenet_resnet50")


@pytest.fixture(scope="module")
def lenet_example() -> ModuleType:
    return _load_example("mnist_lenet")


@pytest.fixture(scope="module")
def smoke_run(imagenet_example: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One no-``--data`` smoke run of the flagship (stand-in data), shared by several tests."""
    root = tmp_path_factory.mktemp("imagenet_smoke")
    out = root / "out"
    report = imagenet_example.main(
        ["--smoke", "--out", str(out), "--standin-dir", str(root / "standin"), "--no-progress"]
    )
    return root, report


def _prunable_zeros(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    model = resnet50(num_classes=10)
    model.load_state_dict(state, strict=True)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def test_imagenet_smoke_outputs(smoke_run: tuple[Path, dict]) -> None:
    root, returned = smoke_run
    out = root / "out"
    for name in ("resnet50_pruned.pth", "report.json", "density.png", "config.yaml", "train.log"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(returned))
    for key in ("accuracy_before", "accuracy_after", "accuracy", "sparsity", "wall_time_s", "config", "bip"):
        assert key in report, key
    assert report["preset"] == "smoke"
    assert report["data"]["standin"] is True
    assert report["data"]["classes"] == 10
    assert 0.0 <= report["accuracy_before"] <= 1.0
    assert 0.0 <= report["accuracy_after"] <= 1.0
    assert set(report["accuracy"]) == {"dense", "pruned", "finetuned"}
    for phase in ("data", "warmup", "eval_dense", "bip", "eval_pruned", "finetune", "save", "total"):
        assert report["wall_time_s"][phase] >= 0.0, phase
    tensors = report["sparsity"]["tensors"]
    assert len(tensors) == 54  # 53 convolutions + fc
    assert "layer1.0.conv1.weight" in tensors
    assert "fc.weight" in tensors
    assert report["sparsity"]["global_sparsity"] == pytest.approx(0.95, abs=1e-6)
    assert report["checkpoint"]["outputs_equal_after_remove"] is True
    assert report["config"]["amount"] == 0.95
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 accuracy" in (out / "train.log").read_text()


def test_imagenet_smoke_checkpoint_is_plain_and_95_percent_sparse(smoke_run: tuple[Path, dict]) -> None:
    root, report = smoke_run
    state = torch.load(root / "out" / "resnet50_pruned.pth", weights_only=True)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    zeros, total = _prunable_zeros(state)
    assert total == report["sparsity"]["numel"] == 23_475_392
    expected = round(0.95 * total)
    assert 0 <= zeros - expected <= 10  # the mask's zeros, plus any weight that is exactly 0
    assert zeros / total == pytest.approx(0.95, abs=1e-6)


def test_imagenet_standin_is_imagenet_layout(smoke_run: tuple[Path, dict]) -> None:
    root, report = smoke_run
    folder = Path(report["data"]["root"])
    assert folder.parent == root / "standin"
    for split, per_class in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (folder / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        for c in classes:
            assert len(list((folder / split / c).glob("*.png"))) == per_class
    assert not list((root / "standin").glob(".building-*"))


def test_imagenet_config_yaml_round_trip(imagenet_example: ModuleType, smoke_run: tuple[Path, dict]) -> None:
    root, _ = smoke_run
    config = root / "out" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    args, preset = imagenet_example.parse_args(["-c", str(config)])
    assert preset == "smoke"
    resolved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "config"}
    assert resolved == saved
    args, _ = imagenet_example.parse_args(["-c", str(config), "--amount", "0.5", "--image-size", "48"])
    assert (args.amount, args.image_size, args.batch_size) == (0.5, 48, saved["batch_size"])


def test_imagenet_presets(imagenet_example: ModuleType, tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    real, preset = imagenet_example.parse_args(["--data", str(tmp_path)])
    assert preset == "imagenet"
    assert (real.image_size, real.lower_lr, real.upper_lr, real.momentum, real.gamma) == (
        224, 0.01, 0.1, 0.9, 1e-4,
    )  # fmt: skip
    standin, preset = imagenet_example.parse_args([])
    assert preset == "standin"
    assert standin.image_size == 64
    assert standin.amount == 0.95
    override, _ = imagenet_example.parse_args(["--image-size", "80"])
    assert override.image_size == 80


def test_imagenet_bad_arguments(imagenet_example: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--data", str(tmp_path)])  # no train/ and val/
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["--amount", "1.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit):
        imagenet_example.parse_args(["-c", str(bad)])


def test_imagenet_with_data_and_pretrained(
    imagenet_example: ModuleType, smoke_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """The ``--data`` path (ImageFolder on a user's folder) starting from a dense checkpoint."""
    _, first = smoke_run
    dense = tmp_path / "dense.pth"
    torch.save(resnet50(num_classes=10).state_dict(), dense)
    out = tmp_path / "out"
    report = imagenet_example.main(
        ["--smoke", "--data", first["data"]["root"], "--pretrained", str(dense), "--warmup-epochs", "0",
         "--finetune-epochs", "0", "--amount", "0.9", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert report["data"]["standin"] is False
    assert report["accuracy"]["finetuned"] is None
    assert report["accuracy_after"] == report["accuracy"]["pruned"]["top1"]
    state = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    zeros, total = _prunable_zeros(state)
    assert 0 <= zeros - round(0.9 * total) <= 10


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
