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
        assert row["forward_ratio_removed"] > 0
        assert set(row["step_ratio_range"]) == {"torch_pruned", "in_loop", "fused", "two_batch"}
        for key, (low, high) in row["step_ratio_range"].items():  # the median of the repeats' ratios
            assert 0 < low <= row[f"step_ratio_{key}"] <= high, key
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
    assert set(summary) == {"dense", "imp", "omp_ft", "bip_x1", "bip_x2", "verdict"}
    for method in ("imp", "omp_ft", "bip_x1", "bip_x2"):
        for sparsity in ("0.500", "0.900"):
            cell = summary[method][sparsity]
            assert 0.0 <= cell["test"]["mean"] <= 1.0
            assert 0.0 <= cell["val"]["mean"] <= 1.0
            assert cell["time_s"]["mean"] > 0
    # every method reached exactly the sparsity it was asked for
    for row in result["rows"]:
        if row["method"] != "dense":
            assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-4)
    # the verdict follows its definition: the smallest budget level with IMP
    for sparsity, verdict in summary["verdict"].items():
        imp = summary["imp"][sparsity]["test"]
        level = [
            b
            for b in (1, 2)
            if summary[f"bip_x{b}"][sparsity]["test"]["mean"]
            >= imp["mean"] - max(imp["std"], summary[f"bip_x{b}"][sparsity]["test"]["std"])
        ]
        assert verdict["bip_budget_at_imp_accuracy"] == (level[0] if level else None)
        omp = summary["omp_ft"][sparsity]["test"]
        all_targets = [
            b
            for b in level
            if summary["imp"][sparsity]["time_s"]["mean"]
            >= 4 * summary[f"bip_x{b}"][sparsity]["time_s"]["mean"]
            and (
                float(sparsity) < 0.95
                or summary[f"bip_x{b}"][sparsity]["test"]["mean"] - omp["mean"]
                > max(omp["std"], summary[f"bip_x{b}"][sparsity]["test"]["std"])
            )
        ]
        assert verdict["bip_budget_meeting_all_targets"] == (all_targets[0] if all_targets else None)
        # every budget meeting all targets is listed (the per-budget lines read this list)
        assert verdict["bip_budgets_meeting_all_targets"] == all_targets
        # the budget chosen on validation: the smallest meeting every target on validation
        # accuracy, else the smallest level with IMP's validation accuracy
        imp_val, omp_val = summary["imp"][sparsity]["val"], summary["omp_ft"][sparsity]["val"]
        imp_time = summary["imp"][sparsity]["time_s"]["mean"]
        cells = {b: summary[f"bip_x{b}"][sparsity] for b in (1, 2)}
        on_val = [
            b
            for b, c in cells.items()
            if c["val"]["mean"] >= imp_val["mean"] - max(imp_val["std"], c["val"]["std"])
        ]
        all_val = [
            b
            for b in on_val
            if imp_time >= 4 * cells[b]["time_s"]["mean"]
            and (
                float(sparsity) < 0.95
                or cells[b]["val"]["mean"] - omp_val["mean"] > max(omp_val["std"], cells[b]["val"]["std"])
            )
        ]
        expected = all_val[0] if all_val else (on_val[0] if on_val else None)
        assert verdict["bip_budget_validated"] == expected
        if expected is not None:
            chosen = summary[f"bip_x{expected}"][sparsity]
            assert verdict["validated_level_with_imp"] == (expected in level)
            assert verdict["validated_time_ratio"] == pytest.approx(
                summary["imp"][sparsity]["time_s"]["mean"] / chosen["time_s"]["mean"]
            )
            assert verdict["validated_meets_all_targets"] == (expected in all_targets)
    # the validation split is held out of the training images
    data = bench_accuracy.split(None, 5000)
    assert len(data["xtr"]) == 55_000
    assert len(data["xval"]) == 5000
    # --replot rebuilds the same table and a new plot from the JSON alone
    (md,) = tmp_path.glob("*.md")
    (js,) = tmp_path.glob("*.json")
    table = md.read_text()
    assert "Budget chosen on validation" in table
    assert "after the fact" in table
    assert "- BiP 1x: all targets hold at" in table
    md.unlink()
    (tmp_path / md.name.replace(".md", ".png")).unlink()
    bench_accuracy.main(["--replot", str(js)])
    assert md.read_text() == table
    assert (tmp_path / md.name.replace(".md", ".png")).read_bytes()[:8] == PNG


def test_bench_accuracy_sweep_reads_no_test_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_accuracy

    def no_test(self: object, model: object) -> float:
        raise AssertionError("the sweep read the test split")

    monkeypatch.setattr(bench_accuracy.Seed, "test", no_test)
    monkeypatch.setattr(bench_accuracy, "SWEEP", {"upper_lr": [1.0, 200.0], "finetune_epochs": [0.0, 0.5]})
    args = ["--quick", "--sweep", "--sparsities", "0.9", "--out", str(tmp_path)]
    result = bench_accuracy.main(args)
    settings = result["summary"]["settings"]
    assert set(settings) == {"center", "upper_lr=1.0", "upper_lr=200.0", "finetune_epochs=0.5"}
    best = result["summary"]["best"]
    means = {label: v["val_mean"] for label, v in settings.items()}
    default_lr = bench_accuracy.torchbip.BiPConfig().upper_lr
    lr_candidates = {
        1.0: means["upper_lr=1.0"],
        200.0: means["upper_lr=200.0"],
        default_lr: means["center"],
    }
    assert best["upper_lr"] == max(lr_candidates, key=lambda v: lr_candidates[v])
    assert all("test_accuracy" not in row for row in result["rows"])
    (png,) = tmp_path.glob("bench_accuracy_sweep-*.png")
    assert png.read_bytes()[:8] == PNG
    assert result["budget"]["lenet_300_100"]["train_images"] == 3000


def test_bench_accuracy_sweep_baselines_reads_no_test_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench_accuracy

    def no_test(self: object, model: object) -> float:
        raise AssertionError("the baselines' sweep read the test split")

    split = bench_accuracy.split

    def split_without_test(train_size: int | None, val_size: int) -> dict:
        data = split(train_size, val_size)
        del data["xte"], data["yte"]
        return data

    monkeypatch.setattr(bench_accuracy.Seed, "test", no_test)
    monkeypatch.setattr(bench_accuracy, "split", split_without_test)
    common = ["--quick", "--sweep-baselines", "--sparsities", "0.5", "0.9", "--lrs", "0.05", "0.1"]
    result = bench_accuracy.main([*common, "--out", str(tmp_path), "--tag", "s0"])
    assert all("test_accuracy" not in row for row in result["rows"])
    # per learning rate: the dense model, OMP+FT at each sparsity and IMP's rounds that stop at each
    for lr in (0.05, 0.1):
        mine = [r for r in result["rows"] if r["lr"] == lr]
        assert sorted((r["method"], r["sparsity"]) for r in mine) == [
            ("dense", 0.0),
            ("imp", 0.5),
            ("imp", 0.9),
            ("omp_ft", 0.5),
            ("omp_ft", 0.9),
        ]
        for row in mine:
            assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-4)
    summary = result["summary"]["lenet_300_100"]
    for method in ("dense", "imp", "omp_ft"):
        cells = summary[method]["lrs"]
        assert set(cells) == {"0.05", "0.1"}
        for lr, cell in cells.items():
            rows = [r for r in result["rows"] if r["method"] == method and r["lr"] == float(lr)]
            assert cell["mean"]["mean"] == pytest.approx(sum(r["val_accuracy"] for r in rows) / len(rows))
        assert summary[method]["chosen_lr"] == float(max(cells, key=lambda lr: cells[lr]["mean"]["mean"]))
        assert summary[method]["chosen_lr"] in summary[method]["level_with_chosen"]
    (js,) = tmp_path.glob("bench_accuracy_baselines-*-quick-s0.json")
    assert js.with_suffix(".png").read_bytes()[:8] == PNG
    assert "chosen lr" in js.with_suffix(".md").read_text()
    # another seed in another process, merged by --replot
    bench_accuracy.main([*common, "--seeds", "1", "--out", str(tmp_path), "--tag", "s1"])
    merged = tmp_path / "merged.json"
    both = bench_accuracy.main(["--replot", str(js), str(js).replace("-s0", "-s1"), "--merged", str(merged)])
    assert both["seeds"] == [0, 1]
    assert json.loads(merged.read_text())["summary"]["lenet_300_100"]["imp"]["lrs"]["0.1"]["mean"]["n"] == 2
    assert merged.with_suffix(".png").read_bytes()[:8] == PNG


def test_bench_accuracy_sweep_omp_ft_reads_no_test_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OMP+FT's own fine-tuning rate: one dense model at the baselines' rate, then each rate at
    each sparsity from it, scored on validation only."""
    import bench_accuracy

    def no_test(self: object, model: object) -> float:
        raise AssertionError("the OMP+FT sweep read the test split")

    split = bench_accuracy.split

    def split_without_test(train_size: int | None, val_size: int) -> dict:
        data = split(train_size, val_size)
        del data["xte"], data["yte"]
        return data

    dense_runs: list[float] = []
    train = bench_accuracy.train

    def counted(model: object, loader: object, epochs: float, *, lr: float) -> object:
        dense_runs.append(lr)
        return train(model, loader, epochs, lr=lr)  # type: ignore[arg-type]

    monkeypatch.setattr(bench_accuracy.Seed, "test", no_test)
    monkeypatch.setattr(bench_accuracy, "split", split_without_test)
    monkeypatch.setattr(bench_accuracy, "train", counted)
    argv = ["--quick", "--sweep-omp-ft", "--sparsities", "0.5", "0.9", "--lrs", "0.05", "0.4", "--lr", "0.1"]
    result = bench_accuracy.main([*argv, "--out", str(tmp_path)])
    assert dense_runs == [0.1]  # one dense model, at the baselines' rate, shared by every fine-tuning rate
    assert sorted((r["method"], r["lr"], r["sparsity"]) for r in result["rows"]) == [
        ("dense", 0.1, 0.0),
        ("omp_ft", 0.05, 0.5),
        ("omp_ft", 0.05, 0.9),
        ("omp_ft", 0.4, 0.5),
        ("omp_ft", 0.4, 0.9),
    ]
    for row in result["rows"]:
        assert "test_accuracy" not in row
        assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-4)
    cells = result["summary"]["lenet_300_100"]["omp_ft"]["lrs"]
    best = max(cells, key=lambda lr: cells[lr]["mean"]["mean"])
    assert result["summary"]["lenet_300_100"]["omp_ft"]["chosen_lr"] == float(best)
    (js,) = tmp_path.glob("bench_accuracy_omp_ft-*-quick.json")
    assert "OMP+FT's own fine-tuning learning rate" in js.with_suffix(".md").read_text()
    assert js.with_suffix(".png").read_bytes()[:8] == PNG


def test_protocol_fine_tunes_omp_at_its_own_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The protocol's OMP+FT fine-tunes at ``--omp-ft-lr`` (else OMP_FT_LR's validated rate, else
    the baselines' rate) and records it in the budget."""
    import argparse

    import bench_accuracy

    args = argparse.Namespace(lr=None, omp_ft_lr=None)
    monkeypatch.setattr(bench_accuracy, "OMP_FT_LR", {"lenet5": 0.3})
    assert bench_accuracy.omp_ft_lr("lenet5", args) == 0.3
    assert bench_accuracy.omp_ft_lr("small_cnn", args) == bench_accuracy.LR["small_cnn"]
    assert bench_accuracy.omp_ft_lr("lenet5", argparse.Namespace(lr=None, omp_ft_lr=0.7)) == 0.7
    seen: list[float] = []
    monkeypatch.setattr(bench_accuracy, "omp_finetune", lambda *a, lr, **k: seen.append(lr))
    monkeypatch.setattr(bench_accuracy.Seed, "row", lambda self, *a, **k: {})
    monkeypatch.setattr(bench_accuracy.Seed, "dense", property(lambda self: self.init))
    data = bench_accuracy.split(600, 100)
    run = argparse.Namespace(
        epochs=1.0, lr=None, omp_ft_lr=None, batch_size=64, methods=["omp_ft"], sparsities=[0.5], budgets=[1],
        bip={}, bip_epochs=1.0, train_size=600,
    )  # fmt: skip
    bench_accuracy.run_seed("lenet5", 0, run, data)
    assert seen == [0.3]


def test_bench_ablation_quick(tmp_path: Path) -> None:
    import bench_ablation

    result = bench_ablation.main(["--quick", "--out", str(tmp_path)])
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
    (png,) = tmp_path.glob("*.png")
    assert png.read_bytes()[:8] == PNG
    assert "omp+finetune" in result["summary"]
    n_fused = sum("fused" in v for v in result["summary"])
    assert n_fused == sum("two_batch" in v for v in result["summary"]) > 0


def _protocol_json(path: Path, lr: float, seed: int) -> Path:
    budget = {
        "train_images": 100,
        "val_images": 10,
        "epochs": 1.0,
        "bip_epochs": 0.5,
        "lr": lr,
        "seeds": [seed],
    }
    result = {"device": "cpu", "torch": "0", "quick": True, "bip_settings": {"lower_lr": 0.05},
              "budget": {"lenet_300_100": budget}, "rows": []}  # fmt: skip
    path.write_text(json.dumps(result))
    return path


def test_bench_accuracy_replot_refuses_runs_of_other_budgets(tmp_path: Path) -> None:
    """Runs merged by ``--replot`` must share every budget (the learning rate included), not only
    the BiP settings; seeds may differ, that is what merging is for."""
    import bench_accuracy

    a = _protocol_json(tmp_path / "a.json", 0.2, 0)
    b = _protocol_json(tmp_path / "b.json", 0.05, 1)
    with pytest.raises(SystemExit, match="budgets"):
        bench_accuracy.main(["--replot", str(a), str(b), "--merged", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_bench_accuracy_sweep_replot_refuses_other_centers(tmp_path: Path) -> None:
    import bench_accuracy

    paths = []
    for name, lower_lr in (("a", 0.05), ("b", 0.2)):
        center = {"lower_lr": lower_lr}
        sweep = {"models": ["lenet_300_100"], "seeds": [0], "budget": {}, "rows": [],
                 "summary": {"center": center, "settings": {}, "best": {}}}  # fmt: skip
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(sweep))
    with pytest.raises(SystemExit, match="center or budget"):
        bench_accuracy.main(["--replot", *map(str, paths), "--merged", str(tmp_path / "m.json")])


def test_committed_lenet_300_100_protocol_is_the_merge_of_its_seeds(tmp_path: Path) -> None:
    """The published LeNet-300-100 table is what ``--replot`` builds from its three per-seed runs."""
    import bench_accuracy

    results = BENCH / "results"
    stem = "bench_accuracy-cpu-x86_64-1threads-torch2.14.1-lenet_300_100"
    seeds = sorted((results / "seeds").glob(f"{stem}-lpt-lr0.2-s?.json"))
    if len(seeds) != 3:
        pytest.skip("the per-seed runs are not in this checkout")
    merged = bench_accuracy.main(["--replot", *map(str, seeds), "--merged", str(tmp_path / f"{stem}.json")])
    assert (tmp_path / f"{stem}.md").read_text() == (results / f"{stem}.md").read_text()
    assert merged["budget"]["lenet_300_100"]["seeds"] == [0, 1, 2]
    assert merged["budget"]["lenet_300_100"]["lr"] == 0.2


HEADLINE = "bench_accuracy-cpu-x86_64-1threads-torch2.14.1-{}.json"  # the committed headline runs


def _documented_protocol_commands() -> list[tuple[str, list[str]]]:
    """Every documented ``bench_accuracy.py --models ...`` command (a protocol run, not a sweep):
    benchmarks/README.md's and the script's docstring's, as argument lists."""
    import bench_accuracy

    commands = []
    for where, text in (("benchmarks/README.md", (BENCH / "README.md").read_text()),
                        ("bench_accuracy's docstring", bench_accuracy.__doc__ or "")):  # fmt: skip
        for line in text.splitlines():
            if "bench_accuracy.py --models" in line:
                commands.append((where, line.split("bench_accuracy.py", 1)[1].split("#")[0].split()))
    return commands


class _ResolvedError(Exception):
    """Raised by the stand-in of ``run_seed``: the run's settings are known, nothing trains."""


def _resolve(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """What ``bench_accuracy.main(argv)`` would run, read where the first seed starts: the model,
    the budget its JSON records, BiP's settings and the learning rate the baselines train at."""
    import bench_accuracy

    seen: dict = {}

    def run_seed(name: str, seed: int, args: object, data: dict) -> list[dict]:
        seen.update(
            model=name,
            budget=bench_accuracy.protocol_budget(name, args, data),  # type: ignore[arg-type]
            bip_settings=bench_accuracy.bip_settings(args.bip),  # type: ignore[attr-defined]
            lr=bench_accuracy.Seed(name, seed, args, data).lr,  # type: ignore[arg-type]
        )
        raise _ResolvedError

    def split(train_size: int | None, val_size: int) -> dict:  # the sizes of the real split, no data
        return {"xtr": range(55_000 if train_size is None else train_size), "xval": range(val_size)}

    monkeypatch.setattr(bench_accuracy, "run_seed", run_seed)
    monkeypatch.setattr(bench_accuracy, "split", split)
    with pytest.raises(_ResolvedError):
        bench_accuracy.main(argv)
    return seen


def test_the_documented_protocol_commands_reproduce_the_committed_headline_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parsed by the script's own argument parser, each documented command runs the baselines at
    the learning rate the committed headline JSON records (0.2 for LeNet-300-100: the command ran
    them at 0.05, the under-trained setting the results README withdrew), with the same budget and
    BiP settings."""
    import bench_accuracy

    commands = _documented_protocol_commands()
    models = sorted(argv[argv.index("--models") + 1] for _, argv in commands)
    assert models == ["lenet5", "lenet5", "lenet_300_100", "lenet_300_100"]  # README's and the docstring's
    for where, argv in commands:
        seen = _resolve(argv, monkeypatch)
        headline = json.loads((BENCH / "results" / HEADLINE.format(seen["model"])).read_text())
        budget = headline["budget"][seen["model"]]
        assert seen["lr"] == budget["lr"] == bench_accuracy.LR[seen["model"]], (where, argv)
        assert seen["budget"] == budget, (where, argv)
        assert seen["bip_settings"] == headline["bip_settings"], (where, argv)


def test_bench_accuracy_lr_defaults_per_model_and_lr_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_accuracy

    for model, lr in bench_accuracy.LR.items():
        path = BENCH / "results" / HEADLINE.format(model)
        if path.exists():  # a headline run records the rate its model's default must be
            assert json.loads(path.read_text())["budget"][model]["lr"] == lr, model
        assert _resolve(["--models", model], monkeypatch)["lr"] == lr
        assert _resolve(["--models", model, "--lr", "0.1"], monkeypatch)["lr"] == 0.1


@pytest.mark.filterwarnings("ignore:the global ranking pruned every entry")  # (a tiny model at 99%)
def test_imp_time_to_a_ticket_is_that_of_a_run_aimed_at_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """One IMP run serves every sparsity; its ticket at s is charged the rounds of a run to s alone.

    A clock that advances one unit per training (round 0 and each round) makes the oracle exact: a
    run to s alone trains ``ceil(log(1 - s) / log(1 - rate)) + 1`` times.
    """
    import argparse
    import math
    import types

    import bench_accuracy
    import torch
    from torch import nn

    import torchbip.baselines

    clock = types.SimpleNamespace(t=0.0)
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock.t)
    monkeypatch.setattr(torchbip.baselines, "time", fake_time)
    trained = torchbip.baselines._train

    def counted(*args: object, **kwargs: object) -> object:
        clock.t += 1.0
        return trained(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torchbip.baselines, "_train", counted)
    monkeypatch.setitem(
        bench_accuracy.MODELS,
        "tiny",
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 400), nn.Linear(400, 10)),
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 10, (64,), generator=g)
    data = {"xtr": x, "ytr": y, "xval": x, "yval": y, "xte": x, "yte": y}
    args = argparse.Namespace(
        epochs=1.0, lr=0.05, batch_size=64, methods=["imp"], sparsities=list(bench_accuracy.SPARSITIES),
        budgets=[1], bip={}, bip_epochs=1.0,
    )  # fmt: skip
    rows = [r for r in bench_accuracy.run_seed("tiny", 0, args, data) if r["method"] == "imp"]
    rate = bench_accuracy.IMP_RATE
    expected = {
        s: math.ceil(math.log(1 - s) / math.log(1 - rate) - 1e-9) + 1 for s in bench_accuracy.SPARSITIES
    }
    assert {r["sparsity"]: r["time_s"] for r in rows} == expected
    # the run itself went through more rounds, and says so
    assert [r["round"] for r in rows] == [8, 12, 16, 18, 21, 25]
    assert all(r["run_time_s"] == r["round"] + 1 for r in rows)
    assert [r["rounds_charged"] + 1 for r in rows] == list(expected.values())
