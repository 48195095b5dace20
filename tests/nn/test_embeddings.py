"""`embedding` (an `index_select` row gather) against `F.embedding`, its init and its id checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fnlm
from tests.adapters import run_embedding


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_embedding_rejects_non_integer_ids(dtype):
    with pytest.raises(TypeError, match="token_ids"):
        fnlm.embedding(fnlm.init_embedding(10, 4), torch.zeros(3, dtype=dtype))


def test_embedding_gradient_sums_rows_like_f_embedding():
    weight = torch.randn(20, 5, requires_grad=True)
    ids = torch.tensor([[1, 3, 3], [19, 1, 1]])
    g = torch.randn(2, 3, 5)
    (ours,) = torch.autograd.grad(fnlm.embedding({"weight": weight}, ids), weight, g)
    (ref,) = torch.autograd.grad(F.embedding(ids, weight), weight, g)
    torch.testing.assert_close(ours, ref)
