"""No RMSNorm anywhere: the blocks' two norms and the final norm are the identity."""

from __future__ import annotations

import functools

import torch

import fnlm
from fnlm.types import Float, Int, Tensor

from .variant import Ablation, with_fields

_block = functools.partial(fnlm.transformer_block, norm=fnlm.no_norm)


def no_rmsnorm_lm(params: dict, token_ids: Int[Tensor, "... seq"], config: fnlm.TransformerConfig) -> Float[Tensor, "... seq vocab"]:
    """The LM with `no_norm` in every block and as the final norm.

    **Arguments:** `params` from `init_no_rmsnorm_lm`; `token_ids` `(..., seq)`; `config`.

    **Returns:** logits `(..., seq, vocab)`.
    """
    return fnlm.transformer_lm(params, token_ids, config, block=_block, final_norm=fnlm.no_norm)


def init_no_rmsnorm_lm(config: fnlm.TransformerConfig, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> dict:
    """The baseline's parameters without any norm gain (`ln1`, `ln2`, `ln_final`); the other
    weights are the baseline's for the same seed (gains draw no random numbers)."""
    params = fnlm.init_transformer_lm(config, seed=seed, device=device, dtype=dtype)
    params["layers"] = [{k: v for k, v in layer.items() if k not in ("ln1", "ln2")} for layer in params["layers"]]
    params.pop("ln_final", None)
    return params


NO_RMSNORM = Ablation(
    "no_rmsnorm",
    "no RMSNorm in the blocks nor before the LM head",
    no_rmsnorm_lm,
    init_no_rmsnorm_lm,
    with_fields(norm="none"),
)
