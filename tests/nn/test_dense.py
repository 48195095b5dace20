"""`linear` (an `einx.dot`) against `F.linear`; its init; the column-major weight layout that makes
the gradient come back in the parameter's own layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fnlm
from tests.adapters import run_linear


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


def test_linear_weight_is_column_major_and_its_gradient_has_the_same_layout():
    p = fnlm.init_linear(6, 10, generator=gen(2))
    w = p["weight"]
    assert w.shape == (10, 6) and w.stride() == (1, 10)
    row_major = fnlm.init_linear(6, 10, generator=gen(2))["weight"].contiguous()
    assert torch.equal(w, row_major)  # the same draw, only the memory order differs
    x = torch.randn(3, 4, 6)
    leaf = w.detach().requires_grad_()
    (grad,) = torch.autograd.grad(fnlm.linear({"weight": leaf}, x).square().sum(), leaf)
    assert grad.stride() == w.stride()
    torch.testing.assert_close(grad, 2 * torch.einsum("...o,...i->oi", x @ w.T, x))


def test_adamw_step_with_transposed_gradients_equals_contiguous_ones():
    """torch's fused AdamW kernel mis-reads a gradient whose strides differ from its parameter's;
    `adamw_step` must give the same update for either layout of the same gradient."""
    w = torch.randn(8, 5)
    g = torch.randn(5, 8).T
    state = fnlm.adamw_init({"w": w})
    a, _ = fnlm.adamw_step({"w": w}, state, {"w": g}, lr=1e-2, weight_decay=0.1)
    b, _ = fnlm.adamw_step({"w": w}, state, {"w": g.contiguous()}, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(a["w"], b["w"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(a["w"], w)
