"""The flagship example keeps its outputs when something around it goes wrong.

An unusable matplotlib (installed but not importable, an invalid ``MPLBACKEND``, a plot that
fails) costs only ``density.png``, never ``report.json``; a ``config.yaml`` written by a
``--resume`` run can be reused with ``-c`` without resuming; a ``torchrun`` validation set with
fewer images than processes finishes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from example_scripts import load_example

from torchbip.report import SparsityReport

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["--smoke", "--no-progress", "--epochs", "1", "--warmup-epochs", "0", "--finetune-epochs", "0",
        "--limit-batches", "1"]  # fmt: skip
WARNING = "density.png will not be written"


@pytest.fixture(scope="module")
def flagship() -> ModuleType:
    return load_example("imagenet_resnet50", "torchbip_example_robustness")


def _tiny(out: Path, standin: Path, *extra: str) -> list[str]:
    return [*TINY, "--out", str(out), "--standin-dir", str(standin), *extra]


def _assert_written_without_plot(out: Path, report: dict[str, Any]) -> None:
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "resnet50_pruned.pth").is_file()
    assert report["checkpoint"]["outputs_equal_after_remove"] is True
    assert not (out / "density.png").exists()
    assert not (out / "bip_state.pt").exists()  # the run is complete: a later --resume starts afresh


class _BrokenMatplotlib(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """matplotlib is installed (found) but its import fails, as with a NumPy ABI mismatch."""

    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name == "matplotlib" or name.startswith("matplotlib."):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        raise ImportError("matplotlib is broken (simulated)")


def test_imagenet_matplotlib_that_fails_to_import_warns_at_the_start(
    flagship: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenMatplotlib(), *sys.meta_path])
    out = tmp_path / "out"
    report = flagship.main(_tiny(out, tmp_path / "standin"))
    _assert_written_without_plot(out, report)
    first = (out / "train.log").read_text().splitlines()[0]  # before any work, with the real error
    assert f"matplotlib cannot be used (ImportError: matplotlib is broken (simulated)): {WARNING}" in first


def test_imagenet_invalid_mplbackend_warns_at_the_start(tmp_path: Path) -> None:
    """matplotlib refuses an invalid ``MPLBACKEND`` (e.g. a Jupyter backend inherited by a shell
    command) when it is imported: the run warns and writes everything but the plot."""
    out = tmp_path / "out"
    env = {**os.environ, "MPLBACKEND": "nosuch", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / "imagenet_resnet50.py"), *_tiny(out, tmp_path / "standin")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    _assert_written_without_plot(out, json.loads((out / "report.json").read_text()))
    first = (out / "train.log").read_text().splitlines()[0]
    assert "matplotlib cannot be used (ValueError: Key backend: 'nosuch' is not a valid value" in first
    assert WARNING in first


def test_imagenet_a_failing_plot_costs_only_the_plot(
    flagship: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no room for the plot")

    monkeypatch.setattr(SparsityReport, "plot", fail)
    out = tmp_path / "out"
    report = flagship.main(_tiny(out, tmp_path / "standin"))
    _assert_written_without_plot(out, report)
    log = (out / "train.log").read_text()
    assert WARNING not in log  # matplotlib itself works
    assert "WARNING density.png not written: RuntimeError: no room for the plot" in log
    assert "top-1 accuracy" in log.splitlines()[-1]  # the run ends as usual


def test_imagenet_a_resumed_runs_config_yaml_can_be_reused_without_resuming(
    flagship: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.yaml leaves out --resume (how the run was started), so ``-c config.yaml`` (the
    documented reuse, e.g. with another option) starts a new run; ``--no-resume`` and
    ``--no-smoke`` turn off a file's ``resume: true`` / ``smoke: true``."""
    out, standin = tmp_path / "out", tmp_path / "standin"
    argv = _tiny(out, standin, "--warmup-epochs", "1")
    flagship.main(argv)
    report = flagship.main([*argv, "--resume"])  # reuses dense.pth
    assert report["resumed"]["warmup"] is True
    assert "resume" not in report["config"]
    config = out / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert "resume" not in saved
    assert saved["smoke"] is True
    args, preset = flagship.parse_args(["-c", str(config)])
    assert (args.resume, preset) == (False, "smoke")
    # another warm-up option next to this run's dense.pth: a new run, not a refused resume
    args, _ = flagship.parse_args(["-c", str(config), "--warmup-lr", "0.2"])
    assert (args.resume, args.warmup_lr) == (False, 0.2)
    with pytest.raises(SystemExit):  # resuming with it is refused, as before
        flagship.parse_args(["-c", str(config), "--warmup-lr", "0.2", "--resume"])
    assert "dense.pth was written with other options (warmup_lr: 0.05 -> 0.2)" in capsys.readouterr().err
    # an older config.yaml that holds resume: true: the command line wins
    old = tmp_path / "old.yaml"
    old.write_text(f"smoke: true\nresume: true\nout: {tmp_path / 'other'}\n")
    assert flagship.parse_args(["-c", str(old)])[0].resume is True
    args, preset = flagship.parse_args(["-c", str(old), "--no-resume", "--no-smoke"])
    assert (args.resume, args.smoke, preset) == (False, False, "standin")
    old.write_text("resume: false\nsmoke: false\n")  # false values: the switches' --no- forms
    args, preset = flagship.parse_args(["-c", str(old), "--smoke"])
    assert (args.resume, args.smoke, preset) == (False, True, "smoke")


@pytest.mark.slow
def test_imagenet_torchrun_with_fewer_validation_images_than_processes(tmp_path: Path) -> None:
    """Three processes, two validation images: rank 2's validation shard is empty. Evaluation
    counts each image once; the check that ``prune.remove`` leaves the outputs unchanged takes
    training images on that rank and holds on every rank."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 1)):
        for c in ("a", "b"):
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--standalone",
           str(EXAMPLES / "imagenet_resnet50.py"), "--smoke", "--no-progress",
           "--data", str(tmp_path / "data"), "--out", str(out), "--batch-size", "2",
           "--warmup-epochs", "0", "--epochs", "1", "--finetune-epochs", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["world_size"] == 3
    assert [report["accuracy"][k]["images"] for k in ("dense", "pruned")] == [2, 2]
    assert report["checkpoint"]["outputs_equal_after_remove"] is True
    assert report["sparsity"]["global_sparsity"] == pytest.approx(0.95, abs=1e-6)
    state = torch.load(out / "resnet50_pruned.pth", weights_only=True)
    assert state["fc.weight"].shape == (2, 2048)
    assert not (out / "bip_state.pt").exists()
