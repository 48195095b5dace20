"""Softmax, causal masks, scaled dot-product attention and multi-head self-attention against
torch's own ops (`torch.softmax`, `F.scaled_dot_product_attention`) and a reference built from them."""

from __future__ import annotations

import einx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from tests.adapters import (
    run_multihead_self_attention,
    run_multihead_self_attention_with_rope,
    run_scaled_dot_product_attention,
    run_softmax,
)
from tests.reference_lm import rope_reference

FAST = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_softmax_matches_torch():
    x = torch.randn(4, 7, 9) * 5
    for dim in (0, 1, -1):
        torch.testing.assert_close(fnlm.softmax(x, dim), torch.softmax(x, dim))
        torch.testing.assert_close(run_softmax(x, dim), torch.softmax(x, dim))


rows = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=20)


@FAST
@given(st.lists(rows, min_size=1, max_size=5).filter(lambda r: len({len(x) for x in r}) == 1))
def test_softmax_rows_sum_to_one_and_are_finite(data):
    x = torch.tensor(data, dtype=torch.float32)
    p = fnlm.softmax(x, dim=-1)
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)


@FAST
@given(rows, st.floats(-1e4, 1e4, allow_nan=False, width=32))
def test_softmax_is_invariant_to_adding_a_constant(row, c):
    x = torch.tensor(row, dtype=torch.float64)
    torch.testing.assert_close(fnlm.softmax(x + c, dim=0), fnlm.softmax(x, dim=0), atol=1e-9, rtol=1e-6)


@FAST
@given(rows, st.integers(0, 2**31 - 1))
def test_softmax_masked_entries_get_zero_and_the_rest_renormalise(row, seed):
    x = torch.tensor(row, dtype=torch.float32)
    keep = torch.rand(x.shape, generator=gen(seed)) < 0.5
    masked = x.masked_fill(~keep, float("-inf"))
    p = fnlm.softmax(masked, dim=0)
    assert torch.isfinite(p).all()
    assert (p[~keep] == 0).all()
    if keep.any():
        torch.testing.assert_close(p[keep], torch.softmax(x[keep], dim=0))
    else:
        assert (p == 0).all()  # fully masked row: all zeros, documented


def test_softmax_fully_masked_row_is_zero_and_others_untouched():
    x = torch.tensor([[1.0, 2.0, 3.0], [float("-inf")] * 3])
    p = fnlm.softmax(x)
    torch.testing.assert_close(p[0], torch.softmax(x[0], 0))
    assert torch.equal(p[1], torch.zeros(3))


def test_softmax_bf16_keeps_dtype():
    x = torch.randn(3, 50).to(torch.bfloat16)
    p = fnlm.softmax(x)
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.float(), torch.softmax(x.float(), -1), atol=4e-3, rtol=1e-2)


# --- attention -----------------------------------------------------------------------------


def test_causal_mask_example():
    assert fnlm.causal_mask(2, 3).tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(fnlm.causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("lead", [(), (3,), (2, 4)])
def test_sdpa_matches_torch_with_boolean_mask(lead):
    q = torch.randn(*lead, 5, 8)
    k = torch.randn(*lead, 7, 8)
    v = torch.randn(*lead, 7, 6)
    mask = torch.rand(*lead, 5, 7) < 0.7
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fnlm.scaled_dot_product_attention(q, k, v, mask), ref)
    torch.testing.assert_close(run_scaled_dot_product_attention(q, k, v, mask), ref)
    torch.testing.assert_close(fnlm.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_sdpa_mask_broadcasts_over_heads_and_fully_masked_query_reads_zero():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[2] = False
    out = fnlm.scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out[..., 2, :], torch.zeros(2, 3, 8))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref)  # torch also returns 0 for a fully masked query


def mha_reference(params, x, num_heads, *, theta=None, positions=None):
    def proj(name, t):
        return F.linear(t, params[name]["weight"])

    q, k, v = (einx.id("... s (h d) -> ... h s d", proj(n, x), h=num_heads) for n in ("q_proj", "k_proj", "v_proj"))
    if theta is not None:
        pos = torch.arange(x.shape[-2]) if positions is None else positions
        pos = pos.unsqueeze(-2)  # a heads dim
        q, k = rope_reference(q, pos, theta), rope_reference(k, pos, theta)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return proj("output_proj", einx.id("... h s d -> ... s (h d)", out))


def test_mha_matches_torch_reference():
    d_model, heads = 16, 4
    p = fnlm.init_multihead_self_attention(d_model, generator=gen())
    x = torch.randn(2, 6, d_model)
    ref = mha_reference(p, x, heads)
    torch.testing.assert_close(fnlm.multihead_self_attention(p, x, num_heads=heads), ref, atol=1e-5, rtol=1e-5)
    w = [p[n]["weight"] for n in ("q_proj", "k_proj", "v_proj", "output_proj")]
    torch.testing.assert_close(run_multihead_self_attention(d_model, heads, *w, x), ref, atol=1e-5, rtol=1e-5)


def test_mha_with_rope_matches_reference_with_and_without_positions():
    d_model, heads, theta = 16, 2, 10000.0
    p = fnlm.init_multihead_self_attention(d_model, generator=gen(5))
    x = torch.randn(2, 5, d_model)
    w = [p[n]["weight"] for n in ("q_proj", "k_proj", "v_proj", "output_proj")]
    ref = mha_reference(p, x, heads, theta=theta)
    out = run_multihead_self_attention_with_rope(d_model, heads, 32, theta, *w, x)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    positions = torch.tensor([[3, 4, 5, 6, 7], [10, 11, 12, 13, 14]])
    ref = mha_reference(p, x, heads, theta=theta, positions=positions)
    out = run_multihead_self_attention_with_rope(d_model, heads, 32, theta, *w, x, positions)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_mha_is_causal():
    p = fnlm.init_multihead_self_attention(8, generator=gen())
    x = torch.randn(1, 6, 8)
    y = fnlm.multihead_self_attention(p, x, num_heads=2)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 8)
    y2 = fnlm.multihead_self_attention(p, x2, num_heads=2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_split_and_merge_heads_match_reshapes_and_invert_each_other():
    x = torch.randn(2, 5, 12)
    heads = fnlm.split_heads(x, 3)
    assert torch.equal(heads, x.reshape(2, 5, 3, 4).transpose(1, 2))
    assert torch.equal(fnlm.merge_heads(heads), x)


def test_sdpa_gradients_match_torch_including_a_fully_masked_query():
    q, k, v = (torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[1] = False
    g = torch.randn(2, 4, 6, dtype=torch.float64)
    ours = torch.autograd.grad((fnlm.scaled_dot_product_attention(q, k, v, mask) * g).sum(), (q, k, v))
    ref = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * g).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b, c: fnlm.scaled_dot_product_attention(a, b, c, mask), (q, k, v))


def test_softmax_gradients_match_torch_and_pass_gradcheck():
    x = (torch.randn(3, 4, 9) * 3).requires_grad_()
    g = torch.randn(3, 4, 9)
    (a,) = torch.autograd.grad((fnlm.softmax(x, 1) * g).sum(), x)
    (b,) = torch.autograd.grad((torch.softmax(x, 1) * g).sum(), x)
    torch.testing.assert_close(a, b)
    x64 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fnlm.softmax(t, 0), (x64,))
    masked = x64.detach().clone()
    masked[0, 1] = float("-inf")
    masked[1, 2, :2] = float("-inf")
    masked.requires_grad_()
    (grad,) = torch.autograd.grad((fnlm.softmax(masked) * torch.randn(2, 3, 5, dtype=torch.float64)).sum(), masked)
    assert torch.isfinite(grad).all() and (grad[0, 1] == 0).all() and (grad[1, 2, :2] == 0).all()
