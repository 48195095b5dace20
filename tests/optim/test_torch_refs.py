"""The AdamW aliases against torch: `adamw` (optax's form) against `torch.optim.AdamW`, and
`adamw_cs336` against `fnlm.adamw_step` (CS336's Algorithm 2, itself checked against torch in
`tests/test_optim.py`)."""

from __future__ import annotations

import pytest
import torch

import fnlm
from fnlm import optim
from tests.optim.helpers import grad_stream, random_tree


def _matrices_only(name, leaf):
    return leaf.ndim >= 2


@pytest.mark.parametrize("path", ["fused apply", "update"])
@pytest.mark.parametrize("masked", [False, True])
def test_adamw_equals_torch_adamw_over_50_steps(path, masked):
    """float32, 50 steps, each side on its own trajectory; `torch.optim.AdamW` with two param groups
    (decay / no decay) for the mask. Asserted: `rtol=1e-6, atol=1e-6 * max|torch's|` per leaf."""
    params = random_tree(0)
    flat = fnlm.tree_flatten(params)
    leaves = {n: torch.nn.Parameter(p.clone()) for n, p in flat.items()}
    decays = {n: not masked or p.ndim >= 2 for n, p in flat.items()}
    opt = torch.optim.AdamW([{"params": [leaves[n] for n in flat if decays[n]]},
                             {"params": [leaves[n] for n in flat if not decays[n]], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tx = optim.adamw(3e-3, 0.9, 0.95, 1e-8, weight_decay=0.1, mask=_matrices_only if masked else None)
    assert tx.apply is not None
    state = tx.init(params)
    for grads in grad_stream(50):
        for n, g in fnlm.tree_flatten(grads).items():
            leaves[n].grad = g.clone()
        opt.step()
        if path == "update":
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        else:
            params, state = optim.optimizer_step(tx, params, state, grads)
    ours = fnlm.tree_flatten(params)
    for n, p in leaves.items():
        torch.testing.assert_close(ours[n], p.detach(), rtol=1e-6, atol=1e-6 * float(p.detach().abs().max()), msg=n)
        torch.testing.assert_close(fnlm.tree_flatten(state[0]["mu"])[n], opt.state[p]["exp_avg"], rtol=1e-6,
                                   atol=1e-6 * float(opt.state[p]["exp_avg"].abs().max()))
    assert state[0]["count"] == 50


@pytest.mark.parametrize("mask", [None, fnlm.default_decay_mask])
@pytest.mark.parametrize("schedule", [False, True])
def test_adamw_cs336_apply_is_adamw_step_bitwise(mask, schedule):
    lr = optim.warmup_cosine_schedule(1e-2, 1e-3, 5, 30) if schedule else 3e-3
    tx = optim.adamw_cs336(lr, 0.9, 0.95, 1e-8, 0.1, mask)
    params = ref = {"token_embeddings": {"weight": torch.randn(7, 4)}, "lm_head": {"weight": torch.randn(7, 4)},
                    "ln": {"weight": torch.randn(4)}}
    state, ref_state = tx.init(params), fnlm.adamw_init(ref)
    for t, grads in enumerate(grad_stream(40, shapes={"token_embeddings": {"weight": (7, 4)},
                                                      "lm_head": {"weight": (7, 4)}, "ln": {"weight": (4,)}})):
        params, state = optim.optimizer_step(tx, params, state, grads)
        rate = lr(t) if schedule else lr
        ref, ref_state = fnlm.adamw_step(ref, ref_state, grads, lr=rate, betas=(0.9, 0.95), eps=1e-8,
                                         weight_decay=0.1, decay_mask=mask)
    for a, b in zip(fnlm.tree_leaves((params, state)), fnlm.tree_leaves((ref, ref_state))):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_adamw_cs336_update_plus_apply_updates_equals_its_apply():
    tx = optim.adamw_cs336(3e-3, weight_decay=0.1)
    params = fused = random_tree(0)
    state = fused_state = tx.init(params)
    for grads in grad_stream(40):
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        fused, fused_state = tx.apply(grads, fused_state, fused)
    for a, b in zip(fnlm.tree_leaves(params), fnlm.tree_leaves(fused)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    for a, b in zip(fnlm.tree_leaves(state), fnlm.tree_leaves(fused_state)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # the moments do not see the params


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_with_decay_equals_torch_sgd(momentum, nesterov):
    """`build_optimizer`'s SGD: `chain(add_decayed_weights(wd), sgd(lr, momentum))` is `torch.optim.SGD`
    with L2 decay and dampening 0."""
    params = random_tree(0)
    leaves = [torch.nn.Parameter(p.clone()) for p in fnlm.tree_leaves(params)]
    opt = torch.optim.SGD(leaves, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    tx = optim.chain(optim.add_decayed_weights(0.01), optim.sgd(0.05, momentum or None, nesterov))
    state = tx.init(params)
    for grads in grad_stream(30):
        for p, g in zip(leaves, fnlm.tree_leaves(grads)):
            p.grad = g.clone()
        opt.step()
        params, state = optim.optimizer_step(tx, params, state, grads)
    for a, p in zip(fnlm.tree_leaves(params), leaves):
        torch.testing.assert_close(a, p.detach(), rtol=1e-6, atol=1e-6 * float(p.detach().abs().max()))
