"""Byte-level BPE tokenizer: encode text to ids by a vocabulary and an ordered list of merges.

Encoding works in three stages, the same as GPT-2 and tiktoken:

1. the text is cut on the special tokens (longest first, so ``<|endoftext|><|endoftext|>`` is
   one token when it is in the list); each special token becomes its id;
2. the text between special tokens is cut into pre-tokens by the GPT-2 regex;
3. each pre-token's UTF-8 bytes start as one token per byte and are merged by BPE: the adjacent
   pair with the lowest merge rank is merged (every occurrence, left to right), until no
   adjacent pair is a merge.

Pre-token results are kept in a bounded cache, so the BPE loop runs once per distinct word;
pure-ASCII text is pre-tokenized by an equivalent pattern on the faster standard-library ``re``
(text holding some non-ASCII characters sends only short stretches around them to the slower
``regex`` engine; the stretches are joined exactly as `encode_iterable` joins chunks).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain, islice, repeat

import numpy as np
from jaxtyping import Integer
from torch import Tensor

from fnlm.tokenizer import gpt2
from fnlm.tokenizer.pretokenize import ASCII_GPT2_REGEX, GPT2_REGEX, special_tokens_regex

__all__ = ["Tokenizer"]

DEFAULT_CACHE_SIZE = 1 << 18
DEFAULT_BUFFER_CHARS = 1 << 14
ISLAND_MARGIN = 48
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


class _PretokenCache(dict):
    """Pre-token string -> tuple of ids; computes misses, and empties itself when full."""

    __slots__ = ("encode_bytes", "capacity")

    def __missing__(self, pretoken):
        ids = self.encode_bytes(pretoken.encode("utf-8"))
        if len(self) >= self.capacity:
            self.clear()
        self[pretoken] = ids
        return ids


def _rebuild(vocab, merges, special_tokens, cache_size):
    return Tokenizer(vocab, merges, special_tokens, cache_size=cache_size)


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style), equal to tiktoken on the same vocabulary.

    **Arguments:**

    - `vocab`: ``{id: token bytes}``; must hold all 256 single bytes.
    - `merges`: ``[(left bytes, right bytes), ...]`` in rank order (first = applied first);
      both parts and their concatenation must be in `vocab`.
    - `special_tokens`: strings that are always encoded as one token each and never merged
      with their neighbours. Those whose UTF-8 bytes are not in `vocab` get new ids, appended
      after the largest id, in the order given.
    - `cache_size`: how many distinct pre-tokens to remember (the cache is emptied when full).

    Example:

    ```python
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab"}
    tok = Tokenizer(vocab, [(b"a", b"b")], ["<|eot|>"])
    tok.encode("abc<|eot|>") == [256, 99, 257]   # "<|eot|>" was appended as id 257
    tok.decode([256, 99]) == "abc"
    ```
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Iterable[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ):
        if not isinstance(vocab, Mapping):
            raise TypeError(f"vocab must be a mapping of int id -> bytes, got {type(vocab).__name__}")
        if isinstance(special_tokens, str):
            raise TypeError(f"special_tokens must be a list of strings, got the string {special_tokens!r}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self.vocab: dict[int, bytes] = {}
        for idx, token in vocab.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise TypeError(f"vocab ids must be ints >= 0, got {idx!r} for {token!r}")
            if not isinstance(token, bytes):
                raise TypeError(f"vocab values must be bytes, got {type(token).__name__} {token!r} for id {idx}")
            self.vocab[idx] = token
        self._token_ids: dict[bytes, int] = {}
        for idx in sorted(self.vocab):
            self._token_ids.setdefault(self.vocab[idx], idx)

        missing = [b for b in range(256) if bytes([b]) not in self._token_ids]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} single-byte tokens, e.g. {[bytes([b]) for b in missing[:8]]}")
        self._byte_ids = [self._token_ids[bytes([b])] for b in range(256)]

        self.special_tokens: list[str] = []
        self.special_ids: dict[str, int] = {}
        next_id = max(self.vocab, default=-1) + 1
        for token in special_tokens or ():
            if not isinstance(token, str):
                raise TypeError(f"special tokens must be str, got {type(token).__name__} {token!r}")
            if not token:
                raise ValueError("a special token cannot be the empty string")
            if token in self.special_ids:
                continue
            raw = token.encode("utf-8")
            if raw not in self._token_ids:
                self.vocab[next_id] = raw
                self._token_ids[raw] = next_id
                next_id += 1
            self.special_tokens.append(token)
            self.special_ids[token] = self._token_ids[raw]

        self.merges: list[tuple[bytes, bytes]] = []
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged_by_rank: list[int] = []
        for rank, merge in enumerate(merges):
            if not (isinstance(merge, tuple | list) and len(merge) == 2 and all(isinstance(p, bytes) for p in merge)):
                raise TypeError(f"merge {rank} must be a pair of bytes, got {merge!r}")
            left, right = merge
            ids = (self._token_ids.get(left), self._token_ids.get(right), self._token_ids.get(left + right))
            if None in ids:
                absent = [t for t, i in zip((left, right, left + right), ids) if i is None]
                raise ValueError(f"merge {rank} {(left, right)!r}: {absent!r} not in the vocab")
            self.merges.append((left, right))
            self._merged_by_rank.append(ids[2])
            self._ranks.setdefault((ids[0], ids[1]), rank)
        self._no_rank = len(self._merged_by_rank)

        self._cache_size = cache_size
        self._special_re = special_tokens_regex(self.special_tokens)
        self._max_special_len = max((len(s) for s in self.special_tokens), default=0)
        self._cache = _PretokenCache()
        self._cache.encode_bytes = self._bpe
        self._cache.capacity = cache_size

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the number of embedding rows a model needs)."""
        return max(self.vocab) + 1

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={len(self.vocab)}, merges={len(self.merges)}, special_tokens={self.special_tokens!r})"

    def fingerprint(self) -> str:
        """A SHA-256 hex digest of what decides the ids: the vocab, the merges in rank order and
        the special tokens. Two tokenizers with equal fingerprints encode every text to the same ids.

        A checkpoint records it, so a model is never decoded with another run's tokenizer.
        """
        h = hashlib.sha256()
        for idx in sorted(self.vocab):
            h.update(b"v%d:%d:" % (idx, len(self.vocab[idx])) + self.vocab[idx])
        for left, right in self.merges:
            h.update(b"m%d:%d:" % (len(left), len(right)) + left + right)
        for token in self.special_tokens:
            raw = token.encode("utf-8")
            h.update(b"s%d:" % len(raw) + raw)
        return h.hexdigest()

    def __reduce__(self):
        return _rebuild, (self.vocab, self.merges, self.special_tokens, self._cache_size)

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        """Merge the bytes of one pre-token: the leftmost pair of lowest rank first, until none.

        The ranks of adjacent pairs are kept in a list beside the ids, so each merge is a
        C-level ``min`` and ``index`` plus two dictionary look-ups for the new neighbours.
        """
        ids = list(map(self._byte_ids.__getitem__, piece))
        if len(ids) < 2:
            return tuple(ids)
        get = self._ranks.get
        none = self._no_rank
        pair_ranks = list(map(get, zip(ids, ids[1:]), repeat(none)))
        merged = self._merged_by_rank
        while pair_ranks:
            rank = min(pair_ranks)
            if rank == none:
                break
            i = pair_ranks.index(rank)
            ids[i : i + 2] = (merged[rank],)
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = get((ids[i - 1], ids[i]), none)
            if i < len(pair_ranks):
                pair_ranks[i] = get((ids[i], ids[i + 1]), none)
        return tuple(ids)

    def _encode_ordinary(self, findall, text: str, out: list, start: int, end: int) -> None:
        out += chain.from_iterable(map(self._cache.__getitem__, findall(text, start, end)))

    def encode(self, text: str) -> list[int]:
        """Token ids of a string.

        **Arguments:**

        - `text`: any string; lone surrogates (not encodable as UTF-8) raise UnicodeEncodeError,
          a ValueError.

        **Returns:** the ids, a list of ints.

        Example: with GPT-2's files, ``encode("Hello world<|endoftext|>") == [15496, 995, 50256]``.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if text.isascii():
            return self._encode_whole(text)
        return self._encode_islands(text)

    def _encode_islands(self, text: str) -> list[int]:
        """`encode` for text with non-ASCII characters, so ASCII stretches still use ``re``.

        The text is cut into pieces: each run of non-ASCII characters with a margin of ASCII
        on both sides (close runs joined), and the ASCII stretches between them. The pieces are
        joined by the carry logic of `encode_iterable` (exact for any cut), and each is
        pre-tokenized by ``re`` when it and the carried text are ASCII, else by ``regex``.
        """
        if len(text) < 1024:
            return self._encode_whole(text)
        cuts = [0]
        in_island = False
        for m in _NON_ASCII_RUN.finditer(text):
            lo, hi = max(0, m.start() - ISLAND_MARGIN), min(len(text), m.end() + ISLAND_MARGIN)
            if in_island and lo <= cuts[-1]:
                cuts[-1] = max(cuts[-1], hi)
                continue
            if lo > cuts[-1]:
                cuts.append(lo)
            cuts.append(hi)
            in_island = True
        out: list[int] = []
        buf = ""
        for a, b in zip(cuts, cuts[1:]):
            buf = self._encode_settled(buf + text[a:b], out)
        out += self._encode_whole(buf + text[cuts[-1] :])
        return out

    def _encode_whole(self, text: str) -> list[int]:
        out: list[int] = []
        findall = ASCII_GPT2_REGEX.findall if text.isascii() else GPT2_REGEX.findall
        if self._special_re is None:
            self._encode_ordinary(findall, text, out, 0, len(text))
            return out
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                self._encode_ordinary(findall, text, out, start, m.start())
            out.append(self.special_ids[m.group()])
            start = m.end()
        if start < len(text):
            self._encode_ordinary(findall, text, out, start, len(text))
        return out

    def _encode_settled(self, buf: str, out: list) -> str:
        """Encode the part of ``buf`` that no further text can change; return the rest.

        A special token is settled once the longest special could fit after its start. Of the
        ordinary text after the last settled special, the last two pre-tokens (and any text that
        could still turn into a special token) are held back: more text can extend the last
        pre-token (letters, a whitespace run that gives its last space to the next word) or turn
        ``'`` + ``l`` into the contraction ``'ll``.
        """
        start, end = 0, len(buf)
        findall = ASCII_GPT2_REGEX.findall if buf.isascii() else GPT2_REGEX.findall
        if self._special_re is not None:
            limit = end - self._max_special_len
            for m in self._special_re.finditer(buf):
                if m.start() > limit:
                    break
                if m.start() > start:
                    self._encode_ordinary(findall, buf, out, start, m.start())
                out.append(self.special_ids[m.group()])
                start = m.end()
            end = max(start, limit + 1)
        pieces = findall(buf, start, end)
        if len(pieces) < 2:
            return buf[start:]
        out += chain.from_iterable(map(self._cache.__getitem__, islice(pieces, len(pieces) - 2)))
        return buf[end - len(pieces[-1]) - len(pieces[-2]) :]

    def encode_iterable(self, iterable: Iterable[str], *, buffer_chars: int = DEFAULT_BUFFER_CHARS) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open text file) in constant memory.

        The result equals ``encode("".join(iterable))``: text that more input could still
        change (the last pre-tokens, a partial special token) is carried into the next chunk.

        **Arguments:**

        - `iterable`: strings, cut anywhere (lines of a file, fixed-size reads, ...).
        - `buffer_chars`: chunks are gathered until this many characters before encoding, to
          spend less time per chunk; ``1`` encodes after every chunk.

        **Returns:** an iterator of ids.
        """
        if isinstance(iterable, str):
            raise TypeError("encode_iterable takes an iterable of strings; for one string use encode()")
        buf = ""
        out: list[int] = []
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iterable: chunks must be str, got {type(chunk).__name__}")
            buf += chunk
            if len(buf) < buffer_chars:
                continue
            buf = self._encode_settled(buf, out)
            if out:
                yield from out
                out.clear()
        if buf:
            yield from self._encode_whole(buf)

    def decode(self, ids: Iterable[int] | Integer[np.ndarray, " seq"] | Integer[Tensor, " seq"]) -> str:
        """The text of a sequence of ids; byte sequences that are not valid UTF-8 become U+FFFD.

        **Arguments:**

        - `ids`: token ids (a list, a tuple, a 1-D numpy array or torch tensor, ...).

        **Returns:** the decoded string. An id not in the vocab raises ValueError naming it.
        """
        if isinstance(ids, str | bytes):
            raise TypeError(f"decode takes a sequence of int ids, got {type(ids).__name__} {ids!r:.40}")
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            data = b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"decode: unknown token id {e.args[0]!r} (ids are 0..{max(self.vocab)})") from None
        return data.decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int] | Integer[np.ndarray, " seq"] | Integer[Tensor, " seq"]) -> bytes:
        """The raw bytes of a sequence of ids (no UTF-8 decoding); ValueError on an unknown id."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"decode: unknown token id {e.args[0]!r} (ids are 0..{max(self.vocab)})") from None

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: Iterable[str] | None = None,
        **options,
    ) -> Tokenizer:
        """Load a tokenizer from GPT-2 style files (GPT-2's own, or ones written by `save`).

        **Arguments:**

        - `vocab_path`: ``vocab.json``, ``{"byte-to-unicode token": id}`` (see `fnlm.tokenizer.gpt2`).
        - `merges_path`: ``merges.txt``, one ``"left right"`` merge a line in rank order.
        - `special_tokens`: the special tokens; when ``None``, those listed in the merges file's
          ``#special_tokens:`` line (none for GPT-2's files).
        - `options`: passed to the constructor (``cache_size``).

        **Returns:** the tokenizer. A missing file raises FileNotFoundError.
        """
        vocab = gpt2.read_vocab(vocab_path)
        merges, saved_specials = gpt2.read_merges(merges_path)
        if special_tokens is None:
            special_tokens = saved_specials
        return cls(vocab, merges, special_tokens, **options)

    def save(self, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> None:
        """Write the tokenizer as GPT-2 style ``vocab.json`` and ``merges.txt``.

        Token bytes are written with GPT-2's byte-to-unicode map (a space is ``Ġ``); the
        vocabulary one ``"token": id`` a line in id order, the merges one ``left right`` a line
        in rank order after a ``#special_tokens: [...]`` line. `from_files` reads them back to
        an equal tokenizer.
        """
        gpt2.write_vocab(vocab_path, self.vocab)
        gpt2.write_merges(merges_path, self.merges, self.special_tokens)
