"""Attention: softmax, causal masks, scaled dot-product attention, head split/merge, and causal
multi-head self-attention as the LM uses it (`self_attention` with an `AttentionContext`).

`self_attention(params, x, ctx, *, position=rope_position)` is the one implementation: the
stand-alone layer `multihead_self_attention` builds a context and calls it. A positional function
`position(q, k, ctx) -> (q, k)` picks RoPE (`rope_position`) or none (`no_position`, NoPE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import einx
import torch

from fnlm.nn._autograd import _SoftmaxFn
from fnlm.nn._common import _cast, _upcast
from fnlm.nn.dense import init_linear
from fnlm.nn.rotary import RopeCache, rope_cos_sin, rope_rotate_tables, rope_tables
from fnlm.types import Bool, Float, Int, Tensor

__all__ = [
    "softmax",
    "causal_mask",
    "scaled_dot_product_attention",
    "split_heads",
    "merge_heads",
    "LayerKV",
    "AttentionContext",
    "attention_context",
    "kv_append",
    "rope_position",
    "no_position",
    "self_attention",
    "nope_self_attention",
    "init_multihead_self_attention",
    "multihead_self_attention",
]

Params = dict[str, Any]


def softmax(x: Float[Tensor, "..."], dim: int = -1) -> Float[Tensor, "..."]:
    """Numerically stable softmax along `dim`, computed in (at least) float32 and cast back to `x.dtype`.

    The row maximum is subtracted first, so entries of any finite size (e.g. ±1e4) give no
    overflow. Entries of `-inf` get probability 0. **A fully masked row** (every entry `-inf`)
    returns all zeros rather than NaN: an attention query that may attend to nothing reads
    nothing (the same as `F.scaled_dot_product_attention` with a boolean mask), and its gradient
    is zero. The backward is hand-written and keeps only the output.

    **Arguments:**

    - `x`: any shape.
    - `dim`: the dimension to normalise over.

    **Returns:** same shape and dtype as `x`; along `dim` each row sums to 1 (or is all zero).
    """
    return _cast(_SoftmaxFn.apply(_upcast(x), dim), x.dtype)


def causal_mask(seq_q: int, seq_k: int, *, device: torch.device | str | None = None) -> Bool[Tensor, "seq_q seq_k"]:
    """Boolean causal mask (True = may attend) for `seq_q` queries that are the *last* `seq_q` of
    `seq_k` keys: query `i` sees keys `j ≤ i + (seq_k - seq_q)`.

    Example: `causal_mask(2, 3)` is `[[True, True, False], [True, True, True]]`.
    """
    if seq_q > seq_k:
        raise ValueError(f"causal_mask needs seq_q <= seq_k, got seq_q={seq_q}, seq_k={seq_k}")
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(diagonal=seq_k - seq_q)


def scaled_dot_product_attention(
    q: Float[Tensor, "... seq d_head"],
    k: Float[Tensor, "... seq_kv d_head"],
    v: Float[Tensor, "... seq_kv d_v"],
    mask: Bool[Tensor, "... seq seq_kv"] | None = None,
) -> Float[Tensor, "... seq d_v"]:
    """`softmax(q kᵀ / √d_head, masked) v`, over any number of leading (batch, heads) dims.

    The scores are `einx.dot("... seq [d_head], ... seq_kv [d_head] -> ... seq seq_kv", q, k)` and
    the output `einx.dot("... seq [seq_kv], ... [seq_kv] d_v -> ... seq d_v", p, v)`; `seq_kv` is
    the keys' axis (longer than `seq` when decoding with a KV cache). The probabilities `p` come
    from torch's fused softmax kernel (forward and backward, in float32 for low-precision scores):
    masked scores are set to the dtype's lowest finite value rather than `-inf`, so a query with
    no key to attend to gets a uniform row, finite gradients, and then a zero output (its row of
    `mask.any(-1)` is False). Against `fnlm.softmax` (hand-written, five passes over the scores
    forward and three backward) this saves about 2 % of a 17M CPU training step.

    **Arguments:**

    - `q`: `(..., seq, d_head)`; `k`: `(..., seq_kv, d_head)`; `v`: `(..., seq_kv, d_v)`.
    - `mask`: boolean, True = attend, broadcastable to `(..., seq, seq_kv)`; `None` attends
      everywhere. A query whose row is all False gets a zero output (see `softmax`).

    **Returns:** `(..., seq, d_v)`.
    """
    return _attend(_scores(q, k, mask), v, mask)


def _scores(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    scores = einx.dot("... seq [d_head], ... seq_kv [d_head] -> ... seq seq_kv", q * (1.0 / math.sqrt(q.shape[-1])), k)
    return scores if mask is None else scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


def _attend(scores: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    probs = _cast(torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)), v.dtype)
    out = einx.dot("... seq [seq_kv], ... [seq_kv] d_v -> ... seq d_v", probs, v)
    return out if mask is None else out * mask.any(dim=-1, keepdim=True)


def split_heads(x: Float[Tensor, "... seq d_model"], num_heads: int) -> Float[Tensor, "... heads seq d_head"]:
    """`(..., seq, heads·d_head) -> (..., heads, seq, d_head)`; head `h` owns features
    `h·d_head .. (h+1)·d_head - 1`."""
    _check_heads(x.shape[-1], num_heads)
    return einx.id("... seq (heads d_head) -> ... heads seq d_head", x, heads=num_heads)


def merge_heads(x: Float[Tensor, "... heads seq d_head"]) -> Float[Tensor, "... seq d_model"]:
    """Inverse of `split_heads`: `(..., heads, seq, d_head) -> (..., seq, heads·d_head)`."""
    return einx.id("... heads seq d_head -> ... seq (heads d_head)", x)


def _check_heads(d_model: int, num_heads: int) -> None:
    if d_model % num_heads != 0:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")


def _project_heads(
    weight: Float[Tensor, "d_model_out d_model"], x: Float[Tensor, "... seq d_model"], num_heads: int
) -> Float[Tensor, "... heads seq d_head"]:
    _check_heads(weight.shape[0], num_heads)
    return einx.dot("... seq [d_model], (heads d_head) [d_model] -> ... heads seq d_head", x, weight, heads=num_heads)


def _merge_project(
    weight: Float[Tensor, "d_model d_model_in"], x: Float[Tensor, "... heads seq d_head"]
) -> Float[Tensor, "... seq d_model"]:
    return einx.dot("... [heads] seq [d_head], d_model ([heads d_head]) -> ... seq d_model", x, weight)


class LayerKV(NamedTuple):
    """One layer's KV-cache buffers (`(..., heads, max_len, d_head)`, written in place) and the
    position `start` at which this call's keys and values go."""

    keys: Tensor
    values: Tensor
    start: int


class AttentionContext(NamedTuple):
    """What the attention of every layer needs for one `transformer_lm` call.

    - `num_heads`: the head count.
    - `cos`, `sin`: the RoPE tables at the token positions (`rope_tables`: `cos θ` on both entries
      of each pair, `(-sin θ, +sin θ)`), `(seq, d_head)` or `(..., 1, seq, d_head)` (a heads dim
      for per-sequence positions); `None` when the config has no RoPE.
    - `mask`: boolean `(seq, seq_kv)`, True = attend; `None` when every key may be attended to.
      With a KV cache `seq_kv` is the cache's `max_len`.
    - `kv`: this layer's `LayerKV` when decoding with a cache, else `None`.
    """

    num_heads: int
    cos: Tensor | None
    sin: Tensor | None
    mask: Tensor | None
    kv: LayerKV | None = None


def attention_context(
    *,
    num_heads: int,
    seq_len: int,
    d_head: int,
    rope_theta: float | None = 10000.0,
    positions: Int[Tensor, "... seq"] | None = None,
    start: int = 0,
    kv_len: int | None = None,
    device: torch.device | str | None = None,
) -> AttentionContext:
    """Build the `AttentionContext` for `seq_len` new tokens following `start` cached ones.

    **Arguments:**

    - `num_heads`, `d_head`: attention shape.
    - `seq_len`: number of new tokens in this call.
    - `rope_theta`: RoPE base; `None` for no RoPE (`cos`/`sin` left `None`).
    - `positions`: token positions `(..., seq)`; `start .. start+seq_len-1` when `None`.
    - `start`: number of tokens already in the KV cache (0 without one).
    - `kv_len`: the KV cache's length (its `max_len`) when decoding with one: the keys are then
      the whole cache buffer, a static shape, and the mask `(seq_len, kv_len)` lets the query at
      slot `start + i` see slots `<= start + i` (the filled ones, causally); `None` without a cache.
    - `device`: where the tensors go.

    **Returns:** an `AttentionContext` with `kv=None` (`transformer_lm` fills it per layer).
    """
    cos = sin = None
    if rope_theta is not None:
        at = torch.arange(start, start + seq_len, device=device) if positions is None else positions
        cos, sin = rope_tables(*rope_cos_sin(at, d_head, rope_theta))
        if positions is not None:
            cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (..., 1, seq, d_head)
    if kv_len is not None:
        slots = torch.arange(kv_len, device=device)
        mask = slots <= torch.arange(start, start + seq_len, device=device).unsqueeze(-1)  # (seq, kv_len)
    else:
        mask = None if seq_len == 1 else causal_mask(seq_len, seq_len, device=device)
    return AttentionContext(num_heads, cos, sin, mask)


def kv_append(
    kv: LayerKV, k: Float[Tensor, "... heads seq d_head"], v: Float[Tensor, "... heads seq d_head"]
) -> tuple[Float[Tensor, "... heads seq_kv d_head"], Float[Tensor, "... heads seq_kv d_head"]]:
    """Write `k`, `v` at slots `kv.start ..` of the layer's cache (in place) and return the whole
    cache buffers `(..., heads, max_len, d_head)`.

    The shapes stay the same at every decoding step (slots past the filled ones are masked by the
    context's mask), so each einx call sees one shape, and a compiled decode step one graph.
    """
    end = kv.start + k.shape[-2]
    kv.keys[..., kv.start : end, :] = k
    kv.values[..., kv.start : end, :] = v
    return kv.keys, kv.values


def rope_position(
    q: Float[Tensor, "... heads seq d_head"], k: Float[Tensor, "... heads seq d_head"], ctx: AttentionContext
) -> tuple[Float[Tensor, "... heads seq d_head"], Float[Tensor, "... heads seq d_head"]]:
    """Positional function: RoPE on queries and keys with the context's cosines and sines."""
    if ctx.cos is None or ctx.sin is None:
        raise ValueError("rope_position needs RoPE angles in the context; this config has position='nope'")
    return rope_rotate_tables(q, ctx.cos, ctx.sin), rope_rotate_tables(k, ctx.cos, ctx.sin)


def no_position(
    q: Float[Tensor, "... heads seq d_head"], k: Float[Tensor, "... heads seq d_head"], ctx: AttentionContext
) -> tuple[Float[Tensor, "... heads seq d_head"], Float[Tensor, "... heads seq d_head"]]:
    """Positional function of the NoPE ablation: queries and keys unchanged (causal masking is the
    only source of position information)."""
    return q, k


def self_attention(
    params: Params,
    x: Float[Tensor, "... seq d_model"],
    ctx: AttentionContext,
    *,
    position: Callable[..., tuple[Tensor, Tensor]] = rope_position,
) -> Float[Tensor, "... seq d_model"]:
    """Causal multi-head self-attention for the LM: project, apply `position` to q and k, append
    to the KV cache if the context has one, attend, project back.

    Each of q, k, v is one `einx.dot("... seq [d_model], (heads d_head) [d_model] -> ... heads seq
    d_head", x, W, heads=num_heads)` (the projection and the head split together), and the output
    projection merges the heads in the same call, `einx.dot("... [heads] seq [d_head], d_model
    ([heads d_head]) -> ... seq d_model", out, W_o)`: the same einsums as `linear` with
    `split_heads` / `merge_heads`, in one call each.

    **Arguments:**

    - `params`: `q_proj`, `k_proj`, `v_proj`, `output_proj`, each `{"weight": (d_model, d_model)}`.
    - `x`: `(..., seq, d_model)`.
    - `ctx`: the `AttentionContext` of this call.
    - `position`: `position(q, k, ctx) -> (q, k)` on `(..., heads, seq, d_head)` tensors.

    **Returns:** `(..., seq, d_model)`.
    """
    q, k, v = (_project_heads(params[name]["weight"], x, ctx.num_heads) for name in ("q_proj", "k_proj", "v_proj"))
    q, k = position(q, k, ctx)
    if ctx.kv is not None:
        k, v = kv_append(ctx.kv, k, v)
    return _merge_project(params["output_proj"]["weight"], scaled_dot_product_attention(q, k, v, ctx.mask))


def nope_self_attention(params: Params, x: Float[Tensor, "... seq d_model"], ctx: AttentionContext) -> Float[Tensor, "... seq d_model"]:
    """The NoPE ablation: `self_attention` without any positional encoding."""
    return self_attention(params, x, ctx, position=no_position)


def init_multihead_self_attention(
    d_model: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, Tensor]]:
    """Parameters of multi-head self-attention: `q_proj`, `k_proj`, `v_proj`, `output_proj`, each
    `(d_model, d_model)` (heads are stacked along the rows, as `split_heads` reads them)."""
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {name: init_linear(d_model, d_model, **kw) for name in ("q_proj", "k_proj", "v_proj", "output_proj")}


def multihead_self_attention(
    params: dict[str, dict[str, Tensor]],
    x: Float[Tensor, "... seq d_model"],
    *,
    num_heads: int,
    rope_cache: RopeCache | None = None,
    positions: Int[Tensor, "... seq"] | None = None,
) -> Float[Tensor, "... seq d_model"]:
    """Causal multi-head self-attention as a stand-alone layer, `d_k = d_v = d_model / num_heads`.

    **Arguments:**

    - `params`: `q_proj`, `k_proj`, `v_proj`, `output_proj` (see `init_multihead_self_attention`).
    - `x`: `(..., seq, d_model)`.
    - `num_heads`: number of heads; must divide `d_model`.
    - `rope_cache`: when given, RoPE is applied to queries and keys (not values).
    - `positions`: token positions `(..., seq)` for RoPE; `0 .. seq-1` when `None`.

    **Returns:** `(..., seq, d_model)`. It is `self_attention` with a context built here.
    """
    seq = x.shape[-2]
    cos = sin = None
    if rope_cache is not None:
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        cos, sin = rope_tables(rope_cache.cos[positions], rope_cache.sin[positions])
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (..., 1, seq, d_head)
    ctx = AttentionContext(num_heads, cos, sin, causal_mask(seq, seq, device=x.device))
    return self_attention(params, x, ctx, position=rope_position if rope_cache is not None else no_position)
