"""The C extension (`fnlm/tokenizer/_merge.c`) does not trust its caller.

Its functions are private (`train_bpe` and `Tokenizer` call them with lists they built), but a C
function that reads freed memory when handed a hostile object is a crash or a silent wrong
answer. Each hostile call runs in a child process, so that a crash fails the test instead of
killing pytest: objects whose `__index__` empties the input lists (a SEGV and a heap
use-after-free before), a garbage-collector callback that empties the list being read, a
re-entrant call from Python code the function ran, and ids beyond what the C table holds (which
gave other ids than the Python path). `.ci/sanitize.sh` runs this file under AddressSanitizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fnlm.tokenizer import Tokenizer, _merge
from fnlm.tokenizer.bpe import MAX_TOKEN_ID, MergeTable, bpe_word

REPO = Path(__file__).resolve().parents[2]
KEYS = "[chr(i) for i in range(300)]"


def run_child(code: str) -> str:
    """Run `code` with the extension; it prints one line, which is returned. `PYTHONMALLOC=malloc`
    sends every object to malloc, so that freed memory is not reused silently by pymalloc."""
    env = dict(os.environ, PYTHONMALLOC="malloc")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", "from fnlm.tokenizer import _merge\n" + textwrap.dedent(code)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


def test_where_list_index_that_empties_the_list_is_refused():
    """Before: the loop kept the list's old length and read past the emptied list (SEGV)."""
    out = run_child(f"""
        class Evil:
            def __index__(self):
                where_list.clear()
                return 0
        where_list = [Evil()] + list(range(1, 2000))
        words, counts = ["abab"] * 2000, [1] * 2000
        try:
            _merge.merge_words(words, counts, where_list, {{"ab": 4000, "ba": 2000}}, "ab", "z", {{}}, [], {KEYS})
            print("no error")
        except TypeError as e:
            print("TypeError:", e)
    """)
    assert out == "TypeError: where_list must hold ints, got Evil"


def test_count_index_that_replaces_the_word_is_refused():
    """Before: the count's `__index__` replaced the word being rewritten, whose characters were
    then read from freed memory (heap-use-after-free under ASan)."""
    out = run_child(f"""
        class Evil:
            def __index__(self):
                words[0] = "q"
                return 1
        words = ["ab" * 3000 + "c"]
        try:
            _merge.merge_words(words, [Evil()], [0], {{"ab": 3000, "ba": 2999, "bc": 1}}, "ab", "z", {{}}, [], {KEYS})
            print("no error", len(words[0]))
        except TypeError as e:
            print("TypeError:", e)
    """)
    assert out == "TypeError: counts must hold ints, got Evil"


def test_make_table_ids_whose_index_empties_the_list_are_refused():
    """Before: `PySequence_Fast` returned the list itself, and the next id was read from the array
    the first id's `__index__` had freed."""
    out = run_child("""
        class Evil:
            def __index__(self):
                ids.clear()
                return 0
        ids = [Evil()] + list(range(1, 256))
        try:
            _merge.make_table(ids, {}, [])
            print("no error")
        except TypeError as e:
            print("TypeError:", e)
    """)
    assert out == "TypeError: byte ids must be ints, got Evil"


def test_pieces_emptied_by_a_collection_during_bpe_many():
    """A garbage-collector callback (as a finalizer could) empties `pieces` while `bpe_many` runs.
    Before: the loop kept reading the freed list. Now it works on a private copy: the right ids."""
    out = run_child("""
        import gc
        table = _merge.make_table(range(256), {(97, 98): 0}, [256])
        pieces = [bytes([97, 98, 99 + i % 50]) * 3 for i in range(3000)]
        want = _merge.bpe_many(table, list(pieces))
        seen = [0, False]
        def callback(phase, info):
            if phase == "start" and seen[1]:
                seen[0] += 1
                if seen[0] == 40:
                    pieces.clear()
        gc.callbacks.append(callback)
        gc.set_threshold(1)
        seen[1] = True
        got = _merge.bpe_many(table, pieces)
        seen[1] = False
        gc.set_threshold(700)
        print("cleared" if not pieces else "not cleared", got == want, seen[0] >= 40)
    """)
    assert out == "cleared True True"


def test_a_reentrant_merge_words_call_is_refused():
    """A count whose `+` calls `merge_words` again. Before: the inner call emptied the shared
    scratch under the outer one, which then skipped its count updates without an error."""
    out = run_child(f"""
        class Count(int):
            def __add__(self, other):
                _merge.merge_words(["xy"], [1], [0], {{"xy": 1}}, "xy", "w", {{}}, [], {KEYS})
                return int(self) + other
        pair_counts = {{"xa": Count(5), "ab": 5, "bx": 5}}
        try:
            _merge.merge_words(["xabx"] * 5, [1] * 5, list(range(5)), pair_counts, "ab", "z", {{}}, [], {KEYS})
            print("no error", pair_counts)
        except RuntimeError as e:
            print("RuntimeError:", e)
    """)
    assert out == "RuntimeError: merge_words is not re-entrant (called from code it ran)"


def test_ids_beyond_the_c_table_are_refused_in_c_and_in_python():
    """Ids of 2**32 and more were cut to 32 bits in the C table's pair keys: the C loop and the
    Python path gave different ids for the same word. Both now refuse ids above 2**31 - 1."""
    big = 2**32 + 300
    vocab = {i: bytes([i]) for i in range(256)} | {big: b"ab", big + 1: b"abc"}
    ranks, merged = {(97, 98): 0, (big, 99): 1}, [big, big + 1]
    assert bpe_word(MergeTable(range(256), ranks, merged), [97, 98, 99]) == (big + 1,)
    with pytest.raises(ValueError, match=r"merged ids must lie in \[0, 2147483647\]"):
        _merge.make_table(range(256), ranks, merged)
    with pytest.raises(ValueError, match="a pair id or rank is out of range"):
        _merge.make_table(range(256), {(97, big): 0}, [256])
    with pytest.raises(ValueError, match=r"merged ids must lie in \[0, 2147483647\]"):
        _merge.make_table(range(256), {(97, 98): 0}, [2**31])
    with pytest.raises(ValueError, match=r"byte ids must lie in \[0, 2147483647\]"):
        _merge.make_table([*range(255), 2**40], {}, [])
    with pytest.raises(ValueError, match=rf"vocab id {big} .* above the largest id {MAX_TOKEN_ID}"):
        Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c")])
    top = {i: bytes([i]) for i in range(256)} | {MAX_TOKEN_ID: b"ab"}
    assert Tokenizer(top, [(b"a", b"b")]).encode("abc") == [MAX_TOKEN_ID, 99]
    with pytest.raises(ValueError, match=r"special token '<s>' would get id 2147483648"):
        Tokenizer(top, [(b"a", b"b")], ["<s>"])


def test_int_subclasses_still_work_and_other_types_are_type_errors():
    class Id(int):
        pass

    table = _merge.make_table([Id(i) for i in range(256)], {(Id(97), Id(98)): Id(0)}, (Id(256),))
    assert _merge.bpe_many(table, [b"abab", b"ba"]) == [(256, 256), (98, 97)]
    with pytest.raises(TypeError, match="pair ids must be ints, got float"):
        _merge.make_table(range(256), {(97.0, 98): 0}, [256])
    with pytest.raises(TypeError, match="words must be str"):
        _merge.merge_words([b"ab"], [1], [0], {"ab": 1}, "ab", "z", {}, [], [chr(i) for i in range(300)])
    with pytest.raises(TypeError, match="counts must hold ints, got float"):
        _merge.merge_words(["ab"], [1.0], [0], {"ab": 1}, "ab", "z", {}, [], [chr(i) for i in range(300)])
