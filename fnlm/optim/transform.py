"""Optimizers as gradient transformations: optax's design on torch tensors and fnlm params trees.

A transformation is a pair of pure functions, `init(params) -> state` and
`update(updates, state, params=None) -> (updates, state)`; `chain` composes them and
`apply_updates(params, updates)` adds the result to the params:

```python
import torch, fnlm
from fnlm import optim

params = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
grads = {"w": torch.full((3, 2), 0.5), "b": torch.ones(2)}
tx = optim.chain(optim.clip_by_global_norm(1.0), optim.scale_by_adam(), optim.scale_by_learning_rate(1e-2))
state = tx.init(params)
updates, state = tx.update(grads, state, params)
params = optim.apply_updates(params, updates)
```

Names, arguments and semantics follow optax wherever optax has the same transformation (the same
gradients, state and params give the same updates; `tests/optim/` checks each against optax), with
updates *added* to the params (`scale_by_learning_rate` multiplies by `-lr`). States are plain data
(dicts, tuples, ints and tensors), so a checkpoint loads them with `weights_only=True`.

Two things go beyond optax, for speed on torch:

- **A fused link.** A transformation may carry `apply(updates, state, params, *, donate=False)
  -> (params, state)`, which computes the new params directly (e.g. with torch's fused AdamW
  kernel) and equals `update` + `apply_updates` up to rounding. `optimizer_step` uses it when
  present; `chain` has one when its last link has one.
- **Extra arguments** (optax's `GradientTransformationExtraArgs`): `update` may take keywords that
  describe the incoming gradients. fnlm passes `grad_norm` (their global l2 norm, which
  `train_step` computes anyway) and `donate_updates` (the caller will not use the incoming updates
  again, so they may be overwritten); `chain` gives both to its first link only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fnlm.optim._common import (
    Scalar,
    _check_state,
    _decay_flags,
    _distinct,
    _decay_state,
    _under_functorch,
    check_hyper,
)
from fnlm.optim.clipping import global_norm
from fnlm.optim.schedules import Schedule
from fnlm.tree import Tree, tree_flatten, tree_map, tree_unflatten
from fnlm.types import Tensor

__all__ = [
    "OptState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "apply_updates",
    "optimizer_step",
    "chain",
    "identity",
    "scale",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "add_decayed_weights",
    "trace",
    "scale_by_adam",
    "scale_by_lion",
    "set_to_zero",
]

OptState = Any
"""An optimizer state: plain data (dicts, tuples, ints, tensors) mirroring the params where it
keeps per-parameter buffers."""

_FIRST_LINK_ONLY = ("grad_norm", "donate_updates")


class GradientTransformation(NamedTuple):
    """A gradient transformation: `init(params) -> state` and `update(updates, state, params=None)
    -> (updates, state)`, both pure; `apply`, when not None, is a fused form
    `apply(updates, state, params, *, donate=False) -> (params, state)` that computes the new params
    directly (it never writes `updates`; with `donate` it may write `params` and `state`).

    A NamedTuple, as optax's: `GradientTransformation(init, update)` makes one from two functions.
    """

    init: Callable[[Tree], OptState]
    update: Callable[..., tuple[Tree, OptState]]
    apply: Callable[..., tuple[Tree, OptState]] | None = None


class GradientTransformationExtraArgs(GradientTransformation):
    """A `GradientTransformation` whose `update` also takes keyword arguments
    (`update(updates, state, params=None, **extra_args)`), such as `grad_norm` and `donate_updates`."""

    __slots__ = ()


def _call(tx: GradientTransformation, updates: Tree, state: OptState, params: Tree | None,
          extra: dict[str, Any]) -> tuple[Tree, OptState]:
    if extra and isinstance(tx, GradientTransformationExtraArgs):
        return tx.update(updates, state, params, **extra)
    return tx.update(updates, state, params)


def _later(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in _FIRST_LINK_ONLY}


def _leaves_of(tree: Tree) -> tuple[list[str], list[Any]]:
    flat = tree_flatten(tree)
    return list(flat), list(flat.values())


def _mirror(names: list[str], tree: Tree, what: str) -> list[Any]:
    flat = tree_flatten(tree)
    if list(flat) != names:
        missing, extra = sorted(set(names) - flat.keys()), sorted(flat.keys() - set(names))
        raise ValueError(f"{what} does not mirror the updates: missing {missing[:8]}, unexpected {extra[:8]}")
    return list(flat.values())


def apply_updates(params: Tree, updates: Tree, *, donate: bool = False) -> Tree:
    """`params + updates`, leaf by leaf, each result in its param's dtype (optax's `apply_updates`).

    **Arguments:**

    - `params`: the params tree.
    - `updates`: a tree with the same flat names and shapes (from a transformation's `update`).
    - `donate`: add into the tensors of `params` in place and return them (JAX's donation: the
      donated `params` must not be used afterwards); the values are the same.

    **Returns:**

    The new params tree.
    """
    names, p_list = _leaves_of(params)
    u_list = _mirror(names, updates, "updates")
    with torch.no_grad():
        if donate and not _under_functorch() and _distinct(p_list) and all(
                u.dtype == p.dtype for p, u in zip(p_list, u_list)):
            torch._foreach_add_(p_list, u_list)
            return params
        new = [(p + u).to(p.dtype) for p, u in zip(p_list, u_list)]
    return tree_unflatten(dict(zip(names, new)))


def optimizer_step(
    optimizer: GradientTransformation,
    params: Tree,
    opt_state: OptState,
    grads: Tree,
    *,
    donate: bool = False,
    donate_grads: bool | None = None,
    **extra_args: Any,
) -> tuple[Tree, OptState]:
    """One optimizer step, `(params, state, grads) -> (params, state)`: the transformation's fused
    `apply` where it has one, else `update` then `apply_updates`.

    **Arguments:**

    - `optimizer`: a `GradientTransformation`.
    - `params`, `opt_state`, `grads`: the params, the optimizer's state, and gradients mirroring
      the params.
    - `donate`: the caller will not use `params` or `opt_state` again, so the step may update
      them in place (JAX's donation); the values are the same.
    - `donate_grads`: the same for `grads` (default: as `donate`).
    - `extra_args`: passed to the transformation (e.g. `grad_norm=`, the gradients' global norm).

    **Returns:**

    `(new_params, new_opt_state)`.
    """
    extra_args["donate_updates"] = donate if donate_grads is None else donate_grads
    if optimizer.apply is not None:
        return optimizer.apply(grads, opt_state, params, donate=donate, **extra_args)
    updates, opt_state = _call(optimizer, grads, opt_state, params, extra_args)
    return apply_updates(params, updates, donate=donate), opt_state


def _check_chain_state(state: OptState, n: int) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != n:
        got = f"a {type(state).__name__} of {len(state)}" if isinstance(state, (tuple, list, dict)) else repr(state)
        raise ValueError(f"this optimizer is a chain of {n} transformation(s); its state must be a tuple of {n} "
                         f"states, got {got:.200} (a state made by another optimizer?)")


def chain(*transforms: GradientTransformation) -> GradientTransformationExtraArgs:
    """Apply transformations one after the other (optax's `chain`, same semantics); the state is a
    tuple of theirs. `chain()` of nothing is the identity, with state `()` (optax's fails to build).

    Extra arguments reach every link that takes them, except `grad_norm` and `donate_updates`, which
    describe the chain's incoming gradients and go to the first link only. The chain has a fused
    `apply` when its last link has one: the other links run `update`, the last one `apply`.

    **Arguments:**

    - `*transforms`: the links, first applied first.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    links = tuple(transforms)
    for i, t in enumerate(links):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain's argument {i} must be a GradientTransformation, got {type(t).__name__}")

    def init(params: Tree) -> OptState:
        return tuple(t.init(params) for t in links)

    def run(updates: Tree, state: OptState, params: Tree | None, extra: dict[str, Any], upto: int) -> tuple:
        new_state = []
        for i, t in enumerate(links[:upto]):
            updates, s = _call(t, updates, state[i], params, extra if i == 0 else _later(extra))
            new_state.append(s)
        return updates, new_state

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_chain_state(state, len(links))
        updates, new_state = run(updates, state, params, extra, len(links))
        return updates, tuple(new_state)

    def apply(updates: Tree, state: OptState, params: Tree, *, donate: bool = False,
              **extra: Any) -> tuple[Tree, OptState]:
        _check_chain_state(state, len(links))
        updates, new_state = run(updates, state, params, extra, len(links) - 1)
        last = extra if len(links) == 1 else _later(extra)
        params, s = links[-1].apply(updates, state[-1], params, donate=donate, **last)
        return params, tuple(new_state) + (s,)

    fused = links and links[-1].apply is not None
    return GradientTransformationExtraArgs(init, update, apply if fused else None)


def _check_empty_state(state: OptState, who: str) -> None:
    if not (isinstance(state, tuple) and len(state) == 0):
        got = f"keys {sorted(state)}" if isinstance(state, dict) else f"{type(state).__name__} {state!r:.120}"
        raise ValueError(f"{who} keeps no state, so its state must be (), got {got} (a state made by another "
                         "transformation or optimizer?)")


def _stateless(fn: Callable[[Tree, Tree | None, dict[str, Any]], Tree], who: str) -> GradientTransformationExtraArgs:
    def init(params: Tree) -> OptState:
        return ()

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_empty_state(state, who)
        return fn(updates, params, extra), state

    return GradientTransformationExtraArgs(init, update)


def identity() -> GradientTransformationExtraArgs:
    """The transformation that changes nothing (optax's `identity`, same semantics); state `()`.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    return _stateless(lambda updates, params, extra: updates, "identity")


def set_to_zero() -> GradientTransformationExtraArgs:
    """Map the updates to zeros (optax's `set_to_zero`, same semantics); state `()`. With
    `multi_transform` (or `masked`) it freezes a group of leaves:
    `multi_transform({"train": adamw(1e-3), "frozen": set_to_zero()}, labels)`.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    return _stateless(lambda updates, params, extra: tree_map(torch.zeros_like, updates), "set_to_zero")


def _scaled(updates: Tree, factor: float | Tensor) -> Tree:
    with torch.no_grad():
        return tree_map(lambda u: u * factor, updates)


def scale(step_size: Scalar) -> GradientTransformationExtraArgs:
    """Multiply the updates by `step_size` (optax's `scale`, same semantics); state `()`.

    **Arguments:**

    - `step_size`: the factor (a number, or a 0-d tensor such as a per-model value under `vmap`).

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    return _stateless(lambda updates, params, extra: _scaled(updates, step_size), "scale")


def scale_by_learning_rate(
    learning_rate: Scalar | Schedule, *, flip_sign: bool = True
) -> GradientTransformationExtraArgs:
    """Multiply the updates by `-learning_rate` (optax's `scale_by_learning_rate`, same arguments and
    semantics).

    **Arguments:**

    - `learning_rate`: a float (or a 0-d tensor, e.g. one per model under `vmap`), or a schedule
      `count -> lr` evaluated at the number of updates done so far (state `{"count": n}`; with a
      constant rate the state is `()`).
    - `flip_sign`: multiply by `-lr` (descent) rather than `lr`.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    sign = -1.0 if flip_sign else 1.0
    if not callable(learning_rate):
        check_hyper(learning_rate=learning_rate)
        return _stateless(lambda updates, params, extra: _scaled(updates, sign * learning_rate),
                          "scale_by_learning_rate")

    def init(params: Tree) -> OptState:
        return {"count": 0}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("count",), "scale_by_learning_rate (with a schedule)")
        count = state["count"]
        return _scaled(updates, sign * learning_rate(count)), {"count": count + 1}

    return GradientTransformationExtraArgs(init, update)


def clip_by_global_norm(max_norm: float | int, *, eps: float = 0.0) -> GradientTransformationExtraArgs:
    """Scale the updates so that their global l2 norm is at most `max_norm` (optax's
    `clip_by_global_norm`, same semantics); state `()`.

    Every leaf is multiplied by `min(1, max_norm / (norm + eps))`, with no data-dependent branch
    (an all-zero tree stays zero, also with `max_norm = 0`; an empty tree stays empty).
    With `eps=0` (the default) this is optax's rule (`g * max_norm / norm` where the norm exceeds
    `max_norm`); `eps=1e-6` is CS336's `clip_grad_norm` and `torch.nn.utils.clip_grad_norm_`.
    Takes the extra arguments `grad_norm` (the norm, already computed by the caller) and
    `donate_updates` (scale the incoming tensors in place).

    **Arguments:**

    - `max_norm`: the largest global norm, `>= 0`.
    - `eps`: added to the norm in the denominator.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    check_hyper(max_norm=max_norm, eps=eps)

    def clip(updates: Tree, params: Tree | None, extra: dict[str, Any]) -> Tree:
        names, leaves = _leaves_of(updates)
        if not leaves:
            return updates
        norm = extra.get("grad_norm")
        norm = global_norm(updates) if norm is None else norm
        coef = (max_norm / (norm + eps)).nan_to_num(nan=1.0).clamp(max=1.0)
        with torch.no_grad():
            if _under_functorch():
                scaled = [u * coef for u in leaves]
            elif extra.get("donate_updates", False):
                torch._foreach_mul_(leaves, coef)
                return updates
            else:
                scaled = list(torch._foreach_mul(leaves, coef))
        return tree_unflatten(dict(zip(names, scaled)))

    return _stateless(clip, "clip_by_global_norm")


def _decayed(updates: Tree, params: Tree | None, rate: Scalar, mask: Any) -> Tree:
    if params is None:
        raise ValueError("add_decayed_weights needs the params: call update(updates, state, params)")
    names, u_list = _leaves_of(updates)
    p_list = _mirror(names, params, "params")
    flags = _decay_flags(dict(zip(names, u_list)), mask, "mask")
    if not isinstance(rate, Tensor) and rate == 0:
        return updates
    with torch.no_grad():
        new = [u + rate * p if f else u for u, p, f in zip(u_list, p_list, flags)]
    return tree_unflatten(dict(zip(names, new)))


def add_decayed_weights(weight_decay: Scalar | Schedule = 0.0, mask: Any = None) -> GradientTransformationExtraArgs:
    """Add `weight_decay * params` to the updates of the masked-in leaves (optax's
    `add_decayed_weights`, same arguments and semantics).

    **Arguments:**

    - `weight_decay`: the rate (a number, a 0-d tensor, or a schedule `count -> rate`, evaluated at
      the number of updates done so far: state `{"count": n}`; otherwise the state is `()`).
    - `mask`: which leaves decay: None (all), a tree of bools mirroring the params (or a prefix of
      them), a predicate `fn(name, leaf) -> bool` (e.g. `fnlm.default_decay_mask`), or optax's
      `fn(params) -> tree of bools`. As in optax, a callable mask is called on the updates.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    if not callable(weight_decay):
        check_hyper(weight_decay=weight_decay)
        return _stateless(lambda updates, params, extra: _decayed(updates, params, weight_decay, mask),
                          "add_decayed_weights")

    def init(params: Tree) -> OptState:
        return {"count": 0}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("count",), "add_decayed_weights (with a schedule)")
        count = state["count"]
        return _decayed(updates, params, weight_decay(count), mask), {"count": count + 1}

    return GradientTransformationExtraArgs(init, update)


def trace(decay: Scalar, nesterov: bool = False, accumulator_dtype: torch.dtype | None = None
          ) -> GradientTransformationExtraArgs:
    """Momentum (optax's `trace`, same arguments and semantics): `t <- g + decay t`; the updates are
    `t`, or with `nesterov` `g + decay t`. State `{"trace": tree}`.

    **Arguments:**

    - `decay`: the momentum coefficient, in `[0, 1)`.
    - `nesterov`: Nesterov momentum.
    - `accumulator_dtype`: the dtype the trace is stored in (default: the params'); the updates are
      computed before that cast, as in optax.

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    check_hyper(decay=decay)

    def init(params: Tree) -> OptState:
        return {"trace": tree_map(lambda p: torch.zeros_like(p, dtype=accumulator_dtype or p.dtype), params)}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("trace",), "trace")
        names, u_list = _leaves_of(updates)
        t_list = _mirror(names, state["trace"], "state['trace']")
        with torch.no_grad():
            new_t = [g + _decay_state(decay, t, g) for g, t in zip(u_list, t_list)]
            out = [g + decay * t for g, t in zip(u_list, new_t)] if nesterov else new_t
            kept = [t if accumulator_dtype is None else t.to(accumulator_dtype) for t in new_t]
        return tree_unflatten(dict(zip(names, out))), {"trace": tree_unflatten(dict(zip(names, kept)))}

    return GradientTransformationExtraArgs(init, update)


def _bias_correction(decay: float, count: int | Tensor) -> float | Tensor:
    return 1.0 - decay**count


def scale_by_adam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformationExtraArgs:
    """Rescale the updates by Adam's moment estimates (optax's `scale_by_adam`, same arguments and
    semantics).

    With `t` the count after this update: `mu <- b1 mu + (1 - b1) g`, `nu <- b2 nu + (1 - b2) g^2`,
    `updates = mu_hat / (sqrt(nu_hat + eps_root) + eps)` where `mu_hat = mu / (1 - b1^t)` and
    `nu_hat = nu / (1 - b2^t)` (with `nesterov`, `mu_hat = b1 mu / (1 - b1^(t+1)) + (1 - b1) g /
    (1 - b1^t)`). State `{"count": t, "mu": tree, "nu": tree}`.

    **Arguments:**

    - `b1`, `b2`: the moment decays, in `[0, 1)`.
    - `eps`: added to the root of the second moment.
    - `eps_root`: added under the root.
    - `mu_dtype`: the dtype the first moment is stored in (default: the params'); the updates are
      computed before that cast, and a float16/bfloat16 moment is multiplied by `b1` rounded to
      its dtype, both as in optax (under `jax.jit`).
    - `nesterov`: Nesterov's momentum (NAdam).

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    check_hyper(beta1=b1, beta2=b2, eps=eps, eps_root=eps_root)

    def init(params: Tree) -> OptState:
        return {"count": 0, "mu": tree_map(lambda p: torch.zeros_like(p, dtype=mu_dtype or p.dtype), params),
                "nu": tree_map(torch.zeros_like, params)}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("count", "mu", "nu"), "scale_by_adam")
        names, g_list = _leaves_of(updates)
        mu = _mirror(names, state["mu"], "state['mu']")
        nu = _mirror(names, state["nu"], "state['nu']")
        count = state["count"] + 1
        bc1, bc2 = _bias_correction(b1, count), _bias_correction(b2, count)
        with torch.no_grad():
            new_mu = [(1.0 - b1) * g + _decay_state(b1, m, g) for m, g in zip(mu, g_list)]
            new_nu = [((1.0 - b2) * (g * g) + b2 * v).to(v.dtype) for v, g in zip(nu, g_list)]
            if nesterov:
                bc1_next = _bias_correction(b1, count + 1)
                mu_hat = [b1 * (m / bc1_next) + (1.0 - b1) * (g / bc1) for m, g in zip(new_mu, g_list)]
            else:
                mu_hat = [m / bc1 for m in new_mu]
            out = [(m / ((v / bc2 + eps_root).sqrt() + eps)).to(g.dtype) for m, v, g in zip(mu_hat, new_nu, g_list)]
            new_mu = [m if mu_dtype is None else m.to(mu_dtype) for m in new_mu]
        new_state = {"count": count, "mu": tree_unflatten(dict(zip(names, new_mu))),
                     "nu": tree_unflatten(dict(zip(names, new_nu)))}
        return tree_unflatten(dict(zip(names, out))), new_state

    return GradientTransformationExtraArgs(init, update)


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99, mu_dtype: torch.dtype | None = None
                  ) -> GradientTransformationExtraArgs:
    """Rescale the updates by Lion's rule (optax's `scale_by_lion`, same arguments and semantics):
    `updates = sign((1 - b1) g + b1 mu)`, then `mu <- (1 - b2) g + b2 mu`. State
    `{"count": n, "mu": tree}`.

    **Arguments:**

    - `b1`: the rate that combines the momentum and the current gradient, in `[0, 1)`.
    - `b2`: the decay of the momentum, in `[0, 1)`.
    - `mu_dtype`: the dtype the momentum is stored in (default: the params').

    **Returns:**

    A `GradientTransformationExtraArgs`.
    """
    check_hyper(beta1=b1, beta2=b2)

    def init(params: Tree) -> OptState:
        return {"count": 0, "mu": tree_map(lambda p: torch.zeros_like(p, dtype=mu_dtype or p.dtype), params)}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("count", "mu"), "scale_by_lion")
        names, g_list = _leaves_of(updates)
        mu = _mirror(names, state["mu"], "state['mu']")
        with torch.no_grad():
            out = [torch.sign((1.0 - b1) * g + _decay_state(b1, m, g)) for g, m in zip(g_list, mu)]
            new_mu = [(1.0 - b2) * g + _decay_state(b2, m, g) for g, m in zip(g_list, mu)]
            new_mu = [m if mu_dtype is None else m.to(mu_dtype) for m in new_mu]
        new_state = {"count": state["count"] + 1, "mu": tree_unflatten(dict(zip(names, new_mu)))}
        return tree_unflatten(dict(zip(names, out))), new_state

    return GradientTransformationExtraArgs(init, update)
