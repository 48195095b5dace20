"""encode_file: text corpus -> uint16 ids, in parallel chunks, equal to encoding the whole text."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnlm
from fnlm import Tokenizer, encode_file
from fnlm.tokenizer.files import _cuttable_at, _npy_header

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    fixtures = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
    if not fixtures.is_dir():
        pytest.skip("../shared/fixtures is not present beside this checkout")
    return Tokenizer.from_files(fixtures / "gpt2_vocab.json", fixtures / "gpt2_merges.txt", [EOT])


def byte_tokenizer(specials=(EOT,)) -> Tokenizer:
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"th", 257: b" th", 258: b"e "}
    return Tokenizer(vocab, [(b"t", b"h"), (b" ", b"th"), (b"e", b" ")], list(specials))


@pytest.fixture
def corpus(fixtures_dir, tmp_path) -> Path:
    docs = [(fixtures_dir / n).read_text(encoding="utf-8") for n in ["tinystories_sample.txt", "german.txt", "address.txt"]]
    path = tmp_path / "corpus.txt"
    path.write_text(EOT.join(docs * 6), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_parallel_chunks_equal_whole_encode(gpt2, corpus, tmp_path, suffix):
    out = tmp_path / f"ids{suffix}"
    n = encode_file(gpt2, corpus, out, num_workers=2, chunk_bytes=2048, progress=False)
    expected = gpt2.encode(corpus.read_text(encoding="utf-8"))
    ids = np.load(out, mmap_mode="r") if suffix == ".npy" else np.memmap(out, dtype=np.uint16, mode="r")
    assert ids.dtype == np.uint16 and n == len(expected)
    assert ids.tolist() == expected
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_paths_tuple_and_serial(gpt2, corpus, tmp_path):
    gpt2.save(tmp_path / "v.json", tmp_path / "m.txt")
    encode_file((tmp_path / "v.json", tmp_path / "m.txt"), corpus, tmp_path / "a.npy", num_workers=1, progress=False)
    encode_file(gpt2, corpus, tmp_path / "b.npy", num_workers=2, chunk_bytes=4096, progress=False)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=st.lists(st.text(alphabet="the é\n'l<|>", max_size=40), max_size=8),
    chunk=st.integers(min_value=1, max_value=64),
)
def test_any_chunking_equals_encode(tmp_path, docs, chunk):
    tok = byte_tokenizer()
    text = EOT.join(docs)
    src = tmp_path / "docs.txt"
    src.write_bytes(text.encode("utf-8"))
    n = encode_file(tok, src, tmp_path / "ids.bin", num_workers=1, chunk_bytes=chunk, progress=False)
    ids = np.fromfile(tmp_path / "ids.bin", dtype="<u2")
    assert n == len(ids) and ids.tolist() == tok.encode(text)


def test_empty_file(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    assert encode_file(byte_tokenizer(), tmp_path / "e.txt", tmp_path / "e.npy", progress=False) == 0
    assert np.load(tmp_path / "e.npy").shape == (0,)


def test_npy_header_is_fixed_size_and_readable(tmp_path):
    for n in (0, 7, 10**12):
        assert len(_npy_header(n)) == 128
    (tmp_path / "x.npy").write_bytes(_npy_header(3) + np.array([1, 2, 65535], dtype="<u2").tobytes())
    assert np.load(tmp_path / "x.npy").tolist() == [1, 2, 65535]


def test_split_token_must_be_a_lone_special():
    assert _cuttable_at(EOT, [EOT])
    assert not _cuttable_at(EOT, [])
    assert not _cuttable_at(EOT, [EOT, EOT + EOT])
    assert not _cuttable_at(EOT, [EOT, "x<|end"])
    assert _cuttable_at(EOT, [EOT, "<|pad|>"])


def test_overlapping_specials_fall_back_to_one_chunk(tmp_path):
    tok = byte_tokenizer([EOT, EOT + EOT])
    text = f"the{EOT}{EOT}the e {EOT}x" * 50
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode_file(tok, tmp_path / "t.txt", tmp_path / "t.npy", num_workers=2, chunk_bytes=16, progress=False)
    assert any("one chunk" in str(w.message) for w in caught)
    assert np.load(tmp_path / "t.npy").tolist() == tok.encode(text)


def test_vocab_too_large_for_uint16(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {70_000: b"ab"}
    tok = Tokenizer(vocab, [(b"a", b"b")])
    (tmp_path / "t.txt").write_text("ab", encoding="utf-8")
    with pytest.raises(ValueError, match="70000"):
        encode_file(tok, tmp_path / "t.txt", tmp_path / "t.npy", progress=False)
    assert not (tmp_path / "t.npy").exists()


def test_non_utf8_input_names_the_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine text " + EOT.encode() + b"then \xff\xfe junk")
    with pytest.raises(ValueError, match="byte offset 28"):
        encode_file(byte_tokenizer(), tmp_path / "bad.txt", tmp_path / "bad.npy", num_workers=1, progress=False)
    assert not (tmp_path / "bad.npy").exists() and not (tmp_path / "bad.npy.tmp").exists()


def test_non_utf8_input_in_a_worker(tmp_path):
    data = (b"ok " + EOT.encode()) * 200 + b"\xc3("
    (tmp_path / "bad.txt").write_bytes(data)
    with pytest.raises(ValueError, match=f"byte offset {len(data) - 2}"):
        encode_file(byte_tokenizer(), tmp_path / "bad.txt", tmp_path / "bad.npy", num_workers=2, chunk_bytes=64, progress=False)


def test_bad_arguments(tmp_path):
    (tmp_path / "t.txt").write_text("x", encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        encode_file(byte_tokenizer(), tmp_path / "missing.txt", tmp_path / "o.npy", progress=False)
    with pytest.raises(TypeError):
        encode_file("not a tokenizer", tmp_path / "t.txt", tmp_path / "o.npy", progress=False)
    with pytest.raises(ValueError):
        encode_file(byte_tokenizer(), tmp_path / "t.txt", tmp_path / "o.npy", num_workers=0, progress=False)


def test_exported():
    assert fnlm.encode_file is encode_file and fnlm.Tokenizer is Tokenizer
