"""fnlm.per_example_grads: vmap of grad over the examples, checked against one-example gradients."""

from __future__ import annotations

import pytest
import torch

import fnlm

CONFIG = fnlm.TransformerConfig(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)


def loss_fn(params, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(params, x, CONFIG), y)


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG.vocab_size, (n, CONFIG.context_length), generator=g)
    return x, torch.randint(0, CONFIG.vocab_size, (n, CONFIG.context_length), generator=g)


def test_per_example_grads_equal_one_example_grads():
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    x, y = _batch()
    grads = fnlm.per_example_grads(loss_fn)(params, x, y)
    flat = fnlm.tree_flatten(grads)
    assert flat.keys() == fnlm.tree_flatten(params).keys()
    for i in range(x.shape[0]):
        _, one = fnlm.value_and_grad(loss_fn)(params, x[i:i + 1], y[i:i + 1])
        for name, g in fnlm.tree_flatten(one).items():
            assert flat[name].shape == (x.shape[0], *g.shape)
            torch.testing.assert_close(flat[name][i], g, rtol=1e-4, atol=1e-6)


def test_mean_of_per_example_grads_is_the_batch_gradient_and_norms_are_each_examples():
    params = fnlm.init_transformer_lm(CONFIG, seed=1)
    x, y = _batch(4, seed=1)
    grads = fnlm.per_example_grads(loss_fn, chunk_size=3)(params, x, y)
    _, full = fnlm.value_and_grad(loss_fn)(params, x, y)
    for name, g in fnlm.tree_flatten(full).items():
        torch.testing.assert_close(fnlm.tree_flatten(grads)[name].mean(0), g, rtol=1e-4, atol=1e-6)
    norms = fnlm.per_example_grad_norms(grads)
    assert norms.shape == (4,)
    for i in range(4):
        _, one = fnlm.value_and_grad(loss_fn)(params, x[i:i + 1], y[i:i + 1])
        torch.testing.assert_close(norms[i], fnlm.global_norm(one), rtol=1e-4, atol=1e-6)


def test_per_example_grads_bad_batches():
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    x, y = _batch()
    with pytest.raises(ValueError, match="same leading batch axis"):
        fnlm.per_example_grads(loss_fn)(params, x, y[:3])
    with pytest.raises(ValueError, match="at least one batch argument"):
        fnlm.per_example_grads(lambda p: p["ln_final"]["weight"].sum())(params)


def test_value_and_grad_autograd_backend_works_under_vmap():
    """Inside torch.func.vmap the default (autograd) back end hands over to torch.func."""
    stacked = fnlm.tree_stack([fnlm.init_transformer_lm(CONFIG, seed=s) for s in range(2)])
    x, y = _batch(2)
    losses, grads = torch.func.vmap(fnlm.value_and_grad(loss_fn), in_dims=(0, None, None))(stacked, x, y)
    for k, params in enumerate(fnlm.tree_unstack(stacked)):
        loss, want = fnlm.value_and_grad(loss_fn)(params, x, y)
        torch.testing.assert_close(losses[k], loss)
        for a, b in zip(fnlm.tree_leaves(grads), fnlm.tree_leaves(want)):
            torch.testing.assert_close(a[k], b, rtol=1e-4, atol=1e-6)
