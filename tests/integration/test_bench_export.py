"""benchmarks/bench_export.py runs end to end and writes consistent results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def _check_models(result: dict) -> None:
    for model in result["models"]:
        rows = {r["variant"]: r for r in model["rows"]}
        assert rows["dense"]["speedup"] == pytest.approx(1.0)
        for row in rows.values():
            assert row["latency_s"] > 0
            assert row["params"] > 0
            assert row["macs"] > 0
            if row["kind"] == "slim":
                assert row["param_ratio"] < 1.0
                assert 0 < row["removed_filters"] <= row["pruned_filters"]
                assert row["max_abs_diff_to_masked"] < 1e-3
            if row["kind"] == "csr":
                assert row["mac_ratio"] == pytest.approx(1 - row["amount"], abs=0.02)
                assert row["max_abs_diff_to_masked"] < 1e-3


def test_bench_export_quick_one_model(tmp_path: Path) -> None:
    import bench_export

    result = bench_export.main(["--quick", "--models", "vgg_style", "--no-digits", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "bench_export-cpu-torch" + result["environment"]["torch"].split("+")[0] + "-quick." + ext
        for ext in ("json", "md")
    ]
    assert json.loads((tmp_path / names[0]).read_text()) == json.loads(json.dumps(result))
    _check_models(result)
    assert "| slim@0.50 |" in (tmp_path / names[1]).read_text()


@pytest.mark.slow
def test_bench_export_quick(tmp_path: Path) -> None:
    import bench_export

    result = bench_export.main(["--quick", "--out", str(tmp_path)])
    _check_models(result)
    methods = {r["method"] for r in result["digits"]}
    assert methods == {"dense", "bip_structured", "l1_filter"}
    for row in result["digits"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        if row["method"] != "dense":
            assert row["slim_accuracy"] == pytest.approx(row["accuracy"], abs=1e-6)
            assert row["kept_filters"] <= row["slim_filters"] <= row["total_filters"]


def test_committed_markdown_is_what_its_json_gives(tmp_path: Path) -> None:
    """The committed page is the one ``--replot`` writes from the committed JSON (with its caveats)."""
    import bench_export

    committed = BENCH / "results" / "bench_export-cpu-torch2.14.1.json"
    if not committed.is_file():
        pytest.skip("the committed run is not in this checkout")
    copy = tmp_path / committed.name
    copy.write_text(committed.read_text())
    bench_export.main(["--replot", str(copy)])
    assert copy.with_suffix(".md").read_text() == committed.with_suffix(".md").read_text()
    assert "picked in a sweep scored on this test split" in committed.with_suffix(".md").read_text()
