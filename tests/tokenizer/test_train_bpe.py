"""Tests for the BPE trainer.

Known answers: ``../shared/fixtures/train-bpe-reference-{merges.txt,vocab.json}`` are the
CS336 reference result for ``corpus.en`` (vocab 500, ``<|endoftext|>``), stored in GPT-2's
byte-to-unicode encoding; `_gpt2_unicode_to_byte` below decodes them. Properties: the fast
trainer equals `slow_train_bpe`, a direct transcription of the algorithm (full recount of every
pair per merge, same tie-break), on hypothesis-generated corpora.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnlm
import fnlm.tokenizer.train as train_module
from fnlm.tokenizer.pretokenize import ASCII_GPT2_REGEX, GPT2_PATTERN, GPT2_REGEX
from fnlm.tokenizer.train import bpe_merges_from_counts, count_pretokens, train_bpe
from tests.adapters import run_train_bpe

EOT = "<|endoftext|>"


def _gpt2_unicode_to_byte() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _decode_gpt2(token: str) -> bytes:
    table = _gpt2_unicode_to_byte()
    return bytes(table[ch] for ch in token)


def slow_merges(word_counts: dict[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """BPE by the definition: recount every adjacent pair, merge the max (count, pair) everywhere."""
    words = {tuple(bytes([x]) for x in w): c for w, c in word_counts.items() if c > 0}
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: dict[tuple[bytes, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def slow_train_bpe(text: str, vocab_size: int, special_tokens: list[str]):
    if special_tokens:
        alternatives = sorted(special_tokens, key=len, reverse=True)
        pieces = regex.split("|".join(regex.escape(s) for s in alternatives), text)
    else:
        pieces = [text]
    word_counts = Counter(tok.encode("utf-8") for piece in pieces for tok in regex.findall(GPT2_PATTERN, piece))
    merges = slow_merges(dict(word_counts), vocab_size - 256 - len(special_tokens))
    values = [s.encode() for s in special_tokens] + [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
    return dict(enumerate(values)), merges


def _write(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_reference_merges_and_vocab(fixtures_dir, workers):
    vocab, merges = run_train_bpe(
        fixtures_dir / "corpus.en", 500, [EOT], num_workers=workers, progress=False,
        chunk_bytes=16 << 10, min_parallel_bytes=0,
    )
    with open(fixtures_dir / "train-bpe-reference-merges.txt", encoding="utf-8") as f:
        ref_merges = [tuple(_decode_gpt2(t) for t in line.rstrip("\n").split(" ")) for line in f if line.strip()]
    with open(fixtures_dir / "train-bpe-reference-vocab.json", encoding="utf-8") as f:
        ref_vocab = {i: (tok.encode() if tok == EOT else _decode_gpt2(tok)) for tok, i in json.load(f).items()}
    assert merges == ref_merges
    assert set(vocab) == set(ref_vocab)
    assert set(vocab.values()) == set(ref_vocab.values())


def test_special_tokens_never_merged_across(fixtures_dir):
    vocab, merges = train_bpe(fixtures_dir / "tinystories_sample.txt", 1000, [EOT], progress=False)
    assert vocab[0] == EOT.encode()
    others = [v for i, v in vocab.items() if i != 0]
    assert not any(b"<|" in v or b"|>" in v or b"endoftext" in v for v in others)
    assert not any(b"<|" in a + b for a, b in merges)
    assert len(vocab) == 257 + len(merges) and len(set(vocab.values())) == len(vocab)
    text = (fixtures_dir / "tinystories_sample.txt").read_text(encoding="utf-8")
    assert (vocab, merges) == slow_train_bpe(text, 1000, [EOT])


def test_vocab_order_and_docstring_example(tmp_path):
    path = _write(tmp_path, "low low lower")
    vocab, merges = train_bpe(path, 258, [], progress=False)
    assert merges == [(b"o", b"w"), (b"l", b"ow")]
    assert vocab[257] == b"low" and vocab[0] == b"\x00" and vocab[255] == b"\xff"
    vocab, merges = train_bpe(path, 262, ["<|a|>", "<|b|>"], progress=False)
    assert vocab[0] == b"<|a|>" and vocab[1] == b"<|b|>" and vocab[2] == b"\x00"
    assert [vocab[258 + i] for i in range(len(merges))] == [a + b for a, b in merges]
    assert bpe_merges_from_counts({b"abab": 1, b"ab": 1}, 2, progress=False) == [(b"a", b"b"), (b"ab", b"ab")]


def test_stops_when_no_pair_is_left(tmp_path):
    path = _write(tmp_path, "ab ab")
    vocab, merges = train_bpe(path, 1000, [], progress=False)
    assert merges == [(b"a", b"b"), (b" ", b"ab")]
    assert len(vocab) == 258


def test_count_pretokens_splits_on_specials(tmp_path):
    path = _write(tmp_path, "a a<|endoftext|>a<|x|> a")
    counts = count_pretokens(path, [EOT, "<|x|>"], num_workers=1, progress=False)
    assert counts == Counter({"a": 2, " a": 2})


def test_overlapping_specials_longest_first(tmp_path):
    path = _write(tmp_path, "xy<|e|><|e|>xy<|e|>x")
    counts = count_pretokens(path, ["<|e|>", "<|e|><|e|>"], num_workers=1, progress=False)
    assert counts == Counter({"xy": 2, "x": 1})


words_strategy = st.dictionaries(
    st.text(alphabet="aab\u00e9\U0001f600", min_size=1, max_size=12).map(lambda s: s.encode("utf-8")),
    st.integers(min_value=1, max_value=5),
    max_size=15,
)


MERGE_IMPLS = {"c": train_module._merge_words, "python": train_module._merge_words_py}


def _merges_with(impl: str, word_counts, num_merges):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "_merge_words", MERGE_IMPLS[impl])
        return bpe_merges_from_counts(word_counts, num_merges, progress=False)


def test_merge_loop_extension_is_built():
    """`pip install` compiles `fnlm/tokenizer/_merge.c`; where it could not, training falls back
    to the Python loop silently, so this checks the build happened."""
    from fnlm.tokenizer import _merge

    assert train_module._merge_words is _merge.merge_words


@settings(max_examples=300, deadline=None)
@given(word_counts=words_strategy, num_merges=st.integers(min_value=0, max_value=40))
def test_merges_equal_slow_trainer_on_word_counts(word_counts, num_merges):
    expected = slow_merges(word_counts, num_merges)
    for impl in MERGE_IMPLS:
        assert _merges_with(impl, word_counts, num_merges) == expected, impl


def test_same_bytes_from_two_merges_is_one_symbol():
    word_counts = {b"aaab": 3, b"xab": 2, b"aab": 2, b"aaaab": 1, b"ba": 1, b"aaaa": 2}
    for n in range(12):
        for impl in MERGE_IMPLS:
            assert _merges_with(impl, word_counts, n) == slow_merges(word_counts, n), impl


def _merge_state(words, counts):
    where, pair_counts = {}, Counter()
    for wi, (w, c) in enumerate(zip(words, counts)):
        for i in range(len(w) - 1):
            where.setdefault(w[i : i + 2], []).append(wi)
            pair_counts[w[i : i + 2]] += c
    return list(words), list(counts), where, dict(pair_counts)


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.text(alphabet="abz\u0101\u0400", min_size=2, max_size=14), min_size=1, max_size=12),
    data=st.data(),
)
def test_c_merge_step_equals_python_step(words, data):
    """One merge step, C against Python, on the same state: the words, the pair counts, the
    index, the heap and the returned new pairs agree (lists compared as multisets). The new
    token may already occur in the words (`z` = "z": two merges that spell the same bytes; it is
    never one of the pair's own tokens), and the characters cover three string kinds."""
    counts = data.draw(st.lists(st.integers(1, 10**12), min_size=len(words), max_size=len(words)))
    pairs = sorted({w[i : i + 2] for w in words for i in range(len(w) - 1)})
    k = data.draw(st.sampled_from(pairs))
    z = data.draw(st.sampled_from([t for t in ("z", "\u0102", "\U00010000") if t not in k]))  # never a or b
    key = [chr(i) for i in range(0x10001)]
    results = []
    for impl in MERGE_IMPLS.values():
        w, c, where, pair_counts = _merge_state(words, counts)
        heap: list = []
        new = impl(w, c, where.pop(k), pair_counts, k, z, where, heap, key)
        results.append((w, pair_counts, {p: sorted(v) for p, v in where.items()}, sorted(heap),
                        {p: sorted(v) for p, v in new.items()}))
    assert results[0] == results[1]
    merged = results[0][0]
    assert merged == [w.replace(k, z) for w in words]
    assert all(type(x) is str and x == x.encode("utf-8").decode("utf-8") for x in merged)


def test_c_merge_step_rejects_bad_input():
    merge = MERGE_IMPLS["c"]
    w, c, where, pair_counts = _merge_state(["abab"], [1])
    with pytest.raises(ValueError, match="two-character pair"):
        merge(w, c, [0], pair_counts, "abc", "z", where, [], [])
    with pytest.raises(IndexError):
        merge(w, c, [5], pair_counts, "ab", "z", where, [], ["k"] * 200)
    with pytest.raises(KeyError):
        merge(["xab"], [1], [0], {}, "ab", "z", {}, [], ["k"] * 200)
    with pytest.raises(TypeError):
        merge(w, c, [0], pair_counts, "ab", "z", where, (), ["k"] * 200)


docs_strategy = st.lists(
    st.text(alphabet=st.sampled_from(list("ab cé 1²\n\t'sll!\u00a0\u3000的\U0001f600<|>")), max_size=40),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=docs_strategy, extra=st.integers(min_value=0, max_value=60), specials=st.sampled_from([[], [EOT], [EOT, "<|x|>"]]))
def test_train_bpe_equals_slow_trainer(tmp_path, docs, extra, specials):
    sep = specials[0] if specials else ""
    text = sep.join(docs)
    if len(specials) > 1:
        text = text.replace("c", specials[1])
    path = _write(tmp_path, text)
    vocab_size = 256 + len(specials) + extra
    assert train_bpe(path, vocab_size, specials, num_workers=1, progress=False) == slow_train_bpe(text, vocab_size, specials)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_ascii_pattern_equals_gpt2_pattern(text):
    assert ASCII_GPT2_REGEX.findall(text) == GPT2_REGEX.findall(text)


def test_multi_worker_equals_single_worker(tmp_path, fixtures_dir):
    base = (fixtures_dir / "tinystories_sample.txt").read_text(encoding="utf-8")
    docs = [d for d in base.split(EOT) if d.strip()]
    text = EOT.join(f"{d} ünïcødé {i} 的" for i in range(40) for d in docs)
    path = _write(tmp_path, text)
    single = train_bpe(path, 600, [EOT], num_workers=1, progress=False)
    multi = train_bpe(path, 600, [EOT], num_workers=2, progress=False, chunk_bytes=8 << 10, min_parallel_bytes=0)
    assert multi == single
    many = count_pretokens(path, [EOT], num_workers=3, progress=False, chunk_bytes=4 << 10, min_parallel_bytes=0)
    assert many == count_pretokens(path, [EOT], num_workers=1, progress=False)


def test_progress_bars_can_be_shown(tmp_path, capsys):
    path = _write(tmp_path, "hello world<|endoftext|>hello there")
    train_bpe(path, 260, [EOT], progress=True)
    err = capsys.readouterr().err
    assert "pre-tokenize" in err and "merges" in err
    train_bpe(path, 260, [EOT], progress=False)
    assert capsys.readouterr().err == ""


def test_vocab_size_too_small(tmp_path):
    path = _write(tmp_path, "abc")
    with pytest.raises(ValueError, match=r"vocab_size=257 .* 258"):
        train_bpe(path, 257, ["<|a|>", "<|b|>"], progress=False)


def test_bad_argument_types(tmp_path):
    path = _write(tmp_path, "abc")
    with pytest.raises(TypeError, match="endoftext"):
        train_bpe(path, 300, EOT, progress=False)
    with pytest.raises(TypeError, match="300.5"):
        train_bpe(path, 300.5, [EOT], progress=False)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_bpe(missing, 300, [EOT], progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_input_names_file_and_offset(tmp_path, workers):
    good = ("hello world " * 50 + EOT) * 20
    data = good.encode() + b"bad \xff byte" + good.encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    offset = len(good.encode()) + 4
    with pytest.raises(ValueError, match=rf"bad\.txt.*offset {offset}"):
        train_bpe(path, 300, [EOT], num_workers=workers, progress=False, chunk_bytes=1024, min_parallel_bytes=0)


def test_exported():
    assert fnlm.train_bpe is train_bpe


def test_chunks_cut_at_a_special_not_inside_another(tmp_path):
    text = "".join(f"w{i} x<|a|>v{i} <|a|>" for i in range(300))
    path = _write(tmp_path, text)
    specials = ["<|a|>", "x<|a|>"]
    single = count_pretokens(path, specials, num_workers=1, progress=False)
    multi = count_pretokens(path, specials, num_workers=2, progress=False, chunk_bytes=64, min_parallel_bytes=0)
    assert multi == single
    assert "x" not in single and single["w"] == 300 and single[" "] == 600


# ---- long words (a line of letters or digits with no space is one pre-token)


@settings(max_examples=200, deadline=None)
@given(word_counts=words_strategy, num_merges=st.integers(min_value=0, max_value=40), big=st.sampled_from([0, 1, 3, 8]))
def test_long_word_path_equals_slow_trainer(word_counts, num_merges, big):
    saved = train_module.BIG_WORD
    train_module.BIG_WORD = big  # every word longer than `big` goes through the linked-list path
    try:
        for impl in MERGE_IMPLS:
            assert _merges_with(impl, word_counts, num_merges) == slow_merges(word_counts, num_merges), impl
    finally:
        train_module.BIG_WORD = saved


def test_one_long_line_equals_slow_trainer(tmp_path):
    rng = random.Random(0)
    text = "".join(rng.choice("abcab") for _ in range(3_000)) + " x " + "12" * 700 + "<|endoftext|>" + "ab" * 800
    path = _write(tmp_path, text)
    assert train_bpe(path, 256 + 1 + 60, [EOT], progress=False, num_workers=1) == slow_train_bpe(text, 256 + 1 + 60, [EOT])


def test_a_long_line_trains_and_starts_like_the_definition(tmp_path):
    """A 200 kB single-word line: every merge touches it (quadratic before the linked list;
    `benchmarks/bpe_train_long_line.py` times a 1 MB one)."""
    rng = random.Random(1)
    path = _write(tmp_path, "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000)))
    vocab, merges = train_bpe(path, 2_000, [EOT], progress=False, num_workers=1)
    assert len(vocab) == 2_000 and len(merges) == 2_000 - 257
    counts = {b"".join(bytes([c]) for c in path.read_bytes()): 1}
    assert merges[:50] == slow_merges(counts, 50)
