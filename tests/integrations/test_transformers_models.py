"""Hugging Face model architectures as BiP's entry points see them.

GPT-2 and its kin compute their projections with ``transformers``' ``Conv1D``, whose weight is
laid out ``(in_features, out_features)``, the transpose of ``nn.Linear``'s. Oracles: the layers'
own shapes (a filter of a ``Conv1D`` is a column), counts of zeros, and the model's tensors
before and after a refused call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, capture
from torch import nn

import torchbip

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 50


def tiny_gpt2(tie: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tie
    )
    return transformers.GPT2LMHeadModel(config)


def conv1d_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]


def lm_loss(out, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.reshape(-1, VOCAB), ids.reshape(-1))


@pytest.mark.parametrize(
    "layout", ["filter", "channel", "2:4", torchbip.Groups(0, budget="global"), torchbip.NM(2, 4)]
)
def test_a_structured_layout_refuses_a_conv1d_weight_by_name(layout: object) -> None:
    """A filter of Conv1D(nx=16, nf=64) is a column of its (16, 64) weight: grouping rows pruned
    input features as filters, silently. Refused, naming the tensor and its layout."""
    model = tiny_gpt2()
    c_fc = model.transformer.h[0].mlp.c_fc
    assert tuple(c_fc.weight.shape) == (16, 64)
    before = capture(model)
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight'.*transformers Conv1D"):
        torchbip.BiP(model, 0.5, parameters=[(c_fc, "weight")], layout=layout)
    assert_unchanged(before, model)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"c_fc\.weight'.*transformers Conv1D"):
        torchbip.global_prune(
            model, 0.5, [((ids,), ids)], parameters=[(c_fc, "weight")], structured=layout,
            loss_fn=lm_loss, steps=1, progress=False,
        )  # fmt: skip
    assert_unchanged(before, model)


def test_conv1d_weights_named_in_parameters_prune_unstructured_exactly() -> None:
    model = tiny_gpt2()
    layers = conv1d_layers(model)
    pruner = torchbip.BiP(model, 0.9, parameters=[(m, "weight") for _, m in layers])
    assert pruner.names == [f"{n}.weight" for n, _ in layers]
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    assert zeros == round(0.9 * total)


def test_the_defaults_tell_that_they_leave_conv1d_layers_out() -> None:
    """The defaults are nn.Linear and nn.Conv*d weights: on an untied GPT-2 that is lm_head alone,
    and amount=0.9 pruned a fifth of the model's projections without a word."""
    model = tiny_gpt2(tie=False)
    names = [n for n, _ in conv1d_layers(model)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = torchbip.BiP(model, 0.9)
    assert pruner.names == ["lm_head.weight"]
    told = [str(w.message) for w in caught if "Conv1D" in str(w.message)]
    assert told, [str(w.message) for w in caught]
    assert f"its {len(names)} transformers Conv1D layer(s) ('{names[0]}'" in told[0]
    assert "parameters=" in told[0]


def test_errors_about_an_empty_selection_name_the_conv1d_layers() -> None:
    tied = tiny_gpt2(tie=True)
    with (
        pytest.warns(UserWarning, match="transformers Conv1D"),
        pytest.raises(ValueError, match=r"leaves nothing to prune \(.*transformers Conv1D"),
    ):
        torchbip.BiP(tied, 0.9, exclude=["*lm_head*"])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    before = capture(tied)
    with (
        pytest.warns(UserWarning, match="transformers Conv1D"),
        pytest.raises(ValueError, match="nothing") as info,
    ):
        torchbip.global_prune(
            tied, 0.5, [((ids,), ids)], loss_fn=lm_loss, steps=1, progress=False, structured="filter"
        )
    message = str(info.value)
    assert "has no nn.Linear or nn.Conv*d weights;" not in message  # lm_head is one, left out as the output
    assert "among the layout's default targets" in message
    assert "transformers Conv1D" in message
    assert_unchanged(before, tied)
