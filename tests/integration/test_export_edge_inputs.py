"""export_slim, to_sparse_csr and SlimMultiheadAttention on the inputs that used to go wrong.

A pruned tensor tied to another module, half-precision models, a one-element argument next to
a batch, attention whose heads the user keeps or calls with a per-head mask, and a Linear that
reads flattened convolution channels. Each oracle is the masked model itself, a hand count or
a float64 reference.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

import torchbip
from torchbip.attention import SlimMultiheadAttention
from torchbip.export import SlimExportWarning
from torchbip.sparse import to_sparse_csr

pytest.importorskip("torch_pruning")

pytestmark = pytest.mark.usefixtures("one_thread")


# --- a pruned tensor tied to another module -----------------------------------------------------


class TiedLM(nn.Module):
    """An embedding and a head that share one Parameter (weight tying, as in most LMs)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t: Tensor) -> Tensor:
        return self.head(torch.relu(self.mid(self.emb(t))))


PRUNE_HEAD = {
    "bip_structured": lambda m: torchbip.bip_structured(m, "weight", amount=0.5, dim=1),
    "bip_unstructured": lambda m: torchbip.bip_unstructured(m, "weight", amount=0.9),
    "torch_l1": lambda m: prune.l1_unstructured(m, "weight", amount=0.9),
}


@pytest.mark.parametrize("how", sorted(PRUNE_HEAD))
@pytest.mark.parametrize("convert", ["export_slim", "to_sparse_csr"])
def test_a_pruned_tensor_tied_to_another_module_is_refused_and_the_model_is_unchanged(
    how: str, convert: str
) -> None:
    torch.manual_seed(0)
    model = TiedLM().eval()
    PRUNE_HEAD[how](model.head)
    t = torch.randint(0, 12, (4, 6))
    with torch.no_grad():
        before = model(t).clone()
    emb_before = model.emb.weight.detach().clone()
    run = (
        (lambda: torchbip.export_slim(model, t))
        if convert == "export_slim"
        else (lambda: to_sparse_csr(model))
    )
    with pytest.raises(
        ValueError,
        match=r"'head\.weight' is tied: its unmasked Parameter 'head\.weight_orig' is 'emb\.weight'",
    ):
        run()
    assert model.head.weight_orig is model.emb.weight  # still tied, still pruned
    assert torch.equal(model.emb.weight, emb_before)
    with torch.no_grad():
        assert torch.equal(model(t), before)


# --- half precision ------------------------------------------------------------------------------


def _half_model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 5),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.uniform_(0.5, 2)
    model = model.to(dtype).eval()
    for i in (0, 3, 6):
        torchbip.bip_structured(model[i], "weight", amount=0.5, dim=0)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_export_with_the_default_tolerances(dtype: torch.dtype) -> None:
    model = _half_model(dtype)
    x = torch.randn(8, 3, 8, 8, dtype=dtype)
    slim = torchbip.export_slim(model, x)
    assert (slim[0].out_channels, slim[3].out_channels, slim[6].out_features) == (8, 8, 16)
    with torch.no_grad():
        got, masked = slim(x).double(), model(x).double()
        reference = model.double()(x.double())
    # as close to the float64 oracle as the masked model, within rounding
    limit = 4 * float((masked - reference).abs().max()) + 1e-2 * float(reference.abs().max())
    assert float((got - reference).abs().max()) <= limit


def test_the_verify_error_names_the_dtype_and_the_tolerances() -> None:
    model = _half_model(torch.bfloat16)
    x = torch.randn(8, 3, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"dtype torch\.bfloat16, rtol=0, atol=0\)"):
        torchbip.export_slim(model, x, rtol=0.0, atol=0.0)  # bf16 rounding differs at 1 ulp


# --- a one-element argument ----------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x))) * scale


def test_a_one_element_argument_next_to_a_batch_is_not_a_batch_of_one() -> None:
    torch.manual_seed(0)
    model = Scaled().eval()
    torchbip.bip_structured(model.a, "weight", amount=0.5, dim=0)
    x, scale = torch.randn(4, 8), torch.tensor([2.0])
    slim = torchbip.export_slim(model, (x, scale))
    assert slim.a.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(slim(x, scale), model(x, scale))
    with pytest.raises(ValueError, match=r"a batch of one sample \(shape \(1, 8\)\)"):
        torchbip.export_slim(model, (x[:1], scale))  # no argument holds two samples


# --- attention -----------------------------------------------------------------------------------


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, w = self.attn(x, x, x)  # need_weights=True, torch's default
        return self.fc(y.mean(1)), w


class Biased(Attn):
    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        y, _ = self.attn(x, x, x, attn_mask=bias, need_weights=False)
        return self.fc(y.mean(1))


def _zero_value_rows(model: Attn, head: int) -> None:
    """Head ``head`` outputs nothing: its value rows (rows 32.. of in_proj, 4 per head) are zero."""
    with torch.no_grad():
        rows = slice(32 + 4 * head, 32 + 4 * head + 4)
        model.attn.in_proj_weight[rows] = 0
        model.attn.in_proj_bias[rows] = 0


@pytest.mark.parametrize("ignored", ["attn", "out_proj"])
def test_an_ignored_attention_keeps_its_heads(ignored: str) -> None:
    torch.manual_seed(0)
    model = Attn().eval()
    _zero_value_rows(model, 1)
    x = torch.randn(3, 5, 16)
    layer = model.attn if ignored == "attn" else model.attn.out_proj
    slim = torchbip.export_slim(model, x, ignored_layers=[layer])
    assert type(slim.attn) is nn.MultiheadAttention
    assert slim.attn.num_heads == 4
    with torch.no_grad():
        for got, want in zip(slim(x), model(x), strict=True):
            torch.testing.assert_close(got, want)


def test_the_verify_error_says_which_attention_lost_heads() -> None:
    torch.manual_seed(0)
    model = Attn().eval()
    _zero_value_rows(model, 1)
    with pytest.raises(
        RuntimeError, match=r"heads were removed from 'attn' .*pass it in ignored_layers to keep them"
    ):
        torchbip.export_slim(model, torch.randn(3, 5, 16))  # the weights average 3 heads, not 4


def test_the_slim_attention_takes_the_per_head_mask_of_the_original_model_also_after_loading() -> None:
    torch.manual_seed(0)
    model = Biased().eval()
    _zero_value_rows(model, 1)
    x, bias = torch.randn(3, 5, 16), torch.randn(3 * 4, 5, 5)
    slim = torchbip.export_slim(model, (x, bias))
    assert isinstance(slim.attn, SlimMultiheadAttention)
    assert (slim.attn.num_heads, slim.attn.original_heads, slim.attn.kept_heads) == (3, 4, (0, 2, 3))
    x2, bias2 = torch.randn(2, 5, 16), torch.randn(2 * 4, 5, 5)
    with torch.no_grad():
        want = model(x2, bias2)
        torch.testing.assert_close(slim(x2, bias2), want)
        # a mask of the kept heads' rows (heads 0, 2, 3 of each sample) gives the same
        kept_rows = bias2.reshape(2, 4, 5, 5)[:, [0, 2, 3]].reshape(2 * 3, 5, 5)
        torch.testing.assert_close(slim(x2, kept_rows), want)
    buffer = io.BytesIO()
    torch.save(slim.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = torchbip.load_slim_state_dict(Biased(), torch.load(buffer, weights_only=True)).eval()
    assert isinstance(rebuilt.attn, SlimMultiheadAttention)
    assert (rebuilt.attn.original_heads, rebuilt.attn.kept_heads) == (4, (0, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x2, bias2), want)


def test_a_slim_state_dict_without_the_kept_heads_still_loads() -> None:
    """A file saved before the kept heads were recorded: the heads are unknown, the rest loads."""
    torch.manual_seed(0)
    model = Biased().eval()
    _zero_value_rows(model, 1)
    slim = torchbip.export_slim(model, (torch.randn(3, 5, 16), torch.randn(3 * 4, 5, 5)))
    state = {k: v for k, v in slim.state_dict().items() if not k.endswith("_extra_state")}
    rebuilt = torchbip.load_slim_state_dict(Biased(), state).eval()
    assert isinstance(rebuilt.attn, SlimMultiheadAttention)
    assert (rebuilt.attn.num_heads, rebuilt.attn.original_heads, rebuilt.attn.kept_heads) == (3, None, None)
    x, bias = torch.randn(2, 5, 16), torch.randn(2 * 4, 5, 5)
    kept_rows = bias.reshape(2, 4, 5, 5)[:, [0, 2, 3]].reshape(2 * 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, kept_rows), model(x, bias))


def test_kept_heads_that_do_not_fit_the_model_are_refused_before_loading() -> None:
    torch.manual_seed(0)
    model = Biased().eval()
    _zero_value_rows(model, 1)
    slim = torchbip.export_slim(model, (torch.randn(3, 5, 16), torch.randn(3 * 4, 5, 5)))
    fresh = Biased()
    weight = fresh.attn.in_proj_weight
    for bad, match in (
        (torch.tensor([4, 0, 2]), r"does not record 3 kept heads"),
        (torch.tensor([4, 0, 2, 4]), r"does not record 3 kept heads"),
        (torch.tensor([8, 0, 2, 3]), r"records heads kept of 8, but the model's attention has 4"),
    ):
        with pytest.raises(ValueError, match=match):
            torchbip.load_slim_state_dict(fresh, {**slim.state_dict(), "attn._extra_state": bad})
        assert fresh.attn.in_proj_weight is weight
        assert type(fresh.attn) is nn.MultiheadAttention


# --- a Linear that reads flattened convolution channels -------------------------------------------


def test_the_warning_says_why_per_feature_masks_after_a_flatten_stay() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()
    with torch.no_grad():  # one feature of each of channels 0..5: no channel loses all 4 of its features
        model[3].weight[:, [0, 4, 8, 12, 16, 20]] = 0
        model[3].weight[:, 28:32] = 0  # all of channel 7's features: it goes
    with pytest.warns(
        SlimExportWarning, match=r"Linear layers that read flattened convolution channels stay \('3' \(6\)\)"
    ):
        slim = torchbip.export_slim(model, torch.randn(4, 3, 2, 2))
    assert (slim[0].weight.shape[0], slim[3].in_features) == (7, 28)  # channel 7 went


def test_layer_attributes_follow_the_tensors_after_a_flatten() -> None:
    """Channels removed through a flattened Linear: the conv's and BatchNorm's attributes say how
    many remain (Torch-Pruning counted one per removed Linear feature, 9 for a 3x3 map)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5)
    ).eval()
    with torch.no_grad():  # every feature of channels 1 and 5: both go, 6 channels stay
        model[4].weight[:, 9:18] = 0
        model[4].weight[:, 45:54] = 0
    x = torch.randn(4, 3, 3, 3)
    slim = torchbip.export_slim(model, x)
    assert tuple(slim[0].weight.shape[:2]) == (6, 3)
    assert (slim[0].out_channels, slim[0].in_channels) == (6, 3)
    assert slim[1].num_features == 6 == slim[1].running_mean.shape[0]
    assert (slim[4].in_features, slim[4].out_features) == (54, 5) == tuple(slim[4].weight.shape[::-1])
    torch.testing.assert_close(slim(x), model(x))
    assert "Conv2d(3, 6," in repr(slim[0])
