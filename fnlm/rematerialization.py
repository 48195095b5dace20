"""Activation checkpointing (rematerialisation) as a function transform, `jax.checkpoint`'s shape.

```python
block = fnlm.remat(fnlm.transformer_block)                   # recomputed in the backward
logits = fnlm.transformer_lm(params, ids, config, block=block)
logits = fnlm.transformer_lm(params, ids, config, remat=True)  # the same: the config's block
```

`remat(fn)` computes the same values as `fn`, but keeps only `fn`'s inputs for the backward pass
and runs `fn` again there to get its intermediates: a Transformer's per-layer activations (the
attention probabilities, the feed-forward hidden units) then live one layer at a time instead
of all at once, at the cost of one more forward pass through the wrapped blocks.

Two implementations give the same results; the one that works where the call runs is chosen:

- plain autograd (eager, or a `torch.compile`d loss differentiated by autograd from outside:
  `fnlm.value_and_grad`'s default back end, the training loop's path): PyTorch's own
  `torch.utils.checkpoint.checkpoint`, non-reentrant, with its early stop turned off in eager
  calls (the early stop raises an exception inside the recomputation, which einx wraps, and the
  recomputation then fails). Under `torch.compile` it becomes the `tag_activation_checkpoint`
  operator that the compiler's partitioner honours.
- inside a `torch.func` transform (`grad`, `vjp`, `vmap` of either; `value_and_grad(...,
  backend="func")`; also when `torch.compile` traces one, as a compiled `train_step` does):
  `torch.utils.checkpoint` cannot run there (`torch.func` does not support its saved-tensor
  hooks), so a `torch.autograd.Function` saves the inputs and, in its backward, recomputes `fn`
  under `torch.func.vjp`.

What it saves (`benchmarks/remat_memory.py`, CPU, activations kept for the backward above the
gradients): the 17M model at batch 4 x 128 under eager autograd, 153.5 MiB -> 83.5 MiB (the rest is
the embedding, logits and loss outside the blocks), gradients bitwise equal; a 4-layer d_model 256
model at batch 8 x 128 with the loss compiled, 93 -> 49 MiB, and with the whole `value_and_grad`
compiled through `torch.func`, 105 -> 70 MiB. Under eager `torch.func.grad` the peak barely moves
(462 -> 452 MiB at 17M): `torch.func` differentiates with `create_graph=True`, which keeps every
intermediate of the backward (the recomputed ones too) until the gradients are returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from fnlm.types import Tensor

__all__ = ["remat"]

_METHODS = ("auto", "checkpoint", "function")


class _Box:
    """Carries the output's tree structure out of `forward` for outputs other than a tensor or a
    tuple of tensors (not a pytree node: `torch.func` rebuilds lists and tuples among the
    arguments, so a list would not be the caller's). Not used under `torch.compile`, which allows
    no such side effect inside the function's graph."""

    spec: Any = None


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _plain_output(out: Any) -> bool:
    return isinstance(out, Tensor) or (type(out) is tuple and all(isinstance(t, Tensor) for t in out))


def _outputs(out: Any, out_box: _Box | None) -> Any:
    """`out` as an autograd.Function returns it: a tensor or tuple of tensors as is, any other tree
    as the tuple of its leaves (with its structure put in `out_box`)."""
    if _plain_output(out):
        return out
    if out_box is None:
        raise TypeError("remat: inside a torch.func transform under torch.compile, fn must return a tensor or a "
                        f"tuple of tensors, got {type(out).__name__}")
    leaves, out_box.spec = pytree.tree_flatten(out)
    return tuple(leaves)


class _RecomputeFn(torch.autograd.Function):
    """`fn(*args, **kwargs)` whose backward recomputes `fn` from the saved inputs (`torch.func.vjp`).

    The inputs come flattened (`spec` rebuilds `(args, kwargs)`); only the tensors among them are
    saved. Every floating input gets a gradient under `torch.compile`, where `needs_input_grad`
    was measured wrong under `torch.func.grad` (all False: zero gradients for the parameters).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(fn: Callable[..., Any], spec: Any, out_box: _Box | None, *flat: Any) -> Any:
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        return _outputs(fn(*args, **kwargs), out_box)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        fn, spec, _, *flat = inputs
        ctx.fn, ctx.spec = fn, spec
        ctx.is_tensor = [isinstance(a, Tensor) for a in flat]
        ctx.others = [None if t else a for a, t in zip(flat, ctx.is_tensor)]
        ctx.save_for_backward(*(a for a in flat if isinstance(a, Tensor)))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        flat = [next(saved) if t else other for t, other in zip(ctx.is_tensor, ctx.others)]
        every = torch.compiler.is_compiling()
        wrt = [i for i, a in enumerate(flat) if isinstance(a, Tensor) and a.is_floating_point()
               and (every or ctx.needs_input_grad[i + 3])]

        def recompute(*diff: Tensor) -> Any:
            inputs = list(flat)
            for i, value in zip(wrt, diff):
                inputs[i] = value
            args, kwargs = pytree.tree_unflatten(inputs, ctx.spec)
            out = ctx.fn(*args, **kwargs)
            return out if _plain_output(out) else tuple(pytree.tree_leaves(out))

        out, vjp_fn = torch.func.vjp(recompute, *(flat[i] for i in wrt))
        input_grads = vjp_fn(grads[0] if isinstance(out, Tensor) else tuple(grads))
        result: list[Any] = [None] * len(flat)
        for i, g in zip(wrt, input_grads):
            result[i] = g
        return (None, None, None, *result)


def _function_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    flat, spec = pytree.tree_flatten((args, kwargs))
    out_box = None if torch.compiler.is_compiling() else _Box()
    out = _RecomputeFn.apply(fn, spec, out_box, *flat)
    return out if out_box is None or out_box.spec is None else pytree.tree_unflatten(list(out), out_box.spec)


def _checkpoint_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if torch.compiler.is_compiling():  # dynamo makes it the tag_activation_checkpoint operator: no early stop there
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _closure_tensors(fn: Callable[..., Any]) -> list[str]:
    """Names of the closure cells and `functools.partial` arguments of `fn` that hold tensors."""
    found = []
    while isinstance(fn, functools.partial):
        values = list(fn.args) + list(fn.keywords.values())
        if any(isinstance(leaf, Tensor) for leaf in pytree.tree_leaves(values)):
            found.append(f"functools.partial arguments of {getattr(fn.func, '__name__', fn.func)!r}")
        fn = fn.func
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, getattr(fn, "__closure__", None) or ()):
        try:
            contents = cell.cell_contents
        except ValueError:
            continue
        if any(isinstance(leaf, Tensor) for leaf in pytree.tree_leaves(contents)):
            found.append(name)
    return found


def remat(fn: Callable[..., Any], *, method: str = "auto") -> Callable[..., Any]:
    """`fn`, recomputed in the backward pass instead of keeping its intermediates (`jax.checkpoint`).

    The values and gradients are those of `fn` (the recomputation is the same arithmetic: the
    17M model's gradients came out bitwise equal under autograd, and within 1e-7 elsewhere),
    deterministic, and the transform composes with `fnlm.value_and_grad` (both back ends),
    `torch.func.grad`, `vjp`, `vmap` and `torch.compile` (`fullgraph=True` included); see the
    module docstring for where it saves memory. Example:

    ```python
    block = fnlm.remat(fnlm.transformer_block)
    loss = lambda p, x, y: fnlm.cross_entropy(fnlm.transformer_lm(p, x, config, block=block), y)
    ```

    `fn` must be pure: every tensor it reads comes in through its arguments (trees of tensors are
    fine), and it draws no random numbers from torch's global generator (the recomputation must
    see the same values). A `fn` whose closure or `functools.partial` arguments hold tensors is
    refused (their gradients would be lost under `torch.func`). Without autograd (under
    `torch.no_grad`, e.g. evaluation and decoding) `fn` is simply called.

    **Arguments:**

    - `fn`: `fn(*args, **kwargs) -> tensor or tree of tensors`; its arguments are any trees of
      tensors and plain values.
    - `method`: `"auto"` (`torch.utils.checkpoint` under plain autograd, eager or compiled; the
      `torch.autograd.Function` inside `torch.func` transforms), `"checkpoint"` or `"function"` to
      force one (`"checkpoint"` raises `RuntimeError` inside a `torch.func` transform). Under
      `torch.compile` inside a `torch.func` transform, `fn` must return a tensor or a tuple of
      tensors; elsewhere any tree of tensors.

    **Returns:** a function with `fn`'s signature and results.
    """
    if not callable(fn):
        raise TypeError(f"remat needs a callable fn, got {type(fn).__name__}")
    if method not in _METHODS:
        raise ValueError(f"remat: method must be one of {_METHODS}, got {method!r}")
    compiling = torch.compiler.is_compiling()  # dynamo traces neither the closure check nor functools.wraps
    captured = [] if compiling else _closure_tensors(fn)
    if captured:
        raise TypeError(f"remat: fn must take every tensor as an argument, but its closure holds tensors in "
                        f"{captured}; pass them as arguments instead")

    def rematted(*args: Any, **kwargs: Any) -> Any:
        transformed = _functorch_active()
        if not transformed and not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        use_function = method == "function" or (method == "auto" and transformed)
        if method == "checkpoint" and transformed:
            raise RuntimeError("remat(method='checkpoint') cannot run inside a torch.func transform (torch.func does "
                               "not support the saved-tensor hooks torch.utils.checkpoint uses); use method='auto'")
        return (_function_call if use_function else _checkpoint_call)(fn, args, kwargs)

    return rematted if compiling else functools.wraps(fn)(rematted)

