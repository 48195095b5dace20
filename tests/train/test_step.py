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


def _todays_step(state, x, y, config, donate):
    """The step as it was before optimizers became transformations: schedule, value_and_grad, clipping in place,
    `adamw_step` by name."""
    lr = fnlm.cosine_schedule(state.step, config.lr, config.min_lr, config.warmup_steps, config.cosine_steps)
    _, grads = fnlm.value_and_grad(loss_fn)(state.params, x, y)
    grads, _ = fnlm.clip_grad_norm_with_norm(grads, config.grad_clip, donate=True)
    params, opt_state = fnlm.adamw_step(state.params, state.opt_state, grads, lr=lr, betas=config.betas,
                                        eps=config.eps, weight_decay=config.weight_decay, donate=donate)
    return fnlm.TrainState(params, opt_state, state.step + 1)


@pytest.mark.parametrize("donate", [False, True])
def test_the_default_optimizer_is_bitwise_todays_step_over_50_steps(donate):
    config = fnlm.StepConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, cosine_steps=40, grad_clip=0.5)
    ours = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=1))
    theirs = fnlm.TrainState(fnlm.init_transformer_lm(CONFIG, seed=1), fnlm.adamw_init(ours.params), 0)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        x, y = torch.randint(0, 41, (4, 12), generator=g), torch.randint(0, 41, (4, 12), generator=g)
        ours, _ = fnlm.train_step(ours, x, y, loss_fn=loss_fn, config=config, donate=donate)
        theirs = _todays_step(theirs, x, y, config, donate)
    assert ours.step == theirs.step == 50 and ours.opt_state["step"] == 50
    for (name, a), b in zip(fnlm.tree_flatten((ours.params, ours.opt_state)).items(),
                            fnlm.tree_leaves((theirs.params, theirs.opt_state))):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name


def test_any_optimizer_runs_through_the_step_and_equals_its_own_update():
    """`optimizer=` takes any transformation; without a config the step neither clips nor accumulates, so one
    step is exactly `value_and_grad` + `optimizer_step`."""
    from fnlm import optim

    tx = optim.chain(optim.clip_by_global_norm(0.1), optim.sgd(0.05, momentum=0.9))
    state = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=2), tx)
    x, y = torch.randint(0, 41, (3, 12)), torch.randint(0, 41, (3, 12))
    new, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, optimizer=tx)
    _, grads = fnlm.value_and_grad(loss_fn)(state.params, x, y)
    expected, _ = optim.optimizer_step(tx, state.params, state.opt_state, grads)
    assert "lr" not in metrics and new.step == 1
    for name, value in fnlm.tree_flatten(expected).items():
        torch.testing.assert_close(fnlm.tree_flatten(new.params)[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_config_names_the_optimizer(name):
    config = fnlm.StepConfig(lr=1e-2, warmup_steps=0, cosine_steps=10, optimizer=name)
    state = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=0), config)
    x, y = torch.randint(0, 41, (2, 12)), torch.randint(0, 41, (2, 12))
    for _ in range(3):
        state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config, donate=True)
    assert math.isfinite(float(metrics["loss"])) and state.step == 3
    with pytest.raises(ValueError, match="one of adamw_cs336"):
        fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config._replace(optimizer="adam"))


def test_four_micro_batches_of_8_equal_one_batch_of_32_over_20_steps():
    """`grad_accum_steps=4` averages the gradients of 4 micro-batches of 8: the same 20 steps as the
    whole batch of 32 (clipping and the optimizer see the same gradients) to float rounding."""
    tokens = torch.randint(0, CONFIG.vocab_size, (5000,), generator=torch.Generator().manual_seed(0))
    whole = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=0))
    accum = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=0))
    config = fnlm.StepConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, cosine_steps=20, grad_clip=1.0)
    for t in range(20):
        x, y = fnlm.get_batch(tokens, 32, CONFIG.context_length, "cpu", generator=torch.Generator().manual_seed(t))
        whole, m1 = fnlm.train_step(whole, x, y, loss_fn=loss_fn, config=config)
        accum, m2 = fnlm.train_step(accum, x, y, loss_fn=loss_fn, config=config._replace(grad_accum_steps=4))
        assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    a, b = fnlm.tree_flatten(whole.params), fnlm.tree_flatten(accum.params)
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
    assert worst < 1e-6, worst
    with pytest.raises(ValueError, match="grad_accum_steps"):
        fnlm.train_step(whole, x[:6], y[:6], loss_fn=loss_fn, config=config._replace(grad_accum_steps=4))
