"""Every torch.func transform over a params tree: `vmap` over stacked models (the loss, `grad`, an
ensemble's logits) against a loop over the models, per-example gradients
(`vmap(grad(loss), in_dims=(None, 0, 0))`) against one-example gradients from `value_and_grad`,
and the data-dependent checks, which step aside under transforms and keep their error in eager calls.
(`torch.compile` is tested in a fresh process in tests/test_compile.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import grad, vmap

import fnlm
from fnlm.types import tracing

CONFIG = fnlm.TransformerConfig(vocab_size=53, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def stack(trees: list[dict]) -> dict:
    """The models' params with a leading model axis, one `torch.stack` per leaf."""
    flat = [fnlm.tree_flatten(t) for t in trees]
    return fnlm.tree_unflatten({name: torch.stack([f[name] for f in flat]) for name in flat[0]})


def loss_fn(params, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(params, x, CONFIG), y)


def batch(seed: int, shape=(3, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, shape, generator=g), torch.randint(0, CONFIG.vocab_size, shape, generator=g)


@pytest.fixture(scope="module")
def models() -> list[dict]:
    return [fnlm.init_transformer_lm(CONFIG, seed=s) for s in range(3)]


def assert_trees_close(a, b, **tol):
    fa, fb = fnlm.tree_flatten(a), fnlm.tree_flatten(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        torch.testing.assert_close(fa[name], fb[name], msg=name, **tol)


def test_vmapped_ensemble_logits_equal_a_loop(models):
    x, _ = batch(0)
    logits = vmap(lambda p: fnlm.transformer_lm(p, x, CONFIG))(stack(models))
    assert logits.shape == (3, 3, 10, CONFIG.vocab_size)
    for i, params in enumerate(models):
        torch.testing.assert_close(logits[i], fnlm.transformer_lm(params, x, CONFIG), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0], logits[1])


def test_vmap_of_the_loss_and_of_grad_over_stacked_models_equal_a_loop(models):
    x, y = batch(1)
    stacked = stack(models)
    losses = vmap(loss_fn, in_dims=(0, None, None))(stacked, x, y)
    grads = vmap(grad(loss_fn), in_dims=(0, None, None))(stacked, x, y)
    loop = [fnlm.value_and_grad(loss_fn)(params, x, y) for params in models]
    torch.testing.assert_close(losses, torch.stack([v for v, _ in loop]), atol=1e-6, rtol=1e-6)
    assert_trees_close(grads, stack([g for _, g in loop]), atol=1e-6, rtol=1e-5)


def test_vmap_over_models_and_data_together(models):
    xs, ys = batch(2, (3, 2, 10))
    losses = vmap(loss_fn)(stack(models), xs, ys)
    for i, params in enumerate(models):
        torch.testing.assert_close(losses[i], loss_fn(params, xs[i], ys[i]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fields", [{}, dict(norm="none", position="nope", ffn="silu")])
def test_per_example_grads_equal_one_example_grads(fields):
    config = dataclasses.replace(CONFIG, **fields)
    params = fnlm.init_transformer_lm(config, seed=4)
    x, y = batch(3, (4, 9))

    def loss(p, xi, yi):
        return fnlm.cross_entropy(fnlm.transformer_lm(p, xi, config), yi)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        _, one = fnlm.value_and_grad(loss)(params, x[i : i + 1], y[i : i + 1])
        assert_trees_close(fnlm.tree_map(lambda t: t[i], per_example), one, atol=2e-6, rtol=1e-5)
    mean = fnlm.tree_map(lambda t: t.mean(0), per_example)
    _, full = fnlm.value_and_grad(loss)(params, x, y)
    assert_trees_close(mean, full, atol=2e-6, rtol=1e-5)


def test_the_id_range_check_steps_aside_under_transforms_and_stays_in_eager_calls(models):
    params = models[0]
    x, y = batch(5, (2, 6))
    seen = []

    def probe(p, xi, yi):
        seen.append(tracing())
        return loss_fn(p, xi, yi)

    vmap(grad(probe), in_dims=(None, 0, 0))(params, x, y)
    probe(params, x, y)
    assert seen == [True, False]
    bad = x.clone()
    bad[1, 2] = CONFIG.vocab_size
    with pytest.raises(ValueError, match=rf"\[0, {CONFIG.vocab_size}\).*offending ids.*{CONFIG.vocab_size}"):
        loss_fn(params, bad, y)
    with pytest.raises(ValueError, match="offending ids"):
        fnlm.value_and_grad(loss_fn)(params, bad, y)


def test_shape_checks_run_under_vmap_on_each_models_shapes(models):
    """The always-on checks read shapes; under vmap a leaf's shape is one model's, so a stacked tree
    passes and a wrong head passes no more than in an eager call."""
    x, _ = batch(6)
    stacked = stack(models)
    wrong = fnlm.tree_map(lambda t: t, stacked)
    wrong["lm_head"] = {"weight": stacked["lm_head"]["weight"][:, :-1]}
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(52, 32\).*\(53, 32\)"):
        vmap(lambda p: fnlm.transformer_lm(p, x, CONFIG))(wrong)
