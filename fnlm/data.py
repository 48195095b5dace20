"""Token files and language-modelling batches.

Token files hold one flat array of token ids: `.npy` (any integer dtype, opened with
`np.load(mmap_mode="r")`) or raw `.bin` (headerless little-endian ints, `uint16` by default, opened
with `np.memmap`). Nothing is read into memory up front: batches read only the rows they sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fnlm._progress import progress_bar
from fnlm.types import Int, Tensor

__all__ = ["get_batch", "load_tokens", "mix_seed", "batch_generator"]

DEFAULT_BIN_DTYPE = np.uint16


_INT64_MAX = np.iinfo(np.int64).max


def _check_batch_args(n: int, batch_size: int, context_length: int) -> None:
    for name, value in (("batch_size", batch_size), ("context_length", context_length)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size and context_length must be >= 1, got {batch_size}, {context_length}")
    if n < context_length + 1:
        raise ValueError(
            f"need at least context_length + 1 = {context_length + 1} tokens to make a batch, got {n}"
        )


def get_batch(
    tokens: np.ndarray | Int[Tensor, " tokens"],
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    *,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Sample `batch_size` windows uniformly from `tokens`: inputs and next-token targets.

    Start positions are drawn uniformly from `[0, len(tokens) - context_length)` with
    `torch.randint` (from `generator` when given, else torch's global generator), so a run is
    reproducible from that generator's state. `x[b] = tokens[s_b : s_b + context_length]` and
    `y[b] = tokens[s_b + 1 : s_b + context_length + 1]`. Only the sampled windows are read from a
    memmap. On a CUDA device the batch goes through pinned memory with a non-blocking copy.

    The drawn windows (only they, so a call costs the same for any file size) are checked: a
    negative id, an id that does not fit int64 (a `uint64` id of 2**63 or more, which a cast
    would wrap to a negative one) or, with `vocab_size`, an id not below it raises ValueError.
    Tensors on an accelerator are not checked (it would cost a device sync); check the file once
    with :func:`load_tokens` (`vocab_size=`).

    **Arguments:**

    - `tokens`: a 1-D integer array: `np.ndarray`, `np.memmap` (see :func:`load_tokens`) or tensor.
    - `batch_size`: number of windows.
    - `context_length`: tokens per window.
    - `device`: where to put the batch, e.g. `"cpu"` or `"cuda:0"`.
    - `generator`: a CPU `torch.Generator` for the start positions.
    - `vocab_size`: when given, every drawn id must be below it (the model's embedding rows).

    **Returns:**

    `(x, y)`, int64 tensors of shape `(batch_size, context_length)` on `device`.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array of ids, got shape {tuple(tokens.shape)}")
    if isinstance(tokens, np.ndarray):
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must hold integers, got dtype {tokens.dtype}")
    elif tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integers, got dtype {tokens.dtype}")
    n = int(tokens.shape[0])
    _check_batch_args(n, batch_size, context_length)
    starts = torch.randint(0, n - context_length, (batch_size,), generator=generator)
    offsets = torch.arange(context_length + 1)
    if isinstance(tokens, np.ndarray):
        rows = starts.numpy()[:, None] + offsets.numpy()[None, :]
        drawn = np.asarray(tokens[rows])
        _check_drawn_ids(int(drawn.min()), int(drawn.max()), vocab_size)
        windows = torch.from_numpy(drawn.astype(np.int64))
    else:
        drawn = tokens[(starts[:, None] + offsets[None, :]).to(tokens.device)]
        if drawn.device.type == "cpu":
            _check_drawn_ids(int(drawn.min()), int(drawn.max()), vocab_size)
        windows = drawn.to(torch.int64)
    x = windows[:, :-1].contiguous()
    y = windows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu" and torch.cuda.is_available():
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _check_drawn_ids(low: int, high: int, vocab_size: int | None) -> None:
    """The drawn windows' ids must be >= 0, fit int64 (a uint64 id >= 2**63 would wrap to a negative
    one), and lie below `vocab_size` when it is given."""
    if low < 0:
        raise ValueError(f"tokens hold a negative id ({low}) in the drawn windows; token ids are >= 0")
    if high > _INT64_MAX:
        raise ValueError(f"tokens hold id {high} in the drawn windows, which does not fit int64 (max {_INT64_MAX})")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(f"tokens hold id {high} in the drawn windows, not below vocab_size={vocab_size}")


def load_tokens(
    path: str | os.PathLike,
    *,
    dtype: str | np.dtype | type | None = None,
    vocab_size: int | None = None,
    context_length: int | None = None,
    chunk_size: int = 1 << 24,
    progress: bool = False,
) -> np.ndarray:
    """Open a token file memory-mapped (read-only) and validate it.

    Checks, each failing with a `ValueError` that names the file: the extension is `.npy` or
    `.bin`; the array is 1-D with an integer dtype (equal to `dtype` when given); a `.bin` file's
    size is a multiple of the item size; there are at least `context_length + 1` tokens; all ids
    lie in `[0, vocab_size)`. The id range is scanned in chunks of `chunk_size` tokens, so memory
    stays bounded for files larger than RAM.

    **Arguments:**

    - `path`: a `.npy` or `.bin` file.
    - `dtype`: the expected dtype of a `.npy`, or the element type of a `.bin` (default `uint16`).
    - `vocab_size`: when given, every id must be below it.
    - `context_length`: when given, the file must hold at least `context_length + 1` tokens.
    - `chunk_size`: tokens per chunk for the id-range scan.
    - `progress`: show a tqdm bar during the scan.

    **Returns:**

    A read-only 1-D `np.memmap` of token ids, ready for :func:`get_batch`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    want = np.dtype(dtype) if dtype is not None else None
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{str(path)!r} is not a readable .npy array: {err}") from err
        if want is not None and tokens.dtype != want:
            raise ValueError(f"{str(path)!r} holds dtype {tokens.dtype}, expected {want}")
    elif suffix == ".bin":
        want = want if want is not None else np.dtype(DEFAULT_BIN_DTYPE)
        size = path.stat().st_size
        if size % want.itemsize:
            raise ValueError(
                f"{str(path)!r} has {size} bytes, not a multiple of the {want} item size {want.itemsize}"
            )
        if size == 0:
            raise ValueError(f"{str(path)!r} is empty")
        tokens = np.memmap(path, dtype=want, mode="r")
    else:
        raise ValueError(f"{str(path)!r}: token files must end in .npy or .bin, got {path.suffix!r}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{str(path)!r} holds dtype {tokens.dtype}; token ids must be integers")
    if tokens.ndim != 1:
        raise ValueError(f"{str(path)!r} holds an array of shape {tokens.shape}; expected 1-D")
    n = tokens.shape[0]
    if context_length is not None and n < context_length + 1:
        raise ValueError(
            f"{str(path)!r} holds {n} tokens; context_length={context_length} needs at least {context_length + 1}"
        )
    if n == 0:
        raise ValueError(f"{str(path)!r} holds no tokens")
    if vocab_size is not None or np.issubdtype(tokens.dtype, np.signedinteger):
        _check_id_range(tokens, vocab_size, chunk_size, progress, str(path))
    return tokens


def _check_id_range(tokens: np.ndarray, vocab_size: int | None, chunk_size: int, progress: bool, name: str) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    starts = range(0, tokens.shape[0], chunk_size)
    for start in progress_bar(starts, desc=f"checking ids in {Path(name).name}", disable=not progress, unit="chunk"):
        chunk = tokens[start : start + chunk_size]
        if int(chunk.min()) < 0:
            pos = start + int(np.argmax(chunk < 0))
            raise ValueError(f"{name!r} holds a negative token id ({int(tokens[pos])}) at position {pos}")
        if vocab_size is not None and int(chunk.max()) >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(
                f"{name!r} holds token id {int(tokens[pos])} at position {pos}, not below vocab_size={vocab_size}"
            )


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (a splitmix-style hash): a pure function of `parts`.

    Example: `mix_seed(0, 1, 2) != mix_seed(0, 2, 1)`; the same parts always give the same seed.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 31)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def batch_generator(seed: int, shard: int, step: int) -> torch.Generator:
    """The CPU generator `get_batch` uses for data shard `shard` of `step`: a pure function of the three,
    so a batch never depends on how many batches were drawn before it (exact resume)."""
    return torch.Generator().manual_seed(mix_seed(seed, shard, step))
