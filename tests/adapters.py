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

# --- tokenizer ---


def run_train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str],
    **kwargs,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    return fnlm.train_bpe(input_path, vocab_size, special_tokens, **kwargs)
