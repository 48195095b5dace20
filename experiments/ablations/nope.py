"""NoPE: no positional information at all; only the causal mask tells positions apart."""

from __future__ import annotations

import functools

import fnlm
from fnlm.types import Float, Int, Tensor

from .variant import Ablation, with_fields

_block = functools.partial(fnlm.transformer_block, attention=fnlm.nope_self_attention)


def nope_lm(params: dict, token_ids: Int[Tensor, "... seq"], config: fnlm.TransformerConfig) -> Float[Tensor, "... seq vocab"]:
    """The LM with `fnlm.nope_self_attention` (queries and keys not rotated) in every block.

    **Arguments:** `params` from `fnlm.init_transformer_lm` (RoPE has no parameters, so the tree
    is the baseline's); `token_ids` `(..., seq)`; `config`.

    **Returns:** logits `(..., seq, vocab)`.
    """
    return fnlm.transformer_lm(params, token_ids, config, block=_block)


NOPE = Ablation(
    "nope",
    "no positional encoding (RoPE removed; causal mask only)",
    nope_lm,
    fnlm.init_transformer_lm,
    with_fields(position="nope"),
)
