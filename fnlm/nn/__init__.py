"""Pure layers: every layer is an `init_*` function returning a parameter dict and an apply
function taking that dict (and only that dict) plus its input.

Weights are stored `(d_out, d_in)` like `torch.nn.Linear`. Axis names follow the project
vocabulary `batch seq d_model heads d_head d_ff vocab`; `...` is any number of leading dims.
Initialisation draws on the CPU from a `torch.Generator`, so a seed gives the same parameters on
every device.

- `dense`: `init_linear`, `linear`
- `embeddings`: `init_embedding`, `embedding`
- `norm`: `init_rmsnorm`, `rmsnorm`, `no_norm`
- `ffn`: `silu`, `swiglu_d_ff`, `init_swiglu`, `swiglu`, `init_silu_ffn`, `silu_ffn`
- `rotary`: `RopeCache`, `rope_cos_sin`, `rope_cache`, `rope_tables`, `rope_rotate_tables`, `rope_rotate`, `rope`
- `attention`: `softmax`, `causal_mask`, `scaled_dot_product_attention`, `split_heads`,
  `merge_heads`, `AttentionContext`, `attention_context`, `LayerKV`, `kv_append`,
  `rope_position`, `no_position`, `self_attention`, `nope_self_attention`,
  `init_multihead_self_attention`, `multihead_self_attention`
"""

from fnlm.nn.attention import (
    AttentionContext,
    LayerKV,
    attention_context,
    causal_mask,
    init_multihead_self_attention,
    kv_append,
    merge_heads,
    multihead_self_attention,
    no_position,
    nope_self_attention,
    rope_position,
    scaled_dot_product_attention,
    self_attention,
    softmax,
    split_heads,
)
from fnlm.nn.embeddings import embedding, init_embedding
from fnlm.nn.ffn import init_silu_ffn, init_swiglu, silu, silu_ffn, swiglu, swiglu_d_ff
from fnlm.nn.dense import init_linear, linear
from fnlm.nn.norm import init_rmsnorm, no_norm, rmsnorm
from fnlm.nn.rotary import RopeCache, rope, rope_cache, rope_cos_sin, rope_rotate, rope_rotate_tables, rope_tables

__all__ = [
    "init_linear", "linear", "init_embedding", "embedding", "init_rmsnorm", "rmsnorm", "no_norm",
    "silu", "swiglu_d_ff", "init_swiglu", "swiglu", "init_silu_ffn", "silu_ffn",
    "RopeCache", "rope_cos_sin", "rope_cache", "rope_tables", "rope_rotate_tables", "rope_rotate", "rope",
    "softmax", "causal_mask", "scaled_dot_product_attention", "split_heads", "merge_heads",
    "LayerKV", "AttentionContext", "attention_context", "kv_append", "rope_position", "no_position",
    "self_attention", "nope_self_attention", "init_multihead_self_attention", "multihead_self_attention",
]
