"""Validation loss: `evaluate` on seeded random windows (during training) and `evaluate_windows` on
consecutive windows covering the data (a final score). Both take a `loss_fn(params, x, y)`;
`lm_loss_fn` builds the language model's (cross-entropy of `model_fn`'s logits, optional autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fnlm.data import get_batch, mix_seed
from fnlm.loss import cross_entropy
from fnlm.tree import Tree
from fnlm.train.parallel import Parallel

__all__ = ["lm_loss_fn", "eval_generator", "evaluate", "evaluate_windows"]


def lm_loss_fn(model_fn: Callable, model_config: Any, autocast: torch.autocast | None = None) -> Callable:
    """`loss_fn(params, x, y) -> cross_entropy(model_fn(params, x, model_config), y)`, the model's
    forward run under `autocast` when one is given (the loss itself is computed in float32)."""

    def loss(params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = model_fn(params, x, model_config)
        return cross_entropy(logits, y)

    return loss


def eval_generator(seed: int) -> torch.Generator:
    """The CPU generator `evaluate` draws its windows from: the same windows at every call for a seed."""
    return torch.Generator().manual_seed(mix_seed(seed, 0x45564C, 1 << 40))


@torch.no_grad()
def evaluate(
    loss_fn: Callable,
    params: Tree,
    tokens: Any,
    *,
    batch_size: int,
    context_length: int,
    batches: int,
    seed: int,
    device: torch.device,
    parallel: Parallel = Parallel(),
) -> float | list[float]:
    """Mean loss over `batches` random validation batches, the same batches at every call for a seed.

    **Arguments:**

    - `loss_fn`: `(params, x, y) -> scalar loss`, or a 1-D tensor of losses (one per model of a
      stacked tree, e.g. `torch.func.vmap(loss, in_dims=(0, None, None))`).
    - `params`: the params tree.
    - `tokens`: 1-D token ids (memmap, array or tensor).
    - `batch_size`, `context_length`, `batches`: the size of the estimate.
    - `seed`: fixes which windows are drawn.
    - `device`: where the batches go.
    - `parallel`: each rank scores its `batch_size / world_size` rows of every batch (so the windows
      do not depend on the number of processes).

    **Returns:** the mean loss as a float (identical on every rank); a list of floats for a
    `loss_fn` that returns a 1-D tensor.
    """
    gen = eval_generator(seed)
    total = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    world, rank = parallel.world_size, parallel.rank
    if batch_size % world:
        raise ValueError(f"evaluation batch_size {batch_size} does not split over world_size {world} processes")
    rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    for _ in range(batches):
        x, y = get_batch(tokens, batch_size, context_length, "cpu" if world > 1 else device, generator=gen)
        if world > 1:
            x, y = x[rows].to(device), y[rows].to(device)
        total = total + loss_fn(params, x, y).to(total.dtype)
    total = parallel.all_reduce_mean(total)
    return float(total) / batches if total.ndim == 0 else (total / batches).tolist()


@torch.no_grad()
def evaluate_windows(
    loss_fn: Callable,
    params: Tree,
    tokens: Any,
    *,
    context_length: int,
    batch_size: int,
    device: torch.device,
    max_tokens: int | None = None,
) -> tuple[float, int]:
    """Mean loss per token over consecutive, non-overlapping windows from the start of `tokens`.

    **Arguments:**

    - `loss_fn`: `(params, x, y) -> mean loss over the batch's tokens`.
    - `params`: the params tree.
    - `tokens`: 1-D token ids.
    - `context_length`: window length `T`; window `r` predicts `tokens[rT+1 : rT+T+1]`.
    - `batch_size`: windows per forward pass.
    - `device`: where the batches go.
    - `max_tokens`: score at most this many tokens, in whole windows (`None`: all full windows).

    **Returns:** `(mean loss, number of tokens scored)`; the count is a multiple of
    `context_length`, at most `max_tokens`. Fewer tokens than one window raise a `ValueError`.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    T = context_length
    windows = n // T
    if windows < 1:
        what = f"max_tokens {max_tokens}" if max_tokens is not None and max_tokens < len(tokens) - 1 else \
            f"{len(tokens):,} tokens"
        raise ValueError(f"evaluate_windows scores whole windows of context_length {T} tokens (and one more for the "
                         f"last target); {what} hold none")
    ids = torch.from_numpy(np.asarray(tokens[: windows * T + 1], dtype=np.int64))
    total, count = 0.0, 0
    for start in range(0, windows, batch_size):
        rows = range(start, min(windows, start + batch_size))
        x = torch.stack([ids[r * T: r * T + T] for r in rows]).to(device)
        y = torch.stack([ids[r * T + 1: r * T + T + 1] for r in rows]).to(device)
        total += float(loss_fn(params, x, y)) * x.numel()
        count += x.numel()
    return total / count, count
