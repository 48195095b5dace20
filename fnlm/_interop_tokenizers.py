"""Tokenizer formats for `fnlm.interop`: Hugging Face's ``tokenizer.json`` and llama2.c's
``tokenizer.bin``.

A fnlm `Tokenizer` is byte-level BPE with the GPT-2 pre-tokenizer, which HF `tokenizers`
expresses as a ``BPE`` model (vocab and merges in GPT-2's byte-to-unicode strings, no unknown
token, no byte fallback, merges not skipped) behind a ``Split`` on the GPT-2 pattern and a
``ByteLevel`` pre-tokenizer, with each special token an added token. Both libraries then apply
the lowest-ranked merge first, leftmost first among equals, so they give the same ids.

A vocabulary that reaches the same bytes by two merges has two ids for one token; fnlm encodes
to the smaller id, and so does the exported file, which keeps only that id (HF's vocab is a map
from string to id). The larger id is not in the file: HF cannot decode it.
"""

from __future__ import annotations

import heapq
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fnlm.tokenizer import Tokenizer
from fnlm.tokenizer.bpe import MAX_TOKEN_ID
from fnlm.tokenizer.gpt2 import str_to_token, token_to_str
from fnlm.tokenizer.pretokenize import GPT2_PATTERN

__all__ = ["hf_tokenizer_json", "write_hf_tokenizer", "load_hf_tokenizer", "Llama2cTokenizer", "load_llama2c_tokenizer"]

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_GPT2_SPLIT = {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False}


def hf_tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer.json`` document (a dict) that HF `tokenizers` reads to the same ids as `tokenizer`.

    **Arguments:**

    - `tokenizer`: a fnlm `Tokenizer`.

    **Returns:** a JSON-serializable dict.
    """
    vocab: dict[str, int] = {}
    for idx in sorted(tokenizer.vocab):
        vocab.setdefault(token_to_str(tokenizer.vocab[idx]), idx)
    for s in tokenizer.special_tokens:  # HF gives an added token the id of its text in the vocab, else a new one
        vocab.setdefault(s, tokenizer.special_ids[s])
    added = [
        {"id": tokenizer.special_ids[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s in tokenizer.special_tokens
    ]
    model = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
        "vocab": vocab,
        "merges": [[token_to_str(left), token_to_str(right)] for left, right in tokenizer.merges],
    }
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [_GPT2_SPLIT, _BYTE_LEVEL]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": model,
    }


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    `out_dir`, so that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline.

    The first special token (fnlm's document separator, e.g. ``<|endoftext|>``) is the EOS token.
    """
    out = Path(out_dir)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(hf_tokenizer_json(tokenizer), f, ensure_ascii=False, indent=1)
    specials = {"eos_token": tokenizer.special_tokens[0]} if tokenizer.special_tokens else {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **specials,
    }
    for name, doc in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)


def _check_hf_pipeline(doc: dict[str, Any], where: str) -> None:
    model = doc.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{where}: 'model' must be an object (the BPE model), got {type(model).__name__}")
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: model.type is {model.get('type')!r}; fnlm's tokenizer is 'BPE'")
    neutral = {"byte_fallback": False, "ignore_merges": False, "continuing_subword_prefix": None,
               "end_of_word_suffix": None, "dropout": None}
    for key, value in neutral.items():
        if model.get(key, value) != value:
            raise ValueError(f"{where}: model.{key} is {model[key]!r}; fnlm's byte-level BPE needs {value!r}")
    if doc.get("normalizer") is not None:
        raise ValueError(f"{where}: normalizer is {json.dumps(doc['normalizer'])[:200]}; fnlm's tokenizer has none")
    pre = doc.get("pre_tokenizer") or {}
    if not isinstance(pre, dict):
        raise ValueError(f"{where}: pre_tokenizer must be an object, got {type(pre).__name__}")
    steps = pre.get("pretokenizers")
    if pre.get("type") == "Sequence" and isinstance(steps, list) and len(steps) == 2 and all(isinstance(x, dict) for x in steps):
        split, byte_level = steps
        ours = split == _GPT2_SPLIT and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
    else:
        split, byte_level, ours = None, pre, False
    gpt2 = byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex", True) is True and split is None
    if not (ours or gpt2) or byte_level.get("add_prefix_space", False):
        raise ValueError(
            f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not the GPT-2 byte-level pre-tokenizer fnlm uses"
        )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _hf_added(doc: dict[str, Any], where: str) -> list[tuple[int, str]]:
    """The special added tokens, ``(id, content)`` in id order; ValueError naming the entry."""
    added = doc.get("added_tokens", [])
    if not isinstance(added, list):
        raise ValueError(f"{where}: added_tokens must be a list, got {type(added).__name__}")
    out = []
    for i, token in enumerate(added):
        if not isinstance(token, dict):
            raise ValueError(f"{where}: added_tokens[{i}] must be an object, got {token!r:.80}")
        if not token.get("special"):
            continue
        if not _is_id(token.get("id")):
            raise ValueError(f"{where}: added_tokens[{i}].id must be an int in [0, {MAX_TOKEN_ID}], got {token.get('id')!r:.80}")
        if not isinstance(token.get("content"), str) or not token["content"]:
            raise ValueError(f"{where}: added_tokens[{i}].content must be a non-empty string, got {token.get('content')!r:.80}")
        out.append((token["id"], token["content"]))
    ids = [i for i, _ in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: added_tokens give id {next(i for i in ids if ids.count(i) > 1)} to two special tokens")
    return sorted(out)


def _hf_vocab(model: dict[str, Any], specials: dict[str, int], where: str) -> dict[int, bytes]:
    """``{id: bytes}`` from model.vocab (GPT-2 byte-level strings; a special token's own text, as
    `hf_tokenizer_json` writes it beside, is skipped); ValueError naming the entry."""
    raw = model.get("vocab")
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: model.vocab must be an object of token -> id, got {type(raw).__name__}")
    vocab: dict[int, bytes] = {}
    for text, idx in raw.items():
        if not _is_id(idx):
            raise ValueError(f"{where}: model.vocab[{text!r:.60}] must be an int id in [0, {MAX_TOKEN_ID}], got {idx!r:.60}")
        if specials.get(text) == idx:
            continue
        try:
            token = str_to_token(text)
        except ValueError as e:
            raise ValueError(f"{where}: model.vocab[{text!r:.60}]: {e}") from None
        if vocab.setdefault(idx, token) != token:
            raise ValueError(f"{where}: model.vocab gives id {idx} to two tokens, {token_to_str(vocab[idx])!r:.60} and {text!r:.60}")
    return vocab


def _hf_merges(model: dict[str, Any], where: str) -> list[tuple[bytes, bytes]]:
    raw = model.get("merges")
    if not isinstance(raw, list):
        raise ValueError(f"{where}: model.merges must be a list, got {type(raw).__name__}")
    merges = []
    for i, m in enumerate(raw):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) and x for x in pair):
            raise ValueError(f"{where}: model.merges[{i}] must be 'left right' or [left, right], got {m!r:.80}")
        try:
            merges.append((str_to_token(pair[0]), str_to_token(pair[1])))
        except ValueError as e:
            raise ValueError(f"{where}: model.merges[{i}]: {e}") from None
    return merges


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a byte-level BPE ``tokenizer.json`` (one `export_hf` wrote, or a GPT-2-style one) into a
    fnlm `Tokenizer` that encodes to the same ids.

    **Arguments:**

    - `path`: the ``tokenizer.json`` file, or the directory holding it.

    **Returns:** the `Tokenizer`; its special tokens are the file's special added tokens.
    A ValueError names the file and the setting fnlm cannot represent (a normalizer, byte fallback,
    another pre-tokenizer, ...) or the malformed entry (not JSON, a missing or mistyped key, an id
    out of range or given twice, a merge of unknown tokens); FileNotFoundError when there is no file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a valid JSON tokenizer file ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    _check_hf_pipeline(doc, where)
    added = _hf_added(doc, where)
    vocab = _hf_vocab(doc["model"], {text: idx for idx, text in added}, where)
    merges = _hf_merges(doc["model"], where)
    for idx, text in added:
        raw = text.encode("utf-8", "surrogatepass")
        if vocab.get(idx, raw) != raw:
            raise ValueError(f"{where}: added token {text!r} has id {idx}, which the vocab gives to another token")
        vocab[idx] = raw
    try:
        tokenizer = Tokenizer(vocab, merges, [text for _, text in added])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    wrong = {t: (i, tokenizer.special_ids[t]) for i, t in added if tokenizer.special_ids[t] != i}
    if wrong:
        raise ValueError(f"{where}: special tokens whose bytes are also an ordinary token get another id (file, fnlm): {wrong}")
    return tokenizer


class Llama2cTokenizer:
    """llama2.c's tokenizer (a sentencepiece BPE vocabulary as its ``tokenizer.bin`` stores it),
    with run.c's encoding and decoding.

    - `pieces`: each id's text as bytes (sentencepiece's ``▁`` already replaced by a space);
      ids 0, 1, 2 are ``<unk>``, BOS and EOS, and pieces ``<0x00>`` .. ``<0xFF>`` stand for raw bytes.
    - `scores`: each piece's merge score (higher merges first).

    `decode` follows run.c: a piece after BOS loses its leading space, ``<0xXX>`` pieces are that
    byte; BOS and EOS decode to nothing (run.c never prints them). `encode` follows run.c too:
    optional BOS, a leading space piece (sentencepiece's dummy prefix), one piece per character
    (its UTF-8 bytes as byte tokens ``3 + byte`` when the character is no piece), then repeatedly
    merge the adjacent pair whose joined text is the highest-scoring piece (leftmost on ties).
    """

    bos_id = 1
    eos_id = 2

    def __init__(self, pieces: list[bytes], scores: list[float]):
        if len(pieces) != len(scores):
            raise ValueError(f"pieces and scores differ in length: {len(pieces)} vs {len(scores)}")
        if len(pieces) < 259:
            raise ValueError(f"{len(pieces)} pieces; llama2.c needs <unk>, BOS, EOS and 256 byte pieces (259)")
        self.pieces = list(pieces)
        self.scores = list(scores)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _piece_bytes(self, prev: int | None, token: int) -> bytes:
        if token in (self.bos_id, self.eos_id):
            return b""
        piece = self.pieces[token]
        if prev == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return piece
        return piece

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (invalid UTF-8 becomes U+FFFD); ValueError on an id outside the vocab."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.pieces)]
        if bad:
            raise ValueError(f"decode: ids {bad[:8]} are outside the vocab [0, {len(self.pieces)})")
        data = b"".join(self._piece_bytes(prev, tok) for prev, tok in zip([None, *ids], ids))
        return data.decode("utf-8", errors="replace")

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` as run.c's `encode` computes them (see the class docstring).

        run.c rescans every adjacent pair after each merge (quadratic: minutes for a prompt of
        10,000 characters); here candidate pairs wait in a heap keyed by (score, position), so the
        highest score, leftmost on ties, is merged first as in run.c, in O(n log n)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        tokens = [self.bos_id] if bos else []
        if text:
            if b" " not in self._ids:
                raise ValueError("encode: the vocabulary has no ' ' piece (sentencepiece's dummy prefix)")
            tokens.append(self._ids[b" "])
        for char in text:
            raw = char.encode("utf-8")
            if raw in self._ids:
                tokens.append(self._ids[raw])
            else:
                tokens.extend(3 + b for b in raw)
        return self._merge(tokens) + ([self.eos_id] if eos else [])

    def _pair(self, left: int, right: int) -> tuple[float, int] | None:
        """(score, id) of the piece that joins two tokens, if it is one run.c would merge."""
        idx = self._ids.get(self.pieces[left] + self.pieces[right])
        if idx is None or not self.scores[idx] > -1e10:  # run.c starts its best score at -1e10
            return None
        return self.scores[idx], idx

    def _merge(self, ids: list[int]) -> list[int]:
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if 0 <= i and j < n and (found := self._pair(ids[i], ids[j])) is not None:
                heapq.heappush(heap, (-found[0], i, ids[i], ids[j], found[1]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, idx = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] != left or j >= n or ids[j] != right:
                continue  # stale: one of the two was merged since
            ids[i], ids[j] = idx, -1
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            push(i)
            push(prv[i])
        return [t for t in ids if t >= 0]


def load_llama2c_tokenizer(path: str | os.PathLike) -> Llama2cTokenizer:
    """Read llama2.c's ``tokenizer.bin``: an int32 ``max_token_length``, then per token a float32
    score, an int32 byte length and the bytes, until the end of the file.

    **Arguments:**

    - `path`: the file.

    **Returns:** a `Llama2cTokenizer`. A truncated or malformed file raises ValueError.
    """
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise ValueError(f"{os.fspath(path)!r} is not a llama2.c tokenizer.bin: {len(data)} bytes")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces: list[bytes] = []
    scores: list[float] = []
    pos = 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError(f"{os.fspath(path)!r}: truncated entry for token {len(pieces)} at byte {pos}")
        score, length = struct.unpack_from("<fi", data, pos)
        if not 0 <= length <= max(max_len, 0) or pos + 8 + length > len(data):
            raise ValueError(
                f"{os.fspath(path)!r}: token {len(pieces)} at byte {pos} has length {length} "
                f"(max_token_length {max_len}, {len(data) - pos - 8} bytes left)"
            )
        pieces.append(data[pos + 8 : pos + 8 + length])
        scores.append(score)
        pos += 8 + length
    if len(pieces) < 259:
        raise ValueError(f"{os.fspath(path)!r}: {len(pieces)} tokens; llama2.c needs <unk>, BOS, EOS and 256 byte tokens")
    return Llama2cTokenizer(pieces, scores)
