"""The assignment's four ablations and the baseline, each one config change.

| name | config change | the library's part it selects |
| --- | --- | --- |
| `no_rmsnorm` | `norm="none"` | `fnlm.no_norm` in every block and before the head; no `ln1`, `ln2`, `ln_final` |
| `post_norm` | `norm_position="post"` | `fnlm.post_norm_block`: `z = RMSNorm(x + MHA(x)); y = RMSNorm(z + FFN(z))` |
| `nope` | `position="nope"` | `fnlm.nope_self_attention`: no rotation, the causal mask only |
| `silu_ffn` | `ffn="silu"`, `d_ff = 4 d_model` | `fnlm.silu_ffn`: `W2 SiLU(W1 x)`, parameter-matched |
"""

from __future__ import annotations

import dataclasses

from .variant import Ablation, with_fields


def silu_d_ff(d_model: int) -> int:
    """The SiLU feed-forward width that matches SwiGLU's parameter count: `4 · d_model` (two
    matrices of `4 d²` against SwiGLU's three of about `8/3 d²`)."""
    return 4 * d_model


BASELINE = Ablation("baseline", "pre-norm RMSNorm, RoPE, SwiGLU (the assignment's model)")
NO_RMSNORM = Ablation("no_rmsnorm", "no RMSNorm in the blocks nor before the LM head", with_fields(norm="none"))
POST_NORM = Ablation("post_norm", "RMSNorm after each residual addition instead of before each sub-layer",
                     with_fields(norm_position="post"))
NOPE = Ablation("nope", "no positional encoding (RoPE removed; causal mask only)", with_fields(position="nope"))
SILU_FFN = Ablation("silu_ffn", "ungated W2·SiLU(W1·x) feed-forward, d_ff = 4·d_model (parameter-matched)",
                    lambda config: dataclasses.replace(config, ffn="silu", d_ff=silu_d_ff(config.d_model)))
