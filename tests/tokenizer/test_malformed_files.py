"""Malformed tokenizer files: each is one ValueError naming the file and the entry, never a bare
KeyError, TypeError or AttributeError from deep inside.

`tokenizer.json` (HF, `fnlm.interop.load_hf_tokenizer`) and `vocab.json` + `merges.txt` (GPT-2
style, `Tokenizer.from_files`), written by fnlm and then broken one way at a time.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fnlm.tokenizer import Tokenizer
from fnlm._interop_tokenizers import hf_tokenizer_json, load_hf_tokenizer

SPECIALS = ["<|endoftext|>", "<|im start|>", "<é>"]


def small_tokenizer() -> Tokenizer:
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b" x", 258: b"abc"}
    return Tokenizer(vocab, [(b"a", b"b"), (b" ", b"x"), (b"ab", b"c")], SPECIALS)


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path


def test_the_export_reads_back_with_specials_that_have_spaces_and_non_ascii(tmp_path):
    """HF gives an added token the id its text has in the model vocab: the export now lists the
    specials' own text there (before, `<|im start|>` got a new id in HF), and reads back."""
    tok = small_tokenizer()
    back = load_hf_tokenizer(write_json(tmp_path / "tokenizer.json", hf_tokenizer_json(tok)))
    assert back.fingerprint() == tok.fingerprint()
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "abc x<|im start|>ab<é> x<|endoftext|>"
    assert hf.encode(text).ids == tok.encode(text) == back.encode(text)


def broken(edit):
    doc = hf_tokenizer_json(small_tokenizer())
    doc = copy.deepcopy(doc)
    edit(doc)
    return doc


@pytest.mark.parametrize(
    "doc, match",
    [
        ("{not json", r"not a valid JSON tokenizer file"),
        ("[1, 2]", r"expected a JSON object, got list"),
        (broken(lambda d: d.pop("model")), r"'model' must be an object"),
        (broken(lambda d: d["model"].pop("vocab")), r"model\.vocab must be an object of token -> id, got NoneType"),
        (broken(lambda d: d["model"].update(vocab=[1, 2])), r"model\.vocab must be an object"),
        (broken(lambda d: d["model"]["vocab"].update(a="97")), r"model\.vocab\['a'\] must be an int id"),
        (broken(lambda d: d["model"]["vocab"].update(a=-1)), r"model\.vocab\['a'\] must be an int id"),
        (broken(lambda d: d["model"]["vocab"].update(a=2**40)), r"model\.vocab\['a'\] must be an int id in \[0, 2147483647\]"),
        (broken(lambda d: d["model"]["vocab"].update(zz=97)), r"model\.vocab gives id 97 to two tokens, 'a' and 'zz'"),
        (broken(lambda d: d["model"]["vocab"].update({"\u4e00": 900})), r"model\.vocab\['\u4e00'\]: .* maps to no byte"),
        (broken(lambda d: d["model"].pop("merges")), r"model\.merges must be a list, got NoneType"),
        (broken(lambda d: d["model"]["merges"].append("a")), r"model\.merges\[3\] must be 'left right' or \[left, right\]"),
        (broken(lambda d: d["model"]["merges"].append(["a", 7])), r"model\.merges\[3\] must be"),
        (broken(lambda d: d["model"]["merges"].append(["q", "r"])), r"merge 3 \(b'q', b'r'\): \[b'qr'\] not in the vocab"),
        (broken(lambda d: d["model"]["vocab"].pop("a")), r"vocab lacks 1 single-byte tokens"),
        (broken(lambda d: d.update(added_tokens={"id": 3})), r"added_tokens must be a list, got dict"),
        (broken(lambda d: d["added_tokens"].append("x")), r"added_tokens\[3\] must be an object"),
        (broken(lambda d: d["added_tokens"][0].pop("id")), r"added_tokens\[0\]\.id must be an int"),
        (broken(lambda d: d["added_tokens"][1].update(id="260")), r"added_tokens\[1\]\.id must be an int"),
        (broken(lambda d: d["added_tokens"][1].update(content=None)), r"added_tokens\[1\]\.content must be a non-empty string"),
        (broken(lambda d: d["added_tokens"][1].update(id=259)), r"added_tokens give id 259 to two special tokens"),
        (broken(lambda d: d["added_tokens"][0].update(id=97)), r"has id 97, which the vocab gives to another token"),
        (broken(lambda d: d.update(pre_tokenizer=[1])), r"pre_tokenizer must be an object"),
        (broken(lambda d: d["pre_tokenizer"].update(pretokenizers=[1, 2])), r"is not the GPT-2 byte-level pre-tokenizer"),
    ],
)
def test_malformed_tokenizer_json_is_one_value_error_naming_file_and_key(tmp_path, doc, match):
    path = write_json(tmp_path / "tokenizer.json", doc)
    with pytest.raises(ValueError, match=match) as err:
        load_hf_tokenizer(tmp_path)
    assert str(path) in str(err.value)


def saved(tmp_path: Path) -> tuple[Path, Path]:
    small_tokenizer().save(tmp_path)
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


@pytest.mark.parametrize(
    "vocab_edit, merges_edit, match, names",
    [
        (lambda v: v.replace('"a": 97', '"a": 4294967296'), None, r"token 'a' has id 4294967296, expected an int in \[0, 2147483647\]", "vocab"),
        (lambda v: v.replace('"a": 97', '"a": "97"'), None, r"token 'a' has id '97'", "vocab"),
        (lambda v: v.replace('"b": 98', '"b": 97'), None, r"id 97 is given to both 'a' and 'b'", "vocab"),
        (lambda v: v.replace('"a": 97,\n', ""), None, r"vocab lacks 1 single-byte tokens", "both"),
        (None, lambda m: m + "q r\n", r"merge 3 \(b'q', b'r'\): \[b'qr'\] not in the vocab", "both"),
        (None, lambda m: m + "a\n", r"line 6: expected 'left right', got 'a'", "merges"),
        (None, lambda m: m.replace('#special_tokens: ["', '#special_tokens: [7, "'), r"line 2: special tokens must be a JSON list of strings", "merges"),
        (lambda v: "{", None, r"not valid JSON", "vocab"),
        (lambda v: "[]", None, r"expected a JSON object of token -> id, got a JSON array", "vocab"),
    ],
)
def test_malformed_gpt2_files_are_one_value_error_naming_the_file(tmp_path, vocab_edit, merges_edit, match, names):
    vocab_path, merges_path = saved(tmp_path)
    if vocab_edit:
        vocab_path.write_text(vocab_edit(vocab_path.read_text(encoding="utf-8")), encoding="utf-8")
    if merges_edit:
        merges_path.write_text(merges_edit(merges_path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ValueError, match=match) as err:
        Tokenizer.from_files(tmp_path)
    shown = {"vocab": [vocab_path], "merges": [merges_path], "both": [vocab_path, merges_path]}[names]
    assert all(repr(str(p)) in str(err.value) for p in shown), str(err.value)
