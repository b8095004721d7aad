"""The examples run end to end in their ``--smoke`` mode and leave outputs that parse.

The flagship also runs under AMP, ``torch.compile``, ``--resume`` after an interruption, and as
two ``torchrun`` processes (gloo).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

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
    assert report["peak_memory_mb"] is None  # CUDA only
    assert report["distributed"] is None
    assert report["resumed"] == {"warmup": False, "bip_from_step": None}
    assert report["precision"] == {"amp": "none", "compile": None}
    assert report["accuracy"]["dense"]["images"] == 16  # --limit-batches 2 of 8 images
    tensors = report["sparsity"]["tensors"]
    assert len(tensors) == 54  # 53 convolutions + fc
    assert "layer1.0.conv1.weight" in tensors
    assert "fc.weight" in tensors
    assert report["sparsity"]["global_sparsity"] == pytest.approx(0.95, abs=1e-6)
    assert report["checkpoint"]["outputs_equal_after_remove"] is True
    assert report["config"]["amount"] == 0.95
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 accuracy" in (out / "train.log").read_text()
    assert not (out / "bip_state.pt").exists()  # deleted once the run completes
    dense = torch.load(out / "dense.pth", weights_only=True)
    assert dense["accuracy"] == report["accuracy"]["dense"]
    assert dense["warmup_losses"] == report["losses"]["warmup"]
    assert _prunable_zeros(dense["state_dict"])[0] < 100  # dense


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


# -- AMP, torch.compile, resume, torchrun ---------------------------------------------------


def _smoke_args(out: Path, standin: Path, *extra: str) -> list[str]:
    return ["--smoke", "--out", str(out), "--standin-dir", str(standin), "--no-progress", *extra]


def _assert_complete(out: Path, report: dict[str, Any]) -> None:
    for name in ("resnet50_pruned.pth", "report.json", "density.png", "config.yaml", "train.log"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["sparsity"]["global_sparsity"] == pytest.approx(0.95, abs=1e-6)
    assert report["checkpoint"]["outputs_equal_after_remove"] is True
    state = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    assert all(v.dtype != torch.bfloat16 and v.dtype != torch.float16 for v in state.values())
    zeros, total = _prunable_zeros(state)
    assert 0 <= zeros - round(0.95 * total) <= 10
    for name in ("dense", "pruned", "finetuned"):
        assert 0.0 <= report["accuracy"][name]["top1"] <= 1.0
        assert torch.isfinite(torch.tensor(report["accuracy"][name]["loss"]))


def test_imagenet_amp_bfloat16_and_compile(
    imagenet_example: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--amp bfloat16 --compile`` (dynamo's ``eager`` backend, which compiles in seconds).

    AMP: BiP through global_prune's ``amp`` option, the other phases under autocast. Compile:
    fine-tuning and evaluation through ``torch.compile`` (warm-up too, skipped here); pruning,
    ``prune.remove`` and saving act on the original module (no ``_orig_mod.`` keys). One run
    covers both to keep the default suite short; ``test_imagenet_compile_inductor`` (slow)
    compiles with inductor.
    """
    used: list[str] = []
    real_autocast = imagenet_example.autocast

    def spy(device: torch.device, amp: str) -> Any:
        used.append(amp)
        return real_autocast(device, amp)

    monkeypatch.setattr(imagenet_example, "autocast", spy)
    compiled: list[str] = []
    real_compile = torch.compile

    def compile_spy(module: Any, **kwargs: Any) -> Any:
        compiled.append(type(module).__name__)
        return real_compile(module, **kwargs)

    monkeypatch.setattr(imagenet_example.torch, "compile", compile_spy)
    out = tmp_path / "out"
    args = ["--amp", "bfloat16", "--compile", "--compile-backend", "eager", "--limit-batches", "1"]
    # no warm-up (fine-tuning runs the same training loop) and one BiP step: bfloat16 is slow on CPU
    args += ["--warmup-epochs", "0", "--steps", "1"]
    report = imagenet_example.main(_smoke_args(out, tmp_path / "standin", *args))
    _assert_complete(out, report)
    assert report["precision"] == {"amp": "bfloat16", "compile": "eager"}
    assert report["bip"]["config"]["amp"] == "bfloat16"
    # fine-tuning and three evaluations, one batch each, all autocast and compiled
    assert used == ["bfloat16"] * 4
    assert compiled == ["ResNet"] * 4
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


class _Interrupting:
    """A loader that raises ``KeyboardInterrupt`` when its ``stop_at``-th batch is drawn."""

    def __init__(self, loader: Any, stop_at: int) -> None:
        self.loader, self.stop_at, self.drawn = loader, stop_at, 0
        self.sampler = loader.sampler  # global_prune calls sampler.set_epoch through it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.drawn += 1
            if self.drawn == self.stop_at:
                raise KeyboardInterrupt
            yield batch


def test_imagenet_resume_after_interruption_equals_uninterrupted(
    imagenet_example: ModuleType,
    smoke_run: tuple[Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run stopped in the middle of BiP and continued with ``--resume`` saves the same model,
    bit for bit, as the uninterrupted ``smoke_run`` (same options)."""
    root, reference = smoke_run
    out = tmp_path / "out"
    args = _smoke_args(out, root / "standin")
    real_prune = imagenet_example.torchbip.global_prune

    def interrupted(model: Any, amount: Any = 0.95, loader: Any = None, **kwargs: Any) -> Any:
        return real_prune(model, amount, _Interrupting(loader, stop_at=2), **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(imagenet_example.torchbip, "global_prune", interrupted)
        with pytest.raises(KeyboardInterrupt):  # the 2nd batch of BiP's stream: in BiP step 2
            imagenet_example.main([*args, "--checkpoint-every", "1"])
    assert (out / "dense.pth").is_file()
    assert torch.load(out / "bip_state.pt", weights_only=True, mmap=True)["step"] == 1
    assert not (out / "report.json").exists()

    report = imagenet_example.main([*args, "--resume"])
    _assert_complete(out, report)
    assert report["resumed"] == {"warmup": True, "bip_from_step": 1}
    assert report["wall_time_s"]["warmup"] == 0.0
    assert "resuming BiP from step 1" in (out / "train.log").read_text()
    assert not (out / "bip_state.pt").exists()
    got = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    want = torch.load(root / "out" / "resnet50_pruned.pth", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert report["accuracy"] == reference["accuracy"]
    assert report["losses"] == reference["losses"]
    assert report["bip"]["losses"] == reference["bip"]["losses"]

    # --resume refuses options that differ from the interrupted run's
    with pytest.raises(ValueError, match=r"amount: 0.95 -> 0.9"):
        imagenet_example.main([*args, "--resume", "--amount", "0.9"])


def test_shard_sampler_reads_every_sample_once(imagenet_example: ModuleType) -> None:
    dataset = list(range(11))
    shards = [list(imagenet_example.ShardSampler(dataset, 3, rank)) for rank in range(3)]
    assert [len(imagenet_example.ShardSampler(dataset, 3, rank)) for rank in range(3)] == [4, 4, 3]
    assert sorted(i for shard in shards for i in shard) == dataset


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
    assert (ddp["world_size"], ddp["backend"], ddp["global_batch_size"]) == (2, "gloo", 16)
    assert ddp["ranks_agree"] is True
    for when in ("bip", "final"):
        digests = ddp["state_digests"][when]
        assert len(digests) == 2, when
        assert digests[0] == digests[1], when
    assert report["environment"]["processes"] == 2
    # every validation image is counted once: 10 per rank in two batches of at most 8
    assert report["accuracy"]["dense"]["images"] == 20
    log = (out / "train.log").read_text()
    assert "all 2 ranks hold the same model state at the end" in log
    assert "[rank 1]" not in log
