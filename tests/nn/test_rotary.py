"""RoPE against hand-coded float64 rotation matrices, its tables, and its relative-position property."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from tests.adapters import run_rope
from tests.reference_lm import rope_reference

FAST = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


def test_rope_tables_spread_the_angles_over_each_pair():
    cos, sin = fnlm.rope_cos_sin(torch.arange(3), 4, 100.0)
    c2, s2 = fnlm.rope_tables(cos, sin)
    assert c2.shape == s2.shape == (3, 4)
    assert torch.equal(c2[:, 0::2], cos) and torch.equal(c2[:, 1::2], cos)
    assert torch.equal(s2[:, 0::2], -sin) and torch.equal(s2[:, 1::2], sin)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(fnlm.rope_rotate_tables(x, c2, s2), fnlm.rope_rotate(x, cos, sin))
