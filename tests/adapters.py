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
    from fnlm.compat_train import clip_gradients_

    clip_gradients_(parameters, float(max_l2_norm))


def get_adamw_cls() -> Any:
    """The `torch.optim.Optimizer` running fnlm's AdamW update."""
    from fnlm.compat_train import AdamW

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
    from fnlm.compat_train import save_checkpoint

    save_checkpoint(model, optimizer, iteration, out)


def run_load_checkpoint(
    src: str | os.PathLike | BinaryIO | IO[bytes],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Restore model and optimizer from `src`; return the saved iteration."""
    from fnlm.compat_train import load_checkpoint

    return load_checkpoint(src, model, optimizer)


# --- tokenizer ---
