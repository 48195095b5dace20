"""The Transformer language model as pure functions over a parameter tree.

```python
config = TransformerConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4,
                           num_heads=16, d_ff=1344)
params = init_transformer_lm(config, seed=0)
logits = transformer_lm(params, token_ids, config)          # (..., seq, vocab)
```

**Composition.** `transformer_lm` runs `token embedding → blocks → final norm → LM head`. Each
block is a function `block(layer_params, x, ctx) -> x`, and the default blocks take their parts
as keyword arguments:

- `norm(params_or_None, x) -> x` (`rmsnorm`, or the ablation `no_norm`),
- `attention(params, x, ctx) -> x` (`self_attention` with RoPE, or `nope_self_attention`),
  itself built from a positional function `position(q, k, ctx) -> (q, k)`
  (`rope_position`, `no_position`),
- `ffn(params, x) -> x` (`swiglu`, or the ablation `silu_ffn`).

`ctx` is an `AttentionContext`: what every layer's attention needs and nothing else — the head
count, the RoPE cosines/sines at the token positions (computed once per `transformer_lm` call),
the causal mask (built once per call), and this layer's slice of the KV cache when decoding.

The config's name fields (`norm`, `norm_position`, `position`, `ffn`) pick the defaults; passing
`block=` replaces them. A parallel attention + feed-forward block, for example:

```python
def parallel_block(params, x, ctx):
    h = rmsnorm(params["ln1"], x)
    return x + self_attention(params["attn"], h, ctx) + swiglu(params["ffn"], h)

logits = transformer_lm(params, token_ids, config, block=parallel_block)
```

A block that needs other parameters comes with its own `init_block` for `init_transformer_lm`.

`transformer_lm(..., remat=True)` recomputes every block in the backward pass instead of keeping
its activations (`fnlm.remat` around the block, the config's or the one passed): the same values
and gradients for less memory and one more forward pass through the blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from fnlm.nn import (
    AttentionContext,
    LayerKV,
    attention_context,
    embedding,
    init_embedding,
    init_linear,
    init_multihead_self_attention,
    init_rmsnorm,
    init_silu_ffn,
    init_swiglu,
    linear,
    no_norm,
    nope_self_attention,
    rmsnorm,
    self_attention,
    silu_ffn,
    swiglu,
)
from fnlm.rematerialization import remat as remat_transform
from fnlm.types import Float, Int, Tensor

__all__ = [
    "TransformerConfig",
    "check_params",
    "check_token_ids",
    "KVCache",
    "init_kv_cache",
    "transformer_block",
    "post_norm_block",
    "init_transformer_block",
    "block_from_config",
    "init_transformer_lm",
    "transformer_lm",
    "param_names",
    "NORMS",
    "BLOCKS",
    "ATTENTIONS",
    "FFNS",
    "FFN_INITS",
]

Params = dict[str, Any]


# --- config ------------------------------------------------------------------------------

def _choices() -> dict[str, dict[str, Callable[..., Any]]]:
    """The config's name fields and the registries that give their allowed values."""
    return {"norm": NORMS, "norm_position": BLOCKS, "position": ATTENTIONS, "ffn": FFNS}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The model's hyperparameters.

    **Fields:**

    - `vocab_size`: number of token ids (the embedding and output rows).
    - `context_length`: the longest sequence the model reads (RoPE positions, training windows).
    - `d_model`: width of the residual stream; divisible by `num_heads`.
    - `num_layers`: number of Transformer blocks.
    - `num_heads`: attention heads (`d_head = d_model // num_heads`, even for RoPE).
    - `d_ff`: hidden width of the feed-forward network.
    - `rope_theta`: the RoPE base Θ.
    - `norm`: `"rmsnorm"` or `"none"` (the no-norm ablation: no `ln1`, `ln2`, `ln_final` params).
    - `norm_position`: `"pre"` (the default block) or `"post"` (the post-norm ablation).
    - `position`: `"rope"` or `"nope"` (no positional encoding).
    - `ffn`: `"swiglu"` or `"silu"` (the ungated ablation: no `w3`; use `d_ff = 4·d_model` to
      match SwiGLU's parameter count).

    `TransformerConfig(**dataclasses.asdict(config)) == config`.
    """

    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    position: str = "rope"
    ffn: str = "swiglu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise ValueError(f"TransformerConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        for name, registry in _choices().items():
            value = getattr(self, name)
            if value not in registry:
                raise ValueError(f"TransformerConfig.{name} must be one of {tuple(registry)}, got {value!r}")
        if self.position == "rope" and self.d_head % 2 != 0:
            raise ValueError(
                f"RoPE needs an even head size, got d_model={self.d_model} / num_heads={self.num_heads} = {self.d_head}"
            )

    @property
    def d_head(self) -> int:
        """`d_model // num_heads`."""
        return self.d_model // self.num_heads


# --- attention context and KV cache --------------------------------------------------------


@dataclasses.dataclass
class KVCache:
    """Preallocated keys and values for incremental decoding: `keys[i]`, `values[i]` of shape
    `(*batch_shape, heads, max_len, d_head)` for layer `i`, of which the first `length` positions
    are filled. `transformer_lm(..., kv_cache=cache)` writes the new positions in place and
    advances `length`: the cache is the one mutable object in fnlm, and only decoding uses it."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[-2]

    def reset(self) -> None:
        """Forget the cached positions (the buffers are reused)."""
        self.length = 0


def init_kv_cache(
    config: TransformerConfig,
    *,
    batch_shape: tuple[int, ...] = (),
    max_len: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> KVCache:
    """An empty `KVCache` for `config`, for token ids of shape `(*batch_shape, seq)`.

    **Arguments:**

    - `config`: the model's config.
    - `batch_shape`: the leading dims of the token ids that will be fed.
    - `max_len`: positions to hold; `config.context_length` by default.
    - `device`, `dtype`: as the params.

    **Returns:** a `KVCache` with `length == 0`.
    """
    max_len = config.context_length if max_len is None else max_len
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    shape = (*batch_shape, config.num_heads, max_len, config.d_head)
    keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
    values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
    return KVCache(keys, values, 0)


# --- attention, norms, blocks ---------------------------------------------------------------


def transformer_block(
    params: Params,
    x: Float[Tensor, "... seq d_model"],
    ctx: AttentionContext,
    *,
    norm: Callable[..., Tensor] = rmsnorm,
    attention: Callable[..., Tensor] = self_attention,
    ffn: Callable[..., Tensor] = swiglu,
) -> Float[Tensor, "... seq d_model"]:
    """The pre-norm block: `x + attention(norm(x))`, then `+ ffn(norm(·))`.

    **Arguments:**

    - `params`: one layer: `attn`, `ffn`, and `ln1`, `ln2` unless the norm takes none.
    - `x`: `(..., seq, d_model)`.
    - `ctx`: the `AttentionContext` of this call.
    - `norm`, `attention`, `ffn`: the parts (see the module docstring for their signatures).

    **Returns:** `(..., seq, d_model)`.
    """
    x = x + attention(params["attn"], norm(params.get("ln1"), x), ctx)
    return x + ffn(params["ffn"], norm(params.get("ln2"), x))


def post_norm_block(
    params: Params,
    x: Float[Tensor, "... seq d_model"],
    ctx: AttentionContext,
    *,
    norm: Callable[..., Tensor] = rmsnorm,
    attention: Callable[..., Tensor] = self_attention,
    ffn: Callable[..., Tensor] = swiglu,
) -> Float[Tensor, "... seq d_model"]:
    """The post-norm ablation (the original Transformer's order): `z = norm(x + attention(x))`,
    then `norm(z + ffn(z))`. Same parameters and arguments as `transformer_block`."""
    x = norm(params.get("ln1"), x + attention(params["attn"], x, ctx))
    return norm(params.get("ln2"), x + ffn(params["ffn"], x))


NORMS: dict[str, Callable[..., Tensor]] = {"rmsnorm": rmsnorm, "none": no_norm}
BLOCKS: dict[str, Callable[..., Tensor]] = {"pre": transformer_block, "post": post_norm_block}
ATTENTIONS: dict[str, Callable[..., Tensor]] = {"rope": self_attention, "nope": nope_self_attention}
FFNS: dict[str, Callable[..., Tensor]] = {"swiglu": swiglu, "silu": silu_ffn}
FFN_INITS: dict[str, Callable[..., Params]] = {"swiglu": init_swiglu, "silu": init_silu_ffn}


def block_from_config(config: TransformerConfig) -> Callable[..., Tensor]:
    """The block the config's name fields select, as `block(params, x, ctx) -> x`."""
    return functools.partial(
        BLOCKS[config.norm_position],
        norm=NORMS[config.norm],
        attention=ATTENTIONS[config.position],
        ffn=FFNS[config.ffn],
    )


# --- init and the LM ---------------------------------------------------------------------------


def init_transformer_block(
    config: TransformerConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """One layer's parameters: `attn.{q,k,v,output}_proj`, `ffn.{w1,w2,w3}` (no `w3` for
    `ffn="silu"`), and `ln1`, `ln2` unless `norm="none"`."""
    kw = dict(generator=generator, device=device, dtype=dtype)
    init_ffn = FFN_INITS[config.ffn]
    layer: Params = {
        "attn": init_multihead_self_attention(config.d_model, **kw),
        "ffn": init_ffn(config.d_model, config.d_ff, **kw),
    }
    if config.norm != "none":
        layer["ln1"] = init_rmsnorm(config.d_model, device=device, dtype=dtype)
        layer["ln2"] = init_rmsnorm(config.d_model, device=device, dtype=dtype)
    return layer


def init_transformer_lm(
    config: TransformerConfig,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    init_block: Callable[..., Params] = init_transformer_block,
) -> Params:
    """Initial parameters of the LM, a nested dict whose flat names are the CS336 state-dict names
    (`token_embeddings.weight`, `layers.{i}.attn.q_proj.weight`, ..., `ln_final.weight`,
    `lm_head.weight`).

    Linear weights ~ N(0, 2/(d_in+d_out)) truncated at ±3σ, embeddings ~ N(0, 1) truncated at ±3,
    RMSNorm gains 1. All draws come from one CPU generator seeded with `seed`, so a seed gives the
    same parameters on every device.

    **Arguments:**

    - `config`: the `TransformerConfig`.
    - `seed`: the RNG seed.
    - `device`, `dtype`: where and how the parameters are stored.
    - `init_block`: `init_block(config, *, generator, device, dtype) -> layer params`, for blocks
      that need other parameters than `init_transformer_block` gives.

    **Returns:** the params tree.
    """
    generator = torch.Generator().manual_seed(seed)
    kw = dict(generator=generator, device=device, dtype=dtype)
    params: Params = {
        "token_embeddings": init_embedding(config.vocab_size, config.d_model, **kw),
        "layers": [init_block(config, **kw) for _ in range(config.num_layers)],
    }
    if config.norm != "none":
        params["ln_final"] = init_rmsnorm(config.d_model, device=device, dtype=dtype)
    params["lm_head"] = init_linear(config.d_model, config.vocab_size, **kw)
    return params


def param_names(config: TransformerConfig) -> set[str]:
    """The flat parameter names `init_transformer_lm(config)` produces (the CS336 names)."""
    layer = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight"]
    layer += ["ffn.w1.weight", "ffn.w2.weight"] + (["ffn.w3.weight"] if config.ffn == "swiglu" else [])
    layer += ["ln1.weight", "ln2.weight"] if config.norm != "none" else []
    names = {"token_embeddings.weight", "lm_head.weight"} | ({"ln_final.weight"} if config.norm != "none" else set())
    return names | {f"layers.{i}.{n}" for i in range(config.num_layers) for n in layer}


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_token_ids(token_ids: Any, name: str = "token_ids") -> None:
    """Raise `TypeError` unless `token_ids` is an integer tensor, and `ValueError` unless it has a
    non-empty `seq` axis. Reads only the type, dtype and shape: no host sync, nothing for
    `torch.compile` to break on.

    **Arguments:**

    - `token_ids`: what was passed as the ids.
    - `name`: the argument's name for the message.
    """
    if not isinstance(token_ids, Tensor):
        hint = f"; wrap it: torch.tensor({name}, dtype=torch.long)" if isinstance(token_ids, (list, tuple)) else ""
        raise TypeError(
            f"{name} must be a torch.Tensor of integer ids, shape (..., seq); got {type(token_ids).__name__}{hint}"
        )
    if token_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must hold integer ids (int64, int32, ...), got dtype {token_ids.dtype}")
    if token_ids.ndim == 0 or token_ids.numel() == 0:
        raise ValueError(
            f"{name} must have shape (..., seq) with at least one token, got shape {tuple(token_ids.shape)}"
        )


Spec = tuple[tuple[tuple[Any, ...], tuple[int, ...], str], ...]


def _param_spec(config: TransformerConfig, layers: bool, final_norm: bool) -> Spec:
    """The `(path, shape, from)` of every parameter `transformer_lm` reads for `config` (without
    the layers' or the final norm's when those are the caller's own); cached in eager calls
    (dynamo traces the uncached builder instead of warning about a cache wrapper)."""
    if torch.compiler.is_compiling():
        return _build_spec(config, layers, final_norm)
    return _cached_spec(config, layers, final_norm)


def _build_spec(config: TransformerConfig, layers: bool, final_norm: bool) -> Spec:
    c = config
    spec = [(("token_embeddings", "weight"), (c.vocab_size, c.d_model), "(vocab_size, d_model)")]
    if layers:
        square, up, down = (c.d_model, c.d_model), (c.d_ff, c.d_model), (c.d_model, c.d_ff)
        projections = ("q_proj", "k_proj", "v_proj", "output_proj")
        layer = [(("attn", n, "weight"), square, "(d_model, d_model)") for n in projections]
        layer += [(("ffn", "w1", "weight"), up, "(d_ff, d_model)"), (("ffn", "w2", "weight"), down, "(d_model, d_ff)")]
        layer += [(("ffn", "w3", "weight"), up, "(d_ff, d_model)")] if c.ffn == "swiglu" else []
        layer += [((n, "weight"), (c.d_model,), "(d_model,)") for n in ("ln1", "ln2")] if c.norm != "none" else []
        spec += [(("layers", i, *path), shape, what) for i in range(c.num_layers) for path, shape, what in layer]
    if c.norm != "none" and final_norm:
        spec.append((("ln_final", "weight"), (c.d_model,), "(d_model,)"))
    spec.append((("lm_head", "weight"), (c.vocab_size, c.d_model), "(vocab_size, d_model)"))
    return tuple(spec)


_cached_spec = functools.lru_cache(maxsize=64)(_build_spec)


def _lookup(params: Any, path: tuple[Any, ...]) -> Any:
    node = params
    for depth, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            dotted = ".".join(str(k) for k in path)
            where = ".".join(str(k) for k in path[:depth]) or "the top level"
            raise ValueError(f"params is missing {dotted!r} (no {key!r} under {where})") from None
    return node


def check_params(params: Any, config: TransformerConfig, *, layers: bool = True, final_norm: bool = True) -> None:
    """Check that `params` has every parameter `transformer_lm(params, ids, config)` reads, with
    the shape `config` gives it: the tree structure, the shapes and floating dtypes (no values).

    Raises `ValueError` naming the dotted path (`'layers.0.attn.q_proj.weight'`) and the expected
    and given shapes, or `TypeError` for a leaf that is not a floating tensor. Extra entries are
    allowed (blocks may read more). The head count cannot be checked here: `W_q` is
    `(d_model, d_model)` for any `num_heads`. About 20 µs for a 4-layer model.

    **Arguments:**

    - `params`: the params tree.
    - `config`: the `TransformerConfig` it is used with.
    - `layers`: check every layer's parameters (the default blocks read them); `False` checks only
      the embedding, final norm, LM head and the number of layers (for a custom `block`).
    - `final_norm`: check `ln_final` (the config's final norm reads it); `False` for a custom one.
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict (a params tree), got {type(params).__name__}")
    n_layers = len(_lookup(params, ("layers",)))
    if n_layers != config.num_layers:
        raise ValueError(f"params have {n_layers} layers but config.num_layers={config.num_layers}")
    for path, shape, what in _param_spec(config, layers, final_norm):
        leaf = _lookup(params, path)
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            kind = f"dtype {leaf.dtype}" if isinstance(leaf, Tensor) else type(leaf).__name__
            raise TypeError(f"params {'.'.join(map(str, path))!r} must be a floating tensor, got {kind}")
        if leaf.shape != shape:
            raise ValueError(
                f"params {'.'.join(map(str, path))!r} has shape {tuple(leaf.shape)}, but config "
                f"(vocab_size={config.vocab_size}, d_model={config.d_model}, d_ff={config.d_ff}) "
                f"expects {what} = {shape}"
            )


def _check_cache(kv_cache: KVCache, config: TransformerConfig) -> None:
    shape = tuple(kv_cache.keys[0].shape[-3:]) if kv_cache.keys else ()
    expected = (config.num_heads, kv_cache.max_len if kv_cache.keys else 0, config.d_head)
    if len(kv_cache.keys) != config.num_layers or shape != expected:
        raise ValueError(
            f"kv_cache holds {len(kv_cache.keys)} layers of (heads, max_len, d_head) = {shape}, but config has "
            f"num_layers={config.num_layers}, num_heads={config.num_heads}, d_head={config.d_head}; "
            "make it with init_kv_cache(config)"
        )


def _missing_in_block(error: KeyError, layer: int, config: TransformerConfig) -> ValueError:
    key = error.args[0] if error.args else "?"
    known = [n for n in param_names(config) if n.startswith(f"layers.{layer}.") and f".{key}." in f".{n}."]
    where = repr(known[0]) if known else f"{key!r} under 'layers.{layer}'"
    return ValueError(f"params is missing {where}: the block of layer {layer} read it (KeyError {key!r})")


def transformer_lm(
    params: Params,
    token_ids: Int[Tensor, "... seq"],
    config: TransformerConfig,
    *,
    positions: Int[Tensor, "... seq"] | None = None,
    block: Callable[..., Tensor] | None = None,
    final_norm: Callable[..., Tensor] | None = None,
    kv_cache: KVCache | None = None,
    remat: bool = False,
) -> Float[Tensor, "... seq vocab"]:
    """The LM's logits: token embedding → `num_layers` blocks → final norm → LM head.

    Pure unless `kv_cache` is given. Sequences shorter than `context_length` work; longer ones
    raise. RoPE angles and the causal mask are built once per call and shared by all layers.

    Cheap checks run on every call (type, dtype and shape of the ids; the params' structure and
    shapes against `config`, `check_params`; about 20-30 µs, no host sync, nothing that breaks
    `torch.compile` or `vmap`) and raise `TypeError`/`ValueError` naming the argument. The ids'
    range is checked by `embedding` in eager CPU calls.

    **Arguments:**

    - `params`: the tree from `init_transformer_lm`.
    - `token_ids`: integer ids `(..., seq)`, each in `[0, vocab_size)`.
    - `config`: the `TransformerConfig`.
    - `positions`: token positions `(..., seq)` for RoPE; `start .. start+seq-1` when `None`
      (`start` is `kv_cache.length`, or 0).
    - `block`: `block(layer_params, x, ctx) -> x` applied per layer, where `x` is
      `(..., seq, d_model)` and `ctx` an `AttentionContext`; chosen from the config's
      `norm_position`, `norm`, `position`, `ffn` when `None` (`block_from_config`).
    - `final_norm`: `norm(params["ln_final"] or None, x) -> x`; from `config.norm` when `None`.
    - `kv_cache`: a `KVCache` (`init_kv_cache`) holding `kv_cache.length` earlier tokens; this
      call's keys and values are written into it and its length advanced, and the new tokens
      attend to all cached ones (over the whole buffer, masked: static shapes at every step).
    - `remat`: recompute each block in the backward pass instead of keeping its activations
      (`fnlm.remat` around `block`): the same values and gradients, about one layer's activations
      held at a time instead of all of them, for one more forward pass through the blocks.

    **Returns:** logits `(..., seq, vocab)`.
    """
    check_token_ids(token_ids)
    check_params(params, config, layers=block is None, final_norm=final_norm is None)
    seq = token_ids.shape[-1]
    start = 0 if kv_cache is None else kv_cache.length
    limit = config.context_length if kv_cache is None else min(kv_cache.max_len, config.context_length)
    if start + seq > limit:
        raise ValueError(
            f"sequence too long: {start} cached + {seq} new tokens > {limit} "
            f"(context_length={config.context_length})"
        )
    if kv_cache is not None:
        _check_cache(kv_cache, config)
    ctx = attention_context(
        num_heads=config.num_heads,
        seq_len=seq,
        d_head=config.d_head,
        rope_theta=config.rope_theta if config.position == "rope" else None,
        positions=positions,
        start=start,
        kv_len=None if kv_cache is None else kv_cache.max_len,
        device=token_ids.device,
    )
    x = embedding(params["token_embeddings"], token_ids)
    x = _blocks(params, x, ctx, config, block, kv_cache, start, remat)
    if kv_cache is not None:
        kv_cache.length = start + seq
    final_norm = NORMS[config.norm] if final_norm is None else final_norm
    return linear(params["lm_head"], final_norm(params.get("ln_final"), x))


def _blocks(
    params: Params, x: Tensor, ctx: AttentionContext, config: TransformerConfig,
    block: Callable[..., Tensor] | None, kv_cache: KVCache | None, start: int, remat: bool = False,
) -> Tensor:
    custom = block is not None
    block = block if custom else block_from_config(config)
    if remat:
        block = remat_transform(block)
    for i, layer in enumerate(params["layers"]):
        layer_ctx = ctx if kv_cache is None else ctx._replace(kv=LayerKV(kv_cache.keys[i], kv_cache.values[i], start))
        if not custom:
            x = block(layer, x, layer_ctx)
            continue
        try:
            x = block(layer, x, layer_ctx)
        except KeyError as error:
            raise _missing_in_block(error, i, config) from error
    return x
