"""Applying BPE merges to pre-tokens: one word, many words at once, and one very long word.

Every function here computes the same thing, the BPE rule of GPT-2 and tiktoken: start with
one symbol per byte and, while some adjacent pair of symbols is a merge, merge the pair of
lowest rank (the leftmost one on a tie). They differ in how the work is organised:

- `bpe_word`: one short word, in plain Python (a list of pair ranks beside the symbols; each
  merge is a C-level ``min`` and ``index``). Quadratic in the word's length.
- `bpe_words`: many short words together (a cold cache), vectorised with numpy: each round
  merges the leftmost lowest-rank pair of every word that still has one, so the Python-level
  work is per round, not per merge. Words still unfinished when few are left go to `bpe_word`.
- `bpe_long`: one long word (a run of 100k letters, digits or CJK characters) in
  O(n log n): a linked list of symbols, and pending pairs grouped by rank. When the merge list
  is *monotone* (every pair that holds a token has a higher rank than every merge that makes
  that token, true of any list learned by BPE training, GPT-2's included), the merges happen
  in rank order, and all pending pairs of one rank are merged as a batch, left to right.
  Otherwise a heap of ``(rank, position)`` applies the merges one by one.

All of them read a `MergeTable`, built once per tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from heapq import heappop, heappush
from itertools import islice, repeat

import numpy as np

__all__ = ["MergeTable", "MAX_TOKEN_ID", "bpe_word", "bpe_words", "bpe_long"]

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
BATCH_MIN_WORDS = 64
"""`bpe_words` stops its numpy rounds when fewer words than this are unfinished."""
MAX_TOKEN_ID = 2**31 - 1
"""The largest token id the merge tables hold (the C table packs a pair of ids into 64 bits)."""
LEVEL_BULK = 16
"""`bpe_long` merges a rank with at least this many pending pairs by numpy gathers and scatters."""


class MergeTable:
    """The merges of a tokenizer in the forms the BPE functions read.

    **Arguments:**

    - `byte_ids`: the id of each single byte, 256 ints.
    - `ranks`: ``{(left id, right id): rank}``; lower ranks merge first.
    - `merged`: ``merged[rank]`` is the id a merge of that rank makes.

    A merge list is *monotone* when every rank is above the ranks of all merges that make
    either of its two parts; `bpe_long` then merges rank by rank.
    """

    def __init__(self, byte_ids: Sequence[int], ranks: dict[tuple[int, int], int], merged: Sequence[int]):
        self.byte_ids = list(byte_ids)
        self.ranks = ranks
        self.merged = list(merged)
        self.none = len(self.merged)
        self.monotone = _is_monotone(ranks, self.merged)
        self.pair = {rank: pair for pair, rank in ranks.items()}
        self.sentinel = max(self.byte_ids + self.merged + [i for pair in ranks for i in pair]) + 1
        self._arrays: tuple | None = None

    def arrays(self) -> tuple:
        """numpy forms, built on first use: byte ids, the 256x256 byte-pair ranks, merged ids
        (with a last entry for "no merge"), and an open-addressing hash table of pair ranks."""
        if self._arrays is None:
            byte_ids = np.array(self.byte_ids, dtype=np.int64)
            byte_pairs = np.full((256, 256), self.none, dtype=np.int64)
            byte_of = {b: i for i, b in enumerate(self.byte_ids)}
            get = self.ranks.get
            for a, ia in byte_of.items():
                row = byte_pairs[ia]
                for b, ib in byte_of.items():
                    rank = get((a, b))
                    if rank is not None:
                        row[ib] = rank
            merged = np.array([*self.merged, 0], dtype=np.int64)
            self._arrays = (byte_ids, byte_pairs, merged, _PairHash(self.ranks, self.none, self.sentinel + 1))
        return self._arrays


def _is_monotone(ranks: dict[tuple[int, int], int], merged: list[int]) -> bool:
    made_last: dict[int, int] = {}
    for rank in ranks.values():
        z = merged[rank]
        if made_last.get(z, -1) < rank:
            made_last[z] = rank
    return all(rank > made_last.get(a, -1) and rank > made_last.get(b, -1) for (a, b), rank in ranks.items())


class _PairHash:
    """``(left id, right id) -> rank`` for numpy arrays of ids in ``[0, width)``: linear probing
    over a table at most a quarter full, keyed by ``left * width + right``. Id ``width - 1`` is
    in no pair (a sentinel)."""

    def __init__(self, ranks: dict[tuple[int, int], int], none: int, width: int):
        self.none = none
        self.width = width
        pairs = np.array(list(ranks), dtype=np.int64).reshape(-1, 2)
        bits = max(4, (4 * len(ranks)).bit_length())
        self.mask = (1 << bits) - 1
        self.shift = np.uint64(64 - bits)
        self.keys = np.full(1 << bits, -1, dtype=np.int64)
        self.values = np.full(1 << bits, none, dtype=np.int64)
        keys = pairs[:, 0] * width + pairs[:, 1]
        values = np.fromiter(ranks.values(), dtype=np.int64, count=len(ranks))
        slots = self._slot(keys)
        todo = np.arange(len(keys))
        while todo.size:
            free = self.keys[slots[todo]] == -1
            take = todo[free]
            _, first = np.unique(slots[take], return_index=True)
            put = take[first]
            self.keys[slots[put]] = keys[put]
            self.values[slots[put]] = values[put]
            placed = np.zeros(len(keys), dtype=bool)
            placed[put] = True
            todo = todo[~placed[todo]]
            slots[todo] = (slots[todo] + 1) & self.mask

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.view(np.uint64) * _HASH_MUL) >> self.shift).view(np.int64)

    def lookup(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Ranks of the pairs ``(left[i], right[i])``; `none` where there is no merge."""
        keys = left * self.width + right
        slots = self._slot(keys)
        found = self.keys[slots]
        hit = found == keys
        out = np.where(hit, self.values[slots], self.none)
        more = np.flatnonzero(~hit & (found != -1))
        keys, slots = keys[more], slots[more]
        while more.size:
            slots = (slots + 1) & self.mask
            found = self.keys[slots]
            hit = found == keys
            out[more[hit]] = self.values[slots[hit]]
            go_on = ~hit & (found != -1)
            more, keys, slots = more[go_on], keys[go_on], slots[go_on]
        return out


def bpe_word(table: MergeTable, ids: list[int]) -> tuple[int, ...]:
    """Merge a short word given as a list of symbol ids (bytes, or a partly merged word).

    Example: with the single merge ``(a, b) -> ab``, ``[a, b, c]`` becomes ``(ab, c)``.
    """
    if len(ids) < 2:
        return tuple(ids)
    get = table.ranks.get
    none = table.none
    merged = table.merged
    pair_ranks = list(map(get, zip(ids, ids[1:]), repeat(none)))
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


def bpe_words(table: MergeTable, pieces: Sequence[bytes]) -> list[tuple[int, ...]]:
    """`bpe_word` of many non-empty short byte strings, vectorised over the words.

    The words are laid end to end in numpy arrays (ids, the rank of the pair that starts at
    each symbol, links to the next and previous live symbol). A round finds, per word, the
    minimum of ``rank * 2**32 + position`` (one ``minimum.reduceat``), i.e. the leftmost
    lowest-rank pair, merges it, and looks up the two new pairs around it. Slot ``n`` is a
    sentinel symbol (in no pair) before the first and after the last symbol of every word.
    """
    if not pieces:
        return []
    byte_ids, byte_pairs, merged, pair_hash = table.arrays()
    none = table.none
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    raw = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    n = raw.size
    starts = np.zeros(len(pieces), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    lasts = starts + lengths - 1
    key = np.empty(n + 1, dtype=np.int64)
    key[: n - 1] = byte_pairs[raw[:-1], raw[1:]]
    key[lasts] = none
    key[n] = none
    position = np.arange(n + 1, dtype=np.int64)
    key = (key << 32) | position
    done_key = none << 32
    ids = np.empty(n + 1, dtype=np.int64)
    ids[:n] = byte_ids[raw]
    ids[n] = table.sentinel
    nxt = position + 1
    nxt[lasts] = n
    prv = position - 1
    prv[starts] = n
    active = starts
    while len(active) >= BATCH_MIN_WORDS:
        low = active[0]
        best = np.minimum.reduceat(key[low:n], active - low)
        live = best < done_key
        if not live.all():
            active, best = active[live], best[live]
        p = best & 0xFFFFFFFF
        q = nxt[p]
        z = merged[best >> 32]
        ids[p] = z
        ids[q] = -1
        key[q] = done_key
        after = nxt[q]
        nxt[p] = after
        prv[after] = p
        before = prv[p]
        ranks = pair_hash.lookup(np.concatenate((ids[before], z)), np.concatenate((z, ids[after])))
        k = len(p)
        key[before] = (ranks[:k] << 32) | before
        key[p] = (ranks[k:] << 32) | p
    alive = ids[:n] >= 0
    counts = np.add.reduceat(alive, starts, dtype=np.int64).tolist()
    flat = iter(ids[:n][alive].tolist())
    words = list(map(tuple, map(islice, repeat(flat), counts)))
    if len(active):
        for w in np.searchsorted(starts, active).tolist():
            words[w] = bpe_word(table, list(words[w]))
    return words


def bpe_long(table: MergeTable, piece: bytes) -> list[int]:
    """BPE of one long byte string in O(n log n); equal to `bpe_word` on it.

    Example: GPT-2's tokenizer encodes ``b"ab" * 100_000`` to 100,000 ids in milliseconds.
    """
    if len(piece) < 2:
        return [table.byte_ids[b] for b in piece]
    raw = np.frombuffer(piece, dtype=np.uint8)
    if table.monotone:
        return _merge_by_rank(table, raw)
    byte_ids, byte_pairs, _, _ = table.arrays()
    ids = byte_ids[raw].tolist()
    ids.append(-1)
    return list(filter((-1).__ne__, _merge_by_heap(table, ids, byte_pairs[raw[:-1], raw[1:]])))


def _merge_by_heap(table: MergeTable, ids: list[int], pair_ranks: np.ndarray) -> list[int]:
    """Any merge list: pop ``(rank, position)`` keys from a heap, skipping stale ones.

    `ids` ends with a sentinel ``-1`` at position ``n`` (also reached as ``-1``); merged-away
    positions become ``-1``.
    """
    n = len(ids) - 1
    none = table.none
    shift = n.bit_length()
    mask = (1 << shift) - 1
    positions = np.flatnonzero(pair_ranks != none)
    heap = np.sort((pair_ranks[positions] << shift) | positions).tolist()
    cur = pair_ranks.tolist()
    cur += (none, none)
    nxt = list(range(1, n + 2))
    prv = list(range(-1, n))
    get = table.ranks.get
    merged = table.merged
    while heap:
        key = heappop(heap)
        i = key & mask
        rank = key >> shift
        if cur[i] != rank:
            continue
        j = nxt[i]
        k = nxt[j]
        z = merged[rank]
        ids[i] = z
        ids[j] = -1
        cur[j] = none
        nxt[i] = k
        prv[k] = i
        x = get((z, ids[k]), none)
        cur[i] = x
        if x != none:
            heappush(heap, (x << shift) | i)
        p = prv[i]
        x = get((ids[p], z), none)
        cur[p] = x
        if x != none:
            heappush(heap, (x << shift) | p)
    return ids


class _Symbols:
    """A word as a doubly linked list of symbols in numpy arrays of length ``n + 1``; slot
    ``n`` is a sentinel (an id in no pair) that ends the list on both sides; merged-away
    symbols get id ``-1``. ``pair[i]`` is
    the rank of the pair that starts at symbol ``i`` (`none` if it has no right neighbour, no
    merge, or was merged away). Pending pairs wait in buckets by rank: ``{rank: (positions,
    position arrays)}``, beside a heap of the ranks."""

    def __init__(self, table: MergeTable, raw: np.ndarray):
        byte_ids, byte_pairs, _, _ = table.arrays()
        n = self.n = raw.size
        none = table.none
        self.ids = np.empty(n + 1, dtype=np.int64)
        self.ids[:n] = byte_ids[raw]
        self.ids[n] = table.sentinel
        self.pair = np.full(n + 1, none, dtype=np.int64)
        self.pair[: n - 1] = byte_pairs[raw[:-1], raw[1:]]
        self.nxt = np.arange(1, n + 2, dtype=np.int64)
        self.nxt[n - 1 :] = n
        self.prv = np.arange(-1, n, dtype=np.int64)
        self.prv[0] = n
        positions = np.flatnonzero(self.pair[: n - 1] != none)
        small = np.uint16 if none < 2**16 else np.int64
        order = np.argsort(self.pair[positions].astype(small), kind="stable")
        ranks = self.pair[positions][order]
        positions = positions[order]
        cuts = np.flatnonzero(ranks[1:] != ranks[:-1]) + 1
        self.heap: list[int] = ranks[np.concatenate(([0], cuts))].tolist() if len(positions) else []
        parts = np.split(positions, cuts) if self.heap else []
        self.buckets: dict[int, tuple[list, list]] = {r: ([], [a]) for r, a in zip(self.heap, parts)}

    def push(self, rank: int, i: int) -> None:
        bucket = self.buckets.get(rank)
        if bucket is None:
            self.buckets[rank] = ([i], [])
            heappush(self.heap, rank)
        else:
            bucket[0].append(i)

    def push_many(self, ranks: np.ndarray, positions: np.ndarray) -> None:
        if len(ranks) < 16:
            for rank, i in zip(ranks.tolist(), positions.tolist()):
                self.push(rank, i)
            return
        order = np.argsort(ranks, kind="stable")
        ranks, positions = ranks[order], positions[order]
        cuts = np.flatnonzero(ranks[1:] != ranks[:-1]) + 1
        for rank, part in zip(ranks[np.concatenate(([0], cuts))].tolist(), np.split(positions, cuts)):
            bucket = self.buckets.get(rank)
            if bucket is None:
                self.buckets[rank] = ([], [part])
                heappush(self.heap, rank)
            else:
                bucket[1].append(part)


def _merge_by_rank(table: MergeTable, raw: np.ndarray) -> list[int]:
    """A monotone merge list: merge all pending pairs of the lowest pending rank, left to right.

    Merging never makes a pair of the same or a lower rank (monotone), so a rank's bucket is
    complete when it is popped; an entry whose pair has changed since is skipped. A rank with
    few pending pairs is merged by a Python loop, one with many by numpy gathers and scatters.
    """
    w = _Symbols(table, raw)
    ids, pair, nxt, prv = w.ids, w.pair, w.nxt, w.prv
    none = table.none
    get = table.ranks.get
    merged = table.merged
    push = w.push
    heap, buckets = w.heap, w.buckets
    while heap:
        rank = heappop(heap)
        singles, arrays = buckets.pop(rank)
        z = merged[rank]
        count = len(singles) + sum(map(len, arrays))
        if count >= LEVEL_BULK:
            _merge_level(table, w, rank, np.concatenate([np.array(singles, dtype=np.int64), *arrays]))
            continue
        for a in arrays:
            singles += a.tolist()
        singles.sort()
        for i in singles:
            if pair.item(i) != rank:
                continue
            j = nxt.item(i)
            k = nxt.item(j)
            ids[i] = z
            ids[j] = -1
            pair[j] = none
            nxt[i] = k
            prv[k] = i
            x = get((z, ids.item(k)), none)
            pair[i] = x
            if x != none:
                push(x, i)
            p = prv.item(i)
            x = get((ids.item(p), z), none)
            pair[p] = x
            if x != none:
                push(x, p)
        pair[w.n] = none
    kept = ids[: w.n]
    return kept[kept >= 0].tolist()


def _merge_level(table: MergeTable, w: _Symbols, rank: int, positions: np.ndarray) -> None:
    """Merge every pending pair of `rank` at once: the valid ones, left to right (in a run like
    ``a a a`` of the merge ``(a, a)`` the leftmost pair wins, as in `bpe_word`)."""
    _, _, merged, pair_hash = table.arrays()
    ids, pair, nxt, prv, n = w.ids, w.pair, w.nxt, w.prv, w.n
    none = table.none
    positions = np.sort(positions)
    p = positions[pair[positions] == rank]
    if len(p) > 1:
        p = p[np.concatenate(([True], p[1:] != p[:-1]))]
    q = nxt[p]
    left, right = table.pair[rank]
    if left == right and len(p) > 1:
        follows = np.zeros(len(p), dtype=bool)
        follows[1:] = q[:-1] == p[1:]
        if follows.any():
            heads = np.flatnonzero(~follows)
            offset = np.arange(len(p)) - heads[np.cumsum(~follows) - 1]
            p = p[offset % 2 == 0]
            q = nxt[p]
    if not len(p):
        return
    z = merged[rank]
    after = nxt[q]
    ids[p] = z
    ids[q] = -1
    pair[q] = none
    nxt[p] = after
    prv[after] = p
    before = prv[p]
    zs = np.full(len(p), z, dtype=np.int64)
    ranks = pair_hash.lookup(np.concatenate((ids[before], zs)), np.concatenate((zs, ids[after])))
    k = len(p)
    pair[p] = ranks[k:]
    pair[before] = ranks[:k]
    pair[n] = none
    where = np.concatenate((before, p))
    found = ranks != none
    w.push_many(ranks[found], where[found])
