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

from fnlm.tokenizer.bpe import MAX_TOKEN_ID

__all__ = [
    "ENDOFTEXT",
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
"""GPT-2's document separator, the special token the data pipeline cuts and joins documents at."""

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


class _Pairs(list):
    """A JSON object's ``(key, value)`` pairs in file order (repeated keys kept)."""


def _read_text(path: str | os.PathLike, what: str) -> str:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"{what} file not found: {name!r}")
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{name!r}: not UTF-8 text ({what}), byte offset {e.start}: {e.reason}") from None


def read_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read a GPT-2 style ``vocab.json`` (``{"mapped token": id}``) into ``{id: token bytes}``.

    **Arguments:**

    - `path`: the JSON file.

    **Returns:** the vocabulary, id -> bytes. A token written twice keeps both ids (a trained
    vocabulary may reach the same bytes by two merges). A missing file raises FileNotFoundError;
    a file that is not a JSON object of ``"token": id``, a non-integer or repeated id, or a
    string that is not in the byte-to-unicode form raises ValueError naming the file.
    """
    name = os.fspath(path)
    text = _read_text(name, "vocab")
    try:
        raw = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name!r}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, _Pairs):
        kind = "a JSON array" if isinstance(raw, list) else type(raw).__name__
        raise ValueError(f"{name!r}: expected a JSON object of token -> id, got {kind}")
    vocab: dict[int, bytes] = {}
    for text, idx in raw:
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx <= MAX_TOKEN_ID:
            shown = "a JSON object" if isinstance(idx, _Pairs) else f"{idx!r:.40}"
            raise ValueError(f"{name!r}: token {text!r:.60} has id {shown}, expected an int in [0, {MAX_TOKEN_ID}]")
        if idx in vocab:
            raise ValueError(f"{name!r}: id {idx} is given to both {token_to_str(vocab[idx])!r} and {text!r}")
        try:
            vocab[idx] = str_to_token(text)
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
    return vocab


def read_merges(path: str | os.PathLike) -> tuple[list[tuple[bytes, bytes]], list[str] | None]:
    """Read a GPT-2 style ``merges.txt``.

    **Arguments:**

    - `path`: the text file: one ``"left right"`` merge a line, after optional header lines.

    **Returns:** ``(merges, special_tokens)``: the merges in rank order, and the special tokens
    from a ``#special_tokens: [...]`` line, or ``None`` when the file has none (GPT-2's has none).
    A missing file raises FileNotFoundError; a malformed line raises ValueError naming the file
    and the line number.
    """
    name = os.fspath(path)
    merges: list[tuple[bytes, bytes]] = []
    specials: list[str] | None = None
    for lineno, line in enumerate(_read_text(name, "merges").split("\n"), 1):
        where = f"{name!r} line {lineno}"
        if not merges and line.startswith(SPECIALS_PREFIX):
            try:
                specials = json.loads(line[len(SPECIALS_PREFIX) :])
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: the special tokens are not valid JSON ({e.msg})") from None
            if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
                raise ValueError(f"{where}: special tokens must be a JSON list of strings, got {specials!r:.80}")
            continue
        if not line or (not merges and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{where}: expected 'left right', got {line!r}")
        try:
            merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
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
