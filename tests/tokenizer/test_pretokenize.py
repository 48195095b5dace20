import io

from hypothesis import given, settings
from hypothesis import strategies as st

from fnlm.tokenizer.pretokenize import find_chunk_boundaries, iter_pretokens, split_on_special_tokens

EOT = "<|endoftext|>"


def test_docstring_example():
    f = io.BytesIO(b"ab<|e|>cd<|e|>ef")
    assert find_chunk_boundaries(f, b"<|e|>", target_chunk_bytes=4) == [0, 9, 16]


def test_split_longest_special_first():
    pieces = list(split_on_special_tokens("x<|a|><|a|>y<|a|>", ["<|a|>", "<|a|><|a|>"]))
    assert pieces == [("x", False), ("<|a|><|a|>", True), ("y", False), ("<|a|>", True)]


def test_pretokens_gpt2_pattern():
    assert list(iter_pretokens("I'll go  now, 123!\n\n")) == ["I", "'ll", " go", " ", " now", ",", " 123", "!", "\n\n"]


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.text(alphabet="ab é\n", max_size=30), min_size=1, max_size=12),
    target=st.integers(min_value=1, max_value=64),
)
def test_chunks_cover_file_and_start_at_separator(docs, target):
    data = EOT.join(docs).encode()
    cuts = find_chunk_boundaries(io.BytesIO(data), EOT.encode(), target_chunk_bytes=target)
    assert cuts[0] == 0 and cuts[-1] == len(data) or data == b""
    assert cuts == sorted(set(cuts))
    for c in cuts[1:-1]:
        assert data[c:].startswith(EOT.encode())
    assert b"".join(data[a:b] for a, b in zip(cuts, cuts[1:])) == data


def old_find_chunk_boundaries(file, split_token, *, target_chunk_bytes=16 << 20, min_chunks=1):
    """The boundaries before: one search per planned cut (a transcription, as the reference)."""
    file.seek(0, 2)
    size = file.tell()
    if size == 0:
        return [0]
    if not split_token:
        return [0, size]
    n = max(min_chunks, -(-size // max(1, target_chunk_bytes)))
    cuts = [0]
    for i in range(1, n):
        pos = max(int(i * size / n), cuts[-1])
        at = file.getvalue().find(split_token, pos)
        found = size if at == -1 else at
        if found > cuts[-1]:
            cuts.append(found)
    if cuts[-1] != size:
        cuts.append(size)
    return cuts


@settings(max_examples=300, deadline=None)
@given(
    docs=st.lists(st.text(alphabet="ab<|e>", max_size=40), min_size=1, max_size=12),
    target=st.integers(min_value=1, max_value=80),
    min_chunks=st.integers(min_value=1, max_value=40),
    sep=st.sampled_from([b"<|e|>", b"<", b"ab"]),
)
def test_chunk_cuts_equal_one_search_per_planned_cut(docs, target, min_chunks, sep):
    data = b"<|e|>".join(d.encode() for d in docs)
    kw = dict(target_chunk_bytes=target, min_chunks=min_chunks)
    assert find_chunk_boundaries(io.BytesIO(data), sep, **kw) == old_find_chunk_boundaries(io.BytesIO(data), sep, **kw)


def test_a_tiny_chunk_size_costs_one_search_per_separator():
    """Before: `target_chunk_bytes=1` planned a cut per byte and searched from each (4M searches
    of 4 KB windows for this 4 MB file: minutes). Now cuts that the last search passed are skipped."""
    import time

    data = (b"x" * 40_000 + EOT.encode()) * 100
    t0 = time.perf_counter()
    cuts = find_chunk_boundaries(io.BytesIO(data), EOT.encode(), target_chunk_bytes=1)
    assert time.perf_counter() - t0 < 5
    assert cuts == [0, *range(40_000, len(data), 40_013), len(data)]
