"""Every pure layer against an independent reference: torch's own ops, or a hand-written
float64 reference where torch has none (interleaved RoPE)."""

from __future__ import annotations

import math

import einx
import jaxtyping
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm


from tests.adapters import (
    run_embedding,
    run_linear,
    run_multihead_self_attention,
    run_multihead_self_attention_with_rope,
    run_rmsnorm,
    run_rope,
    run_scaled_dot_product_attention,
    run_silu,
    run_softmax,
    run_swiglu,
)

FAST = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- linear / embedding ------------------------------------------------------------------


def test_linear_matches_f_linear():
    p = fnlm.init_linear(8, 5, generator=gen())
    x = torch.randn(2, 3, 8)
    assert p["weight"].shape == (5, 8)
    torch.testing.assert_close(fnlm.linear(p, x), F.linear(x, p["weight"]))
    torch.testing.assert_close(run_linear(8, 5, p["weight"], x), F.linear(x, p["weight"]))


def test_linear_init_is_truncated_normal_with_glorot_variance():
    d_in, d_out = 300, 500
    w = fnlm.init_linear(d_in, d_out, generator=gen(1))["weight"]
    sigma = math.sqrt(2 / (d_in + d_out))
    assert w.abs().max() <= 3 * sigma + 1e-7
    # a N(0, σ²) truncated at ±3σ has std 0.9866σ; 150k draws pin it to well under 1%
    assert abs(w.std().item() / sigma - 0.9866) < 0.01
    assert abs(w.mean().item()) < 0.01 * sigma


def test_init_is_reproducible_from_a_generator():
    a = fnlm.init_linear(16, 4, generator=gen(3))["weight"]
    b = fnlm.init_linear(16, 4, generator=gen(3))["weight"]
    c = fnlm.init_linear(16, 4, generator=gen(4))["weight"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_embedding_matches_f_embedding():
    p = fnlm.init_embedding(50, 6, generator=gen())
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(fnlm.embedding(p, ids), F.embedding(ids, p["weight"]))
    torch.testing.assert_close(run_embedding(50, 6, p["weight"], ids), F.embedding(ids, p["weight"]))
    ids32 = ids.to(torch.int32)
    torch.testing.assert_close(fnlm.embedding(p, ids32), F.embedding(ids, p["weight"]))


def test_embedding_init_truncated_standard_normal():
    w = fnlm.init_embedding(1000, 200, generator=gen(2))["weight"]
    assert w.abs().max() <= 3.0
    assert abs(w.std().item() - 0.9866) < 0.01


@pytest.mark.parametrize("bad", [50, 51, -1, 10_000])
def test_embedding_out_of_range_ids_raise_value_error(bad):
    p = fnlm.init_embedding(50, 6, generator=gen())
    ids = torch.tensor([[0, 3, bad, 4]])
    with pytest.raises(ValueError, match=rf"\[0, 50\).*{bad}"):
        fnlm.embedding(p, ids)


# --- RMSNorm, SiLU, feed-forward -----------------------------------------------------------


def test_rmsnorm_matches_f_rms_norm():
    d = 16
    w = torch.rand(d) + 0.5
    x = torch.randn(2, 5, d) * 3
    ref = F.rms_norm(x, (d,), w, eps=1e-5)
    torch.testing.assert_close(fnlm.rmsnorm({"weight": w}, x), ref)
    torch.testing.assert_close(run_rmsnorm(d, 1e-5, w, x), ref)
    assert torch.equal(fnlm.init_rmsnorm(d)["weight"], torch.ones(d))


def test_rmsnorm_upcasts_and_casts_back():
    d = 32
    w = torch.rand(d) + 0.5
    x = (torch.randn(4, d) * 100).to(torch.bfloat16)
    y = fnlm.rmsnorm({"weight": w}, x)
    assert y.dtype == torch.bfloat16
    ref = F.rms_norm(x.float(), (d,), w, eps=1e-5).to(torch.bfloat16)
    assert torch.equal(y, ref)


def test_silu_matches_f_silu():
    x = torch.randn(3, 4, 5) * 4
    torch.testing.assert_close(fnlm.silu(x), F.silu(x))
    torch.testing.assert_close(run_silu(x), F.silu(x))


def test_swiglu_matches_torch_reference():
    d_model, d_ff = 12, 32
    p = fnlm.init_swiglu(d_model, d_ff, generator=gen())
    w1, w2, w3 = (p[n]["weight"] for n in ("w1", "w2", "w3"))
    assert w1.shape == w3.shape == (d_ff, d_model) and w2.shape == (d_model, d_ff)
    x = torch.randn(2, 3, d_model)
    ref = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    torch.testing.assert_close(fnlm.swiglu(p, x), ref)
    torch.testing.assert_close(run_swiglu(d_model, d_ff, w1, w2, w3, x), ref)


def test_silu_ffn_matches_torch_reference():
    p = fnlm.init_silu_ffn(12, 48, generator=gen())
    assert set(p) == {"w1", "w2"}
    x = torch.randn(5, 12)
    ref = F.linear(F.silu(F.linear(x, p["w1"]["weight"])), p["w2"]["weight"])
    torch.testing.assert_close(fnlm.silu_ffn(p, x), ref)


def test_swiglu_d_ff_known_values():
    assert fnlm.swiglu_d_ff(512) == 1408
    assert fnlm.swiglu_d_ff(768) == 2048
    assert fnlm.swiglu_d_ff(64) == 192


@FAST
@given(st.integers(1, 4096))
def test_swiglu_d_ff_is_smallest_multiple_of_64_at_least_8_thirds(d_model):
    d_ff = fnlm.swiglu_d_ff(d_model)
    assert d_ff % 64 == 0
    assert 3 * d_ff >= 8 * d_model
    assert 3 * (d_ff - 64) < 8 * d_model


# --- RoPE ----------------------------------------------------------------------------------


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Block-diagonal 2×2 rotation matrices R_p (float64), applied as R_p x for each position."""
    d = x.shape[-1]
    xb = x.double()
    pos = positions.expand(xb.shape[:-1])
    out = torch.empty_like(xb)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in xb.shape[:-1]]).reshape(-1, xb.dim() - 1):
        idx = tuple(idx.tolist())
        p = pos[idx].item()
        rot = torch.zeros(d, d, dtype=torch.float64)
        for k in range(d // 2):
            a = p / theta ** (2 * k / d)
            rot[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = torch.tensor(
                [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64
            )
        out[idx] = rot @ xb[idx]
    return out.to(x.dtype)


def test_rope_matches_hand_coded_rotation_matrices():
    d, theta, max_len = 8, 10000.0, 64
    x = torch.randn(2, 5, d)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 20, 3, 63, 0]])
    cache = fnlm.rope_cache(d, max_len, theta)
    assert cache.cos.shape == (max_len, d // 2)
    ref = rope_reference(x, positions, theta)
    torch.testing.assert_close(fnlm.rope(x, positions, cache), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(run_rope(d, theta, max_len, x, positions), ref, atol=2e-5, rtol=1e-5)


def test_rope_broadcasts_positions_over_batch_dims():
    d = 6
    x = torch.randn(3, 4, 5, d)
    pos = torch.arange(5)
    cache = fnlm.rope_cache(d, 16, 500.0)
    out = fnlm.rope(x, pos, cache)
    torch.testing.assert_close(out, rope_reference(x, pos, 500.0), atol=2e-5, rtol=1e-5)


@FAST
@given(st.integers(0, 200), st.integers(0, 200), st.integers(0, 2**31 - 1))
def test_rope_scores_depend_only_on_relative_position(m, n, seed):
    g = gen(seed)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    cos, sin = fnlm.rope_cos_sin(torch.tensor([m, n, m + 7, n + 7]), 16, 10000.0)
    cos, sin = cos.double(), sin.double()
    rq = fnlm.rope_rotate(torch.stack([q, q]), cos[[0, 2]], sin[[0, 2]])
    rk = fnlm.rope_rotate(torch.stack([k, k]), cos[[1, 3]], sin[[1, 3]])
    s1, s2 = (rq * rk).sum(-1)
    assert abs(s1 - s2) < 1e-4 * (1 + abs(s1))
    assert abs(rq[0].norm() - q.norm()) < 1e-4  # a rotation keeps the norm


# --- softmax -------------------------------------------------------------------------------


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


# --- shape checks ----------------------------------------------------------------------------


def test_shape_errors_name_the_argument_and_dims():
    assert fnlm.typecheck_enabled(), "the test suite runs with FNLM_TYPECHECK=1"
    p = fnlm.init_linear(8, 5)
    with pytest.raises(jaxtyping.TypeCheckError, match=r"(?s)parameter 'x'.*d_in=8"):
        fnlm.linear(p, torch.randn(2, 7))
    with pytest.raises(jaxtyping.TypeCheckError, match=r"(?s)parameter 'x'.*d_model=16"):
        fnlm.rmsnorm({"weight": torch.ones(16)}, torch.randn(3, 15))
    with pytest.raises(jaxtyping.TypeCheckError, match=r"(?s)parameter 'k'.*d_head=8"):
        fnlm.scaled_dot_product_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 8))
    with pytest.raises(TypeError, match="token_ids"):
        fnlm.embedding(fnlm.init_embedding(10, 4), torch.rand(3))


def test_bad_sizes_raise_value_errors_with_values():
    with pytest.raises(ValueError, match="d_out.*-3"):
        fnlm.init_linear(4, -3)
    with pytest.raises(ValueError, match="d_head=7"):
        fnlm.rope_cache(7, 16)
    with pytest.raises(ValueError, match="num_heads=3"):
        fnlm.split_heads(torch.randn(2, 4, 8), 3)


# --- hand-written backward passes --------------------------------------------------------------


def test_softmax_rmsnorm_silu_gradients_match_torch():
    x = (torch.randn(3, 4, 9) * 3).requires_grad_()
    g = torch.randn(3, 4, 9)
    for ours, ref in [
        (lambda t: fnlm.softmax(t, 1), lambda t: torch.softmax(t, 1)),
        (fnlm.silu, F.silu),
    ]:
        (a,) = torch.autograd.grad((ours(x) * g).sum(), x)
        (b,) = torch.autograd.grad((ref(x) * g).sum(), x)
        torch.testing.assert_close(a, b)
    w = (torch.rand(9) + 0.5).requires_grad_()
    a = torch.autograd.grad((fnlm.rmsnorm({"weight": w}, x) * g).sum(), (x, w))
    b = torch.autograd.grad((F.rms_norm(x, (9,), w, eps=1e-5) * g).sum(), (x, w))
    torch.testing.assert_close(a, b)


def test_hand_written_backwards_pass_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fnlm.softmax(t, 0), (x,))
    assert torch.autograd.gradcheck(fnlm.silu, (x,))
    assert torch.autograd.gradcheck(lambda t, v: fnlm.rmsnorm({"weight": v}, t), (x, w))
    masked = x.detach().clone()
    masked[0, 1] = float("-inf")
    masked[1, 2, :2] = float("-inf")
    masked.requires_grad_()
    (grad,) = torch.autograd.grad((fnlm.softmax(masked) * torch.randn(2, 3, 5, dtype=torch.float64)).sum(), masked)
    assert torch.isfinite(grad).all() and (grad[0, 1] == 0).all() and (grad[1, 2, :2] == 0).all()


def test_torch_func_grad_and_vmap_work_through_the_layers():
    w = torch.rand(6) + 0.5
    xs = torch.randn(4, 6)

    def f(weight, x):
        return fnlm.softmax(fnlm.silu(fnlm.rmsnorm({"weight": weight}, x))).square().sum()

    per_example = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(w, xs)
    wr = w.clone().requires_grad_()
    ref = torch.stack([torch.autograd.grad(f(wr, x), wr)[0] for x in xs])
    torch.testing.assert_close(per_example, ref)
