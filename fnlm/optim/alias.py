"""Optimizers by name, each a `GradientTransformation`: `adamw` (optax's and `torch.optim.AdamW`'s),
`adamw_cs336` (CS336's Algorithm 2, `train_step`'s default), `sgd` and `lion` (optax's). Muon is
`fnlm.optim.muon` (in `fnlm.optim.orthogonal`).

The two AdamW forms differ at second order. With `t` the update count, `m_hat = m / (1 - b1^t)`
and `v_hat = v / (1 - b2^t)`:

- `adamw` (optax, torch): `p <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)`: epsilon is added to
  the bias-corrected root, and the decay acts on the current params.
- `adamw_cs336` (the CS336 handout's Algorithm 2): `p <- p - a_t m / (sqrt(v) + eps)` with
  `a_t = lr sqrt(1 - b2^t) / (1 - b1^t)`, then `p <- p - lr wd p`: epsilon is added to the
  uncorrected root (a larger effective epsilon early in training), and the decay acts on the
  already-updated params.

Both run torch's fused AdamW kernel as one link (`apply`) where it applies: float
hyper-parameters, floating tensors on CPU or CUDA that share one layout per parameter, outside
`torch.func` transforms.
"""

from __future__ import annotations

from typing import Any

from fnlm.optim._adamw import _Adam, _can_fuse, _torch_adamw_fused
from fnlm.optim._common import Scalar, _check_state, _decay_flags, _distinct, check_hyper
from fnlm.optim.schedules import Schedule
from fnlm.optim.steps import adamw_init, adamw_step
from fnlm.optim.transform import (
    GradientTransformationExtraArgs,
    OptState,
    _check_chain_state,
    _leaves_of,
    _mirror,
    add_decayed_weights,
    apply_updates,
    chain,
    identity,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    trace,
)
from fnlm.tree import Tree, tree_unflatten

__all__ = ["adamw", "adamw_cs336", "sgd", "lion"]


def _rate(learning_rate: float | Any | Schedule, count: Any) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def adamw(
    learning_rate: float | Any | Schedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    mu_dtype: Any = None,
    weight_decay: float | Any = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
) -> GradientTransformationExtraArgs:
    """AdamW as optax builds it: `chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov),
    add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))`, with the same
    arguments, state and updates as `optax.adamw`. It is also `torch.optim.AdamW`'s update.

    Where it applies (float rate and decay, no `eps_root`, `mu_dtype` or `nesterov`, see the module
    docstring), its fused `apply` runs torch's fused AdamW kernel instead of the chain.

    **Arguments:**

    - `learning_rate`: a float or a schedule `count -> lr`.
    - `b1`, `b2`, `eps`, `eps_root`, `mu_dtype`, `nesterov`: as `scale_by_adam`.
    - `weight_decay`: the decoupled decay rate (optax's default 1e-4).
    - `mask`: which leaves decay (as `add_decayed_weights`).

    **Returns:**

    A `GradientTransformationExtraArgs` with state `(adam state, (), lr state)`.
    """
    inner = chain(scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
                  add_decayed_weights(weight_decay, mask), scale_by_learning_rate(learning_rate))
    plain = eps_root == 0.0 and mu_dtype is None and not nesterov and not callable(weight_decay)

    def apply(updates: Tree, state: OptState, params: Tree, *, donate: bool = False,
              **extra: Any) -> tuple[Tree, OptState]:
        _check_chain_state(state, 3)
        adam, decayed, lr_state = state
        _check_state(adam, ("count", "mu", "nu"), "adamw's scale_by_adam")
        lr = _rate(learning_rate, lr_state["count"]) if isinstance(lr_state, dict) else learning_rate
        names, p_list = _leaves_of(params)
        g_list = _mirror(names, updates, "updates")
        m_list, v_list = _mirror(names, adam["mu"], "state['mu']"), _mirror(names, adam["nu"], "state['nu']")
        if not (plain and p_list and _can_fuse(p_list, g_list, m_list, v_list, lr, weight_decay)):
            new_updates, new_state = inner.update(updates, state, params)
            return apply_updates(params, new_updates, donate=donate), new_state
        count = adam["count"] + 1
        flags = _decay_flags(dict(zip(names, g_list)), mask, "mask")
        donate = donate and _distinct(p_list + m_list + v_list)
        new_p, new_m, new_v = _torch_adamw_fused(p_list, g_list, m_list, v_list, flags,
                                                 _Adam(count, lr, b1, b2, eps, weight_decay), donate)
        adam = {"count": count, "mu": tree_unflatten(dict(zip(names, new_m))),
                "nu": tree_unflatten(dict(zip(names, new_v)))}
        lr_state = {"count": lr_state["count"] + 1} if isinstance(lr_state, dict) else lr_state
        return tree_unflatten(dict(zip(names, new_p))), (adam, decayed, lr_state)

    return GradientTransformationExtraArgs(inner.init, inner.update, apply)


def adamw_cs336(
    learning_rate: float | Any | Schedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: float | Any = 0.01,
    mask: Any = None,
) -> GradientTransformationExtraArgs:
    """AdamW as CS336's Algorithm 2 writes it (`fnlm.adamw_step`), as a gradient transformation:
    bias correction folded into the step size, epsilon added to the uncorrected `sqrt(v)`, decay
    applied to the already-updated params (see the module docstring for how it differs from
    `adamw`). The default optimizer of `fnlm.train_step`.

    Its state is `adamw_init`'s, `{"step": t, "m": tree, "v": tree}`; its fused `apply` is
    `adamw_step` at the rate `learning_rate(state["step"])` (torch's fused kernel where it applies,
    else multi-tensor kernels, or plain ops under `torch.func`); `update` returns the difference
    that step makes, for use inside other transformations.

    **Arguments:**

    - `learning_rate`: a float (or 0-d tensor) or a schedule `count -> lr`.
    - `b1`, `b2`: the moment decays, in `[0, 1)`.
    - `eps`: added to `sqrt(v)`.
    - `weight_decay`: the decoupled decay rate (a float or a 0-d tensor).
    - `mask`: which leaves decay (as `add_decayed_weights`).

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    check_hyper(beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay)
    if not callable(learning_rate):
        check_hyper(learning_rate=learning_rate)

    def apply(updates: Tree, state: OptState, params: Tree, *, donate: bool = False,
              **extra: Any) -> tuple[Tree, OptState]:
        return adamw_step(params, state, updates, lr=_rate(learning_rate, state["step"]), betas=(b1, b2), eps=eps,
                          weight_decay=weight_decay, decay_mask=mask, donate=donate)

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        if params is None:
            raise ValueError("adamw_cs336 needs the params: call update(updates, state, params)")
        new_params, state = apply(updates, state, params)
        names, p_list = _leaves_of(params)
        new = _mirror(names, new_params, "params")
        return tree_unflatten({n: a - b for n, a, b in zip(names, new, p_list)}), state

    return GradientTransformationExtraArgs(adamw_init, update, apply)


def sgd(
    learning_rate: float | Any | Schedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> GradientTransformationExtraArgs:
    """Stochastic gradient descent, with optional (Nesterov) momentum: optax's `sgd` (same arguments
    and semantics), `chain(trace(momentum, nesterov) or identity(), scale_by_learning_rate(learning_rate))`.

    For `torch.optim.SGD`'s L2 weight decay, put `add_decayed_weights(wd)` in front:
    `chain(add_decayed_weights(wd), sgd(lr, momentum))`.

    **Arguments:**

    - `learning_rate`: a float or a schedule `count -> lr`.
    - `momentum`: the momentum coefficient, or None for plain SGD.
    - `nesterov`: Nesterov momentum.
    - `accumulator_dtype`: the dtype of the momentum buffer.

    **Returns:**

    A `GradientTransformationExtraArgs` with state `(trace state or (), lr state)`.
    """
    first = trace(momentum, nesterov, accumulator_dtype) if momentum is not None else identity()
    return chain(first, scale_by_learning_rate(learning_rate))



def lion(
    learning_rate: Scalar | Schedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    mu_dtype: Any = None,
    weight_decay: Scalar | Schedule = 1e-3,
    mask: Any = None,
) -> GradientTransformationExtraArgs:
    """The Lion optimizer (Chen et al. 2023), as optax builds it (optax's `lion`, same arguments,
    state and updates): `chain(scale_by_lion(b1, b2, mu_dtype), add_decayed_weights(weight_decay,
    mask), scale_by_learning_rate(learning_rate))`, that is
    `p <- p - lr (sign((1 - b1) g + b1 mu) + wd p)`, `mu <- (1 - b2) g + b2 mu`.

    Lion's update has unit size per entry, so its rate is typically 3-10x smaller than AdamW's and
    its decay 3-10x larger (for the same `lr * wd`).

    **Arguments:**

    - `learning_rate`: a number, a 0-d tensor, or a schedule `count -> lr`.
    - `b1`, `b2`, `mu_dtype`: as `scale_by_lion`.
    - `weight_decay`: the decoupled decay rate, multiplied by the learning rate (optax's default 1e-3).
    - `mask`: which leaves decay (as `add_decayed_weights`).

    **Returns:**

    A `GradientTransformationExtraArgs` with state `(lion state, (), lr state)`.
    """
    return chain(scale_by_lion(b1, b2, mu_dtype), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))
