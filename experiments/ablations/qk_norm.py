"""Write your own ablation: QK-norm (RMSNorm with a learned gain on every head's queries and keys, before RoPE)."""

import functools

import torch

import fnlm

from .variant import Ablation


def qk_norm_attention(params, x, ctx):
    def position(q, k, ctx):
        return fnlm.rope_position(fnlm.rmsnorm(params["q_norm"], q), fnlm.rmsnorm(params["k_norm"], k), ctx)
    return fnlm.self_attention(params, x, ctx, position=position)


def init_qk_norm_block(config, *, generator=None, device=None, dtype=torch.float32):
    layer = fnlm.init_transformer_block(config, generator=generator, device=device, dtype=dtype)
    for name in ("q_norm", "k_norm"):
        layer["attn"][name] = fnlm.init_rmsnorm(config.d_head, device=device, dtype=dtype)
    return layer


QK_NORM = Ablation("qk_norm", "user example: RMSNorm on each head's q and k before RoPE",
                   block=functools.partial(fnlm.transformer_block, attention=qk_norm_attention),
                   init_block=init_qk_norm_block)
