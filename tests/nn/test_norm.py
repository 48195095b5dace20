"""RMSNorm (mean of squares in einx, hand-written backward) against `F.rms_norm`, and `no_norm`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fnlm
from tests.adapters import run_rmsnorm


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


def test_rmsnorm_gradients_match_torch_and_pass_gradcheck():
    x = (torch.randn(3, 4, 9) * 3).requires_grad_()
    g = torch.randn(3, 4, 9)
    w = (torch.rand(9) + 0.5).requires_grad_()
    ours = torch.autograd.grad((fnlm.rmsnorm({"weight": w}, x) * g).sum(), (x, w))
    ref = torch.autograd.grad((F.rms_norm(x, (9,), w, eps=1e-5) * g).sum(), (x, w))
    torch.testing.assert_close(ours, ref)
    x64 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, v: fnlm.rmsnorm({"weight": v}, t), (x64, w64))


def test_no_norm_is_the_identity():
    x = torch.randn(2, 3, 4)
    assert fnlm.no_norm(None, x) is x
