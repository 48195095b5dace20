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
