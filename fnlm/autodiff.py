"""Gradients of functions of parameter trees, in JAX's `value_and_grad` shape.

Two interchangeable back ends compute the same thing: reverse-mode autograd over fresh leaf tensors
(`torch.autograd.grad`) and `torch.func.grad_and_value`. `benchmarks/value_and_grad.py` times both;
the default is the one that measured faster (autograd over leaves, see that script).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from fnlm.tree import Tree, tree_flatten, tree_map, tree_unflatten
from fnlm.types import Tensor

__all__ = ["value_and_grad"]


def _check_value(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != 0 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"value_and_grad needs fn to return a floating 0-d tensor, got {shape}")
    return value


def _detach_tree(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, (dict, list, tuple)):
        return tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, tree)
    return tree


def _split(out: Any, has_aux: bool) -> tuple[Tensor, Any]:
    if not has_aux:
        return _check_value(out), None
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError(f"with has_aux=True, fn must return (value, aux), got {type(out).__name__}")
    return _check_value(out[0]), out[1]


def _autograd_value_and_grad(fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    def wrapped(params: Tree, *args: Any, **kwargs: Any) -> Any:
        flat = tree_flatten(params)
        names = list(flat)
        for name, leaf in flat.items():
            if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                kind = leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__
                raise TypeError(f"value_and_grad: parameter {name!r} is not a floating tensor ({kind})")
        leaves = [leaf.detach().requires_grad_() for leaf in flat.values()]
        with torch.enable_grad():
            value, aux = _split(fn(tree_unflatten(dict(zip(names, leaves))), *args, **kwargs), has_aux)
            grads = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
        grad_tree = tree_unflatten(dict(zip(names, grads)))
        value = value.detach()
        return ((value, _detach_tree(aux)), grad_tree) if has_aux else (value, grad_tree)

    return wrapped


def _func_value_and_grad(fn: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    def wrapped(params: Tree, *args: Any, **kwargs: Any) -> Any:
        box: list[Any] = []

        def checked(p: Tree) -> Any:
            value, aux = _split(fn(p, *args, **kwargs), has_aux)
            if not has_aux:
                return value
            leaves, spec = pytree.tree_flatten(aux)
            box.append((leaves, spec))
            return value, tuple(x for x in leaves if isinstance(x, Tensor))

        grads, out = torch.func.grad_and_value(checked, has_aux=has_aux)(params)
        if not has_aux:
            return out, grads
        value, tensors = out
        leaves, spec = box[0]
        it = iter(tensors)
        aux = pytree.tree_unflatten([next(it) if isinstance(x, Tensor) else x for x in leaves], spec)
        return (value, aux), grads

    return wrapped


_BACKENDS = {"autograd": _autograd_value_and_grad, "func": _func_value_and_grad}


def value_and_grad(
    fn: Callable[..., Any], *, has_aux: bool = False, backend: str = "autograd"
) -> Callable[..., Any]:
    """Transform `fn(params, *args, **kwargs) -> loss` into one returning `(loss, grads)`.

    `grads` has exactly the structure (and flat names) of `params`; a parameter that does not
    affect the loss gets a zero gradient. The caller's tensors are never modified and need not
    require grad. Example:

    ```python
    loss, grads = fnlm.value_and_grad(lambda p, x, y: fnlm.cross_entropy(model(p, x), y))(params, x, y)
    ```

    **Arguments:**

    - `fn`: a function whose first argument is the params tree (nested dict/list of floating
      tensors) and which returns a 0-d floating tensor, or `(loss, aux)` when `has_aux`.
    - `has_aux`: `fn` returns `(loss, aux)`; `aux` (any tree, e.g. metrics) is passed through
      with its tensors detached.
    - `backend`: `"autograd"` (reverse mode over fresh leaves; default, measured faster) or
      `"func"` (`torch.func.grad_and_value`).

    **Returns:**

    `f(params, *args, **kwargs)` returning `(loss, grads)`, or `((loss, aux), grads)`.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    return _BACKENDS[backend](fn, has_aux)
