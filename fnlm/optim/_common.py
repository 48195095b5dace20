"""What the optimizers share: decay masks, hyper-parameter checks, tree-shape checks, and the
switches between the multi-tensor kernels and plain per-leaf ops (inside `torch.func` transforms)."""

from __future__ import annotations

import inspect
import math
from typing import Any, Union

import torch

from fnlm.tree import Tree, tree_flatten, tree_unflatten
from fnlm.types import Tensor, tracing

DecayMask = Any
"""`None` (every leaf), a tree of bools mirroring the params (or a prefix of them, optax's form: a
bool at `layers` covers every leaf under it), a predicate `fn(name, leaf) -> bool`, or optax's
`fn(params) -> tree of bools`."""

Scalar = Union[float, int, Tensor]
"""A hyper-parameter: a Python number or a 0-d floating tensor (one per model under `vmap`)."""


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


def _mask_takes_params(mask: Any) -> bool:
    """Whether a callable mask is optax's form `fn(params) -> tree` (one argument) rather than
    fnlm's per-leaf predicate `fn(name, leaf) -> bool`."""
    try:
        params = inspect.signature(mask).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params)


def _covering(name: str, spec_flat: dict[str, Any]) -> str | None:
    """The key of `spec_flat` that is `name` or its longest dotted prefix ("" is the root), if any."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in spec_flat:
            return key
    return None


def _prefix_values(params_flat: dict[str, Any], spec: Any, what: str) -> list[Any]:
    """One value per leaf of `params_flat` from `spec`, a tree mirroring the params or a prefix of
    them (optax's masks and labels: a value at `layers` covers every leaf under `layers`)."""
    spec_flat = tree_flatten(spec)
    if spec_flat.keys() == params_flat.keys():
        return list(spec_flat.values())
    keys = [_covering(name, spec_flat) for name in params_flat]
    missing = sorted(n for n, k in zip(params_flat, keys) if k is None)
    extra = sorted(spec_flat.keys() - set(keys) - {""})
    if missing or extra:
        raise ValueError(f"{what} does not mirror params (nor is a prefix of them): no value for {missing[:8]}, "
                         f"unexpected {extra[:8]}")
    return [spec_flat[k] for k in keys]


def _per_leaf(params_flat: dict[str, Any], spec: Any, what: str) -> list[Any]:
    """`spec` as one value per leaf: a tree (or prefix tree) of values, a per-leaf function
    `fn(name, leaf)`, or optax's `fn(params) -> tree`."""
    if callable(spec) and _mask_takes_params(spec):
        return _prefix_values(params_flat, spec(tree_unflatten(dict(params_flat))), f"{what}(params)")
    if callable(spec):
        return [spec(name, leaf) for name, leaf in params_flat.items()]
    return _prefix_values(params_flat, spec, what)


def _decay_flags(params_flat: dict[str, Any], decay_mask: DecayMask, what: str = "decay_mask") -> list[bool]:
    """The mask as one bool per leaf: `None` (all), a tree of bools mirroring the params (or a prefix
    of them), a predicate `fn(name, leaf) -> bool`, or optax's `fn(params) -> tree of bools`."""
    if decay_mask is None:
        return [True] * len(params_flat)
    flags = _per_leaf(params_flat, decay_mask, what)
    for name, flag in zip(params_flat, flags):
        if not isinstance(flag, bool):
            raise TypeError(f"{what} must give a bool for {name!r}, got {flag!r}")
    return flags


def _check_state(state: Any, keys: tuple[str, ...], who: str) -> None:
    """Raise `ValueError` unless `state` is a dict with exactly `keys` (a state made by another
    transformation, or by another optimizer, is caught here rather than half-used)."""
    if not isinstance(state, dict) or set(state) != set(keys):
        got = f"keys {sorted(state)}" if isinstance(state, dict) else f"{type(state).__name__} {state!r:.120}"
        raise ValueError(f"{who}'s state must be a dict with keys {list(keys)}, got {got} (a state made by another "
                         "transformation or optimizer?)")


_UNIT_INTERVAL = ("decay", "momentum")


def check_hyper(**values: float | Tensor) -> None:
    """Raise `ValueError` for an optimizer hyper-parameter out of range: `beta*` in `[0, 1)`, the
    others in `[0, inf)`, NaN nowhere. A tensor value must be a floating 0-d tensor (or, under
    `torch.func.vmap`, one per model); its value is checked in eager calls on the CPU (a host read
    costs nothing there) and not under `torch.compile`, `torch.func` transforms or on an
    accelerator, where reading it would synchronise every step (a sweep checks its values when it
    is built)."""
    if torch.compiler.is_compiling():
        return
    for key, value in values.items():
        lo, hi = (0.0, 1.0) if key.startswith(("beta", "b1", "b2")) or key in _UNIT_INTERVAL else (0.0, math.inf)
        if isinstance(value, Tensor):
            if value.ndim != 0 or not value.is_floating_point():
                raise ValueError(f"{key} must be a float or a floating 0-d tensor, got {value!r}")
            if value.device.type != "cpu" or tracing():
                continue
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a float, got {type(value).__name__} {value!r}")
        if not (lo <= value < hi):
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


def _under_functorch() -> bool:
    """True inside a `torch.func` transform (not `torch.compile`): `torch._foreach_*` kernels have no
    batching rules, so the steps use one plain op per leaf there."""
    return tracing() and not torch.compiler.is_compiling()


def _distinct(tensors: list[Tensor]) -> bool:
    """No two leaves share memory (tied weights would be updated twice in place); then donation is safe.
    A DTensor (a shard, `fnlm.train.sharding`) has no storage of its own: its local tensor's counts."""
    ptrs = [(t.to_local() if hasattr(t, "device_mesh") else t).untyped_storage().data_ptr()
            for t in tensors if isinstance(t, Tensor)]
    return len(set(ptrs)) == len(ptrs)


def _decay_state(decay: float | Tensor, state: Tensor, like: Tensor) -> Tensor:
    """`decay * state`, as optax computes it under `jax.jit` when `state` is float16 or bfloat16 (a
    `mu_dtype` or `accumulator_dtype`): `decay`, a weakly typed constant, is rounded to the state's
    dtype (bfloat16(0.9) = 0.8984375), and the product is taken in the dtype of `state` and `like`
    (the gradient) promoted together, with no rounding in between. For other dtypes it is the plain
    product."""
    if state.dtype not in (torch.float16, torch.bfloat16):
        return decay * state
    if isinstance(decay, Tensor):
        decay = decay.to(state.dtype).to(like.dtype)
    else:
        decay = torch.tensor(decay, dtype=state.dtype).item()
    return decay * state.to(torch.promote_types(state.dtype, like.dtype))


def _has_decay(weight_decay: float | Tensor) -> bool:
    return isinstance(weight_decay, Tensor) or weight_decay != 0
