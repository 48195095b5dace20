"""The global gradient norm and clipping by it (CS336's `clip_grad_norm`, with eps 1e-6)."""

from __future__ import annotations

import torch

from fnlm.optim._common import _under_functorch
from fnlm.tree import Tree, tree_flatten, tree_unflatten
from fnlm.types import Float, Tensor

__all__ = ["CLIP_EPS", "global_norm", "clip_grad_norm", "clip_grad_norm_with_norm"]

CLIP_EPS = 1e-6


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
