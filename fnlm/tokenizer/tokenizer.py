"""Byte-level BPE tokenizer: encode text to ids by a vocabulary and an ordered list of merges.

Encoding works in three stages, the same as GPT-2 and tiktoken:

1. the text is cut on the special tokens (leftmost, then longest first, so
   ``<|endoftext|><|endoftext|>`` is one token when it is in the list; `SpecialMatcher`, in time
   linear in the text for any number of tokens); each special token becomes its id;
2. the text between special tokens is cut into pre-tokens by the GPT-2 regex;
3. each pre-token's UTF-8 bytes start as one token per byte and are merged by BPE: the adjacent
   pair with the lowest merge rank is merged (the leftmost on a tie), until no adjacent pair
   is a merge.

Pre-token results are kept in a bounded cache. The pre-tokens a text misses in the cache are
gathered and merged together after the text is cut: short ones by a C loop
(`fnlm/tokenizer/_merge.c`, built at install; without it, `fnlm.tokenizer.bpe`'s vectorised
numpy rounds over all of them), a long one (a run of 100k letters or digits) by a linked list in
O(n log n). Pure-ASCII text is pre-tokenized by an equivalent pattern on the faster
standard-library ``re`` (text holding some non-ASCII characters sends only short stretches
around them to the slower ``regex`` engine; the stretches are joined exactly as
`encode_iterable` joins chunks).
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Protocol, runtime_checkable

import numpy as np

from fnlm.tokenizer import gpt2
from fnlm.tokenizer.bpe import MAX_TOKEN_ID, MergeTable, bpe_long, bpe_word, bpe_words
from fnlm.tokenizer.pretokenize import ASCII_GPT2_REGEX, GPT2_REGEX, SpecialMatcher

__all__ = ["Tokenizer", "SupportsToList"]

DEFAULT_CACHE_SIZE = 1 << 18
DEFAULT_BUFFER_CHARS = 1 << 14
ISLAND_MARGIN = 48
ISLAND_TAIL = 256
LONG_STRETCH = 4096
ISLAND_DENSE = 512
_SCAN_BLOCK = 4096
BATCH_BYTES = 64
"""Missed pre-tokens up to this many bytes are merged together by `bpe_words`."""
BATCH_MIN = 64
"""Fewer misses than this in one block of text are merged one by one (`bpe_word`)."""
LONG_BYTES = 256
"""Pre-tokens of more bytes go to `bpe_long` and are not cached."""
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_VOCAB_FILE, _MERGES_FILE = "vocab.json", "merges.txt"
_BLOCK = 1 << 20
_PAUSE_GC = 1 << 14


@runtime_checkable
class SupportsToList(Protocol):
    """Anything with ``.tolist()``: a numpy array or a torch tensor of ids (duck typed, so that
    this module never imports torch)."""

    def tolist(self) -> list: ...


_drain = deque(maxlen=0).extend


def _island_cuts(text: str) -> list[int] | None:
    """Cut points around the runs of non-ASCII characters of `text`: each run with a margin of
    ASCII on both sides is an island (overlapping ones joined); an ASCII stretch longer than
    `LONG_STRETCH` has its first `ISLAND_TAIL` characters cut apart, so that a non-ASCII carry
    from the island before cannot send the rest of it to ``regex``. ``None`` where the cuts would
    be closer than `ISLAND_DENSE` characters on average (cutting would cost more than it saves).

    The text is scanned in blocks: ``block.isascii()`` is a fast C scan, and only non-ASCII
    blocks are searched for runs (a run across a block edge comes out as two, then joined).
    """
    limit = len(text) // ISLAND_DENSE
    cuts = [0]
    for start in range(0, len(text), _SCAN_BLOCK):
        if text[start : start + _SCAN_BLOCK].isascii():
            continue
        for m in _NON_ASCII_RUN.finditer(text, start, start + _SCAN_BLOCK):
            lo, hi = max(0, m.start() - ISLAND_MARGIN), min(len(text), m.end() + ISLAND_MARGIN)
            if len(cuts) > 1 and lo <= cuts[-1]:
                cuts[-1] = max(cuts[-1], hi)
                continue
            if lo > cuts[-1] + LONG_STRETCH:
                cuts.append(cuts[-1] + ISLAND_TAIL)
            if lo > cuts[-1]:
                cuts.append(lo)
            cuts.append(hi)
            if len(cuts) > limit:
                return None
    if len(text) > cuts[-1] + LONG_STRETCH:
        cuts.append(cuts[-1] + ISLAND_TAIL)
    return cuts


try:
    from fnlm.tokenizer._merge import bpe_many as _bpe_many
    from fnlm.tokenizer._merge import make_table as _make_table
except ImportError:  # not built (no C compiler at install time): the numpy and Python paths below
    _bpe_many = _make_table = None


def _bpe_short_and_long(c_table, table: MergeTable, raws: list[bytes], lengths: list[int], longest: int) -> list:
    """BPE of a batch of cache misses with the C loop of `fnlm/tokenizer/_merge.c` (`bpe_word`'s
    rule, one word at a time), and of the long ones (over `LONG_BYTES`) with `bpe_long`. Where
    the extension is not built, the numpy rounds of `bpe_words` do the short ones."""
    if longest <= LONG_BYTES:
        return _bpe_many(c_table, raws)
    results: list = [None] * len(raws)
    short = [i for i, length in enumerate(lengths) if length <= LONG_BYTES]
    for i, ids in zip(short, _bpe_many(c_table, [raws[i] for i in short])):
        results[i] = ids
    for i, length in enumerate(lengths):
        if length > LONG_BYTES:
            results[i] = bpe_long(table, raws[i])
    return results


def _rebuild(vocab, merges, special_tokens, cache_size):
    return Tokenizer(vocab, merges, special_tokens, cache_size=cache_size)


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style), equal to tiktoken on the same vocabulary.

    **Arguments:**

    - `vocab`: ``{id: token bytes}``; must hold all 256 single bytes; ids lie in ``[0, 2**31 - 1]``.
    - `merges`: ``[(left bytes, right bytes), ...]`` in rank order (first = applied first);
      both parts and their concatenation must be in `vocab`.
    - `special_tokens`: strings that are always encoded as one token each and never merged
      with their neighbours. Those whose UTF-8 bytes are not in `vocab` get new ids, appended
      after the largest id, in the order given.
    - `cache_size`: about how many distinct pre-tokens to remember (the cache is emptied when
      it holds more after a text, or a block of 1,048,576 pre-tokens of a text, is encoded).

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
            if idx > MAX_TOKEN_ID:
                raise ValueError(f"vocab id {idx} (for {token!r:.40}) is above the largest id {MAX_TOKEN_ID} a tokenizer holds")
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
                if next_id > MAX_TOKEN_ID:
                    raise ValueError(f"special token {token!r} would get id {next_id}, above the largest id {MAX_TOKEN_ID}")
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

        self._table = MergeTable(self._byte_ids, self._ranks, self._merged_by_rank)
        self._c_table = None if _make_table is None else _make_table(self._byte_ids, self._ranks, self._merged_by_rank)
        if self._c_table is None:
            self._table.arrays()  # numpy forms for the short words; with the C loop only `bpe_long` reads them (lazily)

        self._cache_size = cache_size
        self._specials = SpecialMatcher(self.special_tokens) if self.special_tokens else None
        self._max_special_len = max((len(s) for s in self.special_tokens), default=0)
        self._cache: defaultdict[str, tuple[int, ...] | list[int]] = defaultdict(list)

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

    def _resolve(self, misses: int) -> None:
        """Fill the empty id lists that the last `misses` cache misses made, all together:
        short pre-tokens by `bpe_words` in one batch, long ones by `bpe_long` (and not kept).
        The cache then keeps the ids as tuples (faster to read back than lists)."""
        cache = self._cache
        pending = list(islice(reversed(cache), misses))
        lists = list(map(cache.__getitem__, pending))
        raws = list(map(str.encode, pending))
        lengths = list(map(len, raws))
        longest = max(lengths)
        table = self._table
        if self._c_table is not None:
            results = _bpe_short_and_long(self._c_table, table, raws, lengths, longest)
        elif len(raws) >= BATCH_MIN and longest <= BATCH_BYTES:
            results = bpe_words(table, raws)
        else:
            results = [None] * len(raws)
            batch = []
            for i, (raw, length) in enumerate(zip(raws, lengths)):
                if length > LONG_BYTES:
                    results[i] = bpe_long(table, raw)
                elif length > BATCH_BYTES or len(raws) < BATCH_MIN:
                    results[i] = bpe_word(table, list(map(self._byte_ids.__getitem__, raw)))
                else:
                    batch.append(i)
            for i, ids in zip(batch, bpe_words(table, [raws[i] for i in batch])):
                results[i] = ids
        _drain(map(list.extend, lists, results))
        if len(cache) > self._cache_size:
            cache.clear()
            return
        cache.update(zip(pending, map(tuple, results)))
        if longest > LONG_BYTES:
            for pretoken, length in zip(pending, lengths):
                if length > LONG_BYTES:
                    del cache[pretoken]

    def _extend(self, out: list, pieces: list[str]) -> None:
        """Append the ids of pre-tokens, in blocks so that the cache stays near its size.

        The cache is a ``defaultdict(list)``: a miss inserts an empty list (in C, no Python
        call) at the end of the dict's order, so the misses of a block are its last entries;
        `_resolve` fills them before the ids are read.

        For many pre-tokens the cyclic garbage collector is paused (the cache and the id
        tuples are acyclic; collections triggered by their allocation cost ~10 % of a cold encode).
        """
        cache = self._cache
        pause = len(pieces) >= _PAUSE_GC and gc.isenabled()
        if pause:
            gc.disable()
        try:
            for start in range(0, len(pieces), _BLOCK):
                block = pieces[start : start + _BLOCK] if len(pieces) > _BLOCK else pieces
                size = len(cache)
                values = list(map(cache.__getitem__, block))
                if len(cache) > size:
                    self._resolve(len(cache) - size)
                _drain(map(out.extend, values))
        except BaseException:
            cache.clear()  # no unfilled miss may stay behind (e.g. a lone surrogate failed to encode)
            raise
        finally:
            if pause:
                gc.enable()

    def _encode_ordinary(self, findall, text: str, out: list, start: int, end: int) -> None:
        self._extend(out, findall(text, start, end))

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
        """`encode` for text with non-ASCII characters, so ASCII stretches still use ``re``."""
        cuts = _island_cuts(text) if len(text) >= 1024 else None
        if cuts is None:
            return self._encode_whole(text)
        out: list[int] = []
        out += self._encode_whole(self._settle_pieces(text, cuts, out))
        return out

    def _settle_islands(self, text: str, out: list) -> str:
        """`_encode_settled` of `text`, cut by `_island_cuts` where that pays."""
        cuts = None if text.isascii() else _island_cuts(text)
        if cuts is None:
            return self._encode_settled(text, out)
        return self._settle_pieces(text, cuts, out)

    def _settle_pieces(self, text: str, cuts: list[int], out: list) -> str:
        """Settle the pieces between `cuts` one after another, joined by the carry logic of
        `encode_iterable` (exact for any cut); each piece is pre-tokenized by ``re`` when it
        and the carried text are ASCII, else by ``regex``."""
        carry = ""
        for a, b in zip(cuts, cuts[1:]):
            carry = self._encode_settled(carry + text[a:b], out)
        return self._encode_settled(carry + text[cuts[-1] :], out)

    def _encode_whole(self, text: str) -> list[int]:
        out: list[int] = []
        findall = ASCII_GPT2_REGEX.findall if text.isascii() else GPT2_REGEX.findall
        if self._specials is None:
            self._encode_ordinary(findall, text, out, 0, len(text))
            return out
        start = 0
        for a, b in self._specials.finditer(text):
            if a > start:
                self._encode_ordinary(findall, text, out, start, a)
            out.append(self.special_ids[text[a:b]])
            start = b
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
        if self._specials is not None:
            limit = end - self._max_special_len
            for a, b in self._specials.finditer(buf):
                if a > limit:
                    break
                if a > start:
                    self._encode_ordinary(findall, buf, out, start, a)
                out.append(self.special_ids[buf[a:b]])
                start = b
            end = max(start, limit + 1)
        pieces = findall(buf, start, end)
        if len(pieces) < 2:
            return buf[start:]
        self._extend(out, pieces[:-2])
        return buf[end - len(pieces[-1]) - len(pieces[-2]) :]

    def encode_iterable(self, iterable: Iterable[str], *, buffer_chars: int = DEFAULT_BUFFER_CHARS) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open text file) in constant memory.

        The result equals ``encode("".join(iterable))``: text that more input could still
        change (the last pre-tokens, a partial special token) is carried into the next chunk.

        **Arguments:**

        - `iterable`: strings, cut anywhere (lines of a file, fixed-size reads, ...).
        - `buffer_chars`: chunks are gathered until this many characters before encoding, to
          spend less time per chunk; ``1`` encodes after every chunk. When the text held back
          grows (one long pre-token, e.g. a line of 1M digits), the next encode waits until the
          buffer has doubled, so the work stays linear.

        **Returns:** an iterator of ids.
        """
        if isinstance(iterable, str):
            raise TypeError("encode_iterable takes an iterable of strings; for one string use encode()")
        buf = ""
        wait = buffer_chars
        out: list[int] = []
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise TypeError(f"encode_iterable: chunks must be str, got {type(chunk).__name__}")
            buf += chunk
            if len(buf) < wait:
                continue
            buf = self._settle_islands(buf, out)
            wait = max(buffer_chars, 2 * len(buf))
            if out:
                yield from out
                out.clear()
        if buf:
            yield from self._encode_islands(buf) if not buf.isascii() else self._encode_whole(buf)

    def _join(self, ids) -> bytes:
        if isinstance(ids, str | bytes):
            raise TypeError(f"decode takes a sequence of int ids, got {type(ids).__name__} {ids!r:.40}")
        if isinstance(ids, SupportsToList):
            ids = ids.tolist()
            if not isinstance(ids, list):
                ids = [ids]
        elif not isinstance(ids, list | tuple):
            ids = list(ids)
        kinds = set(map(type, ids))
        if kinds - {int}:
            bad = sorted(t.__name__ for t in kinds if t is bool or not issubclass(t, int | np.integer))
            if bad:
                raise TypeError(f"decode: token ids must be ints, got {', '.join(bad)}")
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"decode: unknown token id {e.args[0]!r} (ids are 0..{max(self.vocab)})") from None

    def decode(self, ids: Iterable[int | np.integer] | SupportsToList) -> str:
        """The text of a sequence of ids; byte sequences that are not valid UTF-8 become U+FFFD.

        **Arguments:**

        - `ids`: token ids (a list, a tuple, a 1-D numpy array or torch tensor, ...).

        **Returns:** the decoded string. An id not in the vocab raises ValueError naming it;
        an id that is not an int (a float, a bool) raises TypeError.
        """
        return self._join(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int | np.integer] | SupportsToList) -> bytes:
        """The raw bytes of a sequence of ids (no UTF-8 decoding); errors as in `decode`."""
        return self._join(ids)

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        merges_path: str | os.PathLike | None = None,
        special_tokens: Iterable[str] | None = None,
        **options,
    ) -> Tokenizer:
        """Load a tokenizer from GPT-2 style files (GPT-2's own, or ones written by `save`).

        **Arguments:**

        - `path`: a directory holding ``vocab.json`` and ``merges.txt`` (as `save` writes it),
          or, with `merges_path`, the ``vocab.json`` file itself: ``{"byte-to-unicode token": id}``
          (see `fnlm.tokenizer.gpt2`).
        - `merges_path`: ``merges.txt``, one ``"left right"`` merge a line in rank order.
        - `special_tokens`: the special tokens; when ``None``, those listed in the merges file's
          ``#special_tokens:`` line (none for GPT-2's files).
        - `options`: passed to the constructor (``cache_size``).

        **Returns:** the tokenizer. A missing file raises FileNotFoundError naming it; a corrupt
        one ValueError naming the file (and the line, for the merges), as do files that are each
        well formed but do not fit together (a merge of tokens not in the vocabulary, a missing byte).

        Example: ``Tokenizer.from_files("tokenizer/")`` after ``tok.save("tokenizer/")``.
        """
        vocab_path, merges_path = _file_pair(path, merges_path, reading=True)
        vocab = gpt2.read_vocab(vocab_path)
        merges, saved_specials = gpt2.read_merges(merges_path)
        if special_tokens is None:
            special_tokens = saved_specials
        try:
            return cls(vocab, merges, special_tokens, **options)
        except ValueError as e:
            raise ValueError(f"{vocab_path!r} and {merges_path!r} do not make a tokenizer: {e}") from None

    def save(self, path: str | os.PathLike, merges_path: str | os.PathLike | None = None) -> None:
        """Write the tokenizer as GPT-2 style ``vocab.json`` and ``merges.txt``.

        **Arguments:**

        - `path`: a directory (created if missing) to write ``vocab.json`` and ``merges.txt``
          into, or, with `merges_path`, the path of the vocabulary file itself.
        - `merges_path`: where to write the merges, when `path` names the vocabulary file.

        Token bytes are written with GPT-2's byte-to-unicode map (a space is ``Ġ``); the
        vocabulary one ``"token": id`` a line in id order, the merges one ``left right`` a line
        in rank order after a ``#special_tokens: [...]`` line. `from_files` reads them back to
        an equal tokenizer (the same `fingerprint`).
        """
        vocab_path, merges_path = _file_pair(path, merges_path, reading=False)
        gpt2.write_vocab(vocab_path, self.vocab)
        gpt2.write_merges(merges_path, self.merges, self.special_tokens)


def _file_pair(path, merges_path, *, reading: bool) -> tuple[str, str]:
    """``(vocab path, merges path)`` from a directory, or from the two paths."""
    for name, value in (("path", path), ("merges_path", merges_path)):
        if value is not None and not isinstance(value, str | os.PathLike):
            raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__} {value!r:.60}")
    if path is None:
        raise TypeError("path must be a directory, or the vocab.json path with merges_path")
    if merges_path is not None:
        return os.fspath(path), os.fspath(merges_path)
    directory = os.fspath(path)
    if reading and not os.path.isdir(directory):
        if os.path.exists(directory):
            raise ValueError(
                f"{directory!r} is a file: pass the directory that holds {_VOCAB_FILE} and {_MERGES_FILE}, "
                "or both file paths"
            )
        raise FileNotFoundError(f"tokenizer directory not found: {directory!r}")
    if not reading:
        os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, _VOCAB_FILE), os.path.join(directory, _MERGES_FILE)
