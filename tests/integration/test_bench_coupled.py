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


def test_bench_coupled_sweep_reads_no_test_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--sweep`` scores settings on images held out of the training split, never on the test split."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_coupled

    for name in ("load_digits", "load_mnist"):
        loader = getattr(bench_coupled, name)

        def guarded(*args: object, _loader: object = loader, **kwargs: object) -> object:
            if "test" in args or kwargs.get("split") == "test":
                raise AssertionError("the sweep read the test split")
            return _loader(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(bench_coupled, name, guarded)
    result = bench_coupled.main(["--quick", "--sweep", "--datasets", "digits", "--out", str(tmp_path)])
    assert {r["setting"] for r in result["sweep"]} == {"center", "upper_lr=1.0"}
    assert all(set(r) == {"dataset", "seed", "amount", "setting", "val_accuracy"} for r in result["sweep"])
    summary = {c["setting"]: c for c in result["sweep_summary"]}
    for setting, cell in summary.items():
        rows = [r["val_accuracy"] for r in result["sweep"] if r["setting"] == setting]
        assert cell["mean"] == pytest.approx(sum(rows) / len(rows))
    stem = "bench_coupled_sweep-cpu-{machine}-{threads}threads-torch{torch}-quick".format(
        **result["environment"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.{ext}" for ext in ("json", "md", "png")]
    assert "| center |" in (tmp_path / f"{stem}.md").read_text()


def test_bench_coupled_merge_joins_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--merge``: the structure part of the first run, the accuracy rows and settings of the others."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_coupled

    first = bench_coupled.main(["--quick", "--out", str(tmp_path / "a")])
    second = bench_coupled.main(
        [
            "--quick",
            "--models",
            "--bip",
            "upper_lr=10",
            "--tp-lr",
            "0.02",
            "0.1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert second["models"] == []
    paths = [next((tmp_path / d).glob("*.json")) for d in ("a", "b")]
    merged = bench_coupled.main(["--merge", *map(str, paths), "--out", str(tmp_path / "m")])
    assert merged["models"] == json.loads(json.dumps(first["models"]))
    assert merged["accuracy"] == json.loads(json.dumps(second["accuracy"]))  # the first run's are left out
    assert merged["accuracy_settings"]["digits"]["tp_lr"] == {"tp_l1": 0.02, "tp_taylor": 0.1}
    markdown = next((tmp_path / "m").glob("*.md")).read_text()
    assert "- digits: structured BiP with" in markdown
    assert "| resnet18 " in markdown or "## resnet18" in markdown
