"""GPT-2's file format for byte-level BPE: ``vocab.json`` and ``merges.txt``.

GPT-2 writes every token's bytes as a printable string by mapping each of the 256 byte values
to one Unicode character (``bytes_to_unicode``): printable Latin-1 bytes map to themselves and
the rest (controls, space, ...) to characters from U+0100 on, so a space becomes ``Ġ`` and a
newline ``Ċ``. With that mapping:

- ``vocab.json`` is one JSON object ``{"<token as mapped string>": id, ...}``;
- ``merges.txt`` has one merge per line, the two parts as mapped strings separated by a single
  space (``Ġ t``), in merge order (rank 0 first). Before the first merge, a ``#version: ...``
  line (GPT-2's file starts with ``#version: 0.2``) is skipped, and fnlm writes its special
  tokens as ``#special_tokens: ["<|endoftext|>"]`` (a JSON list) so that a saved tokenizer
  reloads whole. Later lines starting with ``#`` are merges (GPT-2 merges ``# #``); the header
  lines cannot be mistaken for merges because the first merge always joins two single bytes.

No mapped string holds a space, a newline or any other whitespace, so both files are
unambiguous and can be read and diffed by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache

__all__ = [
    "bytes_to_unicode",
    "unicode_to_bytes",
    "token_to_str",
    "str_to_token",
    "read_vocab",
    "read_merges",
    "write_vocab",
    "write_merges",
]

ENDOFTEXT = "<|endoftext|>"
"""GPT-2's document separator, the special token fnlm's corpora and tokenizers use."""

SPECIALS_PREFIX = "#special_tokens:"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte value to a printable, non-whitespace character.

    **Returns:** a dict of 256 entries. Bytes ``!``..``~``, ``¡``..``¬`` and ``®``..``ÿ`` map to
    themselves; the other 68 bytes map, in increasing order, to ``chr(256)``, ``chr(257)``, ...

    Example: ``bytes_to_unicode()[ord(" ")] == "Ġ"`` and ``bytes_to_unicode()[ord("a")] == "a"``.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: mapped character -> byte value."""
    return {c: b for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[int, str], dict[int, int]]:
    forward = dict(bytes_to_unicode())
    backward = {ord(c): b for b, c in forward.items()}
    for code in range(256):
        backward.setdefault(code, 0xFFFF)
    return forward, backward


def token_to_str(token: bytes) -> str:
    """A token's bytes in GPT-2's printable form. Example: ``token_to_str(b" the") == "Ġthe"``."""
    return token.decode("latin-1").translate(_tables()[0])


def str_to_token(text: str) -> bytes:
    """The bytes of a token written in GPT-2's printable form; ValueError on a character outside it.

    Example: ``str_to_token("Ġthe") == b" the"``.
    """
    try:
        return text.translate(_tables()[1]).encode("latin-1")
    except UnicodeEncodeError:
        bad = next(c for c in text if c not in unicode_to_bytes())
        raise ValueError(f"{text!r} is not a GPT-2 byte-to-unicode string: {bad!r} maps to no byte") from None


def read_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read a GPT-2 style ``vocab.json`` (``{"mapped token": id}``) into ``{id: token bytes}``.

    **Arguments:**

    - `path`: the JSON file.

    **Returns:** the vocabulary, id -> bytes. A token written twice keeps both ids (a trained
    vocabulary may reach the same bytes by two merges). A ValueError names a non-integer or
    repeated id, or a string that is not in the byte-to-unicode form.
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f, object_pairs_hook=lambda pairs: pairs)
    if not isinstance(raw, list):
        raise ValueError(f"{os.fspath(path)!r}: expected a JSON object of token -> id, got {type(raw).__name__}")
    vocab: dict[int, bytes] = {}
    for text, idx in raw:
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"{os.fspath(path)!r}: token {text!r} has id {idx!r}, expected an int >= 0")
        if idx in vocab:
            raise ValueError(f"{os.fspath(path)!r}: id {idx} is given to both {token_to_str(vocab[idx])!r} and {text!r}")
        vocab[idx] = str_to_token(text)
    return vocab


def read_merges(path: str | os.PathLike) -> tuple[list[tuple[bytes, bytes]], list[str] | None]:
    """Read a GPT-2 style ``merges.txt``.

    **Arguments:**

    - `path`: the text file: one ``"left right"`` merge a line, after optional header lines.

    **Returns:** ``(merges, special_tokens)``: the merges in rank order, and the special tokens
    from a ``#special_tokens: [...]`` line, or ``None`` when the file has none (GPT-2's has none).
    """
    merges: list[tuple[bytes, bytes]] = []
    specials: list[str] | None = None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not merges and line.startswith(SPECIALS_PREFIX):
                specials = json.loads(line[len(SPECIALS_PREFIX) :])
                if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
                    raise ValueError(f"{os.fspath(path)!r} line {lineno}: special tokens must be a JSON list of strings")
                continue
            if not line or (not merges and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"{os.fspath(path)!r} line {lineno}: expected 'left right', got {line!r}")
            merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
    return merges, specials


def write_vocab(path: str | os.PathLike, vocab: Mapping[int, bytes]) -> None:
    """Write ``{id: bytes}`` as a GPT-2 style ``vocab.json``, in id order, one entry a line."""
    items = sorted(vocab.items())
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        for k, (idx, token) in enumerate(items):
            sep = "," if k + 1 < len(items) else ""
            f.write(f"  {json.dumps(token_to_str(token), ensure_ascii=False)}: {idx}{sep}\n")
        f.write("}\n")


def write_merges(
    path: str | os.PathLike, merges: Iterable[tuple[bytes, bytes]], special_tokens: Iterable[str] = ()
) -> None:
    """Write merges as a GPT-2 style ``merges.txt`` (rank order), led by the special-token line."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write(f"{SPECIALS_PREFIX} {json.dumps(list(special_tokens), ensure_ascii=False)}\n")
        for left, right in merges:
            f.write(f"{token_to_str(left)} {token_to_str(right)}\n")
