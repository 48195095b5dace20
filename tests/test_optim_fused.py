"""The fused AdamW path (torch's one-pass kernel on copies) equals the multi-tensor path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm import optim


def _tree(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "token_embeddings": {"weight": torch.randn(11, 4, generator=g).to(dtype)},
        "layers": [{"ln1": {"weight": torch.ones(4, dtype=dtype)},
                    "w": {"weight": torch.randn(5, 4, generator=g).to(dtype)}}],
        "lm_head": {"weight": torch.randn(11, 4, generator=g).to(dtype)},
    }


def _run(monkeypatch, fused, dtype, mask, lr, wd, betas, steps=4):
    monkeypatch.setattr(optim, "_can_fuse", lambda *a: fused)
    params = _tree(dtype)
    state = fnlm.adamw_init(params)
    for t in range(steps):
        grads = fnlm.tree_map(lambda p: torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).to(dtype), params)
        params, state = fnlm.adamw_step(params, state, grads, lr=lr, betas=betas, eps=1e-6,
                                        weight_decay=wd, decay_mask=mask)
    return fnlm.tree_leaves(params) + fnlm.tree_leaves(state["m"]) + fnlm.tree_leaves(state["v"])


@pytest.mark.parametrize("mask", [None, fnlm.default_decay_mask])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_foreach(monkeypatch, mask, dtype):
    a = _run(monkeypatch, True, dtype, mask, 0.01, 0.1, (0.9, 0.95))
    b = _run(monkeypatch, False, dtype, mask, 0.01, 0.1, (0.9, 0.95))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(lr=st.floats(1e-5, 0.5), wd=st.floats(0.0, 1.0), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999))
def test_fused_equals_foreach_any_hyperparameters(lr, wd, b1, b2):
    with pytest.MonkeyPatch.context() as mp:
        a = _run(mp, True, torch.float64, fnlm.default_decay_mask, lr, wd, (b1, b2), steps=3)
        b = _run(mp, False, torch.float64, fnlm.default_decay_mask, lr, wd, (b1, b2), steps=3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_fused_path_is_taken_and_pure():
    params = _tree(torch.float32)
    grads = fnlm.tree_map(torch.ones_like, params)
    state = fnlm.adamw_init(params)
    leaves = fnlm.tree_leaves(params)
    assert optim._can_fuse(leaves, fnlm.tree_leaves(grads), fnlm.tree_leaves(state["m"]),
                           fnlm.tree_leaves(state["v"]), 0.01, 0.1)
    before = [t.clone() for t in leaves + fnlm.tree_leaves(grads) + fnlm.tree_leaves(state["m"])]
    new, new_state = fnlm.adamw_step(params, state, grads, lr=0.01)
    after = leaves + fnlm.tree_leaves(grads) + fnlm.tree_leaves(state["m"])
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert all(n.data_ptr() != o.data_ptr() for n, o in zip(fnlm.tree_leaves(new), leaves))
    assert not optim._can_fuse(leaves, leaves, leaves, leaves, torch.tensor(0.01), 0.1)
    assert not optim._can_fuse(leaves, leaves, leaves, leaves, 2.0, 0.5)
