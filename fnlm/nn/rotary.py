"""Rotary position embedding with interleaved pairs `(2k, 2k+1)` (the CS336 convention):
`rope_cos_sin` / `rope_cache` tabulate the angles, `rope_tables` spreads them over the pairs,
`rope_rotate` / `rope_rotate_tables` / `rope` rotate."""

from __future__ import annotations

from typing import NamedTuple

import einx
import torch

from fnlm.nn._common import _cast, _check_positive
from fnlm.types import Float, Int, Tensor

__all__ = ["RopeCache", "rope_cos_sin", "rope_cache", "rope_tables", "rope_rotate_tables", "rope_rotate", "rope"]


class RopeCache(NamedTuple):
    """Cosines and sines of the RoPE angles for positions `0 .. max_seq_len-1`, each of shape
    `(max_seq_len, d_head // 2)`; built by `rope_cache`."""

    cos: Tensor
    sin: Tensor


def rope_cos_sin(
    positions: Int[Tensor, "*pos"], d_head: int, theta: float = 10000.0
) -> tuple[Float[Tensor, "*pos half"], Float[Tensor, "*pos half"]]:
    """Cosines and sines of the RoPE angles `positions · θ^(-2k/d_head)`, `k = 0 .. d_head/2 - 1`.

    Computed in float32 on `positions.device`.

    **Arguments:**

    - `positions`: integer positions of any shape `(*pos)`.
    - `d_head`: the (even) size of each query/key vector.
    - `theta`: the RoPE base Θ.

    **Returns:** `(cos, sin)`, each `(*pos, d_head // 2)` in float32.
    """
    if d_head % 2 != 0 or d_head <= 0:
        raise ValueError(f"RoPE needs a positive even head size, got d_head={d_head}")
    if not theta > 0:
        raise ValueError(f"RoPE theta must be positive, got {theta!r}")
    exponents = torch.arange(0, d_head, 2, device=positions.device, dtype=torch.float32) / d_head
    inv_freq = torch.pow(float(theta), -exponents)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (*pos, half)
    return angles.cos(), angles.sin()


def rope_cache(
    d_head: int, max_seq_len: int, theta: float = 10000.0, *, device: torch.device | str | None = None
) -> RopeCache:
    """The RoPE table for positions `0 .. max_seq_len-1`, built once and indexed by `rope`.

    **Arguments:**

    - `d_head`: the (even) size of each query/key vector.
    - `max_seq_len`: the number of positions to tabulate.
    - `theta`: the RoPE base Θ.
    - `device`: where the table lives.

    **Returns:** a `RopeCache` with `cos` and `sin` of shape `(max_seq_len, d_head // 2)`.
    """
    _check_positive(max_seq_len=max_seq_len)
    return RopeCache(*rope_cos_sin(torch.arange(max_seq_len, device=device), d_head, theta))


def rope_tables(
    cos: Float[Tensor, "*pos half"], sin: Float[Tensor, "*pos half"]
) -> tuple[Float[Tensor, "*pos d_head"], Float[Tensor, "*pos d_head"]]:
    """The rotation tables over the interleaved pairs, `d_head = (half two)`: `cos θ_k` for both
    entries of pair `k`, and `(-sin θ_k, +sin θ_k)`.

    `rope_rotate` rotates with them as `x · cos + swap(x) · sin`, where `swap` exchanges the two
    entries of each pair. `attention_context` builds them once per forward for every layer.

    **Arguments:**

    - `cos`, `sin`: `(*pos, d_head // 2)`, as returned by `rope_cos_sin`.

    **Returns:** `(cos, signed_sin)`, each `(*pos, d_head)`.
    """
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)
    cos = einx.id("... half -> ... (half two)", cos, two=2)
    return cos, einx.multiply("... half, two -> ... (half two)", sin, sign)


def rope_rotate_tables(
    x: Float[Tensor, "... seq d_head"], cos: Float[Tensor, "... seq d_head"], sin: Float[Tensor, "... seq d_head"]
) -> Float[Tensor, "... seq d_head"]:
    """Rotate each interleaved pair of `x` with tables from `rope_tables` (broadcast against `x`):
    `x · cos + swap(x) · sin`, where `swap = einx.flip("... (half [two])", x, two=2)` exchanges
    the two entries of each pair, so pair `(a, b)` becomes `(a cos θ - b sin θ, b cos θ + a sin θ)`."""
    cos, sin = _cast(cos, x.dtype), _cast(sin, x.dtype)
    return x * cos + einx.flip("... (half [two])", x, two=2) * sin


def rope_rotate(
    x: Float[Tensor, "... seq d_head"], cos: Float[Tensor, "... seq half"], sin: Float[Tensor, "... seq half"]
) -> Float[Tensor, "... seq d_head"]:
    """Rotate each interleaved pair `(x[2k], x[2k+1])` by the angle whose cosine and sine are given.

    `cos` and `sin` broadcast against `x` without its last dim (e.g. `(seq, half)` for every batch
    and head, or `(batch, 1, seq, half)` for per-sequence positions with a heads dim). Written with
    the pair axis `d_head = (half two)`: `rope_tables` spreads the angles over the pairs and
    `rope_rotate_tables` applies `x · cos + swap(x) · sin`. (The same rotation as one
    `einx.dot("... seq (half [i]), seq half o [i] -> ... seq (half o)", x, R)` with 2×2 matrices
    `R` is 5x slower, a batched product with inner size 2; elementwise products over
    `(seq, d_head)` tables are 1.7x faster than products broadcast over a `two` axis.)

    **Arguments:**

    - `x`: `(..., seq, d_head)`.
    - `cos`, `sin`: `(..., seq, d_head // 2)`, as returned by `rope_cos_sin`.

    **Returns:** `(..., seq, d_head)`, dtype of `x`.
    """
    return rope_rotate_tables(x, *rope_tables(cos, sin))


def rope(x: Float[Tensor, "... seq d_head"], positions: Int[Tensor, "... seq"], cache: RopeCache) -> Float[Tensor, "... seq d_head"]:
    """Rotary position embedding with interleaved pairs `(2k, 2k+1)` (the CS336 convention).

    **Arguments:**

    - `x`: queries or keys, `(..., seq, d_head)`.
    - `positions`: integer positions `(..., seq)`, broadcastable against the leading dims of `x`.
    - `cache`: the table from `rope_cache(d_head, max_seq_len, theta)`; positions index into it.

    **Returns:** `(..., seq, d_head)`.
    """
    return rope_rotate(x, cache.cos[positions], cache.sin[positions])
