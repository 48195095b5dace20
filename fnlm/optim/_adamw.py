"""The AdamW update kernels on flat lists of tensors: torch's fused one-pass kernel
(`torch._fused_adamw_`), the multi-tensor (`torch._foreach_*`) kernels, and plain per-leaf ops for
`torch.func` transforms (where the multi-tensor kernels have no batching rules). `_adamw_update`
picks one; all compute CS336's Algorithm 2 (`fnlm.adamw_step`), and `_torch_adamw_fused` computes
`torch.optim.AdamW`'s form (optax's `adamw`) with the same fused kernel."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from fnlm.optim._common import _has_decay, _under_functorch
from fnlm.types import Tensor, tracing

_FUSED_DEVICES = ("cpu", "cuda")


class _Adam(NamedTuple):
    """The scalars of one AdamW update: `step` is t >= 1 (an int, or a 0-d tensor in a compiled
    step); `lr` and `weight_decay` may be 0-d tensors (per-model values under `vmap`)."""

    step: int | Tensor
    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float | Tensor


def _can_fuse(
    params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], lr: Any, weight_decay: Any
) -> bool:
    """Whether torch's fused AdamW kernel applies. It reads the four tensors of a parameter as if
    they had one layout: a gradient with other strides than its parameter (a transposed one) is
    mis-read silently, so such trees take the multi-tensor path."""
    if not params or isinstance(lr, Tensor) or isinstance(weight_decay, Tensor) or callable(weight_decay):
        return False
    if lr * weight_decay >= 1.0 or tracing():
        return False
    device, dtype = params[0].device, params[0].dtype
    if device.type not in _FUSED_DEVICES or not dtype.is_floating_point:
        return False
    same_layout = all(g.stride() == p.stride() == a.stride() == b.stride() for p, g, a, b in zip(params, grads, m, v))
    return same_layout and all(
        t.device == device and t.dtype == dtype and not t.requires_grad
        for group in (params, grads, m, v)
        for t in group
    )


def _fused_kernel(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    decayed: tuple[float, float],
    donate: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """torch's fused AdamW kernel (`torch.optim.AdamW`'s update) over the leaves, on copies (or, with
    `donate`, on the inputs), with `hp.lr`, `hp.weight_decay` and `hp.eps` as the kernel takes them;
    the decayed leaves get `(lr, weight_decay) = decayed` instead, the others no decay."""
    step, lr, beta1, beta2, eps, _ = hp
    with torch.no_grad():
        new_p, new_m, new_v = (group if donate else [t.clone() for t in group] for group in (params, m, v))
        steps = [torch.tensor(float(step), device=params[0].device)] * len(params)
        for flag in (True, False):
            idx = [i for i, d in enumerate(decay) if d == flag]
            if not idx:
                continue
            group_lr, group_wd = decayed if flag else (lr, 0.0)
            torch._fused_adamw_(
                [_dense_view(new_p[i]) for i in idx],
                [_dense_view(grads[i]) for i in idx],
                [_dense_view(new_m[i]) for i in idx],
                [_dense_view(new_v[i]) for i in idx],
                [],
                [steps[i] for i in idx],
                lr=group_lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=group_wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
    return new_p, new_m, new_v


def _adamw_update_fused(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """`_adamw_update` with torch's one-pass fused AdamW kernel, on copies (or, with `donate`, on
    the inputs themselves).

    The kernel computes torch's variant, `p <- p (1 - lr' wd') - (lr'/bc1) m / (sqrt(v)/sqrt(bc2) + eps')`
    with `bc_i = 1 - b_i^t`. Taking `lr' = lr (1 - lr wd)`, `wd' = wd / (1 - lr wd)` and
    `eps' = eps / sqrt(bc2)` makes it `(1 - lr wd) (p - a_t m / (sqrt(v) + eps))`, Algorithm 2
    exactly (up to rounding). Three copies plus one fused pass read and write less memory than
    the seven multi-tensor passes of the unfused update.
    """
    step, lr, beta1, beta2, eps, weight_decay = hp
    shrink = 1.0 - lr * weight_decay
    eps_t = eps / math.sqrt(1.0 - beta2**step)
    return _fused_kernel(params, grads, m, v, decay, hp._replace(eps=eps_t), (lr * shrink, weight_decay / shrink),
                         donate)


def _dense_view(t: Tensor) -> Tensor:
    """`t` with its dims permuted so that its strides decrease: a contiguous view of the same memory
    for any dense tensor, such as the column-major weights of `init_linear`. The four tensors of a
    parameter share one layout (`_can_fuse`), so they get the same permutation, and an elementwise
    update through the views is the update of the tensors. torch's CPU fused AdamW copies a
    non-contiguous tensor to a contiguous one and back; through these views it does not (the
    saving is measured in docs/performance.md)."""
    order = sorted(range(t.ndim), key=lambda d: -t.stride(d))
    return t.permute(order)


def _adamw_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Algorithm 2 with multi-tensor kernels: new tensors, or the inputs updated with `donate`."""
    step, lr, beta1, beta2, eps, weight_decay = hp
    device = params[0].device
    if donate:
        new_m, new_v = m, v
        torch._foreach_lerp_(new_m, grads, 1.0 - beta1)
        torch._foreach_mul_(new_v, beta2)
    else:
        new_m = torch._foreach_lerp(m, grads, 1.0 - beta1)
        new_v = torch._foreach_mul(v, beta2)
    torch._foreach_addcmul_(new_v, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(new_v)
    torch._foreach_add_(denom, eps)
    alpha_t = _alpha(lr, step, beta1, beta2)
    if isinstance(alpha_t, Tensor):
        update = torch._foreach_div(new_m, denom)
        torch._foreach_mul_(update, alpha_t.to(device))
        if donate:
            torch._foreach_sub_(params, update)
            new_params = params
        else:
            new_params = torch._foreach_sub(params, update)
    elif donate:
        torch._foreach_addcdiv_(params, new_m, denom, value=-alpha_t)
        new_params = params
    else:
        new_params = torch._foreach_addcdiv(params, new_m, denom, value=-alpha_t)
    decayed = [p for p, d in zip(new_params, decay) if d]
    if _has_decay(weight_decay) and decayed:
        factor = 1.0 - lr * weight_decay
        torch._foreach_mul_(decayed, factor.to(device) if isinstance(factor, Tensor) else factor)
    return list(new_params), list(new_m), list(new_v)


def _alpha(lr: float | Tensor, step: int | Tensor, beta1: float, beta2: float) -> float | Tensor:
    """`lr sqrt(1 - b2^t) / (1 - b1^t)`; a 0-d tensor step (a compiled step's counter) stays a tensor."""
    correction = (1.0 - beta2**step).sqrt() if isinstance(step, Tensor) else math.sqrt(1.0 - beta2**step)
    return lr * (correction / (1.0 - beta1**step))


def _adamw_update_plain(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Algorithm 2 with one plain op per leaf and no in-place op: what `torch.func.vmap` can batch
    (there `lr` and `weight_decay` may be per-model tensors). Returns new tensors."""
    step, lr, beta1, beta2, eps, weight_decay = hp
    alpha_t = _alpha(lr, step, beta1, beta2)
    factor = 1.0 - lr * weight_decay
    new_p, new_m, new_v = [], [], []
    for p, g, m_i, v_i, d in zip(params, grads, m, v, decay):
        m_i = torch.lerp(m_i, g, 1.0 - beta1)
        v_i = torch.addcmul(v_i * beta2, g, g, value=1.0 - beta2)
        denom = v_i.sqrt() + eps
        p = p - alpha_t * (m_i / denom) if isinstance(alpha_t, Tensor) else torch.addcdiv(p, m_i, denom, value=-alpha_t)
        if d and _has_decay(weight_decay):
            p = p * factor
        new_p.append(p)
        new_m.append(m_i)
        new_v.append(v_i)
    return new_p, new_m, new_v


def _adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Algorithm 2 of the CS336 handout on flat lists; `step` is t >= 1. Picks torch's fused kernel
    (float hyper-parameters on CPU/CUDA), the multi-tensor kernels, or plain ops under `torch.func`."""
    if not params:
        return [], [], []
    with torch.no_grad():
        if _under_functorch():
            return _adamw_update_plain(params, grads, m, v, decay, hp)
        if _can_fuse(params, grads, m, v, hp.lr, hp.weight_decay):
            return _adamw_update_fused(params, grads, m, v, decay, hp, donate)
        return _adamw_update_foreach(params, grads, m, v, decay, hp, donate)


def _torch_adamw_fused(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    decay: list[bool],
    hp: _Adam,
    donate: bool = False,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """`torch.optim.AdamW`'s update (optax's `adamw`) with torch's fused kernel, on copies (or, with
    `donate`, on the inputs): `p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)`, `step` = t >= 1.
    The caller checks `_can_fuse` first."""
    return _fused_kernel(params, grads, m, v, decay, hp, (hp.lr, hp.weight_decay), donate)
