"""SiLU, SwiGLU and the ungated SiLU feed-forward against torch references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from tests.adapters import run_silu, run_swiglu

FAST = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


def test_silu_gradient_matches_torch():
    x = (torch.randn(3, 4, 5) * 4).requires_grad_()
    (a,) = torch.autograd.grad(fnlm.silu(x).sum(), x)
    (b,) = torch.autograd.grad((x * torch.sigmoid(x)).sum(), x)
    torch.testing.assert_close(a, b)
