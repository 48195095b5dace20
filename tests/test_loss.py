"""cross_entropy against torch's F.cross_entropy, its stability properties, perplexity, and value_and_grad."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fnlm
from fnlm.autodiff import value_and_grad
from tests.adapters import run_cross_entropy

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=64)


@pytest.mark.parametrize("shape", [(7,), (4, 7), (2, 3, 7), (2, 2, 2, 11)])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_matches_torch_float64(shape, scale):
    g = torch.Generator().manual_seed(sum(shape))
    logits = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    ours = fnlm.cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.reshape(-1, shape[-1]), targets.reshape(-1))
    assert ours.dtype == torch.float64 and ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_gradient_matches_torch_float64():
    logits = torch.randn(3, 5, 9, dtype=torch.float64) * 50
    targets = torch.randint(0, 9, (3, 5))
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    fnlm.cross_entropy(a, targets).backward()
    F.cross_entropy(b.reshape(-1, 9), targets.reshape(-1)).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_extreme_logits_do_not_overflow():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=torch.float32)
    targets = torch.tensor([1, 2])
    loss = fnlm.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.tensor((2e4 + math.log(3)) / 2))


def test_adapter_matches_torch():
    inputs = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    torch.testing.assert_close(run_cross_entropy(inputs, targets), F.cross_entropy(inputs, targets))
    torch.testing.assert_close(run_cross_entropy(1000 * inputs, targets), F.cross_entropy(1000 * inputs, targets))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_upcast(dtype):
    logits = (torch.randn(6, 50) * 30).to(dtype)
    targets = torch.randint(0, 50, (6,))
    loss = fnlm.cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.double(), targets).float()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    logits.requires_grad_()
    fnlm.cross_entropy(logits, targets).backward()
    assert logits.grad.dtype == dtype


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6), elements=finite),
    st.data(),
)
def test_property_finite_and_equals_neg_log_softmax(arr, data):
    logits = torch.from_numpy(arr)
    vocab = logits.shape[-1]
    targets = torch.from_numpy(
        data.draw(hnp.arrays(np.int64, logits.shape[:-1], elements=st.integers(0, vocab - 1)))
    )
    loss = fnlm.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    expected = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 8)), elements=finite),
    st.data(),
)
def test_property_invariant_to_per_row_shift(arr, data):
    logits = torch.from_numpy(arr)
    rows, vocab = logits.shape
    shifts = torch.tensor(data.draw(st.lists(finite, min_size=rows, max_size=rows)), dtype=torch.float64)
    targets = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows)))
    base = fnlm.cross_entropy(logits, targets)
    shifted = fnlm.cross_entropy(logits + shifts[:, None], targets)
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-8)


def test_shape_mismatch_is_an_error():
    with pytest.raises((ValueError, TypeError)):
        fnlm.cross_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def test_perplexity():
    assert fnlm.perplexity(0.0) == 1.0
    assert fnlm.perplexity(math.log(7.0)) == pytest.approx(7.0)
    loss = fnlm.cross_entropy(torch.zeros(3, 11), torch.tensor([0, 5, 10]))
    torch.testing.assert_close(fnlm.perplexity(loss), torch.tensor(11.0))
    with pytest.raises(ValueError):
        fnlm.perplexity(torch.ones(2))


def _mlp_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layers": [
            {"weight": torch.randn(8, 6, generator=g, dtype=torch.float64)},
            {"weight": torch.randn(5, 8, generator=g, dtype=torch.float64)},
        ],
        "gain": torch.randn(6, generator=g, dtype=torch.float64),
        "unused": torch.randn(3, generator=g, dtype=torch.float64),
    }


def _mlp_loss(params, x, y):
    h = x * params["gain"]
    h = torch.tanh(h @ params["layers"][0]["weight"].T)
    return fnlm.cross_entropy(h @ params["layers"][1]["weight"].T, y)


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_value_and_grad_matches_module_autograd(backend):
    params = _mlp_params()
    before = fnlm.tree_map(torch.clone, params)
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    loss, grads = value_and_grad(_mlp_loss, backend=backend)(params, x, y)
    ref = fnlm.tree_map(lambda t: t.clone().requires_grad_(), params)
    ref_loss = _mlp_loss(ref, x, y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    assert not loss.requires_grad
    assert fnlm.tree_flatten(grads).keys() == fnlm.tree_flatten(params).keys()
    for name, g in fnlm.tree_flatten(grads).items():
        want = fnlm.tree_flatten(ref)[name].grad
        torch.testing.assert_close(g, torch.zeros_like(g) if want is None else want)
    for name, t in fnlm.tree_flatten(params).items():
        assert torch.equal(t, fnlm.tree_flatten(before)[name]) and not t.requires_grad


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_value_and_grad_has_aux_and_kwargs(backend):
    def fn(params, x, *, scale):
        out = (params["w"] * x).sum() * scale
        return out, {"mean": params["w"].mean(), "n": 3}

    params = {"w": torch.arange(4.0)}
    (value, aux), grads = value_and_grad(fn, has_aux=True, backend=backend)(params, torch.ones(4), scale=2.0)
    assert value.item() == 12.0
    assert aux["n"] == 3 and aux["mean"].item() == 1.5 and not aux["mean"].requires_grad
    torch.testing.assert_close(grads["w"], torch.full((4,), 2.0))


def test_value_and_grad_errors():
    with pytest.raises(ValueError, match="0-d"):
        value_and_grad(lambda p: p["w"] * 2)({"w": torch.ones(3)})
    with pytest.raises(TypeError, match="not a floating tensor"):
        value_and_grad(lambda p: p["w"].sum().float())({"w": torch.ones(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="backend"):
        value_and_grad(lambda p: p, backend="jax")


def test_float_targets_are_a_type_error_not_truncated():
    """Before: `targets.long()` truncated 3.7 to 3 and returned a loss (with type checking off, as
    users run it). Now the dtype is refused, in plain calls, under `vmap` and under `torch.compile`."""
    from tests.fresh_process import run_python

    out = run_python(
        """
        import json, torch, fnlm
        logits = torch.randn(2, 5)
        errors = []
        for targets in (torch.tensor([3.7, 1.0]), torch.tensor([True, False]), torch.tensor([1, 2], dtype=torch.complex64),
                        [3, 1]):
            try:
                fnlm.cross_entropy(logits, targets)
                errors.append(None)
            except TypeError as e:
                errors.append(str(e))
        try:
            torch.vmap(fnlm.cross_entropy)(torch.randn(3, 2, 5), torch.rand(3, 2) * 4)
            errors.append(None)
        except TypeError as e:
            errors.append(str(e))
        ints = torch.tensor([3, 1])
        compiled = torch.compile(fnlm.cross_entropy, fullgraph=True)
        same = torch.equal(compiled(logits, ints), fnlm.cross_entropy(logits, ints))
        small = fnlm.cross_entropy(logits, ints.to(torch.uint8)).item() == fnlm.cross_entropy(logits, ints).item()
        print("RESULT " + json.dumps({"errors": errors, "same": same, "small": small}))
        """
    )
    assert out["same"] and out["small"]
    assert all(e is not None and "targets must be an integer tensor" in e for e in out["errors"]), out["errors"]
    assert "torch.float32" in out["errors"][0] and "torch.bool" in out["errors"][1] and "list" in out["errors"][3]
