"""SiLU feed-forward: W2·SiLU(W1·x), ungated, with d_ff = 4·d_model so that its two matrices hold
about as many parameters as SwiGLU's three at d_ff ≈ 8/3·d_model."""

from __future__ import annotations

import dataclasses
import functools

import torch

import fnlm
from fnlm.types import Float, Int, Tensor

from .variant import Ablation

_block = functools.partial(fnlm.transformer_block, ffn=fnlm.silu_ffn)


def silu_d_ff(d_model: int) -> int:
    """The SiLU feed-forward width that matches SwiGLU's parameter count: `4 · d_model`."""
    return 4 * d_model


def silu_ffn_lm(params: dict, token_ids: Int[Tensor, "... seq"], config: fnlm.TransformerConfig) -> Float[Tensor, "... seq vocab"]:
    """The LM with `fnlm.silu_ffn` as every block's feed-forward.

    **Arguments:** `params` from `init_silu_ffn_lm`; `token_ids` `(..., seq)`; `config`.

    **Returns:** logits `(..., seq, vocab)`.
    """
    return fnlm.transformer_lm(params, token_ids, config, block=_block)


def init_silu_block(config: fnlm.TransformerConfig, *, generator: torch.Generator | None = None, device=None,
                    dtype: torch.dtype = torch.float32) -> dict:
    """One layer: attention as the baseline's, `ffn.{w1,w2}` of width `silu_d_ff(d_model)`, two norms."""
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {
        "attn": fnlm.init_multihead_self_attention(config.d_model, **kw),
        "ffn": fnlm.init_silu_ffn(config.d_model, silu_d_ff(config.d_model), **kw),
        "ln1": fnlm.init_rmsnorm(config.d_model, device=device, dtype=dtype),
        "ln2": fnlm.init_rmsnorm(config.d_model, device=device, dtype=dtype),
    }


def init_silu_ffn_lm(config: fnlm.TransformerConfig, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> dict:
    """The LM's parameters with `init_silu_block` layers."""
    return fnlm.init_transformer_lm(config, seed=seed, device=device, dtype=dtype, init_block=init_silu_block)


SILU_FFN = Ablation(
    "silu_ffn",
    "ungated W2·SiLU(W1·x) feed-forward, d_ff = 4·d_model (parameter-matched)",
    silu_ffn_lm,
    init_silu_ffn_lm,
    lambda config: dataclasses.replace(config, ffn="silu", d_ff=silu_d_ff(config.d_model)),
)
