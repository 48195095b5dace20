"""A seeded random fuzz of the tokenizer's C extension against its Python reference.

    python .ci/fuzz_merge.py [--seconds 30] [--seed 0]

Each round draws a random corpus and merge list and checks that

- `_merge.merge_words` (one BPE training merge) leaves the same words, pair counts, index, heap
  and returned new pairs as `fnlm.tokenizer.train._merge_words_py` on a copy of the same state;
- `_merge.bpe_many` gives `fnlm.tokenizer.bpe.bpe_word`'s ids for random pieces (short, empty,
  and past the C loop's 512-entry stack buffers), for trained and shuffled merge lists;
- `bpe_merges_from_counts` learns the same merges with the C step and with the Python step.

`.ci/sanitize.sh` runs it with the extension built under AddressSanitizer and UBSan, so a memory
error in any of these paths stops the run. Prints one summary line; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from fnlm.tokenizer import _merge, train
from fnlm.tokenizer.bpe import MergeTable, bpe_word
from fnlm.tokenizer.train import _merge_words_py, bpe_merges_from_counts

ALPHABETS = ["ab", "abc", "ab\u0101z", "ab\u0400\U00010000", "abcdefghij"]


def merge_state(words: list[str], counts: list[int]):
    where: dict[str, list[int]] = {}
    pair_counts: Counter = Counter()
    for wi, (w, c) in enumerate(zip(words, counts)):
        for i in range(len(w) - 1):
            where.setdefault(w[i : i + 2], []).append(wi)
            pair_counts[w[i : i + 2]] += c
    return list(words), list(counts), where, dict(pair_counts)


def check_merge_step(rng: random.Random) -> None:
    alphabet = rng.choice(ALPHABETS)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.choice([2, 3, 5, 14, 40, 600]))) for _ in range(rng.randint(1, 30))]
    counts = [rng.randint(1, 10**12) for _ in words]
    pairs = sorted({w[i : i + 2] for w in words for i in range(len(w) - 1)})
    k = rng.choice(pairs)
    z = rng.choice([t for t in ("z", "\u0102", "\U00010001", "y") if t not in k])
    keys = [chr(i) for i in range(0x10002)]
    results = []
    for impl in (_merge.merge_words, _merge_words_py):
        w, c, where, pair_counts = merge_state(words, counts)
        heap: list = []
        new = impl(w, c, where.pop(k), pair_counts, k, z, where, heap, keys)
        results.append((w, pair_counts, {p: sorted(v) for p, v in where.items()}, sorted(heap),
                        {p: sorted(v) for p, v in new.items()}))
    if results[0] != results[1]:
        raise AssertionError(f"merge_words differs from _merge_words_py: words={words!r} counts={counts} k={k!r} z={z!r}")


def random_merges(rng: random.Random) -> tuple[list[tuple[bytes, bytes]], bytes]:
    alphabet = rng.choice([b"ab", b"abc", b"ab c", bytes(range(97, 107))])
    corpus = {bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 12))): rng.randint(1, 5) for _ in range(30)}
    merges = bpe_merges_from_counts(corpus, rng.randint(0, 40), progress=False)
    if rng.random() < 0.5:
        rng.shuffle(merges)
    return merges, alphabet


def check_encode(rng: random.Random) -> None:
    merges, alphabet = random_merges(rng)
    token_id = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        token_id.setdefault(left + right, len(token_id))
    ranks: dict[tuple[int, int], int] = {}
    for r, (left, right) in enumerate(merges):
        ranks.setdefault((token_id[left], token_id[right]), r)
    table = MergeTable(range(256), ranks, [token_id[a + b] for a, b in merges])
    c_table = _merge.make_table(table.byte_ids, table.ranks, table.merged)
    pieces = [bytes(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 2, 7, 60, 513, 2000]))) for _ in range(rng.randint(1, 40))]
    want = [bpe_word(table, list(p)) for p in pieces]
    got = _merge.bpe_many(c_table, pieces)
    if got != want:
        raise AssertionError(f"bpe_many differs from bpe_word: merges={merges!r} pieces={pieces!r}")


def check_training(rng: random.Random) -> None:
    alphabet = rng.choice(ALPHABETS).encode("utf-8")
    corpus = {bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 30))): rng.randint(1, 6) for _ in range(rng.randint(1, 25))}
    n = rng.randint(0, 60)
    learned = []
    for impl in (_merge.merge_words, _merge_words_py):
        train._merge_words = impl
        learned.append(bpe_merges_from_counts(corpus, n, progress=False))
    train._merge_words = _merge.merge_words
    if learned[0] != learned[1]:
        raise AssertionError(f"training differs between the C and the Python merge step: corpus={corpus!r} n={n}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long to fuzz")
    p.add_argument("--seed", type=int, default=0, help="the first round's seed")
    args = p.parse_args()
    start, rounds = time.monotonic(), 0
    while time.monotonic() - start < args.seconds:
        rng = random.Random(args.seed + rounds)
        try:
            check_merge_step(rng)
            check_encode(rng)
            check_training(rng)
        except AssertionError as e:
            print(f"fuzz_merge: round {rounds} (seed {args.seed + rounds}): {e}", file=sys.stderr)
            return 1
        rounds += 1
    print(f"fuzz_merge: {rounds} rounds, C equals Python ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
