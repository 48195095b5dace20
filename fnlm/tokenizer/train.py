"""Byte-level BPE training: count pre-tokens in parallel, then merge with incremental pair counts.

Two stages:

1. **Pre-token counts.** The file is cut into chunks at the first special token
   (`find_chunk_boundaries`), each chunk is decoded as UTF-8, split on the special tokens
   (longest first; the specials themselves are dropped, so no merge crosses a document
   boundary) and cut into pre-tokens with the GPT-2 pattern. Worker processes count chunk by
   chunk and send back one `Counter` per chunk, so memory stays bounded by the chunk size and
   the number of distinct pre-tokens, not by the file size. Pieces that are pure ASCII use an
   equivalent pattern for the standard-library `re` engine (derived from the `regex` pattern's
   own character classes, about twice as fast); others use the `regex` GPT-2 pattern.
2. **Merges.** Work happens on the distinct pre-tokens (weighted by their counts), each a
   list of token ids. Pair counts live in a dict, an index maps each pair to the words that
   held it, and a max-heap with lazy invalidation picks the next pair (highest count; ties go
   to the lexicographically greater pair of bytes). Each merge rewrites only the words that
   hold the pair and updates only the pairs around the merged positions.

The file is read as bytes and decoded as strict UTF-8 (line endings are kept as they are);
a byte sequence that is not UTF-8 raises `ValueError` naming the file and the byte offset.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Sequence

from tqdm.auto import tqdm

from fnlm.tokenizer.pretokenize import GPT2_REGEX, find_chunk_boundaries, special_tokens_regex

__all__ = ["train_bpe", "count_pretokens", "bpe_merges_from_counts"]

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
_INVERT = bytes(range(255, -1, -1))
_END = "\u0100"


def _ascii_class(pattern: str) -> str:
    import regex

    chars = "".join(chr(c) for c in range(128) if regex.fullmatch(pattern, chr(c)))
    return "".join(re.escape(c) for c in chars)


def _ascii_gpt2_regex() -> re.Pattern:
    letters, numbers, spaces = _ascii_class(r"\p{L}"), _ascii_class(r"\p{N}"), _ascii_class(r"\s")
    return re.compile(
        rf"'(?:[sdmt]|ll|ve|re)| ?[{letters}]+| ?[{numbers}]+| ?[^{spaces}{letters}{numbers}]+"
        rf"|[{spaces}]+(?![^{spaces}])|[{spaces}]+"
    )


ASCII_GPT2_REGEX = _ascii_gpt2_regex()


def _count_text(text: str, specials: tuple[str, ...], counts: Counter) -> None:
    if not specials:
        pieces = [text]
    elif len(specials) == 1:
        pieces = text.split(specials[0])
    else:
        pieces = special_tokens_regex(specials).split(text)
    ascii_findall = ASCII_GPT2_REGEX.findall
    unicode_findall = GPT2_REGEX.findall
    update = counts.update
    for piece in pieces:
        if piece:
            update(ascii_findall(piece) if piece.isascii() else unicode_findall(piece))


def _count_chunk(task: tuple[str, int, int, tuple[str, ...]]) -> tuple[Counter, int]:
    path, start, end, specials = task
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path!r} is not valid UTF-8: byte {data[e.start:e.start + 1]!r} at byte offset "
            f"{start + e.start} ({e.reason})"
        ) from None
    counts: Counter = Counter()
    _count_text(text, specials, counts)
    return counts, end - start


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
      first) and they are not counted. The first one also places the chunk cuts.
    - `num_workers`: worker processes; default `os.cpu_count()`. `1` counts in this process.
    - `chunk_bytes`: about how many bytes a worker reads and counts at a time (bounds memory).
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
    if workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    size = os.path.getsize(path)
    split_token = special_tokens[0].encode("utf-8") if special_tokens and special_tokens[0] else None
    if workers == 1 or size < min_parallel_bytes:
        workers = 1
        min_chunks = 1
    else:
        min_chunks = 4 * workers
    with open(path, "rb") as f:
        cuts = find_chunk_boundaries(f, split_token, target_chunk_bytes=chunk_bytes, min_chunks=min_chunks)
    tasks = [(path, a, b, specials) for a, b in zip(cuts, cuts[1:])]
    total: Counter = Counter()
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="pre-tokenize", disable=not progress)
    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                counts, nbytes = _count_chunk(task)
                total.update(counts)
                bar.update(nbytes)
        else:
            with _pool_context().Pool(min(workers, len(tasks))) as pool:
                for counts, nbytes in pool.imap_unordered(_count_chunk, tasks):
                    total.update(counts)
                    bar.update(nbytes)
    finally:
        bar.close()
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
    if num_merges < 0:
        raise ValueError(f"num_merges must be non-negative, got {num_merges}")
    token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    token_key: list[str] = [tb.translate(_INVERT).decode("latin-1") + _END for tb in token_bytes]
    token_id: dict[bytes, int] = {tb: i for i, tb in enumerate(token_bytes)}

    words: list[list[int]] = []
    counts: list[int] = []
    pair_counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for wb, c in word_counts.items():
        if len(wb) < 2 or c <= 0:
            continue
        wi = len(words)
        w = list(wb)
        words.append(w)
        counts.append(c)
        for x, y in zip(w, w[1:]):
            k = x << _SHIFT | y
            pair_counts[k] = pair_counts.get(k, 0) + c
            s = where.get(k)
            if s is None:
                where[k] = {wi}
            else:
                s.add(wi)
    heap = [(-c, token_key[k >> _SHIFT] + token_key[k & _MASK], k) for k, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    heappop, heappush = heapq.heappop, heapq.heappush
    bar = tqdm(total=num_merges, desc="merges", disable=not progress)
    try:
        while len(merges) < num_merges and heap:
            neg, key, k = heappop(heap)
            c = pair_counts.get(k, 0)
            if c != -neg:
                if c > 0:
                    heappush(heap, (-c, key, k))
                continue
            a, b = k >> _SHIFT, k & _MASK
            ab = token_bytes[a] + token_bytes[b]
            merges.append((token_bytes[a], token_bytes[b]))
            z = token_id.get(ab)
            if z is None:
                z = len(token_bytes)
                token_bytes.append(ab)
                token_key.append(ab.translate(_INVERT).decode("latin-1") + _END)
                token_id[ab] = z
            new_pairs: dict[int, int] = {}
            new_where: dict[int, set[int]] = {}
            for wi in where.pop(k, ()):
                w = words[wi]
                n = len(w)
                last = n - 1
                occ = []
                start = 0
                while True:
                    try:
                        i = w.index(a, start, last)
                    except ValueError:
                        break
                    if w[i + 1] == b:
                        occ.append(i)
                        start = i + 2
                    else:
                        start = i + 1
                if not occ:
                    continue
                cw = counts[wi]
                prev = -2
                for i in occ:
                    if i > 0 and i != prev + 2:
                        pair_counts[w[i - 1] << _SHIFT | a] -= cw
                    if i + 2 < n:
                        pair_counts[b << _SHIFT | w[i + 2]] -= cw
                    prev = i
                for i in reversed(occ):
                    w[i : i + 2] = [z]
                n = len(w)
                last_occ = len(occ) - 1
                for shift, i in enumerate(occ):
                    j = i - shift
                    if j > 0:
                        nk = w[j - 1] << _SHIFT | z
                        new_pairs[nk] = new_pairs.get(nk, 0) + cw
                        s = new_where.get(nk)
                        if s is None:
                            new_where[nk] = {wi}
                        else:
                            s.add(wi)
                    if j + 1 < n and (shift == last_occ or occ[shift + 1] != i + 2):
                        nk = z << _SHIFT | w[j + 1]
                        new_pairs[nk] = new_pairs.get(nk, 0) + cw
                        s = new_where.get(nk)
                        if s is None:
                            new_where[nk] = {wi}
                        else:
                            s.add(wi)
            pair_counts.pop(k, None)
            for nk, dc in new_pairs.items():
                nc = pair_counts.get(nk, 0) + dc
                pair_counts[nk] = nc
                heappush(heap, (-nc, token_key[nk >> _SHIFT] + token_key[nk & _MASK], nk))
            for nk, s in new_where.items():
                old = where.get(nk)
                if old is None:
                    where[nk] = s
                else:
                    old |= s
            bar.update(1)
    finally:
        bar.close()
    return merges


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
    word_counts: dict[bytes, int] = {}
    for token, c in pretoken_counts.items():
        word_counts[token.encode("utf-8")] = c
    del pretoken_counts
    merges = bpe_merges_from_counts(word_counts, vocab_size - 256 - len(specials), progress=progress)
    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    offset = len(specials)
    for i in range(256):
        vocab[offset + i] = bytes([i])
    offset += 256
    for i, (left, right) in enumerate(merges):
        vocab[offset + i] = left + right
    return vocab, merges
