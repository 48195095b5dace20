"""Hand-written ``nn.Module`` baselines with the same maths as fnlm's Transformer LM.

``ReferenceLM(config, fused=False)`` is baseline (a): the same from-scratch pieces fnlm uses
(max-subtracted softmax, masked attention, interleaved RoPE, SwiGLU, float32-upcast RMSNorm,
log-sum-exp cross-entropy), written the way one writes a PyTorch module.
``ReferenceLM(config, fused=True)`` is baseline (b): the same module on torch's fused kernels
(``F.scaled_dot_product_attention(is_causal=True)``, ``F.rms_norm``, ``F.silu``,
``F.cross_entropy``).

Its ``state_dict()`` names are fnlm's flat parameter names, so ``load_fnlm_params`` copies an
fnlm params tree in exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


class Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        nn.init.trunc_normal_(self.weight, std=math.sqrt(2 / (d_in + d_out)), a=-3, b=3)

    def forward(self, x):
        return x @ self.weight.T


class Embedding(nn.Module):
    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, d))
        nn.init.trunc_normal_(self.weight, std=1.0, a=-3, b=3)

    def forward(self, ids):
        return self.weight[ids]


class RMSNorm(nn.Module):
    def __init__(self, d: int, fused: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return F.rms_norm(x, (x.shape[-1],), self.weight, EPS)
        dtype = x.dtype
        x = x.float()
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        return (x / rms * self.weight).to(dtype)


def softmax(x, dim):
    x = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def cross_entropy(logits, targets):
    logits = logits.float()
    shifted = logits - logits.amax(-1, keepdim=True)
    lse = torch.log(torch.exp(shifted).sum(-1))
    picked = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (lse - picked).mean()


class RoPE(nn.Module):
    """Interleaved rotary embedding: rotates pairs ``(x[2k], x[2k+1])`` by ``pos * theta^(-2k/d)``."""

    def __init__(self, theta: float, d_head: int, max_len: int):
        super().__init__()
        inv = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x, positions):
        cos, sin = self.cos[positions], self.sin[positions]
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, rope: RoPE, fused: bool):
        super().__init__()
        self.q_proj, self.k_proj = Linear(d, d), Linear(d, d)
        self.v_proj, self.output_proj = Linear(d, d), Linear(d, d)
        self.heads, self.fused = heads, fused
        self._rope = [rope]

    def forward(self, x, positions):
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        rope = self._rope[0]
        q, k = rope(q, positions), rope(k, positions)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q * (1.0 / math.sqrt(d // h))) @ k.transpose(-1, -2)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            out = softmax(scores, -1) @ v
        return self.output_proj(out.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int, fused: bool):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(d, d_ff), Linear(d_ff, d), Linear(d, d_ff)
        self.fused = fused

    def forward(self, x):
        a = self.w1(x)
        gate = F.silu(a) if self.fused else a * torch.sigmoid(a)
        return self.w2(gate * self.w3(x))


class Block(nn.Module):
    def __init__(self, config, rope: RoPE, fused: bool):
        super().__init__()
        d = config.d_model
        self.ln1, self.ln2 = RMSNorm(d, fused), RMSNorm(d, fused)
        self.attn = Attention(d, config.num_heads, rope, fused)
        self.ffn = SwiGLU(d, config.d_ff, fused)

    def forward(self, x, positions):
        x = x + self.attn(self.ln1(x), positions)
        return x + self.ffn(self.ln2(x))


class ReferenceLM(nn.Module):
    def __init__(self, config, *, fused: bool = False):
        super().__init__()
        self.fused = fused
        d = config.d_model
        self.rope = RoPE(config.rope_theta, d // config.num_heads, config.context_length)
        self.token_embeddings = Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(Block(config, self.rope, fused) for _ in range(config.num_layers))
        self.ln_final = RMSNorm(d, fused)
        self.lm_head = Linear(d, config.vocab_size)

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1], device=ids.device)
        x = self.token_embeddings(ids)
        for layer in self.layers:
            x = layer(x, positions)
        return self.lm_head(self.ln_final(x))

    def loss(self, ids, targets):
        logits = self(ids)
        if self.fused:
            return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
        return cross_entropy(logits, targets)


def load_fnlm_params(module: nn.Module, flat_params: dict[str, torch.Tensor]) -> None:
    """Copy fnlm's flat ``{name: tensor}`` into ``module``; the name sets must be equal."""
    own = dict(module.named_parameters())
    if set(own) != set(flat_params):
        raise ValueError(f"name sets differ: {sorted(set(own) ^ set(flat_params))}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(flat_params[name])
