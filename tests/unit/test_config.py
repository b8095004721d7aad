"""BiPConfig: defaults, validation messages, replace and dict round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from torchbip import BiPConfig


def test_defaults_follow_the_paper_except_where_measured() -> None:
    cfg = BiPConfig()
    assert (cfg.steps, cfg.epochs, cfg.mode) == (None, None, "fused")
    # upper_lr: the paper's 0.1 lost to 10 in benchmarks/bench_ablation.py (see BiPConfig's docs)
    assert (cfg.lower_lr, cfg.upper_lr, cfg.momentum, cfg.upper_momentum) == (0.05, 3.0, 0.9, 0.9)
    assert (cfg.lower_schedule, cfg.upper_schedule) == ("cosine", "constant")
    assert cfg.gamma == 5e-4
    assert cfg.implicit_coef == 1.0
    assert cfg.min_keep is None
    assert cfg.score_init == "magnitude"
    assert (cfg.seed, cfg.device, cfg.progress, cfg.log_every) == (None, None, True, 10)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        pytest.param({"steps": 0}, r"steps must be an int >= 1 or None, got 0", id="steps-zero"),
        pytest.param({"steps": 2.0}, r"steps must be an int >= 1 or None, got 2\.0", id="steps-float"),
        pytest.param({"steps": True}, r"steps must be an int >= 1 or None, got True", id="steps-bool"),
        pytest.param({"epochs": 0}, r"epochs must be a finite number > 0, got 0", id="epochs-zero"),
        pytest.param({"epochs": math.inf}, r"epochs must be a finite number > 0, got inf", id="epochs-inf"),
        pytest.param({"epochs": "1"}, r"epochs must be a finite number > 0, got '1'", id="epochs-str"),
        pytest.param(
            {"mode": "fast"}, r"mode must be one of \('fused', 'two_batch'\), got 'fast'", id="mode"
        ),
        pytest.param(
            {"lower_schedule": "linear"}, r"lower_schedule must be one of .* got 'linear'", id="lower-sched"
        ),
        pytest.param(
            {"upper_schedule": None}, r"upper_schedule must be one of .* got None", id="upper-sched"
        ),
        pytest.param({"score_init": "random"}, r"score_init must be one of .* got 'random'", id="score-init"),
        pytest.param({"lower_lr": -1}, r"lower_lr must be a finite number > 0, got -1", id="lower-lr"),
        pytest.param(
            {"lower_lr": math.nan}, r"lower_lr must be a finite number > 0, got nan", id="lower-lr-nan"
        ),
        pytest.param({"upper_lr": 0.0}, r"upper_lr must be a finite number > 0, got 0\.0", id="upper-lr"),
        pytest.param(
            {"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1\.0", id="momentum-one"
        ),
        pytest.param(
            {"momentum": -0.1}, r"momentum must be a number in \[0, 1\), got -0\.1", id="momentum-neg"
        ),
        pytest.param({"upper_momentum": math.nan}, r"upper_momentum must be .* got nan", id="upper-mom-nan"),
        pytest.param(
            {"momentum": True}, r"momentum must be a number in \[0, 1\), got True", id="momentum-bool"
        ),
        pytest.param({"gamma": 0}, r"gamma must be a finite number > 0, got 0", id="gamma-zero"),
        pytest.param(
            {"implicit_coef": -1.0}, r"implicit_coef must be .* >= 0 or None, got -1\.0", id="coef-neg"
        ),
        pytest.param({"implicit_coef": math.nan}, r"implicit_coef must be .* got nan", id="coef-nan"),
        pytest.param({"implicit_coef": math.inf}, r"implicit_coef must be .* got inf", id="coef-inf"),
        pytest.param({"implicit_coef": "1"}, r"implicit_coef must be .* got '1'", id="coef-str"),
        pytest.param(
            {"min_keep": True}, r"min_keep must be an int, a float or None, got True", id="min-keep-bool"
        ),
        pytest.param(
            {"min_keep": "1"}, r"min_keep must be an int, a float or None, got '1'", id="min-keep-str"
        ),
        pytest.param({"min_keep": -1}, r"min_keep must be >= 0, got -1", id="min-keep-neg"),
        pytest.param(
            {"min_keep": 1.5}, r"min_keep as a float must lie in \[0, 1\], got 1\.5", id="min-keep-big"
        ),
        pytest.param(
            {"min_keep": math.nan}, r"min_keep as a float must lie in \[0, 1\], got nan", id="min-keep-nan"
        ),
        pytest.param(
            {"seed": 1.0},
            r"seed must be an int in \[-2\*\*63, 2\*\*64 - 1\] .* or None, got 1\.0",
            id="seed-float",
        ),
        pytest.param(
            {"seed": False},
            r"seed must be an int in \[-2\*\*63, 2\*\*64 - 1\] .* or None, got False",
            id="seed-bool",
        ),
        pytest.param({"log_every": 0}, r"log_every must be an int >= 1, got 0", id="log-every-zero"),
        pytest.param({"log_every": True}, r"log_every must be an int >= 1, got True", id="log-every-bool"),
    ],
)
def test_rejects_bad_values(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BiPConfig(**changes)
    with pytest.raises(ValueError, match=match):
        BiPConfig().replace(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"steps": 1, "epochs": 0.5}, id="steps-epochs"),
        pytest.param(
            {"mode": "two_batch", "lower_schedule": "constant", "upper_schedule": "cosine"}, id="modes"
        ),
        pytest.param({"momentum": 0.0, "upper_momentum": 0.0}, id="no-momentum"),
        pytest.param({"implicit_coef": None}, id="coef-theory"),
        pytest.param({"implicit_coef": 0}, id="coef-off"),
        pytest.param({"min_keep": 0}, id="min-keep-zero"),
        pytest.param({"min_keep": 3}, id="min-keep-int"),
        pytest.param({"min_keep": 0.0}, id="min-keep-float-zero"),
        pytest.param({"min_keep": 1.0}, id="min-keep-float-one"),
        pytest.param({"score_init": "magnitude", "seed": 0, "device": "cpu"}, id="misc"),
    ],
)
def test_accepts_edge_values(changes: dict) -> None:
    cfg = BiPConfig(**changes)
    for name, value in changes.items():
        assert getattr(cfg, name) == value


def test_effective_implicit_coef() -> None:
    assert BiPConfig(gamma=1e-4, implicit_coef=None).effective_implicit_coef == pytest.approx(1e4)
    assert BiPConfig(gamma=1e-4, implicit_coef=0.5).effective_implicit_coef == 0.5
    assert BiPConfig(implicit_coef=0).effective_implicit_coef == 0.0
    assert isinstance(BiPConfig(implicit_coef=2).effective_implicit_coef, float)


def test_frozen() -> None:
    cfg = BiPConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]


def test_replace_returns_a_new_config() -> None:
    cfg = BiPConfig(steps=5)
    new = cfg.replace(lower_lr=0.05, mode="two_batch")
    assert (new.steps, new.lower_lr, new.mode) == (5, 0.05, "two_batch")
    assert (cfg.lower_lr, cfg.mode) == (0.05, "fused")
    assert cfg.replace() == cfg


def test_replace_rejects_unknown_names() -> None:
    with pytest.raises(TypeError, match=r"unknown BiP option\(s\) \['lr', 'sparsity'\]; valid options: \["):
        BiPConfig().replace(lr=0.1, sparsity=0.9)


def test_dict_round_trip_through_json() -> None:
    cfg = BiPConfig(steps=7, min_keep=0.01, implicit_coef=None, seed=3, device="cpu", progress=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["steps"] == 7
    assert data["implicit_coef"] is None
    assert set(data) == {f.name for f in dataclasses.fields(BiPConfig)}
    assert BiPConfig.from_dict(data) == cfg


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(TypeError, match=r"unknown BiP option\(s\) \['keep_ratio'\]"):
        BiPConfig.from_dict({"keep_ratio": 0.1})
    with pytest.raises(ValueError, match=r"gamma must be a finite number > 0, got -1"):
        BiPConfig.from_dict({"gamma": -1})
