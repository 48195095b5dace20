"""Shape and size errors from the layers name the argument and the sizes (jaxtyping under
`FNLM_TYPECHECK=1`, and the layers' own `ValueError`s)."""

from __future__ import annotations

import jaxtyping
import pytest
import torch

import fnlm


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
