"""Gradient accumulation as a transformation: `MultiSteps` (optax's), which applies its inner
transformation once every K calls to the mean (or sum) of the gradients it was given.

```python
from fnlm import optim

tx = optim.MultiSteps(optim.adamw(1e-3), every_k_schedule=4)
state = tx.init(params)
for micro_batch in batches:                     # 4 calls per optimizer step
    grads = ...
    params, state = optim.optimizer_step(tx.gradient_transformation(), params, state, grads)
```

`train_step`'s own `StepConfig.grad_accum_steps` splits one batch into micro-batches inside a
step; `MultiSteps` spreads one optimizer step over K calls (K batches), as optax does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fnlm.optim._common import _check_state
from fnlm.optim.transform import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    OptState,
    _call,
    _later,
    _leaves_of,
    _mirror,
    apply_updates,
)
from fnlm.tree import Tree, _map_keeping_types, tree_map, tree_unflatten
from fnlm.types import Tensor

__all__ = ["MultiSteps"]

_KEYS = ("mini_step", "gradient_step", "inner_opt_state", "acc_grads")


def _select(emit: Tensor, new: Any, old: Any) -> Any:
    """`new` where `emit`, else `old`, leaf by leaf (both are states of one transformation)."""
    if isinstance(new, Tensor) or isinstance(old, Tensor):
        new, old = torch.as_tensor(new), torch.as_tensor(old)
        return torch.where(emit, new, old).to(old.dtype)
    return new if new == old else torch.where(emit, torch.as_tensor(new), torch.as_tensor(old))


class MultiSteps:
    """Accumulate the gradients of K consecutive calls and apply the inner transformation to their
    mean (or sum) on the K-th, returning zero updates on the others (optax's `MultiSteps`, same
    arguments, state and updates; without optax's `should_skip_update_fn`).

    The mean is accumulated as optax does (Welford's update `acc + (g - acc) / (n + 1)`), in
    `accumulator_dtype`. State `{"mini_step": n, "gradient_step": s, "inner_opt_state": ...,
    "acc_grads": tree}`. With Python-int counters the inner transformation runs only on the K-th
    call; with 0-d tensor counters (a compiled step) it runs on every call and its results are
    selected with `torch.where`, as optax does under `jit`.

    **Arguments:**

    - `opt`: the inner transformation.
    - `every_k_schedule`: K, an int `>= 1`, or a function `gradient_step -> K`.
    - `use_grad_mean`: apply the mean of the accumulated gradients (True) or their sum.
    - `accumulator_dtype`: the dtype of the accumulated gradients (optax's default float32).
    """

    def __init__(self, opt: GradientTransformation, every_k_schedule: int | Callable[[Any], Any],
                 use_grad_mean: bool = True, accumulator_dtype: torch.dtype = torch.float32):
        if not isinstance(opt, GradientTransformation):
            raise TypeError(f"MultiSteps' opt must be a GradientTransformation, got {type(opt).__name__}")
        if not callable(every_k_schedule):
            if isinstance(every_k_schedule, bool) or not isinstance(every_k_schedule, int) or every_k_schedule < 1:
                raise ValueError(f"every_k_schedule must be an int >= 1 or a function, got {every_k_schedule!r}")
            k = every_k_schedule
            every_k_schedule = lambda step: k  # noqa: E731
        self._opt = opt
        self._every_k = every_k_schedule
        self._use_grad_mean = use_grad_mean
        self._dtype = accumulator_dtype

    @property
    def inner_opt(self) -> GradientTransformation:
        """The inner transformation."""
        return self._opt

    def init(self, params: Tree) -> OptState:
        """The initial state: counters 0, the inner transformation's state, zero accumulators."""
        return {"mini_step": 0, "gradient_step": 0, "inner_opt_state": self._opt.init(params),
                "acc_grads": tree_map(lambda p: torch.zeros_like(p, dtype=self._dtype), params)}

    def _accumulated(self, updates: Tree, state: OptState) -> tuple[list[str], list[Tensor], list[Tensor]]:
        """The names, the incoming leaves and the new accumulators (mean or sum so far)."""
        names, u_list = _leaves_of(updates)
        acc = _mirror(names, state["acc_grads"], "state['acc_grads']")
        n = state["mini_step"]
        with torch.no_grad():
            if self._use_grad_mean:
                new = [a + (g - a) / (n + 1) for g, a in zip(u_list, acc)]
            else:
                new = [g + a for g, a in zip(u_list, acc)]
        return names, u_list, [a.to(self._dtype) for a in new]

    def update(self, updates: Tree, state: OptState, params: Tree | None = None,
               **extra_args: Any) -> tuple[Tree, OptState]:
        """Accumulate `updates`; on the K-th call return the inner transformation's updates of the
        accumulated gradients, else zeros. `grad_norm` and `donate_updates` describe the incoming
        gradients, not the accumulated ones, so they do not reach the inner transformation.

        **Returns:**

        `(updates, new_state)`.
        """
        k, emit = self._emits(state)
        names, u_list, acc = self._accumulated(updates, state)
        if emit is None:
            return self._update_branch_free(names, u_list, acc, state, params, k, extra_args)
        if not emit:
            zeros = [torch.zeros_like(u) for u in u_list]
            return tree_unflatten(dict(zip(names, zeros))), self._waiting(state, names, acc, k)
        grads = tree_unflatten({n: a.to(u.dtype) for n, a, u in zip(names, acc, u_list)})
        new_updates, inner = _call(self._opt, grads, state["inner_opt_state"], params, _later(extra_args))
        return new_updates, self._emitted(state, names, acc, inner)

    def _emits(self, state: OptState) -> tuple[Any, bool | None]:
        """K for this gradient step, and whether this call applies the inner transformation (None:
        the counters are tensors, so the caller must not branch on them)."""
        _check_state(state, _KEYS, "MultiSteps")
        k = self._every_k(state["gradient_step"])
        mini = state["mini_step"]
        if isinstance(mini, Tensor) or isinstance(k, Tensor):
            return k, None
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every_k_schedule must give an int >= 1, gave {k!r} at step {state['gradient_step']}")
        return k, mini == k - 1

    def _waiting(self, state: OptState, names: list[str], acc: list[Tensor], k: int) -> OptState:
        return {**state, "mini_step": (state["mini_step"] + 1) % k, "acc_grads": tree_unflatten(dict(zip(names, acc)))}

    def _emitted(self, state: OptState, names: list[str], acc: list[Tensor], inner: OptState) -> OptState:
        zero_acc = tree_unflatten({n: torch.zeros_like(a) for n, a in zip(names, acc)})
        return {"mini_step": 0, "gradient_step": state["gradient_step"] + 1, "inner_opt_state": inner,
                "acc_grads": zero_acc}

    def apply(self, updates: Tree, state: OptState, params: Tree, *, donate: bool = False,
              **extra_args: Any) -> tuple[Tree, OptState]:
        """`update` + `apply_updates` in one: the params are returned as they are between the K-th
        calls, and the K-th runs the inner transformation's fused `apply` where it has one.

        **Returns:**

        `(new_params, new_state)`.
        """
        k, emit = self._emits(state)
        if emit is None or (emit and self._opt.apply is None):
            new_updates, state = self.update(updates, state, params, **extra_args)
            return apply_updates(params, new_updates, donate=donate), state
        names, u_list, acc = self._accumulated(updates, state)
        if not emit:
            return params, self._waiting(state, names, acc, k)
        grads = tree_unflatten({n: a.to(u.dtype) for n, a, u in zip(names, acc, u_list)})
        params, inner = self._opt.apply(grads, state["inner_opt_state"], params, donate=donate, **_later(extra_args))
        return params, self._emitted(state, names, acc, inner)

    def _update_branch_free(self, names: list[str], u_list: list[Tensor], acc: list[Tensor], state: OptState,
                            params: Tree | None, k: Any, extra_args: dict[str, Any]) -> tuple[Tree, OptState]:
        """`update` with no branch on the counters' values: the inner update always runs."""
        mini, step = state["mini_step"], state["gradient_step"]
        emit = torch.as_tensor(mini == k - 1)
        grads = tree_unflatten({n: a.to(u.dtype) for n, a, u in zip(names, acc, u_list)})
        new_updates, inner = _call(self._opt, grads, state["inner_opt_state"], params, _later(extra_args))
        with torch.no_grad():
            out = tree_map(lambda u: torch.where(emit, u, torch.zeros_like(u)), new_updates)
            kept = [torch.where(emit, torch.zeros_like(a), a) for a in acc]
        new_state = {"mini_step": (mini + 1) % k, "gradient_step": step + emit.to(torch.int64),
                     "inner_opt_state": _map_keeping_types(lambda n, o: _select(emit, n, o), inner,
                                                           state["inner_opt_state"]),
                     "acc_grads": tree_unflatten(dict(zip(names, kept)))}
        return out, new_state

    def has_updated(self, state: OptState) -> bool | Tensor:
        """Whether the last `update` applied the inner transformation (optax's `has_updated`)."""
        return (state["mini_step"] == 0) & (state["gradient_step"] > 0) if isinstance(
            state["mini_step"], Tensor) else state["mini_step"] == 0 and state["gradient_step"] > 0

    def gradient_transformation(self) -> GradientTransformationExtraArgs:
        """This accumulator as a `GradientTransformation` (optax's `gradient_transformation()`), with
        the fused `apply` above."""
        return GradientTransformationExtraArgs(self.init, self.update, self.apply)
