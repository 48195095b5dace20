"""Every `fnlm.optim` transformation that has an optax namesake against optax itself.

Each test runs fnlm's transformation and optax's on the same 100 random gradient trees (float32
leaves of four shapes, scales varying over two decades) from the same params, each applying its own
updates to its own params, and compares the updates, the states (leaf by leaf: counts exactly,
tensors to tolerance) and the params at every step with
`torch.testing.assert_close(ours, optax's, rtol=1e-6, atol=1e-6 * max|optax's|)`.

optax runs with `jax_enable_x64` (the arrays stay float32). Without it optax evaluates the bias
corrections `1 - b**t` in float32: at t = 1 with b2 = 0.999, `1 - 0.999` in float32 is 1.3e-5
relative away from 0.001, and Adam's update inherits half of that; torch's optimizers and fnlm
compute these scalars in float64 (Python floats) and round only the result to float32, which optax
also does with x64 on (`(1 - b**t).astype(float32)`). With x64 the two agree to float32 rounding
(a few 1e-7 relative).
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fnlm  # noqa: E402
from fnlm import optim  # noqa: E402
from tests.optim.helpers import SHAPES, Worst, random_tree, run_both, to_jax  # noqa: E402

MASK = {"a": {"b": False, "w": True}, "c": [True, False], "d": True}
PREFIX_MASK = {"a": False, "c": True, "d": True}


def _jit(tx):
    """optax's transformation with its update compiled (fast; the same arithmetic)."""
    return optax.GradientTransformation(tx.init, jax.jit(tx.update))


def _check(ours, theirs, **kw):
    worst = run_both(ours, _jit(theirs), **kw)
    print(f"worst relative difference {worst:.3g}")
    return worst


def test_chain():
    _check(optim.chain(optim.clip_by_global_norm(3.0), optim.scale_by_adam(), optim.add_decayed_weights(0.01),
                       optim.scale_by_learning_rate(1e-2)),
           optax.chain(optax.clip_by_global_norm(3.0), optax.scale_by_adam(), optax.add_decayed_weights(0.01),
                       optax.scale_by_learning_rate(1e-2)))


def test_chain_of_nothing_and_of_one():
    """optax's `chain()` of nothing fails to build (it unpacks an empty zip); fnlm's is the identity."""
    with pytest.raises(ValueError):
        optax.chain()
    _check(optim.chain(), optax.identity(), steps=3)
    _check(optim.chain(optim.trace(0.5)), optax.chain(optax.trace(0.5)), steps=20)


@pytest.mark.parametrize("kw", [{}, {"nesterov": True}, {"eps_root": 1e-8}, {"b1": 0.8, "b2": 0.95, "eps": 1e-6},
                                {"mu_dtype": "bfloat16"}, {"mu_dtype": "bfloat16", "nesterov": True}])
def test_scale_by_adam(kw):
    ours_kw = dict(kw, mu_dtype=torch.bfloat16) if "mu_dtype" in kw else kw
    theirs_kw = dict(kw, mu_dtype=jnp.bfloat16) if "mu_dtype" in kw else kw
    _check(optim.scale_by_adam(**ours_kw), optax.scale_by_adam(**theirs_kw))


@pytest.mark.parametrize("kw", [{}, {"b1": 0.5, "b2": 0.9}])
def test_scale_by_lion(kw):
    _check(optim.scale_by_lion(**kw), optax.scale_by_lion(**kw))


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace(nesterov):
    _check(optim.trace(0.9, nesterov), optax.trace(0.9, nesterov))


def test_trace_in_bfloat16():
    _check(optim.trace(0.9, True, torch.bfloat16), optax.trace(0.9, True, jnp.bfloat16))


def test_scale_by_lion_in_bfloat16():
    _check(optim.scale_by_lion(mu_dtype=torch.bfloat16), optax.scale_by_lion(mu_dtype=jnp.bfloat16))


def _predicate(name, leaf):
    return leaf.ndim >= 2


def _optax_mask_fn(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _fnlm_mask_fn(params):
    return fnlm.tree_map(lambda x: x.ndim >= 2, params)


@pytest.mark.parametrize("form", ["none", "tree", "prefix", "predicate", "optax_fn"])
def test_add_decayed_weights_mask_forms(form):
    ours_mask, theirs_mask = {"none": (None, None), "tree": (MASK, MASK), "prefix": (PREFIX_MASK, PREFIX_MASK),
                              "predicate": (_predicate, _optax_mask_fn),
                              "optax_fn": (_fnlm_mask_fn, _optax_mask_fn)}[form]
    _check(optim.chain(optim.add_decayed_weights(0.3, ours_mask), optim.scale(-0.05)),
           optax.chain(optax.add_decayed_weights(0.3, theirs_mask), optax.scale(-0.05)))


def test_add_decayed_weights_with_a_schedule():
    _check(optim.chain(optim.add_decayed_weights(lambda count: 0.5 / (1 + count)), optim.scale(-0.05)),
           optax.chain(optax.add_decayed_weights(lambda count: 0.5 / (1 + count)), optax.scale(-0.05)))


def test_scale_by_learning_rate_float():
    _check(optim.scale_by_learning_rate(3e-3), optax.scale_by_learning_rate(3e-3))
    _check(optim.scale_by_learning_rate(3e-3, flip_sign=False), optax.scale_by_learning_rate(3e-3, flip_sign=False),
           steps=10)


def test_warmup_cosine_schedule_equals_optax():
    """fnlm's `decay_steps` is the count at which the cosine ends, as optax's (the total, warm-up
    included): `warmup_cosine_schedule(peak, end, w, d)` is `warmup_cosine_decay_schedule(0, peak, w, d, end)`."""
    ours = optim.warmup_cosine_schedule(1e-2, 1e-3, 10, 80)
    theirs = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 80, 1e-3)
    for t in range(120):
        assert abs(ours(t) - float(theirs(t))) <= 1e-12, t
        assert abs(float(ours(torch.tensor(t))) - float(theirs(t))) <= 1e-12, t


def test_scale_by_learning_rate_schedule():
    _check(optim.scale_by_learning_rate(optim.warmup_cosine_schedule(1e-2, 1e-3, 10, 80)),
           optax.scale_by_learning_rate(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 80, 1e-3)))


@pytest.mark.parametrize("max_norm", [0.5, 4.0, 1e3])
def test_clip_by_global_norm(max_norm):
    _check(optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm))


@pytest.mark.parametrize("form", ["tree", "prefix", "optax_fn", "predicate"])
def test_masked(form):
    ours_mask, theirs_mask = {"tree": (MASK, MASK), "prefix": (PREFIX_MASK, PREFIX_MASK),
                              "optax_fn": (_fnlm_mask_fn, _optax_mask_fn),
                              "predicate": (_predicate, _optax_mask_fn)}[form]
    _check(optim.masked(optim.chain(optim.scale_by_adam(), optim.scale(-0.01)), ours_mask),
           optax.masked(optax.chain(optax.scale_by_adam(), optax.scale(-0.01)), theirs_mask))


LABELS = {"a": {"b": "sgd", "w": "adam"}, "c": ["adam", "frozen"], "d": "adam"}


def _optax_labels(params):
    return jax.tree.map(lambda x: "adam" if x.ndim >= 2 else "sgd", params)


@pytest.mark.parametrize("form", ["tree", "prefix", "function", "optax_fn"])
@pytest.mark.parametrize("name", ["multi_transform", "partition"])
def test_multi_transform(form, name):
    ours_labels, theirs_labels = {
        "tree": (LABELS, LABELS), "prefix": ({"a": "sgd", "c": "adam", "d": "frozen"},) * 2,
        "function": (lambda n, leaf: "adam" if leaf.ndim >= 2 else "sgd", _optax_labels),
        "optax_fn": (lambda p: fnlm.tree_map(lambda x: "adam" if x.ndim >= 2 else "sgd", p), _optax_labels)}[form]
    ours = getattr(optim, name)({"adam": optim.adamw(1e-2, weight_decay=0.1), "frozen": optim.set_to_zero(),
                                 "sgd": optim.sgd(0.1, 0.9)}, ours_labels)
    theirs = getattr(optax, name)({"adam": optax.adamw(1e-2, weight_decay=0.1), "frozen": optax.set_to_zero(),
                                   "sgd": optax.sgd(0.1, 0.9)}, theirs_labels)
    _check(ours, theirs, steps=60)


@pytest.mark.parametrize("k, mean", [(1, True), (3, True), (3, False), (4, True)])
def test_multi_steps(k, mean):
    ours = optim.MultiSteps(optim.adamw(1e-2, weight_decay=0.1), k, use_grad_mean=mean).gradient_transformation()
    theirs = optax.MultiSteps(optax.adamw(1e-2, weight_decay=0.1), k, use_grad_mean=mean).gradient_transformation()
    _check(ours, theirs)


def test_multi_steps_with_a_schedule_of_k():
    every = lambda step: 1 + step % 3  # noqa: E731
    ours = optim.MultiSteps(optim.sgd(0.05, 0.9), every).gradient_transformation()
    theirs = optax.MultiSteps(optax.sgd(0.05, 0.9), every).gradient_transformation()
    _check(ours, theirs)


def test_identity_scale_set_to_zero():
    _check(optim.identity(), optax.identity(), steps=10)
    _check(optim.scale(-0.3), optax.scale(-0.3), steps=10)
    _check(optim.set_to_zero(), optax.set_to_zero(), steps=10)


def test_apply_updates():
    params, updates = random_tree(1), random_tree(2, 1e-2)
    worst = Worst()
    ours = fnlm.tree_leaves(optim.apply_updates(params, updates))
    theirs = jax.tree.leaves(optax.apply_updates(to_jax(params), to_jax(updates)))
    for a, b in zip(ours, theirs):
        worst.close(a, b, "apply_updates")
    assert worst.value == 0.0  # one float32 addition: bitwise


@pytest.mark.parametrize("mask", [None, MASK])
@pytest.mark.parametrize("kw", [{}, {"nesterov": True}, {"b1": 0.8, "b2": 0.95, "eps": 1e-6, "weight_decay": 0.3}])
def test_adamw_update_path(mask, kw):
    _check(optim.adamw(3e-3, mask=mask, **kw), optax.adamw(3e-3, mask=mask, **kw))


@pytest.mark.parametrize("mask", [None, MASK])
@pytest.mark.parametrize("schedule", [False, True])
def test_adamw_fused_apply_path(mask, schedule):
    """The fused `apply` (torch's fused AdamW kernel) computes `p (1 - lr wd) - (lr / bc1) m /
    (sqrt(v) / sqrt(bc2) + eps)`, torch's arrangement of optax's update: each step rounds
    differently, so two independent trajectories drift apart by about a rounding per step (1.35e-6
    relative to the largest param after 70 steps here). The params are therefore compared one step
    at a time from the same params; the moments keep their own trajectories over the 100 steps (the
    kernel's `lerp` for the first moment rounds unlike optax's `(1 - b1) g + b1 m`: the largest
    difference, 9.6e-7 of the largest moment, is there)."""
    lr = optim.warmup_cosine_schedule(1e-2, 1e-3, 10, 80) if schedule else 3e-3
    jlr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 80, 1e-3) if schedule else 3e-3
    ours = optim.adamw(lr, weight_decay=0.2, mask=mask)
    assert ours.apply is not None
    _check(ours, optax.adamw(jlr, weight_decay=0.2, mask=mask), fused=True, resync=True)


@pytest.mark.parametrize("momentum, nesterov", [(None, False), (0.9, False), (0.9, True)])
def test_sgd(momentum, nesterov):
    _check(optim.sgd(0.05, momentum, nesterov), optax.sgd(0.05, momentum, nesterov))


def test_sgd_with_a_schedule():
    _check(optim.sgd(optim.warmup_cosine_schedule(0.1, 0.01, 5, 50), 0.9),
           optax.sgd(optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, 50, 0.01), 0.9))


@pytest.mark.parametrize("mask", [None, MASK])
def test_lion(mask):
    _check(optim.lion(1e-3, weight_decay=0.1, mask=mask), optax.lion(1e-3, weight_decay=0.1, mask=mask))


def test_the_comparison_can_fail():
    """The harness notices a difference of 1e-5 relative (a wrong b2), so the passes above mean something."""
    with pytest.raises(AssertionError):
        _check(optim.scale_by_adam(b2=0.999), optax.scale_by_adam(b2=0.99899), steps=5)


def test_shapes_used():
    assert len(fnlm.tree_leaves(random_tree(0, shapes=SHAPES))) == 5
