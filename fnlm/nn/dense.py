"""Linear maps: `init_linear` and `linear`, `y = x Wᵀ` with `W` stored `(d_out, d_in)` like torch."""

from __future__ import annotations

import math

import einx
import torch

from fnlm.nn._common import _check_positive, _trunc_normal
from fnlm.types import Float, Tensor

__all__ = ["init_linear", "linear"]


def init_linear(
    d_in: int,
    d_out: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Parameters of a bias-free linear map.

    **Arguments:**

    - `d_in`, `d_out`: input and output sizes.
    - `generator`: a CPU `torch.Generator` for the draw (the global RNG when `None`).
    - `device`, `dtype`: where and how the weight is stored.

    **Returns:** `{"weight": W}` with `W` of shape `(d_out, d_in)`, drawn from
    N(0, σ²) with σ² = 2 / (d_in + d_out), truncated at ±3σ.

    `W` is stored column-major (`W.T` is contiguous, strides `(1, d_out)`): that is the layout in
    which `einx.dot`'s einsum returns the gradient of `W`, so the gradient, the AdamW moments
    (`zeros_like`) and `W` share one layout, which torch's fused AdamW kernel needs (with a
    row-major `W` the gradient comes back transposed, and the optimizer must take its slower
    multi-tensor path). The values, and hence every seed's parameters, are those of the
    row-major draw; `W.contiguous()` gives the row-major copy.
    """
    _check_positive(d_in=d_in, d_out=d_out)
    std = math.sqrt(2.0 / (d_in + d_out))
    weight = _trunc_normal((d_out, d_in), std, 3 * std, generator=generator, device=device, dtype=dtype)
    return {"weight": weight.T.contiguous().T}


def _linear(weight: Float[Tensor, "d_out d_in"], x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    return einx.dot("... [d_in], d_out [d_in] -> ... d_out", x, weight)


def linear(params: dict[str, Tensor], x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    """`y = x Wᵀ`, as `einx.dot("... [d_in], d_out [d_in] -> ... d_out", x, W)` (one einsum).

    **Arguments:**

    - `params`: `{"weight": W}`, `W` of shape `(d_out, d_in)`.
    - `x`: input of shape `(..., d_in)`.

    **Returns:** `(..., d_out)`.
    """
    return _linear(params["weight"], x)
