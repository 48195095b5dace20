"""Pre-tokenization: the GPT-2 regex, and splitting text on special tokens.

Both the BPE trainer and the tokenizer cut text the same way: first on the special tokens
(escaped, longest first, so that overlapping specials match the longest one), then each piece
between specials into pre-tokens with the GPT-2 pattern. Merges never cross a pre-token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)

__all__ = ["GPT2_PATTERN", "GPT2_REGEX", "special_tokens_regex", "split_on_special_tokens", "iter_pretokens"]


def special_tokens_regex(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A pattern matching any special token, longest first; ``None`` when there are none.

    Example: with ``["<|eot|>", "<|eot|><|eot|>"]`` the text ``"<|eot|><|eot|>"`` matches once.
    """
    specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)
    if not specials:
        return None
    return regex.compile("|".join(regex.escape(s) for s in specials))


def split_on_special_tokens(text: str, special_tokens: Sequence[str]) -> Iterator[tuple[str, bool]]:
    """Yield ``(piece, is_special)`` in order; empty ordinary pieces are skipped.

    Example: ``list(split_on_special_tokens("a<|e|>b", ["<|e|>"]))
    == [("a", False), ("<|e|>", True), ("b", False)]``.
    """
    pattern = special_tokens_regex(special_tokens)
    if pattern is None:
        if text:
            yield text, False
        return
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            yield text[start : m.start()], False
        yield m.group(), True
        start = m.end()
    if start < len(text):
        yield text[start:], False


def iter_pretokens(text: str) -> Iterator[str]:
    """Pre-tokens of a text that holds no special tokens, by the GPT-2 pattern.

    Example: ``list(iter_pretokens("Hi there!")) == ["Hi", " there", "!"]``.
    """
    for m in GPT2_REGEX.finditer(text):
        yield m.group()
