"""Optimizers as pairs of pure functions, a learning-rate schedule and gradient clipping.

An optimizer is `init(params) -> state` and `step(params, state, grads, **hyper) -> (params, state)`.
The state mirrors the params tree (plus an integer step count) and holds only tensors and ints, so
`torch.save(state)` loads back with `weights_only=True`. Steps never modify their inputs: they
build new tensors with multi-tensor (`torch._foreach_*`) kernels under `torch.no_grad()`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from fnlm.tree import Tree, tree_flatten, tree_map, tree_unflatten
from fnlm.types import Float, Tensor, tracing

__all__ = [
    "DecayMask",
    "adamw_init",
    "adamw_step",
    "sgd_init",
    "sgd_step",
    "cosine_schedule",
    "global_norm",
    "clip_grad_norm",
    "clip_grad_norm_with_norm",
    "default_decay_mask",
    "check_hyper",
]

DecayMask = Any
"""`None` (decay every leaf), a tree of bools mirroring params, or `fn(name, leaf) -> bool`."""

CLIP_EPS = 1e-6


def _flat_like(params_flat: dict[str, Any], tree: Tree, what: str) -> list[Any]:
    flat = tree_flatten(tree)
    if flat.keys() != params_flat.keys():
        missing = sorted(params_flat.keys() - flat.keys())
        extra = sorted(flat.keys() - params_flat.keys())
        raise ValueError(f"{what} does not mirror params: missing {missing[:8]}, unexpected {extra[:8]}")
    return list(flat.values())


def _check_shapes(params: list[Tensor], others: list[Tensor], names: list[str], what: str) -> None:
    for name, p, o in zip(names, params, others):
        if not isinstance(o, Tensor) or o.shape != p.shape:
            got = tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__
            raise ValueError(f"{what}[{name!r}] has shape {got}, param has {tuple(p.shape)}")


def default_decay_mask(name: str, leaf: Tensor) -> bool:
    """A decay-mask predicate: decay matrices, but not 1-D gains/biases nor embeddings.

    Example: `adamw_step(..., decay_mask=default_decay_mask)` skips `ln1.weight` and
    `token_embeddings.weight` and decays `layers.0.attn.q_proj.weight` and `lm_head.weight`.

    **Arguments:**

    - `name`: the leaf's dotted flat name.
    - `leaf`: the parameter tensor.

    **Returns:**

    True when the leaf should receive weight decay.
    """
    return leaf.ndim >= 2 and "embedding" not in name


def _decay_flags(params_flat: dict[str, Any], decay_mask: DecayMask) -> list[bool]:
    if decay_mask is None:
        return [True] * len(params_flat)
    if callable(decay_mask):
        flags = [decay_mask(name, leaf) for name, leaf in params_flat.items()]
    else:
        flags = _flat_like(params_flat, decay_mask, "decay_mask")
    for name, flag in zip(params_flat, flags):
        if not isinstance(flag, bool):
            raise TypeError(f"decay_mask must give a bool for {name!r}, got {flag!r}")
    return flags


def check_hyper(**values: float | Tensor) -> None:
    """Raise `ValueError` for an optimizer hyper-parameter out of range: `beta*` in `[0, 1)`, the
    others in `[0, inf)`; a tensor value must be a floating 0-d tensor. Skipped under `torch.compile`."""
    if torch.compiler.is_compiling():
        return
    for key, value in values.items():
        if isinstance(value, Tensor):
            if value.ndim != 0 or not value.is_floating_point():
                raise ValueError(f"{key} must be a float or a floating 0-d tensor, got {value!r}")
            continue
        lo, hi = (0.0, 1.0) if key.startswith("beta") else (0.0, math.inf)
        if not (lo <= value < hi) or math.isnan(value):
            raise ValueError(f"{key} must be in [{lo}, {hi}), got {value!r}")


def _check_step_count(state: Any, keys: tuple[str, ...], what: str) -> int:
    if not isinstance(state, dict) or set(keys) - state.keys():
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{what} state must be a dict with keys {list(keys)}, got {got}")
    step = state["step"]
    if isinstance(step, Tensor) and step.ndim == 0 and not step.is_floating_point() and step.dtype != torch.bool:
        return step  # a 0-d integer tensor stays one (a compiled step then compiles once)
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"{what} state['step'] must be a non-negative int, got {step!r}")
    return step


def adamw_init(params: Tree) -> dict[str, Any]:
    """Fresh AdamW state: zero first and second moments mirroring `params`, and `step = 0`.

    **Arguments:**

    - `params`: the params tree (nested dict/list of tensors).

    **Returns:**

    `{"step": 0, "m": zeros_like(params), "v": zeros_like(params)}`.
    """
    return {
        "step": 0,
        "m": tree_map(torch.zeros_like, params),
        "v": tree_map(torch.zeros_like, params),
    }


_FUSED_DEVICES = ("cpu", "cuda")


class _Adam(NamedTuple):
    """The scalars of one AdamW update: `step` is t >= 1 (an int, or a 0-d tensor in a compiled
    step); `lr` and `weight_decay` may be 0-d tensors (per-model values under `vmap`)."""

    step: int | Tensor
    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float | Tensor


def _under_functorch() -> bool:
    """True inside a `torch.func` transform (not `torch.compile`): `torch._foreach_*` kernels have no
    batching rules, so the steps use one plain op per leaf there."""
    return tracing() and not torch.compiler.is_compiling()


def _can_fuse(
    params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], lr: Any, weight_decay: Any
) -> bool:
    """Whether torch's fused AdamW kernel applies. It reads the four tensors of a parameter as if
    they had one layout: a gradient with other strides than its parameter (a transposed one) is
    mis-read silently, so such trees take the multi-tensor path."""
    if isinstance(lr, Tensor) or isinstance(weight_decay, Tensor) or lr * weight_decay >= 1.0 or tracing():
        return False
    device, dtype = params[0].device, params[0].dtype
    if device.type not in _FUSED_DEVICES or not dtype.is_floating_point:
        return False
    same_layout = all(g.stride() == p.stride() == a.stride() == b.stride() for p, g, a, b in zip(params, grads, m, v))
    return same_layout and all(
        t.device == device and t.dtype == dtype and not t.requires_grad
        for group in (params, grads, m, v)
        for t in group
    )


def _adamw_update_fused(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """`_adamw_update` with torch's one-pass fused AdamW kernel, on copies (or, with `donate`, on
    the inputs themselves).

    The kernel computes torch's variant, `p <- p (1 - lr' wd') - (lr'/bc1) m / (sqrt(v)/sqrt(bc2) + eps')`
    with `bc_i = 1 - b_i^t`. Taking `lr' = lr (1 - lr wd)`, `wd' = wd / (1 - lr wd)` and
    `eps' = eps / sqrt(bc2)` makes it `(1 - lr wd) (p - a_t m / (sqrt(v) + eps))`, Algorithm 2
    exactly (up to rounding). Three copies plus one fused pass read and write less memory than
    the seven multi-tensor passes of the unfused update.
    """
    step, lr, beta1, beta2, eps, weight_decay = hp
    with torch.no_grad():
        new_p, new_m, new_v = (group if donate else [t.clone() for t in group] for group in (params, m, v))
        steps = [torch.tensor(float(step), device=params[0].device)] * len(params)
        shrink = 1.0 - lr * weight_decay
        eps_t = eps / math.sqrt(1.0 - beta2**step)
        for flag in (True, False):
            idx = [i for i, d in enumerate(decay) if d == flag]
            if not idx:
                continue
            wd = weight_decay if flag else 0.0
            torch._fused_adamw_(
                [_dense_view(new_p[i]) for i in idx],
                [_dense_view(grads[i]) for i in idx],
                [_dense_view(new_m[i]) for i in idx],
                [_dense_view(new_v[i]) for i in idx],
                [],
                [steps[i] for i in idx],
                lr=lr * shrink if flag else lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd / shrink if flag else 0.0,
                eps=eps_t,
                amsgrad=False,
                maximize=False,
            )
    return new_p, new_m, new_v


def _dense_view(t: Tensor) -> Tensor:
    """`t` with its dims permuted so that its strides decrease: a contiguous view of the same memory
    for any dense tensor, such as the column-major weights of `init_linear`. The four tensors of a
    parameter share one layout (`_can_fuse`), so they get the same permutation, and an elementwise
    update through the views is the update of the tensors. torch's CPU fused AdamW copies a
    non-contiguous tensor to a contiguous one and back: on the 17M model's column-major weights
    that took 40 ms a step against 13 ms through these views (2 threads)."""
    order = sorted(range(t.ndim), key=lambda d: -t.stride(d))
    return t.permute(order)


def _distinct(tensors: list[Tensor]) -> bool:
    """No two leaves share memory (tied weights would be updated twice in place); then donation is safe."""
    ptrs = [t.untyped_storage().data_ptr() for t in tensors if isinstance(t, Tensor)]
    return len(set(ptrs)) == len(ptrs)


def _has_decay(weight_decay: float | Tensor) -> bool:
    return isinstance(weight_decay, Tensor) or weight_decay != 0


def _adamw_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Algorithm 2 with multi-tensor kernels: new tensors, or the inputs updated with `donate`."""
    step, lr, beta1, beta2, eps, weight_decay = hp
    device = params[0].device
    if donate:
        new_m, new_v = m, v
        torch._foreach_lerp_(new_m, grads, 1.0 - beta1)
        torch._foreach_mul_(new_v, beta2)
    else:
        new_m = torch._foreach_lerp(m, grads, 1.0 - beta1)
        new_v = torch._foreach_mul(v, beta2)
    torch._foreach_addcmul_(new_v, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(new_v)
    torch._foreach_add_(denom, eps)
    alpha_t = _alpha(lr, step, beta1, beta2)
    if isinstance(alpha_t, Tensor):
        update = torch._foreach_div(new_m, denom)
        torch._foreach_mul_(update, alpha_t.to(device))
        if donate:
            torch._foreach_sub_(params, update)
            new_params = params
        else:
            new_params = torch._foreach_sub(params, update)
    elif donate:
        torch._foreach_addcdiv_(params, new_m, denom, value=-alpha_t)
        new_params = params
    else:
        new_params = torch._foreach_addcdiv(params, new_m, denom, value=-alpha_t)
    decayed = [p for p, d in zip(new_params, decay) if d]
    if _has_decay(weight_decay) and decayed:
        factor = 1.0 - lr * weight_decay
        torch._foreach_mul_(decayed, factor.to(device) if isinstance(factor, Tensor) else factor)
    return list(new_params), list(new_m), list(new_v)


def _alpha(lr: float | Tensor, step: int | Tensor, beta1: float, beta2: float) -> float | Tensor:
    """`lr sqrt(1 - b2^t) / (1 - b1^t)`; a 0-d tensor step (a compiled step's counter) stays a tensor."""
    correction = (1.0 - beta2**step).sqrt() if isinstance(step, Tensor) else math.sqrt(1.0 - beta2**step)
    return lr * (correction / (1.0 - beta1**step))


def _adamw_update_plain(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Algorithm 2 with one plain op per leaf and no in-place op: what `torch.func.vmap` can batch
    (there `lr` and `weight_decay` may be per-model tensors). Returns new tensors."""
    step, lr, beta1, beta2, eps, weight_decay = hp
    alpha_t = _alpha(lr, step, beta1, beta2)
    factor = 1.0 - lr * weight_decay
    new_p, new_m, new_v = [], [], []
    for p, g, m_i, v_i, d in zip(params, grads, m, v, decay):
        m_i = torch.lerp(m_i, g, 1.0 - beta1)
        v_i = torch.addcmul(v_i * beta2, g, g, value=1.0 - beta2)
        denom = v_i.sqrt() + eps
        p = p - alpha_t * (m_i / denom) if isinstance(alpha_t, Tensor) else torch.addcdiv(p, m_i, denom, value=-alpha_t)
        if d and _has_decay(weight_decay):
            p = p * factor
        new_p.append(p)
        new_m.append(m_i)
        new_v.append(v_i)
    return new_p, new_m, new_v


def _adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Algorithm 2 of the CS336 handout on flat lists; `step` is t >= 1. Picks torch's fused kernel
    (float hyper-parameters on CPU/CUDA), the multi-tensor kernels, or plain ops under `torch.func`."""
    if not params:
        return [], [], []
    with torch.no_grad():
        if _under_functorch():
            return _adamw_update_plain(params, grads, m, v, decay, hp)
        if _can_fuse(params, grads, m, v, hp.lr, hp.weight_decay):
            return _adamw_update_fused(params, grads, m, v, decay, hp, donate)
        return _adamw_update_foreach(params, grads, m, v, decay, hp, donate)


def adamw_step(
    params: Tree,
    state: dict[str, Any],
    grads: Tree,
    *,
    lr: float | Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | Tensor = 0.01,
    decay_mask: DecayMask = None,
    donate: bool = False,
) -> tuple[Tree, dict[str, Any]]:
    """One AdamW update (Loshchilov & Hutter; Algorithm 2 of the CS336 assignment 1 handout).

    With `t = state["step"] + 1`:

    ```
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    a_t = lr sqrt(1 - b2^t) / (1 - b1^t)
    p <- p - a_t m / (sqrt(v) + eps)
    p <- p - lr wd p            (decoupled decay, applied to the updated p, only where masked in)
    ```

    This differs from `torch.optim.AdamW` at second order: torch decays before the Adam step and
    adds `eps` to the bias-corrected `sqrt(v_hat)`; see `tests/test_optim.py` for the comparison.
    Pure by default: `params`, `state` and `grads` are not modified; no autograd graph is recorded.

    **Donation** (JAX's `donate_argnums`): with `donate=True` the step may update the tensors of
    `params` and `state` in place and return them, so it needs no second copy of the parameters
    and moments. The donated `params` and `state` must not be used afterwards: they may hold the
    new values, or a mix. `grads` is only read. Use it when nothing else keeps the old state (a
    training loop that replaces its state every step); the values returned are the same as
    without donation. Inside `torch.func` transforms the step stays pure whatever `donate` says.

    **Arguments:**

    - `params`: the params tree.
    - `state`: from :func:`adamw_init` or a previous step.
    - `grads`: a tree with the same flat names and shapes as `params`.
    - `lr`: the learning rate (e.g. from :func:`cosine_schedule`). Under `torch.compile`, a Python
      float that changes every step forces a recompile each step; pass a 0-d float tensor
      (updated in place or made anew each step) to compile the step once.
    - `betas`: `(b1, b2)`, each in `[0, 1)`.
    - `eps`: added to `sqrt(v)`.
    - `weight_decay`: the decoupled decay rate `wd` (a float, or a 0-d tensor such as a per-model
      value under `torch.func.vmap`).
    - `decay_mask`: which leaves decay: `None` (all), a tree of bools mirroring `params`, or a
      predicate `fn(name, leaf) -> bool` such as :func:`default_decay_mask`.
    - `donate`: allow the step to reuse the buffers of `params` and `state` (see above).

    **Returns:**

    `(new_params, new_state)`: new trees (of new tensors, or of the donated ones).
    """
    beta1, beta2 = betas
    check_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    step = _check_step_count(state, ("step", "m", "v"), "adamw") + 1
    p_flat = tree_flatten(params)
    names = list(p_flat)
    p_list = list(p_flat.values())
    g_list = _flat_like(p_flat, grads, "grads")
    m_list = _flat_like(p_flat, state["m"], "state['m']")
    v_list = _flat_like(p_flat, state["v"], "state['v']")
    for what, others in (("grads", g_list), ("state['m']", m_list), ("state['v']", v_list)):
        _check_shapes(p_list, others, names, what)
    decay = _decay_flags(p_flat, decay_mask)
    donate = donate and not _under_functorch() and _distinct(p_list + m_list + v_list)
    new_p, new_m, new_v = _adamw_update(
        p_list, g_list, m_list, v_list, decay, _Adam(step, lr, beta1, beta2, eps, weight_decay), donate
    )
    new_state = {
        "step": step,
        "m": tree_unflatten(dict(zip(names, new_m))),
        "v": tree_unflatten(dict(zip(names, new_v))),
    }
    return tree_unflatten(dict(zip(names, new_p))), new_state


def sgd_init(params: Tree) -> dict[str, Any]:
    """Fresh SGD state: `{"step": 0}` (plain SGD keeps no per-parameter buffers).

    **Arguments:**

    - `params`: the params tree (unused; taken for symmetry with :func:`adamw_init`).

    **Returns:**

    `{"step": 0}`.
    """
    del params
    return {"step": 0}


def _sgd_update(
    params: list[Tensor], grads: list[Tensor], decay: list[bool], *, lr: float | Tensor,
    weight_decay: float | Tensor, donate: bool,
) -> list[Tensor]:
    with torch.no_grad():
        if _under_functorch() or isinstance(lr, Tensor) or isinstance(weight_decay, Tensor):
            out = []
            for p, g, d in zip(params, grads, decay):
                if d and _has_decay(weight_decay):
                    g = g + weight_decay * p
                out.append(p.sub_(lr * g) if donate else p - lr * g)
            return out
        if _has_decay(weight_decay) and any(decay):
            idx = [i for i, d in enumerate(decay) if d]
            decayed = torch._foreach_add([grads[i] for i in idx], [params[i] for i in idx], alpha=weight_decay)
            grads = list(grads)
            for i, g in zip(idx, decayed):
                grads[i] = g
        if donate:
            torch._foreach_add_(params, grads, alpha=-lr)
            return list(params)
        return list(torch._foreach_add(params, grads, alpha=-lr))


def sgd_step(
    params: Tree,
    state: dict[str, Any],
    grads: Tree,
    *,
    lr: float | Tensor,
    weight_decay: float | Tensor = 0.0,
    decay_mask: DecayMask = None,
    inverse_sqrt: bool = False,
    donate: bool = False,
) -> tuple[Tree, dict[str, Any]]:
    """One SGD update `p <- p - lr_t (g + wd p)`, with `lr_t = lr` or `lr / sqrt(t + 1)`.

    `inverse_sqrt=True` is the decaying-rate SGD of the CS336 handout's optimizer example, where
    `t = state["step"]` counts the updates done so far (0 on the first call). The decay is added to
    the gradient before the step, `d = g + wd p; p <- p - lr_t d`, as `torch.optim.SGD` does.

    Pure by default; with `donate=True` the step may update the tensors of `params` in place and
    return them (JAX's donation: the donated `params` must not be used afterwards; see
    :func:`adamw_step`). The values are the same either way.

    **Arguments:**

    - `params`: the params tree.
    - `state`: from :func:`sgd_init` or a previous step.
    - `grads`: a tree with the same flat names and shapes as `params`.
    - `lr`: the base learning rate.
    - `weight_decay`: L2 decay rate (for SGD, the same as decoupled decay).
    - `decay_mask`: which leaves decay, as in :func:`adamw_step`.
    - `inverse_sqrt`: scale the rate by `1 / sqrt(t + 1)`.
    - `donate`: allow the step to reuse the buffers of `params`.

    **Returns:**

    `(new_params, {"step": t + 1})`.
    """
    check_hyper(lr=lr, weight_decay=weight_decay)
    t = _check_step_count(state, ("step",), "sgd")
    lr_t = lr / math.sqrt(t + 1) if inverse_sqrt else lr
    p_flat = tree_flatten(params)
    names = list(p_flat)
    p_list = list(p_flat.values())
    g_list = _flat_like(p_flat, grads, "grads")
    _check_shapes(p_list, g_list, names, "grads")
    decay = _decay_flags(p_flat, decay_mask)
    donate = donate and not _under_functorch() and _distinct(p_list)
    new_p = _sgd_update(p_list, g_list, decay, lr=lr_t, weight_decay=weight_decay, donate=donate) if p_list else []
    return tree_unflatten(dict(zip(names, new_p))), {"step": t + 1}


def cosine_schedule(
    t: int, max_lr: float | Tensor, min_lr: float | Tensor, warmup_iters: int, cosine_cycle_iters: int
) -> float | Tensor:
    """Learning rate at iteration `t`: linear warm-up, cosine decay, then constant.

    - `t < warmup_iters`: `t / warmup_iters * max_lr`;
    - `warmup_iters <= t <= cosine_cycle_iters`:
      `min_lr + (1 + cos(pi (t - warmup_iters) / (cosine_cycle_iters - warmup_iters))) / 2 * (max_lr - min_lr)`;
    - `t > cosine_cycle_iters`: `min_lr`.

    Example: `cosine_schedule(0, 1.0, 0.1, 7, 21) == 0.0`, `cosine_schedule(7, 1.0, 0.1, 7, 21) == 1.0`,
    `cosine_schedule(14, 1.0, 0.1, 7, 21) == 0.55`, `cosine_schedule(30, 1.0, 0.1, 7, 21) == 0.1`.

    **Arguments:**

    - `t`: the iteration, `>= 0`.
    - `max_lr`, `min_lr`: the peak and final rates: floats, or tensors (e.g. one rate per model of
      a vectorized sweep, `fnlm.train.sweep`), combined elementwise.
    - `warmup_iters`: `T_w >= 0`.
    - `cosine_cycle_iters`: `T_c >= T_w`, the iteration where the cosine reaches `min_lr`.

    **Returns:**

    The learning rate: a float for float rates, else a tensor.
    """
    if t < 0 or warmup_iters < 0 or cosine_cycle_iters < warmup_iters:
        raise ValueError(
            "need t >= 0 and 0 <= warmup_iters <= cosine_cycle_iters, got "
            f"t={t}, warmup_iters={warmup_iters}, cosine_cycle_iters={cosine_cycle_iters}"
        )
    if t < warmup_iters:
        return t / warmup_iters * max_lr
    if t > cosine_cycle_iters:
        return min_lr if isinstance(min_lr, Tensor) else float(min_lr)
    if cosine_cycle_iters == warmup_iters:
        return max_lr if isinstance(max_lr, Tensor) else float(max_lr)
    progress = (t - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def global_norm(grads: Tree) -> Float[Tensor, ""]:
    """The l2 norm of all leaves of `grads` taken together, `sqrt(sum_i ||g_i||^2)`.

    Accumulates in float32 (float64 if any leaf is float64), so bf16/fp16 gradients do not
    overflow or lose precision in the sum. Does not synchronise with the device.

    **Arguments:**

    - `grads`: a tree of tensors (all on one device).

    **Returns:**

    A 0-d tensor on the leaves' device.
    """
    leaves = [g for g in tree_flatten(grads).values() if g is not None]
    if not leaves:
        raise ValueError("global_norm of a tree with no tensor leaves")
    acc = torch.float64 if any(g.dtype == torch.float64 for g in leaves) else torch.float32
    if _under_functorch():
        norms = [torch.linalg.vector_norm(g, dtype=acc) for g in leaves]
    else:
        norms = torch._foreach_norm(leaves, 2, dtype=acc)
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_grad_norm_with_norm(
    grads: Tree, max_norm: float, *, donate: bool = False
) -> tuple[Tree, Float[Tensor, ""]]:
    """Rescale `grads` so their global l2 norm is at most `max_norm`; also return the norm.

    Every leaf is multiplied by `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`
    does: no data-dependent branch, so no device sync. Pure: `grads` is not modified.

    **Arguments:**

    - `grads`: a tree of gradient tensors.
    - `max_norm`: the largest allowed global norm, `>= 0`.
    - `donate`: scale the tensors of `grads` in place and return them (JAX's donation: `grads`
      must not be used afterwards); the values are the same.

    **Returns:**

    `(clipped_grads, norm)`: a new tree, and the global norm *before* clipping (0-d tensor).
    """
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm!r}")
    flat = tree_flatten(grads)
    norm = global_norm(grads)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    names = [n for n, g in flat.items() if g is not None]
    leaves = [flat[n] for n in names]
    with torch.no_grad():
        if _under_functorch():
            scaled = [g * coef for g in leaves]
        elif donate:
            torch._foreach_mul_(leaves, coef)
            scaled = leaves
        else:
            scaled = list(torch._foreach_mul(leaves, coef))
    flat.update(zip(names, scaled))
    return tree_unflatten(flat), norm


def clip_grad_norm(grads: Tree, max_norm: float) -> Tree:
    """Rescale `grads` so their global l2 norm is at most `max_norm` (eps 1e-6); pure.

    See :func:`clip_grad_norm_with_norm`, which also returns the norm for logging.

    **Arguments:**

    - `grads`: a tree of gradient tensors.
    - `max_norm`: the largest allowed global norm, `>= 0`.

    **Returns:**

    A new tree of clipped gradients.
    """
    return clip_grad_norm_with_norm(grads, max_norm)[0]
