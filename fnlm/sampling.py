"""Decoding: temperature and nucleus (top-p) sampling, and `generate` with a KV cache.

```python
new_ids = generate(params, config, tokenizer.encode("Once upon a time"), max_new_tokens=200,
                   temperature=0.8, top_p=0.95, eos_id=eot, seed=0)
```
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from fnlm.model import TransformerConfig, check_params, init_kv_cache, transformer_lm
from fnlm.nn import softmax
from fnlm.types import Bool, Float, Int, Tensor

__all__ = ["top_p_mask", "sample_next_token", "generate"]


def _check_sampling(temperature: float | int, top_p: float | int) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def top_p_mask(probs: Float[Tensor, "... vocab"], top_p: float | int) -> Bool[Tensor, "... vocab"]:
    """The nucleus: True for the smallest set of most-likely tokens whose probability mass is at
    least `top_p` (a token is kept when the mass of the tokens ranked above it is below `top_p`;
    the most likely token is always kept; ties are broken by sort order).

    Example: `top_p_mask(tensor([0.5, 0.2, 0.3]), 0.7)` is `[True, False, True]`.

    **Arguments:**

    - `probs`: probabilities `(..., vocab)`, each row summing to 1.
    - `top_p`: the mass to cover, in `(0, 1]`.

    **Returns:** boolean `(..., vocab)`.
    """
    _check_sampling(1.0, top_p)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next_token(
    logits: Float[Tensor, "... vocab"],
    *,
    temperature: float | int = 1.0,
    top_p: float | int = 1.0,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "..."]:
    """Draw one token per row from `softmax(logits / temperature)` restricted to the top-p nucleus.

    **Arguments:**

    - `logits`: `(..., vocab)`.
    - `temperature`: `0` picks the argmax (greedy); larger values flatten the distribution.
    - `top_p`: nucleus mass in `(0, 1]`; `1` samples from the whole distribution.
    - `generator`: a `torch.Generator` on `logits.device` (the global RNG when `None`).

    **Returns:** token ids `(...)`, int64.
    """
    _check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        probs = probs * top_p_mask(probs, top_p)
    flat = probs.reshape(-1, probs.shape[-1])  # (rows, vocab)
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def generate(
    params: dict,
    config: TransformerConfig,
    prompt_ids: Sequence[int] | Tensor,
    *,
    max_new_tokens: int,
    temperature: float | int = 1.0,
    top_p: float | int = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    block: Callable[..., Tensor] | None = None,
    final_norm: Callable[..., Tensor] | None = None,
) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens.

    With the KV cache (the default) the prompt is run once (prefill), then one token per step. Every
    step has the same shapes (attention reads the whole cache buffer, masked) and the prefill pads
    the prompt to a power of two (causal: padding never changes earlier logits), so einx, which
    traces each new shape once per process (~0.1 s), meets only a handful of shapes. **Beyond the
    context length** the model conditions on the last `context_length` tokens (a sliding window),
    exactly as recomputing the window would: once the cache is full, each step re-prefills it on
    the last `context_length` tokens (RoPE positions are absolute), costing one full forward.

    **Arguments:**

    - `params`, `config`: the model (as for `transformer_lm`).
    - `prompt_ids`: a non-empty sequence of token ids: a list of ints or a 1-D integer tensor
      (floats, bools and empty prompts raise a `TypeError`/`ValueError` naming `prompt_ids`).
    - `max_new_tokens`: the most tokens to generate.
    - `temperature`, `top_p`: see `sample_next_token`; `temperature=0` is greedy.
    - `eos_id`: stop as soon as this id is produced (it is not included in the result).
    - `seed`: seeds the sampling RNG for a reproducible result (fresh randomness when `None`).
    - `use_cache`: `False` recomputes the whole window each step (the reference behaviour).
    - `block`, `final_norm`: passed to `transformer_lm`, for models built from other blocks.

    **Returns:** the newly generated ids only, as a list of ints; ValueError when a step's logits are not finite.
    """
    ids = _checked_arguments(prompt_ids, config, max_new_tokens, eos_id, temperature, top_p, seed)
    check_params(params, config, layers=block is None, final_norm=final_norm is None)
    weight = params["token_embeddings"]["weight"]
    device, dtype = weight.device, weight.dtype
    generator = torch.Generator(device=device)
    generator.seed() if seed is None else generator.manual_seed(seed)
    window = config.context_length
    cache = init_kv_cache(config, device=device, dtype=dtype) if use_cache and max_new_tokens else None

    def logits_for(tokens: list[int]) -> Tensor:
        x = torch.tensor(tokens, dtype=torch.long, device=device)
        return transformer_lm(params, x, config, block=block, final_norm=final_norm, kv_cache=cache)[-1]

    def prefill(tokens: list[int]) -> Tensor:
        if cache is None:
            return logits_for(tokens)
        cache.reset()
        n = len(tokens)
        size = min(1 << (n - 1).bit_length(), cache.max_len)
        x = torch.tensor(tokens + [0] * (size - n), dtype=torch.long, device=device)
        logits = transformer_lm(params, x, config, block=block, final_norm=final_norm, kv_cache=cache)[n - 1]
        cache.length = n
        return logits

    new: list[int] = []
    if max_new_tokens == 0:
        return new
    with torch.inference_mode():
        logits = prefill(ids[-window:])
        while True:
            token = _next_token(logits, len(new), temperature, top_p, generator)
            if token == eos_id:
                break
            new.append(token)
            ids.append(token)
            if len(new) == max_new_tokens:
                break
            if cache is not None and cache.length < window:
                logits = logits_for([token])
            else:
                logits = prefill(ids[-window:])
    return new


def _next_token(logits: Tensor, step: int, temperature: float | int, top_p: float | int,
                generator: torch.Generator) -> int:
    """`generate`'s draw of new token `step`, after checking that its logits are finite."""
    _check_finite(logits, step)
    return int(sample_next_token(logits, temperature=temperature, top_p=top_p, generator=generator))


def _check_finite(logits: Tensor, step: int) -> None:
    """ValueError when the logits of a step hold NaN or inf (greedy decoding would pick id 0, or
    the first NaN, and sampling would fail deep inside `torch.multinomial`)."""
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = sorted({"nan" if math.isnan(v) else "inf" for v in logits[~finite][:64].tolist()})
        raise ValueError(
            f"generate: the model's logits for new token {step} hold {bad} non-finite values ({', '.join(kinds)}) "
            f"of {logits.numel()}; the params are probably not finite (check them with torch.isfinite)"
        )


def _checked_arguments(prompt_ids: Sequence[int] | Tensor, config: TransformerConfig, max_new_tokens: int,
                       eos_id: int | None, temperature: float | int, top_p: float | int, seed: int | None) -> list[int]:
    """`generate`'s arguments checked (a `TypeError`/`ValueError` naming the bad one); the prompt as a list."""
    _check_sampling(temperature, top_p)
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.Generator.manual_seed's range) or None, got {seed!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    ids = _prompt_list(prompt_ids, config.vocab_size)
    if eos_id is not None and (
        not isinstance(eos_id, numbers.Integral) or isinstance(eos_id, bool) or not 0 <= eos_id < config.vocab_size
    ):
        raise ValueError(f"eos_id must be an int in [0, {config.vocab_size}), got {eos_id!r}")
    return ids


def _prompt_list(prompt_ids: Sequence[int] | Tensor, vocab_size: int) -> list[int]:
    """`prompt_ids` as a list of ints, or a `TypeError`/`ValueError` naming what is wrong."""
    if not isinstance(prompt_ids, (Tensor, list, tuple)) and hasattr(prompt_ids, "__array__"):
        prompt_ids = torch.as_tensor(prompt_ids)
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dtype == torch.bool or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise TypeError(f"prompt_ids must hold integer ids, got a tensor of dtype {prompt_ids.dtype}")
        if prompt_ids.ndim != 1:
            raise ValueError(f"prompt_ids must be one sequence, a 1-D tensor, got shape {tuple(prompt_ids.shape)}")
        ids = prompt_ids.tolist()
    elif isinstance(prompt_ids, (list, tuple)):
        ids = list(prompt_ids)
        bad = next((i for i, t in enumerate(ids) if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
        if bad is not None:
            raise TypeError(f"prompt_ids must be ints, got {ids[bad]!r} ({type(ids[bad]).__name__}) at index {bad}")
        ids = [int(t) for t in ids]
    else:
        raise TypeError(f"prompt_ids must be a list of ints or a 1-D integer tensor, got {type(prompt_ids).__name__}")
    if not ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token to condition on")
    out = [t for t in ids if not 0 <= t < vocab_size]
    if out:
        raise ValueError(f"prompt ids must lie in [0, {vocab_size}) (vocab_size={vocab_size}); got {out[:8]}")
    return ids
