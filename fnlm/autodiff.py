"""Gradients of functions of parameter trees, in JAX's `value_and_grad` shape, and per-example
gradients.

Two interchangeable back ends compute the same thing: reverse-mode autograd over fresh leaf tensors
(`torch.autograd.grad`) and `torch.func.grad_and_value`. `benchmarks/value_and_grad.py` times both;
the default is the one that measured faster (autograd over leaves, see that script). Inside a
`torch.func` transform (`vmap` over stacked models, as `fnlm.train.sweep` does) the autograd back
end cannot run, and `torch.func` is used there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from fnlm.tree import Tree, tree_flatten, tree_map, tree_unflatten
from fnlm.types import Float, Tensor, tracing

__all__ = ["value_and_grad", "per_example_grads", "per_example_grad_norms"]


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
    functional = _func_value_and_grad(fn, has_aux)

    def wrapped(params: Tree, *args: Any, **kwargs: Any) -> Any:
        if tracing() and not torch.compiler.is_compiling():
            return functional(params, *args, **kwargs)
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
    - `backend`: `"autograd"` (reverse mode over fresh leaves; default, measured faster; inside a
      `torch.func` transform it uses `"func"`, since `torch.autograd.grad` cannot run there) or
      `"func"` (`torch.func.grad_and_value`).

    **Returns:**

    `f(params, *args, **kwargs)` returning `(loss, grads)`, or `((loss, aux), grads)`.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    return _BACKENDS[backend](fn, has_aux)


def per_example_grads(
    loss_fn: Callable[..., Tensor], *, chunk_size: int | None = None
) -> Callable[..., Tree]:
    """Transform `loss_fn(params, *batch) -> loss` into one returning the gradient of every example.

    `vmap` of `grad` over the examples (JAX's recipe; what DP-SGD and gradient-noise studies need):
    example `i` is the batch arguments' row `i`, given to `loss_fn` as a batch of one, so `loss_fn`
    is the ordinary batched loss. Example:

    ```python
    grads = fnlm.per_example_grads(loss_fn)(params, x, y)   # x, y: (batch, seq)
    grads["lm_head"]["weight"].shape                        # (batch, vocab, d_model)
    norms = fnlm.per_example_grad_norms(grads)              # (batch,)
    ```

    The mean of the per-example gradients is the gradient of the mean loss (when `loss_fn` is a
    mean over its batch, as `cross_entropy` is).

    **Arguments:**

    - `loss_fn`: `(params, *batch) -> 0-d loss`, where each batch argument has a leading batch axis.
    - `chunk_size`: examples per vectorized chunk (`torch.func.vmap`'s `chunk_size`), to bound
      memory; `None` does them all at once.

    **Returns:**

    `f(params, *batch)` returning the params tree whose every leaf has a leading `batch` axis:
    leaf `[i]` is the gradient of `loss_fn(params, *(a[i:i+1] for a in batch))`.
    """

    def one(params: Tree, *example: Any) -> Tree:
        return torch.func.grad(lambda p: loss_fn(p, *(a.unsqueeze(0) for a in example)))(params)

    def wrapped(params: Tree, *batch: Tensor) -> Tree:
        if not batch:
            raise ValueError("per_example_grads needs at least one batch argument after params")
        sizes = {a.shape[0] if isinstance(a, Tensor) and a.ndim else None for a in batch}
        if len(sizes) != 1 or None in sizes:
            shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in batch]
            raise ValueError(f"per_example_grads: every batch argument needs the same leading batch axis, got {shapes}")
        in_dims = (None,) + (0,) * len(batch)
        return torch.func.vmap(one, in_dims=in_dims, chunk_size=chunk_size)(params, *batch)

    return wrapped


def per_example_grad_norms(grads: Tree) -> Float[Tensor, " batch"]:
    """The global l2 norm of each example's gradient: `sqrt(sum over leaves of |g_leaf[i]|^2)`.

    **Arguments:**

    - `grads`: a tree from :func:`per_example_grads` (every leaf has a leading batch axis).

    **Returns:**

    A float32 (float64 for float64 leaves) tensor of shape `(batch,)`.
    """
    leaves = [g for g in tree_flatten(grads).values() if isinstance(g, Tensor)]
    if not leaves:
        raise ValueError("per_example_grad_norms of a tree with no tensor leaves")
    acc = torch.float64 if any(g.dtype == torch.float64 for g in leaves) else torch.float32
    squares = [g.reshape(g.shape[0], -1).to(acc).square().sum(1) for g in leaves]  # (batch,) each
    return torch.stack(squares).sum(0).sqrt()
