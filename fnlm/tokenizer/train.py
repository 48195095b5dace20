"""Byte-level BPE training: count pre-tokens in parallel, then merge with incremental pair counts.

Two stages:

1. **Pre-token counts.** The file is cut into chunks at a special token
   (`find_chunk_boundaries`), each chunk is decoded as UTF-8, split on the special tokens
   (longest first; the specials themselves are dropped, so no merge crosses a document
   boundary) and cut into pre-tokens with the GPT-2 pattern. Worker processes read and count
   chunk by chunk and send back one `Counter` per run of chunks, so memory stays bounded by
   the chunk size and the number of distinct pre-tokens, not by the file size. Pieces that are
   pure ASCII use an equivalent pattern for the standard-library `re` engine (built from the
   `regex` pattern's own character classes; about twice as fast); others use the `regex`
   GPT-2 pattern.
2. **Merges.** Work happens on the distinct pre-tokens (weighted by their counts), each a
   `str` with one character per token id. Pair counts live in a dict, an index maps each pair
   to the words that held it, and a max-heap with lazy invalidation picks the next pair
   (highest count; ties go to the lexicographically greater pair of bytes). Each merge
   rewrites only the words that hold the pair and updates only the pairs around the merged
   positions; there is never a full recount. A word longer than `BIG_WORD` bytes (a line of
   base64 or digits) is kept as a linked list with an index from each pair to its positions,
   so that a merge costs its occurrences, not the word's length (`_Merger`). The loop over the
   short words of one merge is `fnlm/tokenizer/_merge.c` (compiled at install; on GCIDE the
   merges take 1.8 s with it, 3.6 s without), with the same loop in Python, `_merge_words_py`, as
   its reference and as the fallback where no C compiler was at hand.

The pre-token counts are handed to the merge loop one entry at a time (the `Counter` is
emptied as the words are built), and the process never imports torch.

The file is read as bytes and decoded as strict UTF-8 (line endings are kept as they are);
a byte sequence that is not UTF-8 raises `ValueError` naming the file and the byte offset.
"""

from __future__ import annotations

import functools
import gc
import heapq
import multiprocessing
import os
import signal
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence

from fnlm._progress import progress_bar
from fnlm.tokenizer.pretokenize import (
    ASCII_GPT2_REGEX,
    GPT2_REGEX,
    SpecialMatcher,
    find_chunk_boundaries,
)

__all__ = ["train_bpe", "count_pretokens", "bpe_merges_from_counts"]

_MAX_TOKENS = 0x110000
BIG_WORD = 512
"""Words longer than this (in bytes) are merged through a linked list instead of ``str.split``."""
_INVERT = bytes(range(255, -1, -1))
_END = "\u0100"


@functools.lru_cache(maxsize=4)
def _matcher(specials: tuple[str, ...]) -> SpecialMatcher:
    return SpecialMatcher(specials)


def _count_text(text: str, specials: tuple[str, ...], counts: Counter) -> None:
    if not specials:
        pieces = [text]
    elif len(specials) == 1:
        pieces = text.split(specials[0])
    else:
        pieces = _matcher(specials).split(text)
    ascii_findall = ASCII_GPT2_REGEX.findall
    unicode_findall = GPT2_REGEX.findall
    update = counts.update
    for piece in pieces:
        if piece:
            update(ascii_findall(piece) if piece.isascii() else unicode_findall(piece))


def _count_spans(path: str, spans: list[tuple[int, int]], specials: tuple[str, ...], counts: Counter) -> int:
    done = 0
    with open(path, "rb") as f:
        for start, end in spans:
            f.seek(start)
            data = f.read(end - start)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path!r} is not valid UTF-8: byte {data[e.start:e.start + 1]!r} at byte offset "
                    f"{start + e.start} ({e.reason})"
                ) from None
            del data
            _count_text(text, specials, counts)
            done += end - start
    return done


def _count_task(task: tuple[str, list[tuple[int, int]], tuple[str, ...]]) -> tuple[Counter, int]:
    path, spans, specials = task
    counts: Counter = Counter()
    done = _count_spans(path, spans, specials, counts)
    return counts, done


def _split_token(special_tokens: Sequence[str]) -> bytes | None:
    for s in special_tokens:
        if not any(s != t and s in t for t in special_tokens):
            return s.encode("utf-8")
    return None


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; the parent alone answers it (its
    `with Pool` terminates the workers), so no worker prints a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def count_pretokens(
    input_path: str | os.PathLike,
    special_tokens: Sequence[str] = (),
    *,
    num_workers: int | None = None,
    chunk_bytes: int = 4 << 20,
    min_parallel_bytes: int = 4 << 20,
    progress: bool = True,
) -> Counter:
    """Count the pre-tokens of a UTF-8 text file, in parallel over chunks cut at special tokens.

    **Arguments:**

    - `input_path`: the text file.
    - `special_tokens`: document separators and other specials; text is split on them (longest
      first) and they are not counted. The first one that is not part of another special
      places the chunk cuts; without specials the file is one chunk, counted in this process.
    - `num_workers`: worker processes; default `os.cpu_count()`. `1` counts in this process.
    - `chunk_bytes`: about how many bytes are read and counted at a time (bounds memory). A
      worker takes a run of consecutive chunks (up to 16, about a quarter of the file divided
      by the workers) and sends back one `Counter` for the run.
    - `min_parallel_bytes`: files smaller than this are counted in this process.
    - `progress`: show a tqdm bar over the bytes.

    **Returns:** a `Counter` from pre-token string to its number of occurrences.

    Example: a file holding ``"a a<|endoftext|>a"`` gives ``Counter({"a": 2, " a": 1})``.
    """
    path = os.fspath(input_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPE training input not found: {path!r}")
    specials = tuple(sorted({s for s in special_tokens if s}, key=len, reverse=True))
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    for name, value, low in (("num_workers", workers, 1), ("chunk_bytes", chunk_bytes, 1),
                             ("min_parallel_bytes", min_parallel_bytes, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    size = os.path.getsize(path)
    split_token = _split_token([s for s in special_tokens if s])
    parallel = workers > 1 and size >= min_parallel_bytes
    with open(path, "rb") as f:
        cuts = find_chunk_boundaries(
            f, split_token, target_chunk_bytes=chunk_bytes, min_chunks=4 * workers if parallel else 1
        )
    spans = list(zip(cuts, cuts[1:]))
    total: Counter = Counter()
    with progress_bar(total=size, desc="pre-tokenize", disable=not progress, unit="B", unit_scale=True) as bar:
        if not parallel or len(spans) <= 1:
            for span in spans:
                bar.update(_count_spans(path, [span], specials, total))
        else:
            group_bytes = max(chunk_bytes, min(16 * chunk_bytes, size // (4 * workers)))
            tasks: list[tuple[str, list[tuple[int, int]], tuple[str, ...]]] = []
            group: list[tuple[int, int]] = []
            for span in spans:
                group.append(span)
                if span[1] - group[0][0] >= group_bytes:
                    tasks.append((path, group, specials))
                    group = []
            if group:
                tasks.append((path, group, specials))
            with _pool_context().Pool(min(workers, len(tasks)), initializer=_ignore_sigint) as pool:
                for counts, done in pool.imap_unordered(_count_task, tasks):
                    total.update(counts)
                    bar.update(done)
    return total


def bpe_merges_from_counts(
    word_counts: dict[bytes, int], num_merges: int, *, progress: bool = True
) -> list[tuple[bytes, bytes]]:
    """Learn up to `num_merges` BPE merges from pre-token byte strings and their counts.

    Each step merges the most frequent adjacent pair (counted over all positions, weighted by
    the word counts); ties go to the lexicographically greater pair ``(left_bytes,
    right_bytes)``. In a word, occurrences are merged greedily left to right. Training stops
    early when no pair is left. Two merges that spell the same bytes make the same symbol.

    **Arguments:**

    - `word_counts`: pre-token bytes -> count.
    - `num_merges`: how many merges to learn at most.
    - `progress`: show a tqdm bar over the merges.

    **Returns:** the merges in the order learned, each ``(left_bytes, right_bytes)``.

    Example: ``bpe_merges_from_counts({b"abab": 1, b"ab": 1}, 2, progress=False)
    == [(b"a", b"b"), (b"ab", b"ab")]``.
    """
    words = [(w.decode("latin-1"), c) for w, c in word_counts.items()]
    return _learn_merges(words, num_merges, progress)


def _learn_merges(words: Iterable[tuple[str, int]], num_merges: int, progress: bool) -> list[tuple[bytes, bytes]]:
    """`bpe_merges_from_counts` over ``(word, count)`` with words as latin-1 strings (one char a byte)."""
    if num_merges < 0:
        raise ValueError(f"num_merges must be non-negative, got {num_merges}")
    if num_merges > _MAX_TOKENS - 256:
        raise ValueError(f"num_merges={num_merges} exceeds the {_MAX_TOKENS - 256} this trainer supports")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        merger = _Merger(words)
        with progress_bar(total=num_merges, desc="merges", disable=not progress) as bar:
            return merger.run(num_merges, bar)
    finally:
        if gc_was_enabled:
            gc.enable()


class _Merger:
    """The merge loop's state.

    A word is a `str` with one character per token (``chr(token_id)``) and a pair is the
    two-character string of its tokens, so that applying a merge to a word is one C-speed
    ``word.split(pair)`` (greedy, left to right, non-overlapping: the BPE rule) whose pieces
    also name the neighbours of every occurrence. Pair counts live in a dict, `where` maps each
    pair to the words that held it (once per occurrence), and a heap with lazy invalidation
    picks the next pair: entries ``(-count, key(left), key(right), pair)``, where ``key(t)`` is
    the token's bytes inverted (``255 - b``) and then ``U+0100``, so that the smallest entry
    is the highest count and, on a tie, the lexicographically greater pair of bytes (a token
    sorts after every longer token it begins). Each merge rewrites only the words that hold the pair and updates only the pairs
    around the merged positions; there is never a full recount.

    A word longer than `BIG_WORD` characters (a line of base64, a run of 1M digits) would make
    each split cost its whole length; such a word is kept instead as a linked list of symbols,
    with an index from each pair to its positions, so a merge costs only its occurrences.
    """

    def __init__(self, words: Iterable[tuple[str, int]]):
        self.token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
        self.token_key: list[str] = [tb.translate(_INVERT).decode("latin-1") + _END for tb in self.token_bytes]
        self.token_id: dict[bytes, int] = {tb: i for i, tb in enumerate(self.token_bytes)}
        self.words: list[str] = []
        self.counts: list[int] = []
        self.where: defaultdict[str, list[int]] = defaultdict(list)
        self.big: list[tuple[list[str], list[int], list[int], int]] = []
        self.big_where: dict[str, int | array] = {}
        big_counts: Counter = Counter()
        where = self.where
        for s, c in words:
            if len(s) < 2 or c <= 0:
                continue
            if len(s) > BIG_WORD:
                self._add_big(s, c, big_counts)
                continue
            wi = len(self.words)
            self.words.append(s)
            self.counts.append(c)
            for p in map(str.__add__, s, s[1:]):
                where[p].append(wi)
        count_of = self.counts.__getitem__
        self.pair_counts: dict[str, int] = {p: sum(map(count_of, lst)) for p, lst in where.items()}
        for p, c in big_counts.items():
            self.pair_counts[p] = self.pair_counts.get(p, 0) + c
        key = self.token_key
        self.heap = [(-c, key[ord(p[0])], key[ord(p[1])], p) for p, c in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def _add_big(self, s: str, c: int, big_counts: Counter) -> None:
        """Add a long word as ``(symbols, next, previous, count)``: the links are compact
        arrays, and each pair's index entry is ``word << 32 | position`` in an array too."""
        bw = len(self.big) << 32
        n = len(s)
        self.big.append((list(s) + [""], array("q", range(1, n + 2)), array("q", range(-1, n)), c))
        for i, p in enumerate(map(str.__add__, s, s[1:]), bw):
            self._index(p, i)
            big_counts[p] += c

    def run(self, num_merges: int, bar) -> list[tuple[bytes, bytes]]:
        merges: list[tuple[bytes, bytes]] = []
        heap, pair_counts = self.heap, self.pair_counts
        token_bytes, token_key, token_id = self.token_bytes, self.token_key, self.token_id
        heappop, heappush = heapq.heappop, heapq.heappush
        while len(merges) < num_merges and heap:
            neg, key_a, key_b, k = heappop(heap)
            c = pair_counts.get(k, 0)
            if c != -neg:
                if c > 0:
                    heappush(heap, (-c, key_a, key_b, k))
                continue
            left, right = token_bytes[ord(k[0])], token_bytes[ord(k[1])]
            merges.append((left, right))
            ab = left + right
            zi = token_id.get(ab)
            if zi is None:
                zi = len(token_bytes)
                token_bytes.append(ab)
                token_key.append(ab.translate(_INVERT).decode("latin-1") + _END)
                token_id[ab] = zi
            z = chr(zi)
            touched = self._merge_big(k, z) if k in self.big_where else ()
            new_pairs = _merge_words(self.words, self.counts, self.where.pop(k, []), pair_counts, k, z,
                                     self.where, heap, token_key)
            pair_counts.pop(k, None)
            for nk in touched:
                if nk not in new_pairs:
                    nc = pair_counts.get(nk, 0)
                    if nc > 0:
                        heappush(heap, (-nc, token_key[ord(nk[0])], token_key[ord(nk[1])], nk))
            bar.update(1)
        return merges

    def _merge_big(self, k: str, z: str) -> set[str]:
        """Apply merge ``k -> z`` to the long words at the positions indexed for ``k`` (left to
        right in each word, skipping stale entries); returns the pairs whose count went up."""
        a, b = k
        pair_counts, big = self.pair_counts, self.big
        touched: set[str] = set()
        entries = self.big_where.pop(k)
        for e in (entries,) if type(entries) is int else sorted(entries):
            sym, nxt, prv, c = big[e >> 32]
            i = e & 0xFFFFFFFF
            if sym[i] != a:
                continue
            j = nxt[i]
            if sym[j] != b:
                continue
            x, y = prv[i], nxt[j]
            if x >= 0:
                sx = sym[x]
                _decrement(pair_counts, sx + a, c)
                nk = sx + z
                pair_counts[nk] = pair_counts.get(nk, 0) + c
                touched.add(nk)
                self._index(nk, e - i + x)
            if sym[y]:
                sy = sym[y]
                _decrement(pair_counts, b + sy, c)
                nk = z + sy
                pair_counts[nk] = pair_counts.get(nk, 0) + c
                touched.add(nk)
                self._index(nk, e)
                prv[y] = i
            sym[i] = z
            sym[j] = ""
            nxt[i] = y
        return touched

    def _index(self, pair: str, entry: int) -> None:
        """Note a long-word position of `pair`: one entry as an int, more in an array."""
        old = self.big_where.get(pair)
        if old is None:
            self.big_where[pair] = entry
        elif type(old) is int:
            self.big_where[pair] = array("q", (old, entry))
        else:
            old.append(entry)


def _merge_words_py(
    words: list[str],
    counts: list[int],
    where_list: list[int],
    pair_counts: dict[str, int],
    k: str,
    z: str,
    where: dict[str, list[int]],
    heap: list,
    token_key: list[str],
) -> dict[str, list[int]]:
    """One merge ``k -> z`` on the short words: the words at the indices in `where_list` (stale
    ones, which no longer hold ``k``, are skipped) are rewritten in `words`; the pairs around
    each occurrence lose its count in `pair_counts`; the new pairs (with ``z``) gain theirs,
    are pushed on `heap` with their new counts, and their words are added to `where`. Returns
    the new pairs, each with the indices of the words it appeared in (once per occurrence).

    The reference for the C version in `fnlm/tokenizer/_merge.c`, which `train_bpe` uses when it
    is built: on GCIDE (vocab 10,000) this loop rewrites 1.8 million words, 3.6 s of a 7 s run.
    """
    a, b = k
    new_where: defaultdict[str, list[int]] = defaultdict(list)
    zz, ba = z + z, b + a
    for wi in where_list:
        w = words[wi]
        if k not in w:
            continue
        parts = w.split(k)
        m = len(parts) - 1
        cw = counts[wi]
        words[wi] = z.join(parts)
        for j in range(m):
            p, q = parts[j], parts[j + 1]
            if p:
                x = p[-1]
                pair_counts[x + a] -= cw
                new_where[x + z].append(wi)
            elif j:
                new_where[zz].append(wi)
            if q:
                y = q[0]
                pair_counts[b + y] -= cw
                new_where[z + y].append(wi)
            elif j + 1 < m:
                pair_counts[ba] -= cw
    count_of = counts.__getitem__
    for nk, lst in new_where.items():
        nc = pair_counts.get(nk, 0) + sum(map(count_of, lst))
        pair_counts[nk] = nc
        heapq.heappush(heap, (-nc, token_key[ord(nk[0])], token_key[ord(nk[1])], nk))
        old = where.get(nk)
        if old is None:
            where[nk] = lst
        else:
            old += lst
    return new_where


try:
    from fnlm.tokenizer._merge import merge_words as _merge_words
except ImportError:  # not built (no C compiler at install time): the same loop in Python
    _merge_words = _merge_words_py


def _decrement(counts: dict[str, int], key: str, c: int) -> None:
    left = counts[key] - c
    if left:
        counts[key] = left
    else:
        del counts[key]


def _latin1_words(counts: Counter) -> Iterator[tuple[str, int]]:
    """Empty a Counter of pre-tokens into ``(word, count)`` with each word's UTF-8 bytes as a
    latin-1 string (ASCII words as they are), freeing each key as it goes."""
    popitem = counts.popitem
    for _ in range(len(counts)):
        s, c = popitem()
        yield (s if s.isascii() else s.encode("utf-8").decode("latin-1")), c


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    num_workers: int | None = None,
    progress: bool = True,
    chunk_bytes: int = 4 << 20,
    min_parallel_bytes: int = 4 << 20,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    The vocabulary is ordered: ids ``0 .. S-1`` are the special tokens in the order given,
    ids ``S .. S+255`` the single bytes ``0x00 .. 0xFF``, then one id per merge in the order
    learned. Training stops at `vocab_size` entries, or earlier when no pair is left to merge.

    **Arguments:**

    - `input_path`: the training text (strict UTF-8; see the module docstring).
    - `vocab_size`: the total vocabulary size, at least ``256 + len(special_tokens)``.
    - `special_tokens`: strings added to the vocabulary whole; the text is split on them
      (longest first) so that no merge crosses them. The first one places the chunk cuts.
    - `num_workers`: pre-tokenization processes, default `os.cpu_count()`.
    - `progress`: tqdm bars for the pre-tokenized bytes and the merges.
    - `chunk_bytes`, `min_parallel_bytes`: see `count_pretokens`.

    **Returns:** ``(vocab, merges)``: `vocab` maps id -> token bytes, `merges` lists
    ``(left_bytes, right_bytes)`` in the order learned.

    Example: on a file holding ``"low low lower"`` with ``vocab_size=258`` and no specials the
    merges are ``[(b"o", b"w"), (b"l", b"ow")]`` (``(b"o", b"w")`` ties with ``(b"l", b"o")``
    at 3 and is the greater pair) and ``vocab[257] == b"low"``.
    """
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a sequence of strings, not the string {special_tokens!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    specials = list(dict.fromkeys(special_tokens))
    if any(not isinstance(s, str) or not s for s in specials):
        raise ValueError(f"special tokens must be non-empty strings, got {specials!r}")
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than 256 byte tokens + {len(specials)} special "
            f"tokens = {256 + len(specials)}"
        )
    pretoken_counts = count_pretokens(
        input_path,
        specials,
        num_workers=num_workers,
        chunk_bytes=chunk_bytes,
        min_parallel_bytes=min_parallel_bytes,
        progress=progress,
    )
    merges = _learn_merges(_latin1_words(pretoken_counts), vocab_size - 256 - len(specials), progress)
    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    offset = len(specials)
    for i in range(256):
        vocab[offset + i] = bytes([i])
    offset += 256
    for i, (left, right) in enumerate(merges):
        vocab[offset + i] = left + right
    return vocab, merges
