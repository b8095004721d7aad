"""The benchmarks' ``--quick`` modes run end to end and write parseable results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_step_quick(tmp_path: Path) -> None:
    import bench_step

    result = bench_step.main(["--quick", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("-quick.json") for f in files)
    assert any(f.endswith("-quick.md") for f in files)
    (png,) = tmp_path.glob("*-quick.png")
    assert png.read_bytes()[:8] == PNG
    png.unlink()
    bench_step.main(["--replot", str(next(tmp_path.glob("*.json")))])
    assert png.read_bytes()[:8] == PNG
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data == json.loads(json.dumps(result))
    for row in data["models"]:
        assert row["step_s"]["dense"] > 0
        assert row["step_ratio_fused"] > 0
        assert row["step_ratio_in_loop"] == pytest.approx(row["step_s"]["in_loop"] / row["step_s"]["dense"])
        assert row["forward_ratio_removed"] > 0
    assert all(r["numel"] > 0 and r["global_topk_s"] > 0 for r in data["topk"])
    assert set(data["first_call"]) == {"dense", "global_prune", "in_loop"}
    for timings in data["first_call"].values():
        assert min(timings[k] for k in ("import_s", "first_call_s", "second_call_s")) > 0
        assert timings["first_call_warm_torch_s"] > 0
    markdown = next(tmp_path.glob("*-quick.md")).read_text()
    assert "| in_loop |" in markdown
    assert "in-loop / dense" in markdown


def test_bench_accuracy_quick(tmp_path: Path) -> None:
    import bench_accuracy

    result = bench_accuracy.main(["--quick", "--out", str(tmp_path)])
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
    summary = result["summary"]["lenet_300_100"]
    for method in ("bip", "imp", "omp", "random", "bip_no_implicit"):
        for sparsity in ("0.50", "0.90"):
            cell = summary[method][sparsity]
            assert 0.0 <= cell["accuracy_mean"] <= 1.0
            assert cell["time_mean_s"] > 0
    # every method reached exactly the sparsity it was asked for
    for row in result["rows"]:
        if row["method"] != "dense":
            assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-4)
    # --replot rebuilds the same table and a new plot from the JSON alone
    (md,) = tmp_path.glob("*.md")
    (js,) = tmp_path.glob("*.json")
    table = md.read_text()
    md.unlink()
    (tmp_path / md.name.replace(".md", ".png")).unlink()
    bench_accuracy.main(["--replot", str(js)])
    assert md.read_text() == table
    assert (tmp_path / md.name.replace(".md", ".png")).read_bytes()[:8] == PNG


def test_bench_ablation_quick(tmp_path: Path) -> None:
    import bench_ablation

    result = bench_ablation.main(["--quick", "--out", str(tmp_path)])
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == PNG
    assert "omp+finetune" in result["summary"]
    n_fused = sum("fused" in v for v in result["summary"])
    assert n_fused == sum("two_batch" in v for v in result["summary"]) > 0
