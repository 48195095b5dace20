"""The CS336 assignment-1 adapter interface, served by fnlm. Each body is glue into fnlm."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO, Any, BinaryIO

import numpy.typing as npt
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

import fnlm

# --- core (nn, model) ---


def run_linear(d_in: int, d_out: int, weights: Float[Tensor, " d_out d_in"], in_features: Float[Tensor, " ... d_in"]) -> Float[Tensor, " ... d_out"]:
    return fnlm.linear({"weight": weights}, in_features)


def run_embedding(vocab_size: int, d_model: int, weights: Float[Tensor, " vocab_size d_model"], token_ids: Int[Tensor, " ..."]) -> Float[Tensor, " ... d_model"]:
    return fnlm.embedding({"weight": weights}, token_ids)


def run_swiglu(
    d_model: int,
    d_ff: int,
    w1_weight: Float[Tensor, " d_ff d_model"],
    w2_weight: Float[Tensor, " d_model d_ff"],
    w3_weight: Float[Tensor, " d_ff d_model"],
    in_features: Float[Tensor, " ... d_model"],
) -> Float[Tensor, " ... d_model"]:
    params = {"w1": {"weight": w1_weight}, "w2": {"weight": w2_weight}, "w3": {"weight": w3_weight}}
    return fnlm.swiglu(params, in_features)


def run_scaled_dot_product_attention(
    Q: Float[Tensor, " ... queries d_k"],
    K: Float[Tensor, " ... keys d_k"],
    V: Float[Tensor, " ... values d_v"],
    mask: Bool[Tensor, " ... queries keys"] | None = None,
) -> Float[Tensor, " ... queries d_v"]:
    return fnlm.scaled_dot_product_attention(Q, K, V, mask if mask is None else mask.bool())


def run_multihead_self_attention(
    d_model: int,
    num_heads: int,
    q_proj_weight: Float[Tensor, " d_k d_in"],
    k_proj_weight: Float[Tensor, " d_k d_in"],
    v_proj_weight: Float[Tensor, " d_v d_in"],
    o_proj_weight: Float[Tensor, " d_model d_v"],
    in_features: Float[Tensor, " ... sequence_length d_in"],
) -> Float[Tensor, " ... sequence_length d_out"]:
    params = _attention_params(q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight)
    return fnlm.multihead_self_attention(params, in_features, num_heads=num_heads)


def run_multihead_self_attention_with_rope(
    d_model: int,
    num_heads: int,
    max_seq_len: int,
    theta: float,
    q_proj_weight: Float[Tensor, " d_k d_in"],
    k_proj_weight: Float[Tensor, " d_k d_in"],
    v_proj_weight: Float[Tensor, " d_v d_in"],
    o_proj_weight: Float[Tensor, " d_model d_v"],
    in_features: Float[Tensor, " ... sequence_length d_in"],
    token_positions: Int[Tensor, " ... sequence_length"] | None = None,
) -> Float[Tensor, " ... sequence_length d_out"]:
    params = _attention_params(q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight)
    cache = fnlm.rope_cache(d_model // num_heads, max_seq_len, theta, device=in_features.device)
    return fnlm.multihead_self_attention(params, in_features, num_heads=num_heads, rope_cache=cache, positions=token_positions)


def _attention_params(q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> dict[str, dict[str, Tensor]]:
    return {"q_proj": {"weight": q}, "k_proj": {"weight": k}, "v_proj": {"weight": v}, "output_proj": {"weight": o}}


def run_rope(
    d_k: int,
    theta: float,
    max_seq_len: int,
    in_query_or_key: Float[Tensor, " ... sequence_length d_k"],
    token_positions: Int[Tensor, " ... sequence_length"],
) -> Float[Tensor, " ... sequence_length d_k"]:
    return fnlm.rope(in_query_or_key, token_positions, fnlm.rope_cache(d_k, max_seq_len, theta, device=in_query_or_key.device))


def run_rmsnorm(d_model: int, eps: float, weights: Float[Tensor, " d_model"], in_features: Float[Tensor, " ... d_model"]) -> Float[Tensor, " ... d_model"]:
    return fnlm.rmsnorm({"weight": weights}, in_features, eps=eps)


def run_silu(in_features: Float[Tensor, " ..."]) -> Float[Tensor, " ..."]:
    return fnlm.silu(in_features)


def run_softmax(in_features: Float[Tensor, " ..."], dim: int) -> Float[Tensor, " ..."]:
    return fnlm.softmax(in_features, dim)


def run_transformer_block(
    d_model: int,
    num_heads: int,
    d_ff: int,
    max_seq_len: int,
    theta: float,
    weights: dict[str, Tensor],
    in_features: Float[Tensor, " batch sequence_length d_model"],
) -> Float[Tensor, " batch sequence_length d_model"]:
    ctx = fnlm.attention_context(num_heads=num_heads, seq_len=in_features.shape[-2], d_head=d_model // num_heads, rope_theta=theta, device=in_features.device)
    return fnlm.transformer_block(fnlm.tree_unflatten(weights), in_features, ctx)


def run_transformer_lm(
    vocab_size: int,
    context_length: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    d_ff: int,
    rope_theta: float,
    weights: dict[str, Tensor],
    in_indices: Int[Tensor, " batch_size sequence_length"],
) -> Float[Tensor, " batch_size sequence_length vocab_size"]:
    config = fnlm.TransformerConfig(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta)
    return fnlm.transformer_lm(fnlm.tree_unflatten(weights), in_indices, config)


# --- training maths ---


def run_get_batch(
    dataset: npt.NDArray, batch_size: int, context_length: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `(x, y)` int64 windows of shape `(batch_size, context_length)` from a 1-D id array."""
    return fnlm.get_batch(dataset, batch_size, context_length, device)


def run_cross_entropy(
    inputs: Float[Tensor, " batch_size vocab_size"], targets: Int[Tensor, " batch_size"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy of `targets` under the softmax of `inputs`."""
    return fnlm.cross_entropy(inputs, targets)


def run_gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float) -> None:
    """Clip the parameters' combined `.grad` to l2 norm `max_l2_norm`, in place."""
    from fnlm.compat import clip_gradients_

    clip_gradients_(parameters, float(max_l2_norm))


def get_adamw_cls() -> Any:
    """The `torch.optim.Optimizer` running fnlm's AdamW update."""
    from fnlm.compat import AdamW

    return AdamW


def run_get_lr_cosine_schedule(
    it: int,
    max_learning_rate: float,
    min_learning_rate: float,
    warmup_iters: int,
    cosine_cycle_iters: int,
):
    """Learning rate at iteration `it` of the warm-up + cosine schedule."""
    return fnlm.cosine_schedule(
        it, float(max_learning_rate), float(min_learning_rate), warmup_iters, cosine_cycle_iters
    )


def run_save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    out: str | os.PathLike | BinaryIO | IO[bytes],
):
    """Serialise model, optimizer and iteration to a path or binary file object."""
    fnlm.compat.save_module_checkpoint(model, optimizer, iteration, out)


def run_load_checkpoint(
    src: str | os.PathLike | BinaryIO | IO[bytes],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Restore model and optimizer from `src`; return the saved iteration."""
    return fnlm.compat.load_module_checkpoint(src, model, optimizer)


# --- tokenizer ---


def get_tokenizer(
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_tokens: list[str] | None = None,
) -> Any:
    """A BPE tokenizer from a vocabulary, merges in rank order and special tokens."""
    return fnlm.Tokenizer(vocab, merges, special_tokens)


def run_train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str],
    **kwargs,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    return fnlm.train_bpe(input_path, vocab_size, special_tokens, **kwargs)
