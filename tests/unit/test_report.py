"""sparsity_report / SparsityReport / PruneReport against hand-counted zeros."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torchbip import PruneReport, SparsityReport, bip_unstructured, sparsity_report
from torchbip.report import TensorSparsity


@pytest.fixture
def model(seed: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))


def test_counts_masks_of_pruned_tensors_only(model: nn.Sequential) -> None:
    prune.l1_unstructured(model[0], "weight", amount=4)
    bip_unstructured(model[2][1], "weight", amount=0.5)
    report = sparsity_report(model)
    assert report.tensors == {
        "0.weight": TensorSparsity(numel=16, zeros=4),
        "2.1.weight": TensorSparsity(numel=6, zeros=3),
    }
    assert (report.numel, report.zeros) == (22, 7)
    assert report.global_sparsity == pytest.approx(7 / 22)
    assert report.tensors["0.weight"].sparsity == 0.25


def test_counts_bias_and_custom_masks(model: nn.Sequential) -> None:
    prune.custom_from_mask(model[2][0], "bias", torch.tensor([0.0, 1.0, 0.0]))
    prune.random_unstructured(model[0], "weight", amount=0)
    report = sparsity_report(model)
    assert report.tensors == {"0.weight": TensorSparsity(16, 0), "2.0.bias": TensorSparsity(3, 2)}


def test_matches_global_unstructured(model: nn.Sequential) -> None:
    layers = [(model[0], "weight"), (model[2][0], "weight"), (model[2][1], "weight")]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=17)
    report = sparsity_report(model)
    assert report.zeros == 17
    assert report.numel == 16 + 12 + 6
    for (module, name), key in zip(layers, ["0.weight", "2.0.weight", "2.1.weight"], strict=True):
        assert report.tensors[key].zeros == int((getattr(module, name + "_mask") == 0).sum())


def test_a_mask_buffer_without_orig_is_not_a_pruned_tensor() -> None:
    layer = nn.Linear(2, 2)
    layer.register_buffer("attention_mask", torch.zeros(3))
    assert sparsity_report(layer).tensors == {}


def test_include_dense(model: nn.Sequential) -> None:
    prune.l1_unstructured(model[0], "weight", amount=5)
    with torch.no_grad():
        model[2][1].weight[0, :2] = 0.0
    report = sparsity_report(model, include_dense=True)
    assert report.tensors == {
        "0.weight": TensorSparsity(16, 5),
        "2.0.weight": TensorSparsity(12, 0),
        "2.1.weight": TensorSparsity(6, 2),
    }


def test_after_remove_zeros_are_counted_from_values(model: nn.Sequential) -> None:
    prune.l1_unstructured(model[0], "weight", amount=6)
    before = sparsity_report(model).tensors["0.weight"]
    prune.remove(model[0], "weight")
    assert sparsity_report(model).tensors == {}
    assert sparsity_report(model, include_dense=True).tensors["0.weight"] == before


@pytest.mark.parametrize(
    "layer",
    [nn.Conv1d(2, 3, 2), nn.Conv2d(2, 3, 2), nn.Conv3d(2, 3, 2), nn.Linear(2, 3)],
    ids=lambda m: type(m).__name__,
)
def test_include_dense_covers_prunable_layers(layer: nn.Module) -> None:
    report = sparsity_report(nn.Sequential(layer, nn.BatchNorm1d(3), nn.Embedding(4, 2)), include_dense=True)
    assert list(report.tensors) == ["0.weight"]
    assert report.numel == layer.weight.numel()


def test_root_module_has_no_prefix() -> None:
    layer = nn.Linear(3, 2)
    prune.l1_unstructured(layer, "weight", amount=1)
    assert sparsity_report(layer).tensors == {"weight": TensorSparsity(6, 1)}


def test_reading_leaves_the_model_unchanged(model: nn.Sequential) -> None:
    bip_unstructured(model[0], "weight", amount=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = dict(model[0]._forward_pre_hooks)
    sparsity_report(model, include_dense=True)
    assert dict(model[0]._forward_pre_hooks) == hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_empty_report() -> None:
    report = sparsity_report(nn.Linear(2, 2))
    assert (report.numel, report.zeros, report.global_sparsity) == (0, 0, 0.0)
    assert TensorSparsity(0, 0).sparsity == 0.0
    assert report.to_markdown().splitlines()[-1] == "| **total** | 0 | 0 | 0.00% |"


def test_to_dict_and_markdown() -> None:
    report = SparsityReport({"0.weight": TensorSparsity(16, 4), "fc.weight": TensorSparsity(1000, 900)})
    data = json.loads(json.dumps(report.to_dict()))
    assert data == {
        "global_sparsity": 904 / 1016,
        "numel": 1016,
        "zeros": 904,
        "tensors": {
            "0.weight": {"numel": 16, "zeros": 4, "sparsity": 0.25},
            "fc.weight": {"numel": 1000, "zeros": 900, "sparsity": 0.9},
        },
    }
    assert report.to_markdown() == (
        "| tensor | entries | pruned | sparsity |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| 0.weight | 16 | 4 | 25.00% |\n"
        "| fc.weight | 1,000 | 900 | 90.00% |\n"
        "| **total** | 1,016 | 904 | 88.98% |"
    )


def test_prune_report() -> None:
    sparsity = SparsityReport({"w": TensorSparsity(8, 6)})
    report = PruneReport(
        sparsity=sparsity,
        steps=3,
        wall_time_s=1.25,
        final_loss=0.5,
        amount=0.75,
        config={"steps": 3},
        losses=[(0, 1.0), (2, 0.5)],
    )
    assert report.global_sparsity == 0.75
    data = json.loads(json.dumps(report.to_dict()))
    assert data == {
        "method": "bip",
        "amount": 0.75,
        "steps": 3,
        "wall_time_s": 1.25,
        "final_loss": 0.5,
        "losses": [[0, 1.0], [2, 0.5]],
        "skipped_steps": 0,
        "config": {"steps": 3},
        "sparsity": sparsity.to_dict(),
    }
    head = "BiP: 3 steps in 1.2 s, final loss 0.5000, global sparsity 75.00%\n\n"
    assert report.to_markdown() == head + sparsity.to_markdown()
    assert str(report) == report.to_markdown()
    assert PruneReport(sparsity, 1, 0.0, 0.0, 1, {}).losses == []


# -- SparsityReport.plot ----------------------------------------------------------------------


def test_plot_draws_one_bar_per_tensor_at_its_density(model: nn.Sequential, tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    prune.l1_unstructured(model[0], "weight", amount=4)  # 12 of 16 kept
    prune.random_unstructured(model[2][1], "weight", amount=5)  # 1 of 6 kept
    report = sparsity_report(model)
    path = tmp_path / "density.png"
    fig = report.plot(path, title="two layers")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([12 / 16, 1 / 6])
    assert [label.get_text() for label in ax.get_xticklabels()] == ["0", "2.1"]
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([1 - 9 / 22] * 2)  # the global density
    assert ax.get_title() == "two layers"
    assert not plt.fignum_exists(fig.number)  # written and closed


def test_plot_into_given_axes_keeps_the_figure_open(model: nn.Sequential) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    prune.l1_unstructured(model[0], "weight", amount=8)
    fig, ax = plt.subplots()
    try:
        assert sparsity_report(model).plot(ax=ax) is fig
        assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.5])
        assert ax.get_title() == "50.0% sparse"
    finally:
        plt.close(fig)


def test_plot_errors_name_the_cause(model: nn.Sequential, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="plot: the report has no tensors"):
        sparsity_report(model).plot()
    prune.l1_unstructured(model[0], "weight", amount=4)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.pyplot", None)  # import raises
    with pytest.raises(ImportError, match=r"SparsityReport\.plot needs matplotlib: pip install matplotlib"):
        sparsity_report(model).plot()


def test_include_dense_counts_a_shared_weight_once() -> None:
    first = nn.Linear(4, 4)
    second = nn.Linear(4, 4)
    second.weight = first.weight  # tied
    with torch.no_grad():
        first.weight[0] = 0.0
    report = sparsity_report(nn.Sequential(first, second), include_dense=True)
    assert list(report.tensors) == ["0.weight"]
    assert (report.zeros, report.numel) == (4, 16)


def test_plot_to_a_path_that_cannot_be_written_leaves_no_figure_open(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    model = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(model[0], "weight", amount=4)
    open_before = len(plt.get_fignums())
    with pytest.raises(FileNotFoundError):
        sparsity_report(model).plot(tmp_path / "missing" / "density.png")
    assert len(plt.get_fignums()) == open_before


@pytest.mark.parametrize(
    ("counts", "gone"),
    [
        ({"a": (4, 4), "b": (4, 1)}, ["a"]),
        ({"a": (4, 3), "b": (4, 1)}, []),
        ({"a": (0, 0), "b": (4, 1)}, []),  # an empty tensor has nothing to prune away
        ({"a": (4, 4), "b": (2, 2), "c": (8, 0)}, ["a", "b"]),
    ],
)
def test_pruned_away_lists_the_tensors_with_no_entry_left(counts, gone) -> None:
    report = SparsityReport({k: TensorSparsity(n, z) for k, (n, z) in counts.items()})
    assert report.pruned_away == gone


def test_warn_if_pruned_away_names_the_tensors_and_stays_quiet_when_all_is_pruned() -> None:
    some = SparsityReport({"a": TensorSparsity(4, 4), "b": TensorSparsity(4, 1)})
    with pytest.warns(
        UserWarning, match=r"^X pruned every entry of 'a': the network passes nothing on through it; Y$"
    ):
        some.warn_if_pruned_away("X", "Y")
    everything = SparsityReport({"a": TensorSparsity(4, 4), "b": TensorSparsity(2, 2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        everything.warn_if_pruned_away("X", "Y")  # the budget asked for it
        SparsityReport({"a": TensorSparsity(4, 3)}).warn_if_pruned_away("X", "Y")


def test_include_dense_leaves_out_an_uninitialised_lazy_weight() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    prune.l1_unstructured(model[2], "weight", amount=3)
    report = sparsity_report(model, include_dense=True)
    assert {k: (t.numel, t.zeros) for k, t in report.tensors.items()} == {"2.weight": (8, 3)}
    model(torch.zeros(1, 5))  # materialised: its entries are counted from then on
    with torch.no_grad():
        model[0].weight[0] = 0.0
    report = sparsity_report(model, include_dense=True)
    assert {k: (t.numel, t.zeros) for k, t in report.tensors.items()} == {
        "0.weight": (20, 5),
        "2.weight": (8, 3),
    }


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"])
def test_include_dense_reports_a_computed_weight_by_its_values(kind: str) -> None:
    """A weight computed by a parametrization (or the old hooks) is no Parameter of the layer;
    it is reported by the zeros of the weight it computes, and reading it changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].weight[[0, 1, 2, 3], [0, 1, 2, 3]] = 0.0  # 4 zeros, which every normalisation keeps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (the old torch.nn.utils.weight_norm)
        {
            "weight_norm": nn.utils.parametrizations.weight_norm,
            "spectral_norm": nn.utils.parametrizations.spectral_norm,
            "old_weight_norm": nn.utils.weight_norm,
            "old_spectral_norm": nn.utils.spectral_norm,
        }[kind](model[1])
    prune.l1_unstructured(model[0], "weight", amount=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = sparsity_report(model, include_dense=True)
    assert {k: (t.numel, t.zeros) for k, t in report.tensors.items()} == {
        "0.weight": (16, 3),
        "1.weight": (20, 4),
        "2.weight": (10, 0),
    }
    assert list(report.tensors) == ["0.weight", "1.weight", "2.weight"]
    assert report.global_sparsity == pytest.approx(7 / 46)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no power iteration
    assert all(m.training for m in model.modules())
