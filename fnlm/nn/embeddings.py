"""Token embeddings: `init_embedding` and `embedding`, a row gather from `(vocab, d_model)`."""

from __future__ import annotations

import torch

from fnlm.nn._common import _check_positive, _trunc_normal
from fnlm.types import Float, Int, Tensor, tracing, typecheck_enabled

__all__ = ["init_embedding", "embedding"]


def init_embedding(
    vocab_size: int,
    d_model: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Parameters of a token embedding.

    **Arguments:**

    - `vocab_size`, `d_model`: table size.
    - `generator`, `device`, `dtype`: as for `init_linear`.

    **Returns:** `{"weight": E}` with `E` of shape `(vocab_size, d_model)`, drawn from N(0, 1)
    truncated at ±3.
    """
    _check_positive(vocab_size=vocab_size, d_model=d_model)
    weight = _trunc_normal((vocab_size, d_model), 1.0, 3.0, generator=generator, device=device, dtype=dtype)
    return {"weight": weight}


def _check_token_ids(token_ids: Tensor, vocab_size: int) -> None:
    """Reject ids outside `[0, vocab_size)`, naming up to eight of them (reads values: a host sync)."""
    if token_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(token_ids))
    if lo < 0 or hi >= vocab_size:
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)].unique()[:8].tolist()
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}) (vocab_size={vocab_size}); "
            f"got min {lo}, max {hi}; offending ids (up to 8): {bad}"
        )


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _embedding(weight: Float[Tensor, "vocab d_model"], token_ids: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
    if not isinstance(token_ids, Tensor):
        raise TypeError(f"token_ids must be an integer tensor, got {type(token_ids).__name__}")
    if token_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"token_ids must be an integer tensor (int64, int32, ...), got dtype {token_ids.dtype}")
    if not tracing() and (token_ids.device.type == "cpu" or typecheck_enabled()):
        _check_token_ids(token_ids, weight.shape[0])
    flat = weight.index_select(0, token_ids.reshape(-1).long())  # (n, d_model)
    return flat.unflatten(0, token_ids.shape)  # (..., d_model)


def embedding(params: dict[str, Tensor], token_ids: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
    """Look up token embeddings: row `token_ids[...]` of `E`.

    A row gather with `index_select`, not `E[token_ids]`: advanced indexing backpropagates through
    `index_put_(accumulate=True)`, whose CPU kernel adds in a thread-dependent order (repeated
    gradients differ with 2 threads) and is slower; `index_select`'s gradient is the same bit for
    bit at every call. This is the one layer not written with einx:
    `einx.get_at("[vocab] d_model, ... -> ... d_model", E, ids)` compiles to a gather from the
    flattened table, `E.reshape(-1)[ids * d_model + arange(d_model)]`, which is 20x slower forward
    and 2.4x forward + backward (4x128 ids, vocab 10,000, d 512; torch 2.13 CPU, 1 thread), and
    whose backward is again an accumulating `index_put_`.

    Non-integer ids (float, bool) raise `TypeError`; out-of-range ids raise a `ValueError` naming
    them. The range check reads the ids' values, so it runs in eager calls on CPU tensors (and on
    accelerators when `FNLM_TYPECHECK` is on, where it costs a host sync) and steps aside inside
    `torch.compile` and `torch.func` transforms (`vmap`, `grad`).

    **Arguments:**

    - `params`: `{"weight": E}`, `E` of shape `(vocab, d_model)`.
    - `token_ids`: integer ids of any shape `(...)`.

    **Returns:** `(..., d_model)`.
    """
    return _embedding(params["weight"], token_ids)
