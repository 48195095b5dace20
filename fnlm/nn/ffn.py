"""Feed-forward layers: SiLU, the SwiGLU feed-forward (`W2 (SiLU(W1 x) ⊙ W3 x)`) and the ungated
SiLU ablation (`W2 SiLU(W1 x)`). Elementwise products are plain torch."""

from __future__ import annotations

import math

import torch

from fnlm.nn._common import _check_positive
from fnlm.nn.dense import init_linear, linear
from fnlm.types import Float, Tensor

__all__ = ["silu", "swiglu_d_ff", "init_swiglu", "swiglu", "init_silu_ffn", "silu_ffn"]


def silu(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """SiLU (swish): `x · σ(x)`, elementwise: torch's fused kernel, one pass forward and one
    backward (1.2 ms for `silu(a) · b` forward + backward at the 17M model's 4×128×1344, against
    2.6 ms for a hand-written `x · σ(x)` with its own backward)."""
    return torch.nn.functional.silu(x)


def swiglu_d_ff(d_model: int, multiple_of: int = 64) -> int:
    """The SwiGLU hidden size: 8/3 · d_model rounded up to a multiple of `multiple_of`.

    Example: `swiglu_d_ff(512) == 1408` (8/3 · 512 = 1365.3 → 1408); `swiglu_d_ff(768) == 2048`.
    """
    _check_positive(d_model=d_model, multiple_of=multiple_of)
    target = math.ceil(8 * d_model / 3)
    return multiple_of * math.ceil(target / multiple_of)


def init_swiglu(
    d_model: int,
    d_ff: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, Tensor]]:
    """Parameters of a SwiGLU feed-forward: `w1`, `w3` of shape `(d_ff, d_model)`, `w2` of shape
    `(d_model, d_ff)`, each initialised as `init_linear`."""
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {
        "w1": init_linear(d_model, d_ff, **kw),
        "w2": init_linear(d_ff, d_model, **kw),
        "w3": init_linear(d_model, d_ff, **kw),
    }


def swiglu(params: dict[str, dict[str, Tensor]], x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """SwiGLU feed-forward: `W2 (SiLU(W1 x) ⊙ W3 x)`.

    **Arguments:**

    - `params`: `{"w1", "w2", "w3"}` linear parameters (see `init_swiglu`).
    - `x`: `(..., d_model)`.

    **Returns:** `(..., d_model)`.
    """
    return linear(params["w2"], silu(linear(params["w1"], x)) * linear(params["w3"], x))


def init_silu_ffn(
    d_model: int,
    d_ff: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, Tensor]]:
    """Parameters of the ungated SiLU feed-forward: `w1` `(d_ff, d_model)` and `w2` `(d_model, d_ff)`.

    To match SwiGLU's parameter count use `d_ff = 4 · d_model` (two matrices instead of three).
    """
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {"w1": init_linear(d_model, d_ff, **kw), "w2": init_linear(d_ff, d_model, **kw)}


def silu_ffn(params: dict[str, dict[str, Tensor]], x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The ungated feed-forward ablation: `W2 SiLU(W1 x)`.

    **Arguments:**

    - `params`: `{"w1", "w2"}` linear parameters (see `init_silu_ffn`).
    - `x`: `(..., d_model)`.

    **Returns:** `(..., d_model)`.
    """
    return linear(params["w2"], silu(linear(params["w1"], x)))
