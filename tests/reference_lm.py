"""An independent plain-PyTorch Transformer LM used as a reference by the tests: torch ops only
(F.linear, F.rms_norm, F.silu, F.scaled_dot_product_attention) and RoPE through complex
multiplication, the pairs (2k, 2k+1) read as one complex number; and `rope_reference`, RoPE as
explicit float64 2x2 rotation matrices."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_complex(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double().unsqueeze(-1) * freqs
    rot = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Block-diagonal 2×2 rotation matrices R_p (float64), applied as R_p x for each position."""
    d = x.shape[-1]
    xb = x.double()
    pos = positions.expand(xb.shape[:-1])
    out = torch.empty_like(xb)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in xb.shape[:-1]]).reshape(-1, xb.dim() - 1):
        idx = tuple(idx.tolist())
        p = pos[idx].item()
        rot = torch.zeros(d, d, dtype=torch.float64)
        for k in range(d // 2):
            a = p / theta ** (2 * k / d)
            rot[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = torch.tensor(
                [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64
            )
        out[idx] = rot @ xb[idx]
    return out.to(x.dtype)


def reference_block(
    w: dict[str, Tensor],
    x: Tensor,
    num_heads: int,
    theta: float | None,
    positions: Tensor | None = None,
    *,
    norm: bool = True,
    post: bool = False,
    gated: bool = True,
) -> Tensor:
    d = x.shape[-1]
    seq = x.shape[-2]

    def ln(name: str, t: Tensor) -> Tensor:
        return F.rms_norm(t, (d,), w[name], eps=1e-5) if norm else t

    def attn(t: Tensor) -> Tensor:
        def heads(name: str) -> Tensor:
            return F.linear(t, w[f"attn.{name}.weight"]).reshape(*t.shape[:-1], num_heads, -1).transpose(-3, -2)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        if theta is not None:
            pos = torch.arange(seq) if positions is None else positions.unsqueeze(-2)
            q, k = rope_complex(q, pos, theta), rope_complex(k, pos, theta)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(o.transpose(-3, -2).reshape(t.shape), w["attn.output_proj.weight"])

    def ffn(t: Tensor) -> Tensor:
        h = F.silu(F.linear(t, w["ffn.w1.weight"]))
        if gated:
            h = h * F.linear(t, w["ffn.w3.weight"])
        return F.linear(h, w["ffn.w2.weight"])

    if post:
        x = ln("ln1.weight", x + attn(x))
        return ln("ln2.weight", x + ffn(x))
    x = x + attn(ln("ln1.weight", x))
    return x + ffn(ln("ln2.weight", x))


def reference_lm(
    flat: dict[str, Tensor],
    ids: Tensor,
    *,
    num_layers: int,
    num_heads: int,
    theta: float | None = 10000.0,
    norm: bool = True,
    post: bool = False,
    gated: bool = True,
) -> Tensor:
    x = F.embedding(ids, flat["token_embeddings.weight"])
    for i in range(num_layers):
        w = {k[len(f"layers.{i}.") :]: v for k, v in flat.items() if k.startswith(f"layers.{i}.")}
        x = reference_block(w, x, num_heads, theta, norm=norm, post=post, gated=gated)
    if norm:
        x = F.rms_norm(x, (x.shape[-1],), flat["ln_final.weight"], eps=1e-5)
    return F.linear(x, flat["lm_head.weight"])
