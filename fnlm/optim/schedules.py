"""Learning-rate schedules: `cosine_schedule` (CS336's, a function of the iteration) and
`warmup_cosine_schedule`, the same schedule as a function `count -> lr` for
`fnlm.optim.scale_by_learning_rate` and the optimizer aliases (optax's `Schedule`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fnlm.types import Tensor

__all__ = ["Schedule", "cosine_schedule", "warmup_cosine_schedule", "constant_schedule"]

Schedule = Callable[[int | Tensor], float | Tensor]
"""A learning-rate schedule: the number of updates done so far (an int, or a 0-d integer tensor
in a compiled step) to the rate of the next update."""


def cosine_schedule(
    t: int, max_lr: float | Tensor, min_lr: float | Tensor, warmup_iters: int, cosine_cycle_iters: int
) -> float | Tensor:
    """Learning rate at iteration `t`: linear warm-up, cosine decay, then constant.

    - `t < warmup_iters`: `t / warmup_iters * max_lr`;
    - `warmup_iters <= t <= cosine_cycle_iters`:
      `min_lr + (1 + cos(pi (t - warmup_iters) / (cosine_cycle_iters - warmup_iters))) / 2 * (max_lr - min_lr)`;
    - `t > cosine_cycle_iters`: `min_lr`.

    Example: `cosine_schedule(0, 1.0, 0.1, 7, 21) == 0.0`, `cosine_schedule(7, 1.0, 0.1, 7, 21) == 1.0`,
    `cosine_schedule(14, 1.0, 0.1, 7, 21) == 0.55`, `cosine_schedule(30, 1.0, 0.1, 7, 21) == 0.1`.

    **Arguments:**

    - `t`: the iteration, `>= 0`.
    - `max_lr`, `min_lr`: the peak and final rates: floats, or tensors (e.g. one rate per model of
      a vectorized sweep, `fnlm.train.sweep`), combined elementwise.
    - `warmup_iters`: `T_w >= 0`.
    - `cosine_cycle_iters`: `T_c >= T_w`, the iteration where the cosine reaches `min_lr`.

    **Returns:**

    The learning rate: a float for float rates, else a tensor.
    """
    if t < 0 or warmup_iters < 0 or cosine_cycle_iters < warmup_iters:
        raise ValueError(
            "need t >= 0 and 0 <= warmup_iters <= cosine_cycle_iters, got "
            f"t={t}, warmup_iters={warmup_iters}, cosine_cycle_iters={cosine_cycle_iters}"
        )
    if t < warmup_iters:
        return t / warmup_iters * max_lr
    if t > cosine_cycle_iters:
        return min_lr if isinstance(min_lr, Tensor) else float(min_lr)
    if cosine_cycle_iters == warmup_iters:
        return max_lr if isinstance(max_lr, Tensor) else float(max_lr)
    progress = (t - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def warmup_cosine_schedule(
    peak_value: float | Tensor, end_value: float | Tensor, warmup_steps: int, decay_steps: int | None
) -> Schedule:
    """`cosine_schedule` as a `Schedule`: linear warm-up from 0 to `peak_value` over `warmup_steps`,
    a cosine down to `end_value` at `decay_steps`, then constant (`decay_steps=None`: constant
    `peak_value` after the warm-up).

    Example: `warmup_cosine_schedule(1.0, 0.1, 7, 21)(14) == 0.55`.

    The returned function takes the count as an int (giving exactly `cosine_schedule`'s float) or
    as a 0-d integer tensor, for which it computes the same formula in float64 tensor ops with no
    branch on the value (a compiled step then compiles once). Peak and end may be tensors (one
    value per model in a vectorized sweep).

    **Arguments:**

    - `peak_value`, `end_value`: the rates after the warm-up and at the end (`0 <= end <= peak`).
    - `warmup_steps`: the warm-up length, `>= 0`.
    - `decay_steps`: the count at which the cosine reaches `end_value` (`>= warmup_steps`), or None.

    **Returns:**

    A function `count -> lr`.
    """
    if warmup_steps < 0 or (decay_steps is not None and decay_steps < warmup_steps):
        raise ValueError(f"need 0 <= warmup_steps <= decay_steps, got warmup_steps={warmup_steps}, "
                         f"decay_steps={decay_steps}")
    cycle = warmup_steps if decay_steps is None else decay_steps
    end = peak_value if decay_steps is None else end_value

    def schedule(count: int | Tensor) -> float | Tensor:
        if not isinstance(count, Tensor):
            return cosine_schedule(count, peak_value, end, warmup_steps, cycle)
        t = count.to(torch.float64)
        rising = t / warmup_steps * peak_value if warmup_steps > 0 else t * 0 + peak_value
        progress = ((t - warmup_steps) / max(cycle - warmup_steps, 1)).clamp(0.0, 1.0)
        falling = end + 0.5 * (1.0 + torch.cos(math.pi * progress)) * (peak_value - end)
        return torch.where(t < warmup_steps, rising, falling)

    return schedule


def constant_schedule(value: float | Tensor) -> Schedule:
    """The schedule that is `value` at every count (optax's `constant_schedule`)."""
    return lambda count: value
