"""`fnlm.optim.muon` against `torch.optim.Muon` (and `torch.optim.AdamW` for the other leaves).

Tolerances. fnlm's Newton–Schulz iteration is torch's op for op (bfloat16 `addmm`s in the same
order), so on the CPU the fused `apply` path, which also updates the params as torch does
(`p.mul_(1 - lr wd).add_(O, alpha=-lr r)`), gives torch's params bit for bit: the tests assert
equality over 50 steps. The `update` + `apply_updates` path computes `p + (-lr) (r O + wd p)`, the
same update re-associated in float32, so it differs by a few float32 roundings of the params per
step: asserted below 4 ulps of `max|p|` per step (over 50 independent steps), and below 1e-6 of
`max|p|` in one step from the same params. The bfloat16 iteration matters where the order of its
operations differs (under `torch.func.vmap`, see `test_vmap.py`): there the directions differ by a
few bfloat16 ulps, which the iteration's polynomial amplifies for small singular values.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

import fnlm
from fnlm import optim

SHAPES = {"square": (12, 12), "tall": (20, 8), "wide": (8, 24)}
ULP = 2.0**-23


def _matrices(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (33, 33), (64, 20)])
def test_newton_schulz_is_torchs_bitwise(shape):
    x = torch.randn(*shape)
    ours = optim.orthogonalize_via_newton_schulz(x)
    theirs = _zeropower_via_newtonschulz(x, optim.NS_COEFFS, 5, 1e-7)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    singular = torch.linalg.svdvals(ours.float())  # Muon's "roughly orthogonal": most in (0.5, 1.5)
    assert float(singular.max()) < 1.5 and float((singular > 0.5).float().mean()) >= 0.9


def _run(nesterov: bool, adjust_lr_fn, fused: bool, steps: int = 50):
    params = _matrices(0)
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Muon(torch_params.values(), lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                           adjust_lr_fn=adjust_lr_fn)
    tx = optim.muon(0.02, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn, weight_decay=0.1, beta=0.95)
    state = tx.init(params)
    per_step = 0.0
    for t in range(steps):
        grads = _matrices(100 + t)
        for k, p in torch_params.items():
            p.grad = grads[k].clone()
        before = {k: p.detach().clone() for k, p in torch_params.items()}
        opt.step()
        if fused:
            params, state = optim.optimizer_step(tx, params, state, grads)
        else:
            one, _ = tx.update(grads, state, before)
            one = optim.apply_updates(before, one)
            per_step = max(per_step, max(float((one[k] - p.detach()).abs().max() / p.detach().abs().max())
                                         for k, p in torch_params.items()))
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
    buffers = {k: opt.state[p]["momentum_buffer"] for k, p in torch_params.items()}
    return params, state, {k: p.detach() for k, p in torch_params.items()}, buffers, per_step


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_fused_path_equals_torch_muon_bitwise_over_50_steps(nesterov, adjust_lr_fn):
    params, state, theirs, buffers, _ = _run(nesterov, adjust_lr_fn, fused=True)
    mu = state["inner_states"]["muon"][0]["mu"]
    for k in SHAPES:
        assert torch.equal(params[k], theirs[k]), k
        assert torch.equal(mu[k], buffers[k]), k
    assert not torch.equal(params["square"], _matrices(0)["square"])


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_update_path_equals_torch_muon_to_float32_rounding(nesterov, adjust_lr_fn):
    params, state, theirs, buffers, per_step = _run(nesterov, adjust_lr_fn, fused=False)
    assert per_step <= 1e-6
    for k in SHAPES:
        scale = float(theirs[k].abs().max())
        torch.testing.assert_close(params[k], theirs[k], rtol=0, atol=50 * 4 * ULP * scale, msg=k)
        assert torch.equal(state["inner_states"]["muon"][0]["mu"][k], buffers[k])


CONFIG = fnlm.TransformerConfig(vocab_size=37, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24)


def test_muon_alias_on_a_transformer_equals_torch_muon_and_adamw():
    """Muon on the attention and feed-forward matrices, AdamW (its own rate) on the embeddings, the
    LM head and the RMSNorm gains: `torch.optim.Muon` + `torch.optim.AdamW` on those two groups."""
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    flat = fnlm.tree_flatten(params)
    hidden = [n for n, p in flat.items() if optim.hidden_matrix_mask(n, p)]
    assert sorted(hidden) == sorted(n for n in flat if ".attn." in n or ".ffn." in n)
    leaves = {n: torch.nn.Parameter(p.clone()) for n, p in flat.items()}
    muon = torch.optim.Muon([leaves[n] for n in hidden], lr=0.02, weight_decay=0.1, momentum=0.9)
    adam = torch.optim.AdamW([p for n, p in leaves.items() if n not in hidden], lr=3e-3, betas=(0.9, 0.95),
                             eps=1e-8, weight_decay=0.1)
    tx = optim.muon(0.02, beta=0.9, weight_decay=0.1, adam_b1=0.9, adam_b2=0.95, adam_learning_rate=3e-3)
    state = tx.init(params)
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        grads = {n: torch.randn(p.shape, generator=g) for n, p in flat.items()}
        for n, p in leaves.items():
            p.grad = grads[n].clone()
        muon.step()
        adam.step()
        params, state = optim.optimizer_step(tx, params, state, fnlm.tree_unflatten(grads))
    ours = fnlm.tree_flatten(params)
    for n, p in leaves.items():
        if n in hidden:
            assert torch.equal(ours[n], p.detach()), n
        else:
            scale = float(p.detach().abs().max())
            torch.testing.assert_close(ours[n], p.detach(), rtol=1e-6, atol=1e-6 * scale, msg=n)
    assert sorted(fnlm.tree_flatten(state["inner_states"]["muon"][0]["mu"])) == sorted(hidden)


def test_train_step_with_optimizer_muon_uses_adam_eps_for_adamw():
    """`StepConfig(optimizer="muon")`: `eps` is AdamW's epsilon (`adam_eps`), not the Newton–Schulz floor."""
    config = fnlm.StepConfig(lr=1e-2, warmup_steps=0, cosine_steps=10, optimizer="muon", eps=1e-3)
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    state = fnlm.init_train_state(params, config)
    x, y = torch.randint(0, 37, (2, 8)), torch.randint(0, 37, (2, 8))

    def loss_fn(p, xb, yb):
        return fnlm.cross_entropy(fnlm.transformer_lm(p, xb, CONFIG), yb)

    new, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config)
    _, grads = fnlm.value_and_grad(loss_fn)(params, x, y)
    grads = fnlm.clip_grad_norm(grads, config.grad_clip)
    expected, _ = optim.optimizer_step(
        optim.muon(fnlm.train.lr_schedule(config), beta=0.95, weight_decay=0.1, adam_b1=0.9, adam_b2=0.95,
                   adam_eps=1e-3), params, state.opt_state, grads)
    for n, p in fnlm.tree_flatten(expected).items():
        torch.testing.assert_close(fnlm.tree_flatten(new.params)[n], p, rtol=1e-6, atol=1e-7, msg=n)


def test_muon_input_errors():
    with pytest.raises(ValueError, match="layers.0.ln1.weight"):
        tx = optim.muon(0.02, muon_mask=lambda name, leaf: "ln1" in name or leaf.ndim == 2)
        params = fnlm.init_transformer_lm(CONFIG, seed=0)
        tx.update(fnlm.tree_map(torch.ones_like, params), tx.init(params), params)
    with pytest.raises(ValueError, match="ns_steps"):
        optim.muon(0.02, ns_steps=100)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        optim.muon(0.02, adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="ns_coeffs"):
        optim.scale_by_muon(ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="beta"):
        optim.muon(0.02, beta=1.0)
    with pytest.raises(ValueError, match="scale_by_muon's state"):
        tx = optim.scale_by_muon()
        tx.update(_matrices(0), {"trace": {}}, None)
