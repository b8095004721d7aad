"""benchmarks/bench_coupled.py runs end to end and writes consistent results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_coupled_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_coupled

    result = bench_coupled.main(["--quick", "--out", str(tmp_path)])
    stem = "bench_coupled-cpu-{machine}-{threads}threads-torch{torch}-quick".format(**result["environment"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.{ext}" for ext in ("json", "md", "png")]
    assert json.loads((tmp_path / f"{stem}.json").read_text()) == json.loads(json.dumps(result))
    (model,) = result["models"]
    rows = {r["variant"]: r for r in model["rows"]}
    assert rows["dense"]["speedup"] == pytest.approx(1.0)
    for key in ("layer@0.50", "macs@0.50"):
        row = rows[key]
        assert row["removed_channels"] == row["pruned_channels"] > 0
        assert row["max_abs_diff_to_masked"] < 1e-3
        assert row["params"] < rows["dense"]["params"]
    assert rows["macs@0.50"]["mac_ratio"] == pytest.approx(0.5, abs=0.02)
    methods = {c["method"]: c for c in result["accuracy_summary"] if c["amount"] == 0.5}
    assert set(methods) == {"bip", "tp_l1", "tp_taylor"}
    # the same channels per group: every method lands on the same MACs
    assert len({round(c["mac_ratio"], 9) for c in methods.values()}) == 1
    assert all(0.0 <= c["mean"] <= 1.0 for c in methods.values())
    markdown = (tmp_path / f"{stem}.md").read_text()
    assert "| digits | 50% |" in markdown
