"""`torch.optim` / `nn.Module` shims over fnlm's pure training maths, for the CS336 adapters.

Each forwards to the pure functions (`fnlm.optim`, `fnlm.checkpoint`) and holds no maths of its
own. (To be folded into `fnlm/compat.py`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fnlm import checkpoint as _ckpt
from fnlm.optim import _adamw_update, _check_hyper, clip_grad_norm_with_norm

__all__ = ["AdamW", "clip_gradients_", "save_checkpoint", "load_checkpoint"]


class AdamW(torch.optim.Optimizer):
    """`torch.optim.Optimizer` running :func:`fnlm.adamw_step`'s update on each param group.

    Per-parameter state is `{"step": int, "m": Tensor, "v": Tensor}`, so `state_dict()` /
    `load_state_dict()` round-trip as for any torch optimizer.

    **Arguments:**

    - `params`: parameters or param-group dicts, as for any torch optimizer.
    - `lr`, `betas`, `eps`, `weight_decay`: as in :func:`fnlm.adamw_step`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        _check_hyper(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns `closure()`'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                by_step.setdefault(int(state["step"]), []).append(p)
            beta1, beta2 = group["betas"]
            for done, ps in by_step.items():
                states = [self.state[p] for p in ps]
                new_p, new_m, new_v = _adamw_update(
                    [p.detach() for p in ps],
                    [p.grad for p in ps],
                    [s["m"] for s in states],
                    [s["v"] for s in states],
                    [True] * len(ps),
                    step=done + 1,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
                torch._foreach_copy_([p.detach() for p in ps], new_p)
                for s, m, v in zip(states, new_m, new_v):
                    s.update(step=done + 1, m=m, v=v)
        return loss


def clip_gradients_(parameters: Iterable[torch.Tensor], max_l2_norm: float) -> torch.Tensor:
    """Clip the `.grad` of `parameters` in place to global l2 norm `max_l2_norm` (eps 1e-6).

    Parameters without a gradient are skipped. Uses :func:`fnlm.clip_grad_norm_with_norm`.

    **Arguments:**

    - `parameters`: tensors whose `.grad` to clip.
    - `max_l2_norm`: the largest allowed global norm.

    **Returns:**

    The global norm before clipping.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.tensor(0.0)
    clipped, norm = clip_grad_norm_with_norm([p.grad for p in with_grad], max_l2_norm)
    with torch.no_grad():
        torch._foreach_copy_([p.grad for p in with_grad], clipped)
    return norm


def save_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int, out: _ckpt.PathOrFile
) -> None:
    """Save `model.state_dict()`, `optimizer.state_dict()` and `iteration` with :func:`fnlm.save_checkpoint`.

    **Arguments:**

    - `model`, `optimizer`: what to save.
    - `iteration`: completed training iterations.
    - `out`: a path (written atomically) or a binary file object.
    """
    _ckpt.save_checkpoint(
        out, params=model.state_dict(), opt_state=optimizer.state_dict(), step=iteration, config={}
    )


def load_checkpoint(src: _ckpt.PathOrFile, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore `model` and `optimizer` from :func:`save_checkpoint`'s file; returns the iteration.

    **Arguments:**

    - `src`: a path or a binary file object.
    - `model`, `optimizer`: restored in place.

    **Returns:**

    The saved iteration number.
    """
    ckpt = _ckpt.load_checkpoint(src)
    model.load_state_dict(ckpt["params"])
    optimizer.load_state_dict(ckpt["opt_state"])
    return ckpt["step"]
