"""`torch.nn.Module` shims over fnlm's pure layers, for code that expects modules (the CS336
adapter interface). Each module stores its parameters under the CS336 state-dict names, builds
them with the matching `init_*` function, and its `forward` calls the pure function on
`self.tree()` (its parameters as a params tree). They hold no logic of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fnlm import model as _model
from fnlm import nn as _nn
from fnlm.tree import tree_unflatten

__all__ = [
    "Linear",
    "Embedding",
    "RMSNorm",
    "SwiGLU",
    "RotaryPositionalEmbedding",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "TransformerLM",
]


class _Shim(nn.Module):
    def tree(self) -> Any:
        """This module's parameters as an fnlm params tree (shared storage, not copies)."""
        return tree_unflatten(dict(self.named_parameters()))

    def _adopt(self, params: dict[str, Any]) -> None:
        for name, value in params.items():
            if isinstance(value, Tensor):
                self.register_parameter(name, nn.Parameter(value))
            else:
                raise TypeError(f"_adopt expects leaf tensors, got {type(value).__name__} for {name!r}")


def _kw(device: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    return {"device": device, "dtype": dtype or torch.float32}


class Linear(_Shim):
    """`fnlm.linear` as a module: `weight` of shape `(out_features, in_features)`."""

    def __init__(self, in_features: int, out_features: int, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self._adopt(_nn.init_linear(in_features, out_features, **_kw(device, dtype)))

    def forward(self, x: Tensor) -> Tensor:
        return _nn.linear(self.tree(), x)


class Embedding(_Shim):
    """`fnlm.embedding` as a module: `weight` of shape `(num_embeddings, embedding_dim)`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self._adopt(_nn.init_embedding(num_embeddings, embedding_dim, **_kw(device, dtype)))

    def forward(self, token_ids: Tensor) -> Tensor:
        return _nn.embedding(self.tree(), token_ids)


class RMSNorm(_Shim):
    """`fnlm.rmsnorm` as a module: `weight` of shape `(d_model,)`."""

    def __init__(self, d_model: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self._adopt(_nn.init_rmsnorm(d_model, **_kw(device, dtype)))

    def forward(self, x: Tensor) -> Tensor:
        return _nn.rmsnorm(self.tree(), x, eps=self.eps)


class SwiGLU(_Shim):
    """`fnlm.swiglu` as a module: `w1`, `w2`, `w3` linear submodules."""

    def __init__(self, d_model: int, d_ff: int | None = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        d_ff = _nn.swiglu_d_ff(d_model) if d_ff is None else d_ff
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)
        self.w3 = Linear(d_model, d_ff, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _nn.swiglu(self.tree(), x)


class RotaryPositionalEmbedding(nn.Module):
    """`fnlm.rope` as a module; the cos/sin table (`fnlm.rope_cache`) is a non-persistent buffer."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device: Any = None):
        super().__init__()
        cache = _nn.rope_cache(d_k, max_seq_len, theta, device=device)
        self.register_buffer("cos", cache.cos, persistent=False)
        self.register_buffer("sin", cache.sin, persistent=False)

    def cache(self) -> _nn.RopeCache:
        return _nn.RopeCache(self.cos, self.sin)

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        return _nn.rope(x, token_positions, self.cache())


class MultiHeadSelfAttention(_Shim):
    """`fnlm.multihead_self_attention` as a module: `q_proj`, `k_proj`, `v_proj`, `output_proj`;
    RoPE when `theta` is given (with `max_seq_len` positions)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        max_seq_len: int | None = None,
        theta: float | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            setattr(self, name, Linear(d_model, d_model, device, dtype))
        if theta is not None:
            if max_seq_len is None:
                raise ValueError("MultiHeadSelfAttention with RoPE (theta given) needs max_seq_len")
            self.rope = RotaryPositionalEmbedding(theta, d_model // num_heads, max_seq_len, device)
        else:
            self.rope = None

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        cache = None if self.rope is None else self.rope.cache()
        return _nn.multihead_self_attention(self.tree(), x, num_heads=self.num_heads, rope_cache=cache, positions=token_positions)


class TransformerBlock(_Shim):
    """`fnlm.transformer_block` (pre-norm, RoPE) as a module: `attn`, `ln1`, `ffn`, `ln2`."""

    def __init__(
        self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float = 10000.0, device: Any = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.num_heads, self.theta = num_heads, theta
        self.attn = MultiHeadSelfAttention(d_model, num_heads, device=device, dtype=dtype)
        self.ln1 = RMSNorm(d_model, device=device, dtype=dtype)
        self.ffn = SwiGLU(d_model, d_ff, device, dtype)
        self.ln2 = RMSNorm(d_model, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    def forward(self, x: Tensor, token_positions: Tensor | None = None) -> Tensor:
        ctx = _model.attention_context(
            num_heads=self.num_heads,
            seq_len=x.shape[-2],
            d_head=x.shape[-1] // self.num_heads,
            rope_theta=self.theta,
            positions=token_positions,
            device=x.device,
        )
        return _model.transformer_block(self.tree(), x, ctx)


class TransformerLM(_Shim):
    """`fnlm.transformer_lm` as a module, with the CS336 state-dict names
    (`token_embeddings`, `layers.{i}.…`, `ln_final`, `lm_head`).

    Construct from the CS336 arguments, or from a `TransformerConfig` with `from_config` (which
    also takes the ablation fields). `forward(in_indices)` returns logits."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        config: _model.TransformerConfig | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if config is None:
            config = _model.TransformerConfig(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta)
        self.config = config
        self._build(_model.init_transformer_lm(config, seed=seed, **_kw(device, dtype)), self)

    @classmethod
    def from_config(cls, config: _model.TransformerConfig, *, seed: int = 0, device: Any = None, dtype: torch.dtype | None = None) -> TransformerLM:
        c = config
        return cls(c.vocab_size, c.context_length, c.d_model, c.num_layers, c.num_heads, c.d_ff, c.rope_theta, device, dtype, config=c, seed=seed)

    @staticmethod
    def _build(tree: dict[str, Any], module: nn.Module) -> None:
        for name, value in tree.items():
            if isinstance(value, Tensor):
                module.register_parameter(name, nn.Parameter(value))
            elif isinstance(value, list):
                children = nn.ModuleList(nn.Module() for _ in value)
                for item, child in zip(value, children):
                    TransformerLM._build(item, child)
                module.add_module(name, children)
            else:
                child = nn.Module()
                TransformerLM._build(value, child)
                module.add_module(name, child)

    def forward(self, in_indices: Tensor) -> Tensor:
        return _model.transformer_lm(self.tree(), in_indices, self.config)
