"""Muon (Jordan et al. 2024): momentum orthogonalized by a Newton–Schulz iteration, for the 2-D
hidden matrices of a network, with AdamW for the other leaves.

The update is `torch.optim.Muon`'s (torch 2.13), step for step: the momentum buffer
`B <- lerp(B, g, 1 - beta)`, the Nesterov direction `lerp(g, B, beta)`, five quintic Newton–Schulz
iterations in bfloat16 with coefficients `(3.4445, -4.775, 2.0315)` after dividing by
`max(||X||_F, eps)` (on the transpose of a tall matrix), a rate `lr sqrt(max(1, A/B))` for an
`A x B` matrix (`adjust_lr_fn="original"`) or `0.2 lr sqrt(max(A, B))` (`"match_rms_adamw"`), and
decoupled decay `p <- p (1 - lr wd)`:

```python
from fnlm import optim

tx = optim.muon(0.02, adam_learning_rate=3e-4)   # Muon for hidden matrices, AdamW for the rest
```

`muon` is a `multi_transform` of `chain(scale_by_muon(...), add_decayed_weights(wd),
scale_by_learning_rate(lr))` (labelled `"muon"`) and `adamw(...)` (labelled `"adam"`). Its fused
`apply` computes the matrix update as torch does (`p (1 - lr wd) - lr' O`); `update` +
`apply_updates` give the same up to float rounding.

optax's `optax.contrib.muon` differs from torch's (it bias-corrects the momentum and shares one
epsilon); this module follows torch, with optax's argument names where the two agree.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fnlm.optim._common import Scalar, _check_state, _decay_flags, _distinct, _under_functorch, check_hyper
from fnlm.optim.alias import _rate, adamw
from fnlm.optim.combine import multi_transform
from fnlm.optim.schedules import Schedule
from fnlm.optim.transform import (
    GradientTransformationExtraArgs,
    OptState,
    _check_chain_state,
    _leaves_of,
    _mirror,
    add_decayed_weights,
    chain,
    scale_by_learning_rate,
)
from fnlm.tree import Tree, tree_map, tree_unflatten
from fnlm.types import Float, Tensor

__all__ = ["orthogonalize_via_newton_schulz", "scale_by_muon", "muon", "hidden_matrix_mask", "NS_COEFFS"]

NS_COEFFS = (3.4445, -4.775, 2.0315)
"""The quintic Newton–Schulz coefficients of Keller Jordan's Muon (torch's defaults)."""

_ADJUST = (None, "original", "match_rms_adamw")
_EMBEDDING_AND_HEAD = ("token_embeddings.weight", "lm_head.weight")


def orthogonalize_via_newton_schulz(
    x: Float[Tensor, "rows cols"], ns_coeffs: tuple = NS_COEFFS, ns_steps: int = 5,
    eps: float = 1e-7,
) -> Tensor:
    """An approximate orthogonalization `U S' V^T` of `x = U S V^T` (`S'` near 1), in bfloat16:
    torch's `_zeropower_via_newtonschulz` (torch 2.13), op for op.

    `X <- x / max(||x||_F, eps)` (on `x^T` when `x` is tall), then `ns_steps` times
    `A = X X^T; X <- a X + (b A + c A A) X`.

    **Arguments:**

    - `x`: a matrix.
    - `ns_coeffs`: `(a, b, c)`.
    - `ns_steps`: the number of iterations.
    - `eps`: the floor of the norm.

    **Returns:**

    A bfloat16 matrix of `x`'s shape.
    """
    a, b, c = ns_coeffs
    tall = x.size(0) > x.size(1)
    out = x.bfloat16()
    if tall:
        out = out.T
    out = out / out.norm().clamp(min=eps)
    step = _ns_step_batched if _under_functorch() else _ns_step
    for _ in range(ns_steps):
        out = step(out, a, b, c)
    return out.T if tall else out


def _ns_step(x: Tensor, a: float, b: float, c: float) -> Tensor:
    gram = x @ x.T
    poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
    return torch.addmm(x, poly, x, beta=a)


def _ns_step_batched(x: Tensor, a: float, b: float, c: float) -> Tensor:
    """`_ns_step` under `torch.func.vmap`, where `addmm` decomposes into a bfloat16 product, scale
    and sum, each rounded to bfloat16: here each `addmm` is computed in float32 and rounded once, as
    the unbatched kernel does (same bits on the matrices tried; at most float32 summation order apart)."""
    gram = (x.float() @ x.float().T).bfloat16().float()
    poly = (b * gram + c * (gram @ gram)).bfloat16().float()
    return (a * x.float() + poly @ x.float()).bfloat16()


def _lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch's `_adjust_lr` factor for an `A x B` matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def _check_muon_args(ns_coeffs: Any, ns_steps: Any, adjust_lr_fn: Any) -> None:
    if not (isinstance(ns_coeffs, (tuple, list)) and len(ns_coeffs) == 3):
        raise ValueError(f"ns_coeffs must be a tuple of 3 numbers (a, b, c), got {ns_coeffs!r}")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be an int in [0, 100), got {ns_steps!r}")
    if adjust_lr_fn not in _ADJUST:
        raise ValueError(f"adjust_lr_fn must be one of {_ADJUST}, got {adjust_lr_fn!r}")


class _Muon:
    """The settings of `scale_by_muon`, and its step on flat lists (shared by `update` and `apply`)."""

    def __init__(self, ns_coeffs: tuple, ns_steps: int, beta: Scalar, eps: float, nesterov: bool,
                 adjust_lr_fn: str | None):
        self.ns_coeffs, self.ns_steps, self.beta, self.eps = tuple(ns_coeffs), ns_steps, beta, eps
        self.nesterov, self.adjust_lr_fn = nesterov, adjust_lr_fn

    def directions(self, names: list[str], grads: list[Tensor], bufs: list[Tensor]) -> tuple[list, list]:
        """The orthogonalized directions `O` (bfloat16) and the new momentum buffers."""
        new_bufs, dirs = [], []
        with torch.no_grad():
            for name, g, buf in zip(names, grads, bufs):
                if g.ndim != 2:
                    raise ValueError(f"Muon updates 2-D matrices only; {name!r} has shape {tuple(g.shape)} "
                                     "(leave it to AdamW: see muon's muon_mask)")
                buf = torch.lerp(buf, g, 1 - self.beta)
                d = torch.lerp(g, buf, self.beta) if self.nesterov else buf
                dirs.append(orthogonalize_via_newton_schulz(d, self.ns_coeffs, self.ns_steps, self.eps))
                new_bufs.append(buf)
        return dirs, new_bufs

    def ratio(self, g: Tensor) -> float:
        return _lr_ratio(g.shape, self.adjust_lr_fn)


def scale_by_muon(
    ns_coeffs: tuple = NS_COEFFS,
    ns_steps: int = 5,
    beta: Scalar = 0.95,
    eps: float = 1e-7,
    nesterov: bool = True,
    adjust_lr_fn: str | None = None,
) -> GradientTransformationExtraArgs:
    """Muon's direction for 2-D matrices (optax's `scale_by_muon` in name; torch's `Muon` in
    semantics): `B <- lerp(B, g, 1 - beta)`, `d = lerp(g, B, beta)` (Nesterov) or `B`, and the
    updates `r NS(d)` with `NS` the bfloat16 Newton–Schulz iteration and `r` the rate factor of
    `adjust_lr_fn` for the matrix's shape. State `{"mu": tree}` (torch's `momentum_buffer`).

    Chained with `add_decayed_weights(wd)` and `scale_by_learning_rate(lr)` it is `torch.optim.Muon`:
    `p <- p - lr (r NS(d) + wd p)`.

    **Arguments:**

    - `ns_coeffs`: the Newton–Schulz coefficients `(a, b, c)`.
    - `ns_steps`: the number of Newton–Schulz iterations, in `[0, 100)`.
    - `beta`: the momentum, in `[0, 1)`.
    - `eps`: the floor of the Frobenius norm the iteration divides by.
    - `nesterov`: Nesterov momentum.
    - `adjust_lr_fn`: `None` or `"original"` (`r = sqrt(max(1, A/B))` for an `A x B` matrix) or
      `"match_rms_adamw"` (`r = 0.2 sqrt(max(A, B))`), as `torch.optim.Muon`.

    **Returns:**

    A `GradientTransformationExtraArgs`; its `update` raises `ValueError` for a leaf that is not 2-D.
    """
    _check_muon_args(ns_coeffs, ns_steps, adjust_lr_fn)
    check_hyper(beta=beta, eps=eps)
    rule = _Muon(ns_coeffs, ns_steps, beta, eps, nesterov, adjust_lr_fn)

    def init(params: Tree) -> OptState:
        return {"mu": tree_map(torch.zeros_like, params)}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("mu",), "scale_by_muon")
        names, g_list = _leaves_of(updates)
        dirs, bufs = rule.directions(names, g_list, _mirror(names, state["mu"], "state['mu']"))
        with torch.no_grad():
            out = [d.to(g.dtype) * rule.ratio(g) for d, g in zip(dirs, g_list)]
        return tree_unflatten(dict(zip(names, out))), {"mu": tree_unflatten(dict(zip(names, bufs)))}

    return GradientTransformationExtraArgs(init, update)


def _matrix_step(p: Tensor, o: Tensor, lr: Scalar, wd: Scalar, ratio: float, donate: bool) -> Tensor:
    """torch's `p.mul_(1 - lr wd).add_(o, alpha=-lr r)`, in place when donated."""
    if isinstance(lr, Tensor) or isinstance(wd, Tensor):
        return p * (1 - lr * wd) - (lr * ratio) * o.to(p.dtype)
    if donate:
        return p.mul_(1 - lr * wd).add_(o, alpha=-(lr * ratio))
    return p.mul(1 - lr * wd).add_(o, alpha=-(lr * ratio))


def _muon_part(learning_rate: Scalar | Schedule, weight_decay: Scalar, **muon_args: Any
               ) -> GradientTransformationExtraArgs:
    """`chain(scale_by_muon, add_decayed_weights, scale_by_learning_rate)` with an `apply` that
    updates the params as `torch.optim.Muon` does."""
    inner = chain(scale_by_muon(**muon_args), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))
    rule = _Muon(**muon_args)

    def apply(updates: Tree, state: OptState, params: Tree, *, donate: bool = False,
              **extra: Any) -> tuple[Tree, OptState]:
        _check_chain_state(state, 3)
        muon_state, decayed, lr_state = state
        _check_state(muon_state, ("mu",), "scale_by_muon")
        lr = _rate(learning_rate, lr_state["count"]) if isinstance(lr_state, dict) else learning_rate
        names, p_list = _leaves_of(params)
        g_list = _mirror(names, updates, "updates")
        dirs, bufs = rule.directions(names, g_list, _mirror(names, muon_state["mu"], "state['mu']"))
        donate = donate and not _under_functorch() and _distinct(p_list)
        with torch.no_grad():
            new_p = [_matrix_step(p, o, lr, weight_decay, rule.ratio(p), donate) for p, o in zip(p_list, dirs)]
        lr_state = {"count": lr_state["count"] + 1} if isinstance(lr_state, dict) else lr_state
        new_state = ({"mu": tree_unflatten(dict(zip(names, bufs)))}, decayed, lr_state)
        return tree_unflatten(dict(zip(names, new_p))), new_state

    return GradientTransformationExtraArgs(inner.init, inner.update, apply)


def hidden_matrix_mask(name: str, leaf: Tensor) -> bool:
    """`muon`'s default choice of the leaves Muon updates: the 2-D leaves other than
    `token_embeddings.weight` and `lm_head.weight` (the attention and feed-forward matrices of an
    fnlm transformer); the others go to AdamW.

    **Arguments:**

    - `name`: the leaf's dotted flat name.
    - `leaf`: the tensor.

    **Returns:**

    True for a hidden matrix.
    """
    return leaf.ndim == 2 and name not in _EMBEDDING_AND_HEAD


def muon(
    learning_rate: Scalar | Schedule,
    ns_coeffs: tuple = NS_COEFFS,
    ns_steps: int = 5,
    beta: Scalar = 0.95,
    eps: float = 1e-7,
    weight_decay: Scalar = 0.1,
    nesterov: bool = True,
    adjust_lr_fn: str | None = None,
    adam_b1: Scalar = 0.9,
    adam_b2: Scalar = 0.999,
    adam_eps: Scalar = 1e-8,
    adam_weight_decay: Scalar | None = None,
    muon_mask: Any = None,
    *,
    adam_learning_rate: Scalar | Schedule | None = None,
) -> GradientTransformationExtraArgs:
    """Muon for the hidden matrices and AdamW for the other leaves: `torch.optim.Muon` on the leaves
    `muon_mask` selects and `torch.optim.AdamW` (fnlm's `adamw`) on the rest, as one transformation
    (`multi_transform` with the labels `"muon"` and `"adam"`). optax's `muon` has the same name and
    most argument names, but another update (see the module docstring).

    **Arguments:**

    - `learning_rate`: Muon's rate (a number, 0-d tensor or schedule), before `adjust_lr_fn`'s factor.
    - `ns_coeffs`, `ns_steps`, `beta`, `eps`, `nesterov`, `adjust_lr_fn`: as `scale_by_muon`
      (`eps` is the Newton–Schulz norm floor, torch's `Muon(eps=1e-7)`; AdamW's is `adam_eps`).
    - `weight_decay`: Muon's decoupled decay, `p <- p (1 - lr wd)`.
    - `adam_b1`, `adam_b2`, `adam_eps`: AdamW's betas and epsilon.
    - `adam_weight_decay`: AdamW's decay, on all its leaves (None: `weight_decay`).
    - `muon_mask`: which leaves Muon updates, in any mask form (`add_decayed_weights`); default
      `hidden_matrix_mask` (2-D leaves except the token embeddings and the LM head). Every selected
      leaf must be 2-D.
    - `adam_learning_rate`: AdamW's rate (None: `learning_rate`).

    **Returns:**

    A `GradientTransformationExtraArgs` with state `{"inner_states": {"muon": (muon state, (), lr
    state), "adam": adamw's state}}` and a fused `apply`.
    """
    muon_args = dict(ns_coeffs=ns_coeffs, ns_steps=ns_steps, beta=beta, eps=eps, nesterov=nesterov,
                     adjust_lr_fn=adjust_lr_fn)
    if not callable(learning_rate):
        check_hyper(learning_rate=learning_rate)
    check_hyper(weight_decay=weight_decay)
    mask = hidden_matrix_mask if muon_mask is None else muon_mask
    adam = adamw(learning_rate if adam_learning_rate is None else adam_learning_rate, adam_b1, adam_b2, adam_eps,
                 weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay)

    def labels(params: Tree) -> Tree:
        names, leaves = _leaves_of(params)
        flags = _decay_flags(dict(zip(names, leaves)), mask, "muon_mask")
        return tree_unflatten({n: "muon" if f else "adam" for n, f in zip(names, flags)})

    return multi_transform({"muon": _muon_part(learning_rate, weight_decay, **muon_args), "adam": adam}, labels)
