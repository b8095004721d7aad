"""BiPConfig: defaults, validation messages, replace and dict round trips.

Also the settings' plain types (``numpy.str_`` and ``enum.StrEnum`` values stored as ``str``:
oracle, ``torch.load(weights_only=True)`` reading them back and a resumed run equal bitwise to
the uninterrupted one) and the coefficients that float32 cannot hold (oracle: torch's own
conversion of the coefficient of a float32 operation).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import Tensor, nn

from torchbip import BiP, BiPConfig, global_prune


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
        pytest.param(
            {"gamma": 1e39},
            r"^gamma=1e\+39 is above the largest float32 \(3\.4028234663852886e\+38\)",
            id="gamma-float32-overflow",
        ),
        pytest.param(
            {"implicit_coef": 1e39},
            r"^implicit_coef=1e\+39 is above the largest float32 \(3\.4028234663852886e\+38\)",
            id="coef-float32-overflow",
        ),
        pytest.param(
            {"implicit_coef": np.float64(1e39)}, r"^implicit_coef=1e\+39 is above", id="coef-numpy-overflow"
        ),
        pytest.param(
            {"gamma": 1e-39, "implicit_coef": None},
            r"^gamma=1e-39 with implicit_coef=None makes the implicit coefficient 1/gamma = "
            r"1\.0000000000000001e\+39, above the largest float32 .*pass a gamma of at least 2\.94e-39",
            id="inverse-gamma-float32-overflow",
        ),
        pytest.param(
            {"gamma": 1e-320, "implicit_coef": None},
            r"^gamma=1e-320 with implicit_coef=None makes the implicit coefficient 1/gamma = inf",
            id="inverse-gamma-inf",
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


# -- coefficients that float32 cannot hold ---------------------------------------------------------

F32_MAX = torch.finfo(torch.float32).max


def takes_as_float32_coefficient(value: float) -> bool:
    """Oracle: whether torch converts ``value`` as the coefficient of a float32 operation."""
    try:
        torch.zeros(1).add(torch.ones(1), alpha=value)
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        return False
    return True


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"gamma": F32_MAX}, id="gamma-max"),
        pytest.param({"implicit_coef": F32_MAX}, id="coef-max"),
        pytest.param({"gamma": math.nextafter(1 / F32_MAX, 1.0), "implicit_coef": None}, id="inverse-max"),
    ],
)
def test_accepts_coefficients_up_to_the_largest_float32(changes: dict) -> None:
    cfg = BiPConfig(**changes)
    assert takes_as_float32_coefficient(cfg.gamma)
    assert takes_as_float32_coefficient(cfg.effective_implicit_coef)


@pytest.mark.parametrize(
    ("changes", "coefficient"),
    [
        ({"gamma": 1e39}, 1e39),
        ({"implicit_coef": 1e39}, 1e39),
        ({"gamma": 1e-39, "implicit_coef": None}, 1 / 1e-39),
        ({"gamma": 1 / F32_MAX / 1.0001, "implicit_coef": None}, F32_MAX * 1.0001),
    ],
)
def test_refuses_exactly_the_coefficients_torch_cannot_convert(changes: dict, coefficient: float) -> None:
    assert not takes_as_float32_coefficient(coefficient)
    with pytest.raises(ValueError, match=r"above the largest float32"):
        BiPConfig(**changes)


def mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(n: int = 4) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"implicit_coef": 1e39}, "implicit_coef"),
        ({"gamma": 1e39}, "gamma"),
        ({"gamma": 1e-39, "implicit_coef": None}, "gamma"),
        ({"gamma": 1e-320, "implicit_coef": None}, "gamma"),  # (it blamed implicit_coef, never passed)
    ],
)
def test_global_prune_refuses_coefficients_float32_cannot_hold_before_any_work(
    options: dict, name: str
) -> None:
    model = mlp()
    before = capture(model)
    calls = [0]

    def loss(out: Tensor, y: Tensor) -> Tensor:
        calls[0] += 1
        return F.cross_entropy(out, y)

    with pytest.raises(ValueError, match=rf"^{name}="):
        global_prune(model, 0.5, batches(), steps=2, progress=False, loss_fn=loss, **options)
    assert calls[0] == 0
    assert_unchanged(before, model)


def test_bip_refuses_an_implicit_coef_float32_cannot_hold_at_construction() -> None:
    model = mlp()
    before = capture(model)
    with pytest.raises(ValueError, match=r"^implicit_coef=1e\+39 "):
        BiP(model, amount=0.5, implicit_coef=1e39)
    assert_unchanged(before, model)


# -- str subclasses stored as plain str --------------------------------------------------------------


class Choice(enum.StrEnum):
    COSINE = "cosine"
    FUSED = "fused"
    ADAMW = "adamw"
    FILTER = "filter"
    GLOBAL = "global"


def test_str_subclasses_are_stored_as_plain_str_that_weights_only_loading_reads() -> None:
    odd = BiPConfig(
        mode=Choice.FUSED, lower_schedule=np.str_("cosine"), upper_schedule=Choice.COSINE,
        score_init=np.str_("scaled_magnitude"), optimizer=Choice.ADAMW, device=np.str_("cpu"),
        checkpoint_path=np.str_("bip.ckpt"),
    )  # fmt: skip
    plain = BiPConfig(
        mode="fused", lower_schedule="cosine", upper_schedule="cosine", score_init="scaled_magnitude",
        optimizer="adamw", device="cpu", checkpoint_path="bip.ckpt",
    )  # fmt: skip
    for f in dataclasses.fields(odd):
        value = getattr(odd, f.name)
        assert not isinstance(value, str) or type(value) is str, f.name
    buffer = io.BytesIO()
    torch.save(odd.to_dict(), buffer)
    buffer.seek(0)
    assert BiPConfig.from_dict(torch.load(buffer, weights_only=True)) == plain
    assert type(odd.replace(lower_schedule=np.str_("step")).lower_schedule) is str


class StopsAt:
    """A re-iterable loader of ``batches`` that raises ``KeyboardInterrupt`` at its ``n``-th batch."""

    def __init__(self, items: list[tuple[Tensor, Tensor]], n: int | None = None) -> None:
        self.items, self.n, self.count = items, n, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Any:
        for item in self.items:
            self.count += 1
            if self.count == self.n:
                raise KeyboardInterrupt
            yield item


@pytest.mark.parametrize(
    "option",
    [
        pytest.param({"lower_schedule": np.str_("cosine")}, id="numpy-str"),
        pytest.param({"lower_schedule": Choice.COSINE, "mode": Choice.FUSED}, id="str-enum"),
        pytest.param({"structured": np.str_("filter"), "budget": Choice.GLOBAL}, id="layout-and-budget"),
    ],
)
def test_global_prune_resumes_its_own_checkpoint_written_with_str_subclass_options(
    tmp_path: Path, option: dict[str, Any]
) -> None:
    """Oracle: the uninterrupted run with the same options as plain ``str``."""
    run: dict[str, Any] = {"steps": 6, "progress": False, "seed": 0}
    reference = mlp()
    global_prune(reference, 0.5, StopsAt(batches()), **run, **{k: str(v) for k, v in option.items()})
    path = tmp_path / "bip.ckpt"
    model = mlp()
    with pytest.raises(KeyboardInterrupt):
        global_prune(
            model, 0.5, StopsAt(batches(), 5), checkpoint_path=path, checkpoint_every=2, **run, **option
        )
    saved = torch.load(path, weights_only=True)  # it could not be read back
    assert all(type(v) is str for v in saved["run"].values() if isinstance(v, str))
    global_prune(model, 0.5, StopsAt(batches()), checkpoint_path=path, resume=True, **run, **option)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["progress", "resume"])
@pytest.mark.parametrize("flag", [np.bool_(True), np.bool_(False)])
def test_numpy_bool_flags_are_stored_as_python_bools(name: str, flag: np.bool_) -> None:
    extra = {"checkpoint_path": "bip.pt"} if name == "resume" else {}
    cfg = BiPConfig(**{name: flag}, **extra)
    value = getattr(cfg, name)
    assert type(value) is bool
    assert value == bool(flag)
    assert BiPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # plain types


@pytest.mark.parametrize("value", [1, 0, np.int64(1), "True", None])
def test_flags_that_are_not_bools_are_still_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"^progress must be a bool, got "):
        BiPConfig(progress=value)  # type: ignore[arg-type]


def test_checkpoint_settings_turn_numpy_bools_into_python_bools() -> None:
    from torchbip._checkpoint import _plain

    value = _plain({"flags": [np.True_, (np.bool_(False),)], np.str_("x"): np.True_})
    assert value == {"flags": [True, (False,)], "x": True}
    assert type(value["flags"][0]) is bool
    assert type(value["flags"][1][0]) is bool
    assert type(value["x"]) is bool
