"""AdamW / SGD against torch.optim, purity, decay masks, the cosine schedule, gradient clipping."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm.autodiff import value_and_grad
from tests.adapters import get_adamw_cls, run_get_lr_cosine_schedule, run_gradient_clipping

STEPS = 50


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _data(steps: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps, 8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (steps, 8), generator=g)


def _compare_with_torch(lr, wd, eps, *, emulate=False, betas=(0.9, 0.999)):
    """Run fnlm.adamw_step and torch.optim.AdamW side by side; return the max |param difference|.

    With `emulate`, torch's group hyper-parameters are re-set before each step so that, in exact
    arithmetic, torch computes exactly fnlm's (the assignment's) update; see the test docstring.
    """
    model = _model()
    params = fnlm.tree_unflatten({k: v.detach().clone() for k, v in model.state_dict().items()})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    state = fnlm.adamw_init(params)
    xs, ys = _data()

    def loss_fn(p, x, y):
        out = torch.func.functional_call(model, fnlm.tree_flatten(p), (x,))
        return fnlm.cross_entropy(out, y)

    for t in range(1, STEPS + 1):
        if emulate:
            group = opt.param_groups[0]
            group["lr"] = lr * (1 - lr * wd)
            group["weight_decay"] = wd / (1 - lr * wd)
            group["eps"] = eps / math.sqrt(1 - betas[1] ** t)
        opt.zero_grad()
        fnlm.cross_entropy(model(xs[t - 1]), ys[t - 1]).backward()
        opt.step()
        _, grads = value_and_grad(loss_fn)(params, xs[t - 1], ys[t - 1])
        params, state = fnlm.adamw_step(params, state, grads, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    flat = fnlm.tree_flatten(params)
    assert state["step"] == STEPS
    return max((flat[k] - v).abs().max().item() for k, v in model.state_dict().items())


def test_adamw_matches_torch_adamw_over_50_steps():
    """fnlm.adamw_step (the handout's Algorithm 2) vs torch.optim.AdamW, 50 steps, float64.

    The two differ in exact arithmetic, at second order, in two places:

    1. Decay ordering. torch decays first, `p <- p (1 - lr wd)`, then takes the Adam step from the
       decayed p. The handout takes the Adam step, then decays the *updated* p:
       `p <- (p - a_t u)(1 - lr wd)`. The Adam step is thus shrunk by `(1 - lr wd)` as well, a
       difference of `lr * wd * a_t * u` per step. They are *not* equal in exact arithmetic
       (unless lr * wd == 0); they coincide with torch run at lr' = lr (1 - lr wd) and
       wd' = wd / (1 - lr wd).
    2. Epsilon. torch divides by `sqrt(v) / sqrt(1 - b2^t) + eps`; the handout folds the bias
       correction into a_t and divides by `sqrt(v) + eps`, i.e. torch with eps' = eps / sqrt(1 - b2^t).

    With lr = 1e-3, wd = 0.01 both effects are ~1e-9..1e-8 per step, so after 50 steps the params
    agree to an absolute tolerance of 3e-6 (measured ~9e-7, dominated by the epsilon term in the
    first steps where sqrt(1 - b2^t) ~ 0.03). With eps = 0 and wd = 0 the two are identical in
    exact arithmetic and agree to 1e-12. With torch's hyper-parameters re-set each step to the
    equivalents above, they agree to 1e-12 even at lr * wd = 0.025, where the plain comparison
    is off by ~1e-4 -- which shows that these two differences are the only ones.
    """
    assert _compare_with_torch(1e-3, 0.01, 1e-8) < 3e-6
    assert _compare_with_torch(1e-3, 0.0, 0.0) < 1e-12
    plain = _compare_with_torch(5e-2, 0.5, 1e-3)
    emulated = _compare_with_torch(5e-2, 0.5, 1e-3, emulate=True)
    assert plain > 1e-5
    assert emulated < 1e-12


def _cs336_optimize(opt_class) -> torch.Tensor:
    torch.manual_seed(42)
    model = torch.nn.Linear(3, 2, bias=False)
    opt = opt_class(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(1000):
        opt.zero_grad()
        x = torch.rand(model.in_features)
        y = torch.tensor([x[0] + x[1], -x[2]])
        ((y - model(x)) ** 2).sum().backward()
        opt.step()
    return model.weight.detach()


def test_adamw_optimizer_shim_matches_torch_like_the_assignment():
    """The CS336 check: 1000 steps of a 3->2 linear map, atol 1e-4 against torch.optim.AdamW."""
    torch.testing.assert_close(_cs336_optimize(get_adamw_cls()), _cs336_optimize(torch.optim.AdamW), atol=1e-4, rtol=0)


def test_adamw_shim_equals_pure_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = fnlm.tree_unflatten({k: v.detach().clone() for k, v in model.state_dict().items()})
    state = fnlm.adamw_init(params)
    opt = get_adamw_cls()(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(2, 4)
        opt.zero_grad()
        model(x).square().sum().backward()
        grads = {"weight": model.weight.grad.clone(), "bias": model.bias.grad.clone()}
        opt.step()
        params, state = fnlm.adamw_step(params, state, grads, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(model.weight.detach(), params["weight"], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[model.bias]["v"], state["v"]["bias"], rtol=0, atol=0)
    assert opt.state[model.bias]["step"] == 5


def _tree():
    g = torch.Generator().manual_seed(3)
    return {
        "token_embeddings": {"weight": torch.randn(10, 4, generator=g)},
        "layers": [{"ffn": {"w1": {"weight": torch.randn(6, 4, generator=g)}}, "ln1": {"weight": torch.ones(4)}}],
        "lm_head": {"weight": torch.randn(10, 4, generator=g)},
    }


def _snapshot(tree):
    return {k: (v.clone(), v.data_ptr()) for k, v in fnlm.tree_flatten(tree).items() if isinstance(v, torch.Tensor)}


def _assert_unchanged(tree, snap):
    flat = fnlm.tree_flatten(tree)
    assert snap.keys() <= flat.keys()
    for k, (value, ptr) in snap.items():
        assert torch.equal(flat[k], value) and flat[k].data_ptr() == ptr, k


@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_steps_are_pure(which):
    params = fnlm.tree_map(lambda t: t.requires_grad_(), _tree())
    grads = fnlm.tree_map(lambda t: torch.randn_like(t), params)
    init, step = (fnlm.adamw_init, fnlm.adamw_step) if which == "adamw" else (fnlm.sgd_init, fnlm.sgd_step)
    state = init(params)
    new_params, state = step(params, state, grads, lr=0.1, weight_decay=0.1)
    before = [_snapshot(t) for t in (params, grads, state)]
    before_step = state["step"]
    newer, new_state = step(params, state, grads, lr=0.1, weight_decay=0.1)
    for tree, snap in zip((params, grads, state), before):
        _assert_unchanged(tree, snap)
    assert state["step"] == before_step and new_state["step"] == before_step + 1
    new_ptrs = {v.data_ptr() for v in fnlm.tree_leaves(newer)}
    assert not new_ptrs & {p for _, p in before[0].values()}
    for leaf in fnlm.tree_leaves(newer) + fnlm.tree_leaves(new_state):
        if isinstance(leaf, torch.Tensor):
            assert not leaf.requires_grad and leaf.grad_fn is None


def test_adamw_state_is_weights_only_storable():
    params = _tree()
    state = fnlm.adamw_init(params)
    grads = fnlm.tree_map(torch.randn_like, params)
    _, state = fnlm.adamw_step(params, state, grads, lr=1e-3)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["step"] == 1
    for k, v in fnlm.tree_flatten(state).items():
        assert torch.equal(fnlm.tree_flatten(loaded)[k], v) if isinstance(v, torch.Tensor) else v == fnlm.tree_flatten(loaded)[k]


@pytest.mark.parametrize("mask_kind", ["tree", "predicate"])
def test_decay_mask(mask_kind):
    params = _tree()
    grads = fnlm.tree_map(torch.randn_like, params)
    if mask_kind == "tree":
        mask = fnlm.tree_map_with_path(lambda name, leaf: fnlm.default_decay_mask(name, leaf), params)
    else:
        mask = fnlm.default_decay_mask
    decayed, _ = fnlm.adamw_step(params, fnlm.adamw_init(params), grads, lr=0.1, weight_decay=0.5, decay_mask=mask)
    plain, _ = fnlm.adamw_step(params, fnlm.adamw_init(params), grads, lr=0.1, weight_decay=0.0)
    full, _ = fnlm.adamw_step(params, fnlm.adamw_init(params), grads, lr=0.1, weight_decay=0.5)
    d, p, f = (fnlm.tree_flatten(t) for t in (decayed, plain, full))
    for name in ("token_embeddings.weight", "layers.0.ln1.weight"):
        assert torch.equal(d[name], p[name]) and not torch.equal(d[name], f[name])
    for name in ("layers.0.ffn.w1.weight", "lm_head.weight"):
        assert torch.equal(d[name], f[name])
        torch.testing.assert_close(d[name], p[name] * (1 - 0.1 * 0.5))


def test_optimizer_input_errors():
    params = _tree()
    state = fnlm.adamw_init(params)
    grads = fnlm.tree_map(torch.randn_like, params)
    with pytest.raises(ValueError, match="lr"):
        fnlm.adamw_step(params, state, grads, lr=-1.0)
    with pytest.raises(ValueError, match="beta2"):
        fnlm.adamw_step(params, state, grads, lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="grads does not mirror params"):
        fnlm.adamw_step(params, state, {"lm_head": grads["lm_head"]}, lr=1e-3)
    bad = fnlm.tree_map(torch.randn_like, params)
    bad["lm_head"]["weight"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match="lm_head.weight"):
        fnlm.adamw_step(params, state, bad, lr=1e-3)
    with pytest.raises(ValueError, match="state"):
        fnlm.adamw_step(params, {"m": state["m"]}, grads, lr=1e-3)
    with pytest.raises(ValueError, match="decay_mask"):
        fnlm.adamw_step(params, state, grads, lr=1e-3, decay_mask={"lm_head": {"weight": True}})


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_sgd_matches_torch_sgd(wd):
    model = _model()
    params = fnlm.tree_unflatten({k: v.detach().clone() for k, v in model.state_dict().items()})
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=wd)
    state = fnlm.sgd_init(params)
    xs, ys = _data(10)

    def loss_fn(p, x, y):
        return fnlm.cross_entropy(torch.func.functional_call(model, fnlm.tree_flatten(p), (x,)), y)

    for x, y in zip(xs, ys):
        opt.zero_grad()
        fnlm.cross_entropy(model(x), y).backward()
        opt.step()
        _, grads = value_and_grad(loss_fn)(params, x, y)
        params, state = fnlm.sgd_step(params, state, grads, lr=0.05, weight_decay=wd)
    flat = fnlm.tree_flatten(params)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(flat[k], v, rtol=1e-12, atol=1e-12)


def test_sgd_inverse_sqrt_rate():
    """The handout's example SGD: p_{t+1} = p_t - lr / sqrt(t + 1) * g_t, t = 0, 1, 2, ..."""
    params = {"w": torch.tensor([1.0], dtype=torch.float64)}
    state = fnlm.sgd_init(params)
    grads = {"w": torch.tensor([1.0], dtype=torch.float64)}
    for _ in range(4):
        params, state = fnlm.sgd_step(params, state, grads, lr=1.0, inverse_sqrt=True)
    expected = 1.0 - (1 + 1 / math.sqrt(2) + 1 / math.sqrt(3) + 1 / 2)
    assert params["w"].item() == pytest.approx(expected, abs=1e-15)
    assert state["step"] == 4


def test_cosine_schedule_known_points():
    args = dict(max_lr=1.0, min_lr=0.1, warmup_iters=7, cosine_cycle_iters=21)
    assert fnlm.cosine_schedule(0, **args) == 0.0
    assert fnlm.cosine_schedule(1, **args) == pytest.approx(1 / 7)
    assert fnlm.cosine_schedule(7, **args) == pytest.approx(1.0)
    assert fnlm.cosine_schedule(14, **args) == pytest.approx(0.55)
    assert fnlm.cosine_schedule(21, **args) == pytest.approx(0.1)
    assert fnlm.cosine_schedule(1000, **args) == 0.1
    assert run_get_lr_cosine_schedule(14, 1, 0.1, 7, 21) == pytest.approx(0.55)
    assert fnlm.cosine_schedule(5, 1.0, 0.1, 5, 5) == 1.0
    with pytest.raises(ValueError):
        fnlm.cosine_schedule(3, 1.0, 0.1, 10, 5)
    with pytest.raises(ValueError):
        fnlm.cosine_schedule(-1, 1.0, 0.1, 1, 5)


def test_cosine_phase_matches_torch_cosine_annealing():
    warmup, cycle, max_lr, min_lr = 5, 45, 3e-3, 3e-5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cycle - warmup, eta_min=min_lr)
    for t in range(warmup, cycle + 1):
        assert fnlm.cosine_schedule(t, max_lr, min_lr, warmup, cycle) == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
        opt.step()
        sched.step()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 50), st.integers(0, 200), st.floats(1e-6, 1.0), st.floats(0.0, 1.0))
def test_cosine_schedule_shape(warmup, extra, max_lr, frac):
    cycle, min_lr = warmup + extra, max_lr * frac
    lrs = [fnlm.cosine_schedule(t, max_lr, min_lr, warmup, cycle) for t in range(cycle + 5)]
    assert all(0.0 <= lr <= max_lr * (1 + 1e-12) for lr in lrs)
    assert all(a <= b + 1e-15 for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    assert lrs[warmup] == pytest.approx(max_lr) and lrs[-1] == pytest.approx(min_lr)


@pytest.mark.parametrize("max_norm", [1e-2, 1.0, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    grads = {"a": [torch.randn(5, 5), torch.randn(3)], "b": torch.randn(2, 7) * 10}
    snap = _snapshot(grads)
    clipped, norm = fnlm.clip_grad_norm_with_norm(grads, max_norm)
    _assert_unchanged(grads, snap)
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in fnlm.tree_leaves(grads)]
    for p, g in zip(ref, fnlm.tree_leaves(grads)):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    torch.testing.assert_close(fnlm.global_norm(grads), ref_norm)
    for ours, p in zip(fnlm.tree_leaves(clipped), ref):
        torch.testing.assert_close(ours, p.grad)
    for ours, p in zip(fnlm.tree_leaves(fnlm.clip_grad_norm(grads, max_norm)), ref):
        torch.testing.assert_close(ours, p.grad)
    assert fnlm.global_norm(clipped).item() <= max_norm * (1 + 1e-5)


def test_clip_grad_norm_low_precision():
    grads = {"w": (torch.randn(64, 64) * 300).bfloat16()}
    clipped, norm = fnlm.clip_grad_norm_with_norm(grads, 1.0)
    assert norm.dtype == torch.float32 and clipped["w"].dtype == torch.bfloat16
    torch.testing.assert_close(norm, grads["w"].float().norm())
    assert fnlm.global_norm(clipped).item() == pytest.approx(1.0, rel=1e-2)
    with pytest.raises(ValueError):
        fnlm.clip_grad_norm(grads, -1.0)


def test_gradient_clipping_adapter_like_the_assignment():
    tensors = [torch.randn(5, 5) for _ in range(6)]
    for max_norm in (1e-2, 1e3):
        ours = tuple(torch.nn.Parameter(t.clone()) for t in tensors)
        ref = tuple(torch.nn.Parameter(t.clone()) for t in tensors)
        for group in (ours, ref):
            group[-1].requires_grad_(False)
            (torch.cat(group) ** 2).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        run_gradient_clipping(ours, max_norm)
        assert ours[-1].grad is None
        for a, b in zip(ours[:-1], ref[:-1]):
            torch.testing.assert_close(a.grad, b.grad)


def test_tensor_lr_equals_float_lr():
    params = _tree()
    grads = fnlm.tree_map(torch.randn_like, params)
    state = fnlm.adamw_init(params)
    a, sa = fnlm.adamw_step(params, state, grads, lr=0.03, weight_decay=0.2, decay_mask=fnlm.default_decay_mask)
    b, sb = fnlm.adamw_step(params, state, grads, lr=torch.tensor(0.03), weight_decay=0.2, decay_mask=fnlm.default_decay_mask)
    for x, y in zip(fnlm.tree_leaves(a) + fnlm.tree_leaves(sa), fnlm.tree_leaves(b) + fnlm.tree_leaves(sb)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7) if isinstance(x, torch.Tensor) else None
    with pytest.raises(ValueError, match="0-d"):
        fnlm.adamw_step(params, state, grads, lr=torch.ones(2))


_COMPILE_SCRIPT = """
import torch, torch._dynamo.testing, fnlm
assert not fnlm.typecheck_enabled()
g = torch.Generator().manual_seed(0)
params = {"emb": {"weight": torch.randn(10, 4, generator=g)}, "ln": [{"weight": torch.ones(4)}],
          "w": {"weight": torch.randn(6, 4, generator=g)}}
grads = fnlm.tree_map(torch.randn_like, params)
state = fnlm.adamw_init(params)
counter = torch._dynamo.testing.CompileCounter()
step = torch.compile(fnlm.adamw_step, backend=counter, fullgraph=True)
lr = torch.tensor(0.0)
for t in range(6):
    lr.fill_(fnlm.cosine_schedule(t, 1e-2, 1e-3, 2, 5))
    new, _ = step(params, state, grads, lr=lr, weight_decay=0.1, decay_mask=fnlm.default_decay_mask)
    ref, state = fnlm.adamw_step(params, state, grads, lr=lr.item(), weight_decay=0.1, decay_mask=fnlm.default_decay_mask)
    for x, y in zip(fnlm.tree_leaves(new), fnlm.tree_leaves(ref)):
        torch.testing.assert_close(x, y)
    params = ref
for fn, args in ((fnlm.cross_entropy, (torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3)))),
                 (fnlm.clip_grad_norm_with_norm, (grads, 1.0))):
    torch.compile(fn, backend="eager", fullgraph=True)(*args)
print("frames", counter.frame_count)
"""


def test_compiles_without_graph_breaks_or_per_step_recompiles():
    """torch.compile graph capture (backend="eager", fullgraph) of the step, the loss and clipping.

    Run in a subprocess with type checks off (jaxtyping/beartype wrappers are not traceable). With a
    0-d tensor lr changing every step and a growing step count, dynamo compiles the step at most
    twice (specialised on step 0, then with a dynamic step) and never again.
    """
    env = dict(os.environ, FNLM_TYPECHECK="0")
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=Path(__file__).resolve().parents[1],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    frames = int(out.stdout.split("frames")[-1])
    assert 1 <= frames <= 2


def _three_steps(which, donate, tree, *, lr=0.05, wd=0.1, mask=None):
    """Three steps of `which` from `tree`; returns the final params and state, and the input trees."""
    init, step = (fnlm.adamw_init, fnlm.adamw_step) if which == "adamw" else (fnlm.sgd_init, fnlm.sgd_step)
    params = fnlm.tree_map(torch.clone, tree)
    state = init(params)
    inputs = []
    for t in range(3):
        grads = fnlm.tree_map(lambda p: torch.randn(p.shape, generator=torch.Generator().manual_seed(t), dtype=p.dtype), params)
        inputs.append((params, state))
        params, state = step(params, state, grads, lr=lr, weight_decay=wd, decay_mask=mask, donate=donate)
    return params, state, inputs


@pytest.mark.parametrize("which", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype, lr", [(torch.float32, 0.05), (torch.float64, 0.05), (torch.float32, torch.tensor(0.05))])
def test_donated_steps_give_the_same_values_in_the_same_buffers(which, dtype, lr):
    """donate=True (fused kernel for float32 + float lr, multi-tensor kernels otherwise) returns the
    donated tensors themselves, updated in place, holding exactly what the pure step computes."""
    tree = fnlm.tree_map(lambda t: t.to(dtype), _tree())
    pure, pure_state, _ = _three_steps(which, False, tree, lr=lr, mask=fnlm.default_decay_mask)
    donated, donated_state, inputs = _three_steps(which, True, tree, lr=lr, mask=fnlm.default_decay_mask)
    for a, b in zip(fnlm.tree_leaves((pure, pure_state)), fnlm.tree_leaves((donated, donated_state))):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    first_params, first_state = inputs[0]
    assert [p.data_ptr() for p in fnlm.tree_leaves(donated)] == [p.data_ptr() for p in fnlm.tree_leaves(first_params)]
    if which == "adamw":
        assert [t.data_ptr() for t in fnlm.tree_leaves(donated_state["m"])] == [
            t.data_ptr() for t in fnlm.tree_leaves(first_state["m"])]


def test_donation_is_declined_for_tied_leaves():
    """Two leaves sharing one tensor would be updated twice in place: the step stays pure instead."""
    w = torch.randn(4, 3)
    params = {"a": w, "b": w}
    grads = {"a": torch.ones(4, 3), "b": torch.ones(4, 3)}
    before = w.clone()
    new, _ = fnlm.sgd_step(params, fnlm.sgd_init(params), grads, lr=0.1, donate=True)
    assert torch.equal(w, before)
    torch.testing.assert_close(new["a"], before - 0.1)
    new, _ = fnlm.adamw_step(params, fnlm.adamw_init(params), grads, lr=0.1, donate=True)
    assert torch.equal(w, before) and new["a"].data_ptr() != w.data_ptr()


def test_clip_with_donation_scales_in_place():
    grads = {"a": torch.randn(5, 5) * 10, "b": [torch.randn(3)]}
    expected, norm = fnlm.clip_grad_norm_with_norm(grads, 1.0)
    leaves = fnlm.tree_leaves(grads)
    clipped, norm2 = fnlm.clip_grad_norm_with_norm(grads, 1.0, donate=True)
    assert torch.equal(norm, norm2)
    for a, b, old in zip(fnlm.tree_leaves(expected), fnlm.tree_leaves(clipped), leaves):
        assert torch.equal(a, b) and b.data_ptr() == old.data_ptr()


def test_cosine_schedule_takes_tensor_rates():
    max_lr = torch.tensor([1e-3, 3e-3, 1e-2], dtype=torch.float64)
    min_lr = max_lr / 10
    for t in (0, 3, 7, 10, 15, 21, 30):
        got = fnlm.cosine_schedule(t, max_lr, min_lr, 7, 21)
        assert isinstance(got, torch.Tensor) and got.shape == (3,)
        want = [fnlm.cosine_schedule(t, float(a), float(b), 7, 21) for a, b in zip(max_lr, min_lr)]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_vmapped_steps_with_per_model_hyperparameters_equal_separate_steps(which):
    """Under torch.func.vmap the steps use plain ops (no foreach kernel has a batching rule) and take
    per-model tensor lr and weight decay; each model gets what its own float-hyper-parameter step gives."""
    init, step = (fnlm.adamw_init, fnlm.adamw_step) if which == "adamw" else (fnlm.sgd_init, fnlm.sgd_step)
    models = [fnlm.tree_map(lambda t, s=s: t + s, _tree()) for s in range(3)]
    lrs, wds = [0.01, 0.03, 0.1], [0.0, 0.1, 0.5]
    states = [init(p) for p in models]
    stacked, stacked_state = fnlm.tree_stack(models), fnlm.tree_stack(states)
    dims = {k: (0 if k != "step" else None) for k in stacked_state}
    for t in range(3):
        grads = [fnlm.tree_map(lambda p: torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * t + i)), m)
                 for i, m in enumerate(models)]

        def one(p, s, g, lr, wd):
            return step(p, s, g, lr=lr, weight_decay=wd, decay_mask=fnlm.default_decay_mask)

        stacked, stacked_state = torch.func.vmap(one, in_dims=(0, dims, 0, 0, 0), out_dims=(0, dims))(
            stacked, stacked_state, fnlm.tree_stack(grads), torch.tensor(lrs, dtype=torch.float64),
            torch.tensor(wds, dtype=torch.float64))
        for i in range(3):
            models[i], states[i] = step(models[i], states[i], grads[i], lr=lrs[i], weight_decay=wds[i],
                                        decay_mask=fnlm.default_decay_mask)
    assert stacked_state["step"] == 3
    for i, (m, s) in enumerate(zip(models, states)):
        for a, b in zip(fnlm.tree_leaves((m, s)), fnlm.tree_leaves(fnlm.tree_unstack((stacked, stacked_state))[i])):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_clip_and_norm_under_vmap_equal_per_model():
    grads = [{"a": torch.randn(4, 4) * (i + 1), "b": torch.randn(3)} for i in range(3)]
    clipped, norms = torch.func.vmap(lambda g: fnlm.clip_grad_norm_with_norm(g, 2.0))(fnlm.tree_stack(grads))
    for i, g in enumerate(grads):
        want, norm = fnlm.clip_grad_norm_with_norm(g, 2.0)
        torch.testing.assert_close(norms[i], norm)
        torch.testing.assert_close(clipped["a"][i], want["a"])
