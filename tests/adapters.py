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


def get_tokenizer(
    vocab: dict[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_tokens: list[str] | None = None,
) -> Any:
    """A BPE tokenizer from a vocabulary, merges in rank order and special tokens."""
    return fnlm.Tokenizer(vocab, merges, special_tokens)
