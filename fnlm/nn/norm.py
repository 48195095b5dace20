"""RMSNorm (`init_rmsnorm`, `rmsnorm`) and the no-norm ablation `no_norm`."""

from __future__ import annotations

from typing import Any

import torch

from fnlm.nn._autograd import _RMSNormFn
from fnlm.nn._common import _cast, _check_positive, _upcast
from fnlm.types import Float, Tensor

__all__ = ["init_rmsnorm", "rmsnorm", "no_norm"]


def init_rmsnorm(
    d_model: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Parameters of RMSNorm: `{"weight": ones(d_model)}`."""
    _check_positive(d_model=d_model)
    return {"weight": torch.ones(d_model, device=device, dtype=dtype)}


def _rmsnorm(weight: Float[Tensor, "d_model"], x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    x32 = _upcast(x)
    return _cast(_RMSNormFn.apply(x32, _cast(weight, x32.dtype), eps)[0], x.dtype)


def rmsnorm(params: dict[str, Tensor], x: Float[Tensor, "... d_model"], *, eps: float = 1e-5) -> Float[Tensor, "... d_model"]:
    """RMSNorm: `x / sqrt(mean(x²) + eps) * g`, computed in (at least) float32 and cast back to `x.dtype`.

    The mean of squares is `einx.mean("... ([d_model])", x * x)` (kept as a length-1 axis); the
    products are plain torch. The backward is hand-written and keeps only `x`, `g` and the
    per-row `1/sqrt(mean(x²) + eps)`.

    **Arguments:**

    - `params`: `{"weight": g}`, `g` of shape `(d_model,)`.
    - `x`: `(..., d_model)`.
    - `eps`: added to the mean square.

    **Returns:** `(..., d_model)`, dtype of `x`.
    """
    return _rmsnorm(params["weight"], x, eps)


def no_norm(params: Any, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The no-RMSNorm ablation: the identity (its params, absent from the tree, are ignored)."""
    return x
