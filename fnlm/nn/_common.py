"""Private helpers shared by the layers: truncated-normal init, dtype casts and the check that size
arguments are positive ints. (The switch that lets data-dependent checks step aside under
`torch.compile` and `torch.func` is `fnlm.types.tracing`.)"""

from __future__ import annotations

import torch

from fnlm.types import Tensor


def _trunc_normal(
    shape: tuple[int, ...],
    std: float,
    bound: float,
    *,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(out, mean=0.0, std=std, a=-bound, b=bound, generator=generator)
    return out.to(device=device, dtype=dtype)


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
