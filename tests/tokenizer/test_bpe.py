"""The three ways of applying merges (`fnlm.tokenizer.bpe`) give the same ids as BPE's definition.

`reference_bpe` below is the rule written out as directly as possible (recompute every pair's
rank, merge the leftmost lowest one, repeat); it is independent of the library code. Merge
lists come from training on small random corpora (monotone, like every trained list) and from
shuffling such a list (usually not monotone, which sends `bpe_long` to its heap).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fnlm.tokenizer import _merge, bpe
from fnlm.tokenizer.bpe import MergeTable, bpe_long, bpe_word, bpe_words
from fnlm.tokenizer.train import bpe_merges_from_counts


def reference_bpe(word: bytes, merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    rank = {}
    for r, pair in enumerate(merges):
        rank.setdefault(pair, r)
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        ranks = [rank.get(pair, len(merges)) for pair in zip(parts, parts[1:])]
        best = min(ranks)
        if best == len(merges):
            break
        i = ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def make_table(merges: list[tuple[bytes, bytes]]) -> tuple[MergeTable, dict[bytes, int]]:
    token_id = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        token_id.setdefault(left + right, len(token_id))
    ranks: dict[tuple[int, int], int] = {}
    merged = []
    for r, (left, right) in enumerate(merges):
        ranks.setdefault((token_id[left], token_id[right]), r)
        merged.append(token_id[left + right])
    return MergeTable(range(256), ranks, merged), token_id


def trained_merges(seed: int, alphabet: bytes, count: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    words = {bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 12))): rng.randint(1, 5) for _ in range(30)}
    return bpe_merges_from_counts(words, count, progress=False)


def ids_of(parts: list[bytes], token_id: dict[bytes, int]) -> list[int]:
    return [token_id[p] for p in parts]


alphabets = st.sampled_from([b"ab", b"abc", b"a", b"ab c", bytes(range(97, 107))])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), alphabet=alphabets, count=st.integers(0, 40), shuffle=st.booleans(), data=st.data())
def test_all_encoders_equal_the_definition(seed, alphabet, count, shuffle, data):
    merges = trained_merges(seed, alphabet, count)
    if shuffle:
        random.Random(seed).shuffle(merges)
    table, token_id = make_table(merges)
    words = data.draw(st.lists(st.binary(min_size=1, max_size=60).map(lambda b: bytes(alphabet[x % len(alphabet)] for x in b)), min_size=1, max_size=80))
    expected = [ids_of(reference_bpe(w, merges), token_id) for w in words]
    assert [list(bpe_word(table, list(w))) for w in words] == expected
    assert [list(t) for t in bpe_words(table, words)] == expected
    saved = bpe.BATCH_MIN_WORDS
    bpe.BATCH_MIN_WORDS = 1
    try:
        assert [list(t) for t in bpe_words(table, words)] == expected, "numpy rounds until every word is done"
    finally:
        bpe.BATCH_MIN_WORDS = saved
    assert [bpe_long(table, w) for w in words] == expected
    c_table = _merge.make_table(table.byte_ids, table.ranks, table.merged)
    assert [list(t) for t in _merge.bpe_many(c_table, words)] == expected, "the C loop"


def test_c_encoder_on_long_and_empty_pieces_and_bad_input():
    merges = trained_merges(3, b"abc", 30)
    table, token_id = make_table(merges)
    c_table = _merge.make_table(table.byte_ids, table.ranks, table.merged)
    words = [b"", b"a", bytes(random.Random(0).choice(b"abc") for _ in range(3000))]  # past the stack buffer
    assert [list(t) for t in _merge.bpe_many(c_table, words)] == [ids_of(reference_bpe(w, merges), token_id) for w in words]
    with pytest.raises(TypeError):
        _merge.bpe_many(c_table, ["abc"])
    with pytest.raises(ValueError, match="256"):
        _merge.make_table(range(255), {}, [])
    with pytest.raises(ValueError, match="out of range"):
        _merge.make_table(range(256), {(1, 2): 5}, [300])
    with pytest.raises(ValueError, match="PyCapsule"):
        _merge.bpe_many(object(), [b"ab"])


def test_trained_lists_are_monotone_and_shuffled_ones_mostly_not():
    merges = trained_merges(0, b"abc", 30)
    assert make_table(merges)[0].monotone
    shuffled = [m for m in merges]
    random.Random(1).shuffle(shuffled)
    assert not make_table(shuffled)[0].monotone


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("alphabet", [b"a", b"ab", b"abcdef"])
def test_long_words_take_the_bulk_and_heap_paths(alphabet, shuffle):
    merges = trained_merges(3, alphabet, 25)
    if shuffle:
        random.Random(3).shuffle(merges)
    table, token_id = make_table(merges)
    rng = random.Random(0)
    for n in (2, 3, 17, 1000, 5000):
        word = bytes(rng.choice(alphabet) for _ in range(n))
        expected = ids_of(reference_bpe(word, merges), token_id)
        assert bpe_long(table, word) == expected
        assert list(bpe_word(table, list(word))) == expected


def test_batch_with_few_words_left_finishes_in_python(monkeypatch):
    merges = trained_merges(5, b"abc", 30)
    table, token_id = make_table(merges)
    words = [b"abcabcabcabc" * 3, b"a", b"ab", b"cab"]
    expected = [ids_of(reference_bpe(w, merges), token_id) for w in words]
    for at_least in (1, 2, 1000):
        monkeypatch.setattr(bpe, "BATCH_MIN_WORDS", at_least)
        assert [list(t) for t in bpe_words(table, words)] == expected


def test_pair_hash_lookup_matches_the_dict():
    rng = random.Random(0)
    ranks = {(rng.randrange(5000), rng.randrange(5000)): r for r in range(3000)}
    table = MergeTable(range(256), ranks, [0] * 3000)
    pair_hash = table.arrays()[3]
    pairs = list(ranks)[:500] + [(rng.randrange(6000), rng.randrange(6000)) for _ in range(500)] + [(-1, 3), (7, -1)]
    left = np.array([p[0] for p in pairs])
    right = np.array([p[1] for p in pairs])
    assert pair_hash.lookup(left, right).tolist() == [ranks.get(p, 3000) for p in pairs]
