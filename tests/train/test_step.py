"""`train_step` is its parts composed (value_and_grad, clip_grad_norm, adamw_step, cosine_schedule),
leaves the caller's state untouched, and its tensor-step schedule equals the float one."""

from __future__ import annotations

import math

import pytest
import torch

import fnlm
from fnlm.train.step import learning_rate

CONFIG = fnlm.TransformerConfig(vocab_size=41, context_length=12, d_model=32, num_layers=1, num_heads=4, d_ff=48)


def loss_fn(params, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(params, x, CONFIG), y)


@pytest.mark.parametrize("grad_clip", [0.05, 1e3, 0.0])
def test_train_step_equals_its_parts_and_leaves_the_state_alone(grad_clip):
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 41, (3, 12), generator=g), torch.randint(0, 41, (3, 12), generator=g)
    config = fnlm.StepConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, cosine_steps=5, grad_clip=grad_clip)
    state = fnlm.init_train_state(params)
    state, _ = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config)
    before = {k: v.clone() for k, v in fnlm.tree_flatten(state.params).items()}
    new, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config)

    loss, grads = fnlm.value_and_grad(loss_fn)(state.params, x, y)
    norm = fnlm.global_norm(grads)
    if grad_clip > 0:
        grads = fnlm.clip_grad_norm(grads, grad_clip)
    lr = fnlm.cosine_schedule(1, 1e-2, 1e-3, 1, 5)
    expected, _ = fnlm.adamw_step(state.params, state.opt_state, grads, lr=lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    assert all(torch.equal(before[k], v) for k, v in fnlm.tree_flatten(state.params).items())
    assert new.step == 2 and metrics["lr"] == lr
    torch.testing.assert_close(metrics["loss"], loss)
    torch.testing.assert_close(metrics["grad_norm"], norm)
    for name, value in fnlm.tree_flatten(expected).items():
        torch.testing.assert_close(fnlm.tree_flatten(new.params)[name], value, rtol=1e-6, atol=1e-7, msg=name)
    if grad_clip == 0.05:
        assert float(norm) > 0.05  # the clip was active


@pytest.mark.parametrize("warmup, cycle", [(3, 10), (0, 4), (5, 5)])
def test_the_tensor_schedule_equals_the_float_one(warmup, cycle):
    config = fnlm.StepConfig(lr=3e-3, min_lr=3e-4, warmup_steps=warmup, cosine_steps=cycle)
    for t in range(cycle + 3):
        expected = fnlm.cosine_schedule(t, 3e-3, 3e-4, warmup, cycle)
        got = learning_rate(torch.tensor(t), config)
        assert isinstance(got, torch.Tensor) and math.isclose(float(got), expected, rel_tol=1e-12, abs_tol=1e-15), t
