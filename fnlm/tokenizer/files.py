"""Encode a text file into a flat file of uint16 token ids, in parallel.

This is the "pretokenize to uint16" stage of the data pipeline (download -> train tokenizer ->
encode the text -> train). The output is either

- ``*.npy``: a 1-D ``uint16`` NumPy array (read it with ``np.load(path, mmap_mode="r")``), or
- anything else, e.g. ``*.bin``: the raw little-endian ``uint16`` ids with no header
  (read it with ``np.memmap(path, dtype=np.uint16, mode="r")``).

The file is cut into chunks at the document separator (``<|endoftext|>``), so that encoding
the chunks separately gives exactly the ids of encoding the whole file; worker processes
encode the chunks and the main process writes their ids in file order as they arrive, so
memory stays bounded by a few chunks however large the file.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np

from fnlm._progress import progress_bar
from fnlm.tokenizer.gpt2 import ENDOFTEXT
from fnlm.tokenizer.pretokenize import find_chunk_boundaries
from fnlm.tokenizer.tokenizer import Tokenizer

__all__ = ["encode_file", "MAX_UINT16_VOCAB"]

MAX_UINT16_VOCAB = 1 << 16
_NPY_HEADER_BYTES = 128


def _npy_header(num_tokens: int) -> bytes:
    """A fixed-size (128-byte) .npy v1.0 header for a 1-D little-endian uint16 array."""
    fields = "{'descr': '<u2', 'fortran_order': False, 'shape': (%d,), }" % num_tokens
    body = fields.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin-1")
    assert len(header) == _NPY_HEADER_BYTES
    return header


def _cuttable_at(split_token: str, special_tokens: Sequence[str]) -> bool:
    """True when cutting just before every ``split_token`` cannot cut through a special token.

    That needs `split_token` to be a special token itself, and no other special token to
    overlap it from the left (contain it, or end with a prefix of it, after its first char).
    """
    if split_token not in special_tokens:
        return False
    for other in special_tokens:
        if other == split_token:
            continue
        if other.find(split_token, 1) != -1 or _suffix_is_prefix(other, split_token):
            return False
    return True


def _suffix_is_prefix(other: str, token: str) -> bool:
    """True when a proper suffix of `other` (not all of it) is a prefix of `token`. Only the
    prefixes that end in `other`'s last character are compared (C-speed `find` and `endswith`),
    so long special tokens cost about their length, not its square."""
    limit = min(len(other) - 1, len(token))
    end = token.find(other[-1], 0, limit)
    while end != -1:
        if other.endswith(token[: end + 1]):
            return True
        end = token.find(other[-1], end + 1, limit)
    return False


_worker_state: dict = {}


def _init_worker(tokenizer: Tokenizer, input_path: str) -> None:
    _worker_state["tokenizer"] = tokenizer
    _worker_state["path"] = input_path


def _init_pool_worker(tokenizer: Tokenizer, input_path: str) -> None:
    """A pool worker ignores SIGINT: Ctrl-C reaches the whole process group, and the parent alone
    answers it (its `with Pool` terminates the workers), so no worker prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(tokenizer, input_path)


def current_umask() -> int:
    """The process's umask, read from /proc (setting it to read it back would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _encode_chunk(bounds: tuple[int, int]) -> tuple[np.ndarray, int]:
    start, end = bounds
    path = _worker_state["path"]
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        raise ValueError(
            f"{path!r} is not valid UTF-8: byte offset {at} holds {data[e.start : e.start + 4]!r} ({e.reason})"
        ) from None
    ids = _worker_state["tokenizer"].encode(text)
    return np.array(ids, dtype=np.uint16), end - start


def _as_tokenizer(tokenizer: Tokenizer | Sequence) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, tuple | list) and len(tokenizer) in (2, 3):
        return Tokenizer.from_files(*tokenizer)
    raise TypeError(
        "encode_file needs a Tokenizer or a (vocab_path, merges_path[, special_tokens]) tuple, "
        f"got {type(tokenizer).__name__} {tokenizer!r:.80}"
    )


def default_num_workers() -> int:
    """The CPUs this process may use (``os.sched_getaffinity`` where it exists)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def encode_file(
    tokenizer: Tokenizer | Sequence,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_workers: int | None = None,
    split_token: str = ENDOFTEXT,
    chunk_bytes: int = 4 << 20,
    progress: bool = True,
) -> int:
    """Encode a UTF-8 text file into a file of uint16 token ids (``.npy``, or raw ``.bin``).

    **Arguments:**

    - `tokenizer`: a `Tokenizer`, or ``(vocab_path, merges_path[, special_tokens])`` for
      `Tokenizer.from_files`. Its largest id must fit in uint16 (vocab of at most 65,536).
    - `input_path`: the text file, UTF-8.
    - `output_path`: where to write; a ``.npy`` suffix writes a NumPy array file, any other
      suffix the raw ids. Written to a new temporary file beside it (mode as the umask gives)
      and renamed when complete.
    - `num_workers`: worker processes (default: the usable CPUs, at most one per chunk);
      ``1`` encodes in this process.
    - `split_token`: the document separator at which the file is cut into chunks. It must be
      one of the tokenizer's special tokens; otherwise the file is encoded as one chunk (with
      a warning when it is large), since a cut elsewhere could change the ids.
    - `chunk_bytes`: the target chunk size; chunks end at the next `split_token`.
    - `progress`: show a tqdm bar over input bytes.

    **Returns:** the number of tokens written. The ids equal ``tokenizer.encode(text)``.

    Errors: ValueError if the vocabulary is too large for uint16 or the file is not UTF-8
    (naming the byte offset); FileNotFoundError for a missing input. Ctrl-C raises
    KeyboardInterrupt in the caller only (the workers ignore SIGINT and are terminated) and
    leaves no temporary file.
    """
    tok = _as_tokenizer(tokenizer)
    if tok.vocab_size > MAX_UINT16_VOCAB:
        raise ValueError(
            f"the tokenizer's ids go up to {tok.vocab_size - 1}; uint16 holds ids below {MAX_UINT16_VOCAB}"
        )
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
        raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
    input_path = os.fspath(input_path)
    output_path = os.fspath(output_path)
    size = os.path.getsize(input_path)

    cuttable = _cuttable_at(split_token, tok.special_tokens)
    with open(input_path, "rb") as f:
        bounds = find_chunk_boundaries(f, split_token.encode("utf-8") if cuttable else None, target_chunk_bytes=chunk_bytes)
    if not cuttable and size > chunk_bytes:
        warnings.warn(
            f"{split_token!r} is not a usable separator for this tokenizer (special tokens "
            f"{tok.special_tokens!r}); encoding {input_path!r} ({size} bytes) as one chunk in one process",
            stacklevel=2,
        )
    chunks = list(zip(bounds, bounds[1:]))
    workers = min(num_workers or default_num_workers(), max(1, len(chunks)))

    return _encode_chunks(tok, input_path, output_path, chunks, workers, size, progress)


def _encode_chunks(tok: Tokenizer, input_path: str, output_path: str, chunks: list, workers: int, size: int,
                   progress: bool) -> int:
    """Encode `chunks` of the input with `workers` processes into `output_path` (atomically)."""
    is_npy = output_path.endswith(".npy")
    folder, name = os.path.split(os.path.abspath(output_path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as out, progress_bar(total=size, desc="encode", disable=not progress, unit="B", unit_scale=True) as bar:
            if is_npy:
                out.write(_npy_header(0))
            if workers == 1:
                _init_worker(tok, input_path)
                total = _write_all(map(_encode_chunk, chunks), out, bar)
            else:
                with multiprocessing.get_context().Pool(
                    workers, initializer=_init_pool_worker, initargs=(tok, input_path)
                ) as pool:
                    total = _write_all(pool.imap(_encode_chunk, chunks), out, bar)
            if is_npy:
                out.seek(0)
                out.write(_npy_header(total))
        os.replace(tmp_path, output_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    finally:
        _worker_state.clear()
    return total


def _write_all(results, out, bar) -> int:
    total = 0
    for ids, nbytes in results:
        out.write(ids.astype("<u2", copy=False).tobytes())
        total += len(ids)
        bar.update(nbytes)
    return total
