"""Pure layers: every layer is an ``init_*`` function returning a parameter dict and an apply
function taking that dict (and only that dict) plus its input.

Weights are stored ``(d_out, d_in)`` like ``torch.nn.Linear``. Axis names follow the project
vocabulary ``batch seq d_model heads d_head d_ff vocab``; ``...`` is any number of leading dims.

The hot-path maths is written with plain torch ops (``x @ w.T``, ``view``/``transpose``) rather
than einx: einx re-dispatches on every call (about 0.1 ms each here, ten times a small matmul),
which would be measurable in a training step. Every reshape carries a shape comment instead.
Initialisation draws on the CPU from a ``torch.Generator`` so a seed gives the same parameters
on every device.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from fnlm.types import Bool, Float, Int, Tensor, typecheck_enabled

__all__ = [
    "init_linear",
    "linear",
    "init_embedding",
    "embedding",
    "init_rmsnorm",
    "rmsnorm",
    "silu",
    "swiglu_d_ff",
    "init_swiglu",
    "swiglu",
    "init_silu_ffn",
    "silu_ffn",
    "RopeCache",
    "rope_cos_sin",
    "rope_cache",
    "rope_rotate",
    "rope",
    "softmax",
    "causal_mask",
    "scaled_dot_product_attention",
    "split_heads",
    "merge_heads",
    "init_multihead_self_attention",
    "multihead_self_attention",
]


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


def _classic(fn: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """`fn` in the classic `forward(ctx, *args)` form. torch binds the signature of a
    `setup_context`-style Function with `inspect` on every call (tens of µs); the classic form
    skips that but cannot run under torch.func transforms (nor be traced by dynamo without
    grad), so `_apply` picks per call."""

    def forward(ctx: Any, *args: Any) -> Any:
        out = fn.forward(*args)
        fn.setup_context(ctx, args, out)
        return out

    return type(fn.__name__ + "Classic", (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(fn.backward)})


def _apply(fn: type[torch.autograd.Function], classic: type[torch.autograd.Function], *args: Any) -> Any:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return classic.apply(*args)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# --- linear, embedding, norm -------------------------------------------------------------


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
    """
    _check_positive(d_in=d_in, d_out=d_out)
    std = math.sqrt(2.0 / (d_in + d_out))
    weight = _trunc_normal((d_out, d_in), std, 3 * std, generator=generator, device=device, dtype=dtype)
    return {"weight": weight}


def _linear(weight: Float[Tensor, "d_out d_in"], x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    return x @ weight.T


def linear(params: dict[str, Tensor], x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    """`y = x Wᵀ`.

    **Arguments:**

    - `params`: `{"weight": W}`, `W` of shape `(d_out, d_in)`.
    - `x`: input of shape `(..., d_in)`.

    **Returns:** `(..., d_out)`.
    """
    return _linear(params["weight"], x)


def init_embedding(
    vocab_size: int,
    d_model: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Parameters of a token embedding.

    **Arguments:**

    - `vocab_size`, `d_model`: table size.
    - `generator`, `device`, `dtype`: as for `init_linear`.

    **Returns:** `{"weight": E}` with `E` of shape `(vocab_size, d_model)`, drawn from N(0, 1)
    truncated at ±3.
    """
    _check_positive(vocab_size=vocab_size, d_model=d_model)
    weight = _trunc_normal((vocab_size, d_model), 1.0, 3.0, generator=generator, device=device, dtype=dtype)
    return {"weight": weight}


def _should_check_ids(token_ids: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return token_ids.device.type == "cpu" or typecheck_enabled()


def _check_token_ids(token_ids: Tensor, vocab_size: int) -> None:
    if token_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(token_ids))
    if lo < 0 or hi >= vocab_size:
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)].unique()[:8].tolist()
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (vocab_size={vocab_size}); "
            f"got min {lo}, max {hi}; offending ids (up to 8): {bad}"
        )


def _embedding(weight: Float[Tensor, "vocab d_model"], token_ids: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
    if token_ids.dtype not in (torch.int64, torch.int32):
        token_ids = token_ids.long()
    if _should_check_ids(token_ids):
        _check_token_ids(token_ids, weight.shape[0])
    return weight[token_ids]


def embedding(params: dict[str, Tensor], token_ids: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
    """Look up token embeddings: `E[token_ids]`.

    Out-of-range ids raise a `ValueError` naming them. The check runs on CPU tensors always and on
    accelerator tensors when `FNLM_TYPECHECK` is on (there it would cost a host sync per call); it is
    skipped inside `torch.compile`.

    **Arguments:**

    - `params`: `{"weight": E}`, `E` of shape `(vocab, d_model)`.
    - `token_ids`: integer ids of any shape `(...)`.

    **Returns:** `(..., d_model)`.
    """
    return _embedding(params["weight"], token_ids)


def init_rmsnorm(
    d_model: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Parameters of RMSNorm: `{"weight": ones(d_model)}`."""
    _check_positive(d_model=d_model)
    return {"weight": torch.ones(d_model, device=device, dtype=dtype)}


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward (float32 in, float32 out).

    With `r = 1/sqrt(mean(x²) + eps)`, `n = x·r`, `y = n·g`:
    `∂L/∂g = Σ_rows ∂L/∂y · n` and `∂L/∂x = r · (u - n · mean(u · n))` where `u = ∂L/∂y · g`.
    Only `x`, `g` and the per-row `r` are kept for the backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        r = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)  # (..., 1)
        return (x * r).mul_(weight), r

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_r: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, r = ctx.saved_tensors
        n = x * r
        u = grad * weight
        grad_x = (u - n * (u * n).mean(dim=-1, keepdim=True)) * r
        grad_w = (grad * n).reshape(-1, n.shape[-1]).sum(dim=0)
        return grad_x, grad_w, None


_RMSNormClassic = _classic(_RMSNormFn)


def _rmsnorm(weight: Float[Tensor, "d_model"], x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    x32 = _upcast(x)
    return _cast(_apply(_RMSNormFn, _RMSNormClassic, x32, _cast(weight, x32.dtype), eps)[0], x.dtype)


def rmsnorm(params: dict[str, Tensor], x: Float[Tensor, "... d_model"], *, eps: float = 1e-5) -> Float[Tensor, "... d_model"]:
    """RMSNorm: `x / sqrt(mean(x²) + eps) * g`, computed in (at least) float32 and cast back to `x.dtype`.

    **Arguments:**

    - `params`: `{"weight": g}`, `g` of shape `(d_model,)`.
    - `x`: `(..., d_model)`.
    - `eps`: added to the mean square.

    **Returns:** `(..., d_model)`, dtype of `x`.
    """
    return _rmsnorm(params["weight"], x, eps)


# --- feed-forward ------------------------------------------------------------------------


class _SiLUFn(torch.autograd.Function):
    """SiLU with a hand-written backward: with `s = σ(x)` and `y = x·s`,
    `dy/dx = s + x·s·(1 - s) = s + y·(1 - s)`; keeps `s` and `y`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        sig = torch.sigmoid(x)
        return x * sig, sig

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_sig: Tensor) -> Tensor:
        y, sig = ctx.saved_tensors
        return (1 - sig).mul_(y).add_(sig).mul_(grad)


_SiLUClassic = _classic(_SiLUFn)


def silu(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """SiLU (swish): `x · σ(x)`, elementwise (hand-written forward and backward)."""
    return _apply(_SiLUFn, _SiLUClassic, x)[0]


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


# --- rotary position embedding -----------------------------------------------------------


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


def rope_rotate(
    x: Float[Tensor, "... seq d_head"], cos: Float[Tensor, "... seq half"], sin: Float[Tensor, "... seq half"]
) -> Float[Tensor, "... seq d_head"]:
    """Rotate each interleaved pair `(x[2k], x[2k+1])` by the angle whose cosine and sine are given.

    `cos` and `sin` broadcast against `x` without its last dim (e.g. `(seq, half)` for every batch
    and head, or `(batch, 1, seq, half)` for per-sequence positions with a heads dim).

    **Arguments:**

    - `x`: `(..., seq, d_head)`.
    - `cos`, `sin`: `(..., seq, d_head // 2)`, as returned by `rope_cos_sin`.

    **Returns:** `(..., seq, d_head)`, dtype of `x`.
    """
    cos, sin = _cast(cos, x.dtype), _cast(sin, x.dtype)
    pairs = x.unflatten(-1, (-1, 2))  # (..., seq, half, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (..., seq, half, 2)
    return rotated.flatten(-2)


def rope(x: Float[Tensor, "... seq d_head"], positions: Int[Tensor, "... seq"], cache: RopeCache) -> Float[Tensor, "... seq d_head"]:
    """Rotary position embedding with interleaved pairs `(2k, 2k+1)` (the CS336 convention).

    **Arguments:**

    - `x`: queries or keys, `(..., seq, d_head)`.
    - `positions`: integer positions `(..., seq)`, broadcastable against the leading dims of `x`.
    - `cache`: the table from `rope_cache(d_head, max_seq_len, theta)`; positions index into it.

    **Returns:** `(..., seq, d_head)`.
    """
    return rope_rotate(x, cache.cos[positions], cache.sin[positions])


# --- attention ---------------------------------------------------------------------------


class _SoftmaxFn(torch.autograd.Function):
    """Softmax with a hand-written backward: `∂L/∂x = p · (∂L/∂p - Σ ∂L/∂p · p)`; keeps only `p`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dim: int) -> Tensor:
        finfo = torch.finfo(x.dtype)
        row_max = x.amax(dim=dim, keepdim=True).clamp_min_(finfo.min)  # a fully masked row: -inf -> min
        e = (x - row_max).exp_()
        total = e.sum(dim=dim, keepdim=True)  # >= 1, or 0 for a fully masked row
        return e.div_(total.clamp_min_(finfo.tiny))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        grad_x = grad * p
        return torch.addcmul(grad_x, p, grad_x.sum(dim=ctx.dim, keepdim=True), value=-1), None


_SoftmaxClassic = _classic(_SoftmaxFn)


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
    return _cast(_apply(_SoftmaxFn, _SoftmaxClassic, _upcast(x), dim), x.dtype)


def causal_mask(seq_q: int, seq_k: int, *, device: torch.device | str | None = None) -> Bool[Tensor, "seq_q seq_k"]:
    """Boolean causal mask (True = may attend) for `seq_q` queries that are the *last* `seq_q` of
    `seq_k` keys: query `i` sees keys `j ≤ i + (seq_k - seq_q)`.

    Example: `causal_mask(2, 3)` is `[[True, True, False], [True, True, True]]`.
    """
    if seq_q > seq_k:
        raise ValueError(f"causal_mask needs seq_q <= seq_k, got seq_q={seq_q}, seq_k={seq_k}")
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(diagonal=seq_k - seq_q)


def scaled_dot_product_attention(
    q: Float[Tensor, "... queries d_k"],
    k: Float[Tensor, "... keys d_k"],
    v: Float[Tensor, "... keys d_v"],
    mask: Bool[Tensor, "... queries keys"] | None = None,
) -> Float[Tensor, "... queries d_v"]:
    """`softmax(q kᵀ / √d_k, masked) v`, over any number of leading (batch, heads) dims.

    **Arguments:**

    - `q`: `(..., queries, d_k)`; `k`: `(..., keys, d_k)`; `v`: `(..., keys, d_v)`.
    - `mask`: boolean, True = attend, broadcastable to `(..., queries, keys)`; `None` attends
      everywhere. A query whose row is all False gets a zero output (see `softmax`).

    **Returns:** `(..., queries, d_v)`.
    """
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (..., queries, keys)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return _cast(softmax(scores, dim=-1), v.dtype) @ v


def split_heads(x: Float[Tensor, "... seq d_model"], num_heads: int) -> Float[Tensor, "... heads seq d_head"]:
    """`(..., seq, heads·d_head) -> (..., heads, seq, d_head)`; head `h` owns features
    `h·d_head .. (h+1)·d_head - 1`."""
    if x.shape[-1] % num_heads != 0:
        raise ValueError(f"d_model={x.shape[-1]} is not divisible by num_heads={num_heads}")
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)  # (..., heads, seq, d_head)


def merge_heads(x: Float[Tensor, "... heads seq d_head"]) -> Float[Tensor, "... seq d_model"]:
    """Inverse of `split_heads`: `(..., heads, seq, d_head) -> (..., seq, heads·d_head)`."""
    return x.transpose(-3, -2).flatten(-2)  # (..., seq, heads*d_head)


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
    """Causal multi-head self-attention, heads as a batch dim, `d_k = d_v = d_model / num_heads`.

    **Arguments:**

    - `params`: `q_proj`, `k_proj`, `v_proj`, `output_proj` (see `init_multihead_self_attention`).
    - `x`: `(..., seq, d_model)`.
    - `num_heads`: number of heads; must divide `d_model`.
    - `rope_cache`: when given, RoPE is applied to queries and keys (not values).
    - `positions`: token positions `(..., seq)` for RoPE; `0 .. seq-1` when `None`.

    **Returns:** `(..., seq, d_model)`.

    (The language model uses `fnlm.model.self_attention`, which takes a precomputed
    `AttentionContext` and an optional KV cache; this is the stand-alone layer.)
    """
    seq = x.shape[-2]
    q, k, v = (split_heads(linear(params[name], x), num_heads) for name in ("q_proj", "k_proj", "v_proj"))
    if rope_cache is not None:
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        cos = rope_cache.cos[positions].unsqueeze(-3)  # (..., 1, seq, half)
        sin = rope_cache.sin[positions].unsqueeze(-3)
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
    out = scaled_dot_product_attention(q, k, v, causal_mask(seq, seq, device=x.device))
    return linear(params["output_proj"], merge_heads(out))
