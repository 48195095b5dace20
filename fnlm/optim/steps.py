"""The CS336 optimizer interface: pairs of pure functions over params trees.

`adamw_init(params) -> state` and `adamw_step(params, state, grads, *, lr, ...) -> (params, state)`
(CS336's Algorithm 2), `sgd_init` / `sgd_step` likewise. The state mirrors the params tree (plus an
integer step count) and holds only tensors and ints, so `torch.save(state)` loads back with
`weights_only=True`. A step is pure unless its inputs are donated (`donate=True`, JAX's donation:
updated in place). Inside, AdamW runs torch's fused kernel, the multi-tensor kernels or plain ops
(`fnlm.optim._adamw`). The same Algorithm 2 is the gradient transformation
`fnlm.optim.adamw_cs336`, and `train_step`'s default.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fnlm.optim._adamw import _Adam, _adamw_update
from fnlm.optim._common import (
    DecayMask,
    _check_shapes,
    _check_step_count,
    _decay_flags,
    _distinct,
    _flat_like,
    _has_decay,
    _under_functorch,
    check_hyper,
)
from fnlm.tree import Tree, tree_flatten, tree_map, tree_unflatten
from fnlm.types import Tensor

__all__ = ["adamw_init", "adamw_step", "sgd_init", "sgd_step"]


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
