"""``SlimMultiheadAttention`` against ``nn.MultiheadAttention`` whose removed heads are zeroed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torchbip import bip_unstructured
from torchbip.attention import SlimMultiheadAttention, head_rows, removable_heads

E, H, D = 12, 4, 3


def _assert_slim_matches(
    mha: nn.MultiheadAttention,
    slim: SlimMultiheadAttention,
    qkv: tuple[torch.Tensor, ...],
    full_kwargs: dict,
    slim_kwargs: dict,
    kept_heads: list[int],
) -> torch.Tensor:
    """The slim module's outputs equal the full one's, and its per-head weights those of the kept
    heads; returns the full module's per-head weights."""
    with torch.no_grad():
        want, want_weights = mha(*qkv, average_attn_weights=False, **full_kwargs)
        got, got_weights = slim(*qkv, average_attn_weights=False, **slim_kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_weights is not None
    assert want_weights is not None
    torch.testing.assert_close(got_weights, want_weights[:, kept_heads], rtol=1e-5, atol=1e-6)
    return want_weights


def _attention(batch_first: bool, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=bias).eval()
    with torch.no_grad():  # heads 1 and 3 output nothing: their value rows and bias are zero
        for head in (1, 3):
            rows = head_rows(E, D, head)[2 * D :]
            mha.in_proj_weight[rows] = 0
            if bias:
                mha.in_proj_bias[rows] = 0
    return mha


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "masks",
    ["none", "bool_attn_mask", "float_attn_mask", "key_padding_mask", "causal", "per_head_mask"],
)
def test_outputs_and_kept_heads_weights_equal_the_full_attention(batch_first: bool, masks: str) -> None:
    mha = _attention(batch_first)
    assert removable_heads(mha) == [1, 3]
    slim = SlimMultiheadAttention.from_attention(mha, keep=[0, 2])
    assert (slim.num_heads, slim.head_dim, slim.embed_dim) == (2, D, E)
    assert slim.in_proj_weight.shape == (3 * 2 * D, E)
    assert slim.out_proj.weight.shape == (E, 2 * D)
    gen = torch.Generator().manual_seed(1)
    n, length, source = 2, 5, 6
    shape = (n, length, E) if batch_first else (length, n, E)
    kv_shape = (n, source, E) if batch_first else (source, n, E)
    q, k, v = (
        torch.randn(shape, generator=gen),
        torch.randn(kv_shape, generator=gen),
        torch.randn(kv_shape, generator=gen),
    )
    full_kwargs: dict = {}
    slim_kwargs: dict = {}
    if masks == "bool_attn_mask":
        full_kwargs["attn_mask"] = torch.rand(length, source, generator=gen) > 0.7
    elif masks == "float_attn_mask":
        full_kwargs["attn_mask"] = torch.randn(length, source, generator=gen)
    elif masks == "key_padding_mask":
        full_kwargs["key_padding_mask"] = torch.tensor([[False] * source, [False] * 4 + [True] * 2])
    elif masks == "causal":
        k, v = q, q  # self-attention: a square causal mask
        full_kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        full_kwargs["is_causal"] = True
    elif masks == "per_head_mask":
        per_head = torch.randn(n, H, length, source, generator=gen)
        full_kwargs["attn_mask"] = per_head.reshape(n * H, length, source)
        slim_kwargs["attn_mask"] = per_head[:, [0, 2]].reshape(n * 2, length, source)
    slim_kwargs = {**full_kwargs, **slim_kwargs}
    _assert_slim_matches(mha, slim, (q, k, v), full_kwargs, slim_kwargs, [0, 2])
    assert slim(q, k, v, need_weights=False, **slim_kwargs)[1] is None


def test_unbatched_inputs_and_no_bias() -> None:
    mha = _attention(batch_first=True, bias=False)
    slim = SlimMultiheadAttention.from_attention(mha, keep=[0, 2])
    x = torch.randn(5, E)
    with torch.no_grad():
        got, got_weights = slim(x, x, x, average_attn_weights=False)
        want, want_weights = mha(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_weights, want_weights[[0, 2]], rtol=1e-5, atol=1e-6)


def test_the_module_it_came_from_is_unchanged_and_bad_keeps_are_refused() -> None:
    mha = _attention(batch_first=True)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    slim = SlimMultiheadAttention.from_attention(mha, keep=[2, 0, 2])  # order and repeats ignored
    assert slim.num_heads == 2
    assert all(torch.equal(before[k], v) for k, v in mha.state_dict().items())
    assert mha.num_heads == H
    assert type(mha) is nn.MultiheadAttention
    with pytest.raises(ValueError, match=r"keep must name 1 to 4 heads in 0\.\.3, got \[\]"):
        SlimMultiheadAttention.from_attention(mha, keep=[])
    with pytest.raises(ValueError, match="keep must name"):
        SlimMultiheadAttention.from_attention(mha, keep=[4])
    separate = nn.MultiheadAttention(E, H, kdim=5, vdim=5)
    with pytest.raises(ValueError, match="only attention with one in_proj_weight"):
        SlimMultiheadAttention.from_attention(separate, keep=[0])
    assert removable_heads(separate) == []
    x = torch.randn(2, 5, E)
    with pytest.raises(
        ValueError,
        match=r"a per-head mask needs batch \* num_heads = 4 rows \(this attention keeps 2 heads\) or "
        r"batch \* 4 = 8 \(the heads of the attention it came from\)",
    ):
        slim(x, x, x, attn_mask=torch.zeros(2 * H - 1, 5, 5))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool_attn_mask", "float_attn_mask", "key_padding_mask"])
def test_add_zero_attn_is_honoured(batch_first: bool, masks: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, add_zero_attn=True).eval()
    with torch.no_grad():  # head 1 outputs nothing
        mha.in_proj_weight[head_rows(E, D, 1)[2 * D :]] = 0
        mha.in_proj_bias[head_rows(E, D, 1)[2 * D :]] = 0
    slim = SlimMultiheadAttention.from_attention(mha, keep=[0, 2, 3])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((2, 5, E) if batch_first else (5, 2, E), generator=gen)
    kwargs: dict[str, torch.Tensor] = {}
    if masks == "bool_attn_mask":
        kwargs["attn_mask"] = torch.ones(5, 5, dtype=torch.bool).triu(1)
    elif masks == "float_attn_mask":
        kwargs["attn_mask"] = torch.randn(5, 5, generator=gen)
    elif masks == "key_padding_mask":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    want_weights = _assert_slim_matches(mha, slim, (x, x, x), kwargs, kwargs, [0, 2, 3])
    assert want_weights.shape[-1] == 6  # the zero key's column


def test_from_attention_of_a_pruned_module_copies_the_masked_values() -> None:
    mha = _attention(batch_first=True)
    weight, bias = mha.in_proj_weight.detach().clone(), mha.in_proj_bias.detach().clone()
    mask = torch.ones_like(weight)
    mask[head_rows(E, D, 2)[2 * D :]] = 0  # head 2 removable by its mask only
    bias_mask = torch.ones_like(bias)
    bias_mask[head_rows(E, D, 2)[2 * D :]] = 0
    with torch.no_grad():  # give head 2 nonzero value rows that only the mask zeroes
        weight[head_rows(E, D, 2)[2 * D :]] = 1.0
        bias[head_rows(E, D, 2)[2 * D :]] = 1.0
        mha.in_proj_weight.copy_(weight)
        mha.in_proj_bias.copy_(bias)
    bip_unstructured(mha, "in_proj_weight", amount=0)
    mha.in_proj_weight_mask.copy_(mask)
    prune.custom_from_mask(mha, "in_proj_bias", bias_mask)
    bip_unstructured(mha.out_proj, "weight", amount=0.25)
    x = torch.randn(2, 5, E)
    mha(x, x, x)[0].sum().backward()  # the masked tensors now carry a graph
    assert removable_heads(mha) == [1, 2, 3]
    with torch.no_grad():
        want = mha(x, x, x)[0]
    slim = SlimMultiheadAttention.from_attention(mha, keep=[0])
    with torch.no_grad():
        got = slim(x, x, x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not prune.is_pruned(slim)
    assert sorted(name for name, _ in slim.named_buffers()) == []
    # the module it came from keeps its pruning
    assert prune.is_pruned(mha)
    assert torch.equal(mha.in_proj_weight_orig, weight)
    assert torch.equal(mha.in_proj_weight_mask, mask)


def test_shrink_refuses_a_module_in_pruned_form() -> None:
    slim = SlimMultiheadAttention.from_attention(_attention(batch_first=True), keep=[0, 1, 2, 3])
    prune.l1_unstructured(slim.out_proj, "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"tensors \['out_proj.weight'\] are pruned"):
        slim.shrink([0, 2])
    assert slim.num_heads == H
    assert slim.in_proj_weight.shape == (3 * E, E)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_slim_attention_scripts_and_its_script_computes_what_the_full_attention_does() -> None:
    mha = _attention(batch_first=True)
    slim = SlimMultiheadAttention.from_attention(mha, keep=[0, 2])
    scripted = torch.jit.script(slim)
    gen = torch.Generator().manual_seed(1)
    q, kv = torch.randn(2, 5, E, generator=gen), torch.randn(2, 6, E, generator=gen)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    blocked = torch.rand(5, 6, generator=gen) > 0.6
    blocked[:, 0] = False  # every query sees a key
    for kwargs in ({}, {"key_padding_mask": pad, "attn_mask": blocked}):
        with torch.no_grad():
            want, want_weights = mha(q, kv, kv, average_attn_weights=False, **kwargs)
            got, got_weights = scripted(q, kv, kv, average_attn_weights=False, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_weights is not None
        assert want_weights is not None
        torch.testing.assert_close(got_weights, want_weights[:, [0, 2]], rtol=1e-5, atol=1e-6)
    x = torch.randn(5, E, generator=gen)  # unbatched
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_an_encoder_layer_with_a_slim_attention_scripts() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 24, batch_first=True, dropout=0.0).eval()
    layer.self_attn = _attention(batch_first=True)
    full = torch.jit.script(layer)  # the layer with torch's attention, which scripts
    layer.self_attn = SlimMultiheadAttention.from_attention(layer.self_attn, keep=[0, 2])
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), full(x), rtol=1e-5, atol=1e-5)


def test_shrink_keeps_each_parameters_requires_grad() -> None:
    mha = _attention(batch_first=True)
    mha.in_proj_bias.requires_grad_(False)
    mha.out_proj.weight.requires_grad_(False)
    slim = SlimMultiheadAttention.from_attention(mha, keep=[0, 2])
    assert {n: p.requires_grad for n, p in slim.named_parameters()} == {
        n: p.requires_grad for n, p in mha.named_parameters()
    }
