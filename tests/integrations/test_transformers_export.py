"""The slim export and the Coupled layout on Hugging Face models.

Tiny models built from configs (no downloads). Oracles: the masked model's outputs (the slim
model must compute them), the layers' shapes from the counts of zero rows and columns, and the
model's tensors before and after each call.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from model_state import assert_unchanged, capture
from torch import nn
from torch.nn.utils import prune

import torchbip
from torchbip._tracing import output_tensors
from torchbip.export import SlimExportWarning

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 50


def tiny_llama(kv_heads: int, use_cache: bool) -> Any:
    """One decoder layer: hidden 16, 2 attention heads of 8, ``kv_heads`` key/value heads, MLP 32."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=16,
        tie_word_embeddings=False, use_cache=use_cache,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))


def zero_half_of_the_mlp(model: Any) -> None:
    """Zero every other of the 32 MLP neurons: their gate_proj and up_proj rows."""
    mlp = model.model.layers[0].mlp
    keep = (torch.arange(32) % 2 == 0)[:, None].expand(32, 16).float()
    prune.custom_from_mask(mlp.gate_proj, "weight", keep)
    prune.custom_from_mask(mlp.up_proj, "weight", keep)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail the test if the block runs longer than ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"did not return within {seconds} s")

    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except TimeoutError as err:  # (a traceback through the interrupted frames is not printable)
        pytest.fail(str(err), pytrace=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


needs_alarm = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")


def test_export_slim_of_a_causal_lm_that_returns_its_cache() -> None:
    """use_cache=True (the default of causal LMs) returns a DynamicCache, which Torch-Pruning's
    tracer could not read: the export failed. The cache is an output like the logits."""
    model = tiny_llama(kv_heads=2, use_cache=True)
    zero_half_of_the_mlp(model)
    ids = token_ids()
    before = capture(model)
    slim: Any = torchbip.export_slim(model, (ids,))
    assert_unchanged(before, model)
    mlp = slim.model.layers[0].mlp
    assert (tuple(mlp.gate_proj.weight.shape), tuple(mlp.up_proj.weight.shape)) == ((16, 16), (16, 16))
    assert tuple(mlp.down_proj.weight.shape) == (16, 16)
    with torch.no_grad():
        got, want = slim(ids), model(ids)
    got_tensors, want_tensors = output_tensors(got), output_tensors(want)
    assert len(want_tensors) == 3  # the logits, and the layer's keys and values in the cache
    for g, w in zip(got_tensors, want_tensors, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_coupled_on_a_causal_lm_that_returns_its_cache() -> None:
    """The cache holds the keys: k_proj's channels reach the output, the MLP's group is found."""
    model = tiny_llama(kv_heads=2, use_cache=True)
    before = capture(model)
    found = torchbip.Coupled((token_ids(),)).found(model)
    assert_unchanged(before, model)
    assert [g.root for g in found.groups] == ["model.layers.0.mlp.up_proj"]
    assert set(found.groups[0].layers) == {
        f"model.layers.0.mlp.{name}" for name in ("up_proj", "down_proj", "gate_proj")
    }
    assert dict(found.skipped)["model.layers.0.self_attn.k_proj"] == "its channels reach the model's output"


def test_output_tensors_reads_the_cache() -> None:
    model = tiny_llama(kv_heads=2, use_cache=True)
    with torch.no_grad():
        out = model(token_ids())
    caches = [v for v in out.values() if isinstance(v, transformers.Cache)]
    assert len(caches) == 1
    found = output_tensors(out)
    assert sum(t is out.logits for t in found) == 1
    # the layer's keys and values: (batch, key/value heads, length, head dim)
    assert sorted(tuple(t.shape) for t in found if t is not out.logits) == [(4, 2, 8, 8)] * 2


@needs_alarm
def test_coupled_on_grouped_query_attention_returns() -> None:
    """num_key_value_heads < num_attention_heads: Torch-Pruning's search for the group of the
    attention projections goes round rotate_half's slices and concatenation for ever. Those
    groups are left dense with the reason; the MLP's group is found as without GQA."""
    model = tiny_llama(kv_heads=1, use_cache=False)
    with time_limit(20):
        found = torchbip.Coupled((token_ids(),)).found(model)
    reference = torchbip.Coupled((token_ids(),)).found(tiny_llama(kv_heads=2, use_cache=False))
    assert [(g.root, g.size, g.layers) for g in found.groups] == [
        (g.root, g.size, g.layers) for g in reference.groups
    ]
    reasons = dict(found.skipped)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert "does not end" in reasons[f"model.layers.0.self_attn.{name}"], reasons


@needs_alarm
@pytest.mark.parametrize(("layer", "dim"), [("k_proj", 0), ("o_proj", 1)])
def test_export_slim_of_grouped_query_attention_returns(layer: str, dim: int) -> None:
    """Zero rows of k_proj (or columns of o_proj) of a GQA Llama: the export hung in the same
    search. Those channels stay (named in the warning); the outputs are the masked model's."""
    model = tiny_llama(kv_heads=1, use_cache=False)
    module = getattr(model.model.layers[0].self_attn, layer)
    mask = torch.ones_like(module.weight)
    mask.select(dim, 0).zero_()
    mask.narrow(dim, 2, 4).zero_()
    prune.custom_from_mask(module, "weight", mask)
    ids = token_ids()
    with time_limit(20), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim: Any = torchbip.export_slim(model, (ids,))
    kept = getattr(slim.model.layers[0].self_attn, layer)
    assert kept.weight.shape == module.weight.shape
    told = [str(w.message) for w in caught if issubclass(w.category, SlimExportWarning)]
    assert told, [str(w.message) for w in caught]
    assert f"'model.layers.0.self_attn.{layer}'" in told[0], told
    with torch.no_grad():
        torch.testing.assert_close(slim(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


class Conv1DNet(nn.Module):
    """Linear(8, 16), transformers Conv1D(nf=12, nx=16) (weight (16, 12)), Linear(12, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(8, 16), nn.Linear(12, 3)
        self.b: Any = Conv1D(12, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_export_slim_reports_the_zero_output_features_of_a_conv1d() -> None:
    """A Conv1D's output feature is a column of its (in, out) weight: 6 zero columns of 16 rows
    are 96 weights in zero filters, which the export keeps (it does not slice Conv1D) and must
    report, as it promises when it keeps more than a quarter of them."""
    torch.manual_seed(0)
    model = Conv1DNet().eval()
    mask = torch.ones(16, 12)
    mask[:, :6] = 0
    prune.custom_from_mask(model.b, "weight", mask)
    with torch.no_grad():
        model.b.bias[:6] = 0
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim: Any = torchbip.export_slim(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))
    assert tuple(slim.b.weight.shape) == (16, 12)
    told = [str(w.message) for w in caught if issubclass(w.category, SlimExportWarning)]
    assert len(told) == 1, [str(w.message) for w in caught]
    assert "96 of the 96 weights" in told[0]
    assert "'b' (96)" in told[0]
    assert "does not slice transformers Conv1D layers" in told[0]


def test_export_slim_reports_the_zero_input_features_of_a_conv1d() -> None:
    """An input feature of a Conv1D is a row: 4 zero rows of 12 columns are 48 weights."""
    torch.manual_seed(0)
    model = Conv1DNet().eval()
    mask = torch.ones(16, 12)
    mask[4:8] = 0
    prune.custom_from_mask(model.b, "weight", mask)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchbip.export_slim(model, (x,))
    told = [str(w.message) for w in caught if issubclass(w.category, SlimExportWarning)]
    assert len(told) == 1, [str(w.message) for w in caught]
    assert "48 of the 48 weights" in told[0]
