"""What the wheel and the source distribution hold: the MNIST file in the latter only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build(kind: str, project: Path, out: Path) -> Path:
    """Build a wheel or sdist of ``project`` with setuptools' PEP 517 backend, in its own process."""
    code = (
        f"import sys; from setuptools import build_meta; print('BUILT', build_meta.build_{kind}(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=project, capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built = next(line for line in done.stdout.splitlines() if line.startswith("BUILT "))
    return out / built.split()[1]


@pytest.mark.timeout(200)
def test_the_wheel_holds_the_package_and_the_sdist_the_data(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    project = tmp_path / "project"  # a copy: building writes egg-info and build folders
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "constraints.txt", "MANIFEST.in"):
        shutil.copy(ROOT / name, project / name)
    for folder in ("torchbip", "data"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with zipfile.ZipFile(_build("wheel", project, tmp_path / "wheel")) as archive:
        wheel = archive.namelist()
    assert "torchbip/__init__.py" in wheel
    assert "torchbip/py.typed" in wheel
    assert not [n for n in wheel if n.endswith(".npz") or n.startswith("data/")]
    with tarfile.open(_build("sdist", project, tmp_path / "sdist")) as archive:
        sdist = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"data/mnist.npz", "data/README.md", "torchbip/__init__.py", "LICENSE"} <= sdist
