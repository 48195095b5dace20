"""Post-norm blocks (the original Transformer's order): z = RMSNorm(x + MHA(x)); y = RMSNorm(z + FFN(z))."""

from __future__ import annotations

import fnlm
from fnlm.types import Float, Int, Tensor

from .variant import Ablation, with_fields


def post_norm_lm(params: dict, token_ids: Int[Tensor, "... seq"], config: fnlm.TransformerConfig) -> Float[Tensor, "... seq vocab"]:
    """The LM with `fnlm.post_norm_block` in place of the pre-norm block; same parameters as the
    baseline (the final norm stays).

    **Arguments:** `params` from `fnlm.init_transformer_lm`; `token_ids` `(..., seq)`; `config`.

    **Returns:** logits `(..., seq, vocab)`.
    """
    return fnlm.transformer_lm(params, token_ids, config, block=fnlm.post_norm_block)


POST_NORM = Ablation(
    "post_norm",
    "RMSNorm after each residual addition instead of before each sub-layer",
    post_norm_lm,
    fnlm.init_transformer_lm,
    with_fields(norm_position="post"),
)
