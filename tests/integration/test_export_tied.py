"""A Parameter held by two layers (tied) through export_slim and load_slim_state_dict.

Torch-Pruning slices each layer's tensors on its own: removing a channel of one holder would
give it a new tensor and untie the two, and a state dict with two values under the one tensor's
two keys would then load the last one into it. So the export keeps every channel of a layer
holding a tied tensor (with a SlimExportWarning naming it) and removes the others, and the load
refuses two different values for one tensor before it changes anything.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import torchbip
from torchbip.export import SlimExportWarning

pytest.importorskip("torch_pruning")


class Tied(nn.Module):
    """pre -> enc -> mid -> dec -> out, with ``dec.weight`` the same Parameter as ``mid.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.enc = nn.Linear(8, 8), nn.Linear(8, 8)
        self.mid, self.dec, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.dec.weight = self.mid.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc(torch.relu(self.pre(x))))
        return self.out(torch.relu(self.dec(torch.relu(self.mid(h)))))


def _pruned() -> Tied:
    torch.manual_seed(0)
    model = Tied().eval()
    torchbip.bip_structured(model.enc, "weight", amount=1, dim=1, importance_scores=torch.arange(8.0) != 1)
    with torch.no_grad():
        model.mid.weight[:, 2] = 0  # mid's and dec's input channel 2 (one tensor)
        model.out.weight[:, 6] = 0  # out never reads dec's output 6
    return model


def _saved(slim: nn.Module) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(slim.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_export_keeps_the_channels_of_tied_layers_and_says_so() -> None:
    model = _pruned()
    x = torch.randn(4, 8)
    with pytest.warns(SlimExportWarning, match=r"'mid', 'dec' \('mid.weight' is 'dec.weight'\)"):
        slim = torchbip.export_slim(model, x).eval()
    assert slim.mid.weight is slim.dec.weight  # still one Parameter
    assert tuple(slim.mid.weight.shape) == (8, 8)
    assert (slim.enc.out_features, slim.out.in_features) == (8, 8)  # they touch the tied layers
    assert (slim.pre.out_features, slim.enc.in_features) == (7, 7)  # the others still go
    y = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(slim(y), model(y))
        rebuilt = torchbip.load_slim_state_dict(Tied(), _saved(slim)).eval()
        assert rebuilt.mid.weight is rebuilt.dec.weight
        torch.testing.assert_close(rebuilt(y), slim(y))


def test_export_without_zero_channels_at_tied_layers_does_not_warn_about_them() -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    torchbip.bip_structured(model.enc, "weight", amount=1, dim=1, importance_scores=torch.arange(8.0) != 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        slim = torchbip.export_slim(model, torch.randn(4, 8))
    assert not [w for w in record if issubclass(w.category, SlimExportWarning)]
    assert slim.pre.out_features == 7


def test_load_refuses_two_values_for_one_tied_tensor_before_changing_anything() -> None:
    slim = torchbip.export_slim(Tied().eval(), torch.randn(4, 8))
    state = _saved(slim)
    state["dec.weight"] = state["dec.weight"] + 1.0  # same shape, other values
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"state_dict\['dec.weight'\] and state_dict\['mid.weight'\] hold"):
        torchbip.load_slim_state_dict(model, state)
    assert model.mid.weight is model.dec.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_refuses_different_values_also_where_the_tensor_is_resized() -> None:
    model = Tied()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pre.weight"], state["pre.bias"], state["enc.weight"] = (
        state["pre.weight"][:7],
        state["pre.bias"][:7],
        state["enc.weight"][:, :7],
    )
    state["mid.weight"] = torch.randn(8, 8)
    fresh = Tied()
    with pytest.raises(ValueError, match="hold different values"):
        torchbip.load_slim_state_dict(fresh, state)
    assert fresh.pre.out_features == 8  # nothing resized


def test_load_accepts_equal_values_for_one_tied_tensor_nans_included() -> None:
    model = Tied()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mid.weight"][0, 0] = float("nan")
    state["dec.weight"] = state["mid.weight"].clone()  # equal values, another tensor
    rebuilt = torchbip.load_slim_state_dict(Tied(), state)
    assert rebuilt.mid.weight is rebuilt.dec.weight
    assert torch.isnan(rebuilt.dec.weight[0, 0])
