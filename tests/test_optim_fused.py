"""The fused AdamW path (torch's one-pass kernel on copies) equals the multi-tensor path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm.optim import _adamw as optim


def _tree(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "token_embeddings": {"weight": torch.randn(11, 4, generator=g).to(dtype)},
        "layers": [{"ln1": {"weight": torch.ones(4, dtype=dtype)},
                    "w": {"weight": torch.randn(5, 4, generator=g).to(dtype)}}],
        "lm_head": {"weight": torch.randn(11, 4, generator=g).to(dtype)},
    }


def _column_major(t):
    return t.T.contiguous().T if t.ndim == 2 else t


def _run(monkeypatch, fused, dtype, mask, lr, wd, betas, steps=4, layout=lambda t: t):
    monkeypatch.setattr(optim, "_can_fuse", lambda *a: fused)
    params = fnlm.tree_map(layout, _tree(dtype))
    state = fnlm.adamw_init(params)
    for t in range(steps):
        grads = fnlm.tree_map(
            lambda p: layout(torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).to(dtype)), params)
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


def test_fused_path_on_column_major_leaves(monkeypatch):
    """`init_linear`'s weights are column-major (and so are their einsum gradients): the fused kernel
    runs on contiguous permuted views of them, updates them in place, and keeps their layout."""
    a = _run(monkeypatch, True, torch.float64, fnlm.default_decay_mask, 0.01, 0.1, (0.9, 0.95), layout=_column_major)
    b = _run(monkeypatch, False, torch.float64, fnlm.default_decay_mask, 0.01, 0.1, (0.9, 0.95))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
        assert x.stride() == _column_major(x).stride()
    w = _column_major(torch.randn(5, 4))
    view = optim._dense_view(w)
    assert view.is_contiguous() and view.data_ptr() == w.data_ptr()
    cube = torch.randn(2, 3, 4).permute(2, 0, 1)
    assert optim._dense_view(cube).is_contiguous()


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


@pytest.mark.parametrize("fused", [True, False])
def test_donated_update_equals_pure_on_both_paths(monkeypatch, fused):
    """donate=True updates the donated buffers in place on the fused and the multi-tensor path and
    gives exactly the pure step's values."""
    monkeypatch.setattr(optim, "_can_fuse", lambda *a: fused)
    results = []
    for donate in (False, True):
        params = _tree(torch.float32)
        state = fnlm.adamw_init(params)
        first = [t.data_ptr() for t in fnlm.tree_leaves((params, state["m"], state["v"]))]
        for t in range(3):
            grads = fnlm.tree_map(lambda p: torch.randn(p.shape, generator=torch.Generator().manual_seed(t)), params)
            params, state = fnlm.adamw_step(params, state, grads, lr=0.02, weight_decay=0.1, donate=donate,
                                            decay_mask=fnlm.default_decay_mask)
        now = [t.data_ptr() for t in fnlm.tree_leaves((params, state["m"], state["v"]))]
        assert (now == first) == donate
        results.append(fnlm.tree_leaves((params, state)))
    for a, b in zip(*results):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_fused_path_is_not_taken_for_tensor_weight_decay_or_under_vmap():
    leaves = fnlm.tree_leaves(_tree(torch.float32))
    assert not optim._can_fuse(leaves, leaves, leaves, leaves, 0.01, torch.tensor(0.1))
    seen = []
    torch.func.vmap(lambda t: seen.append(optim._can_fuse([t], [t], [t], [t], 0.01, 0.1)) or t)(torch.ones(2, 3))
    assert seen == [False]
