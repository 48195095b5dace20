"""get_batch sampling and the validated token-file loader."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import fnlm
from tests.adapters import run_get_batch


def test_get_batch_windows_and_uniform_starts():
    tokens = np.arange(100, dtype=np.uint16)
    context_length, batch_size, iters = 7, 32, 400
    counts: Counter[int] = Counter()
    for _ in range(iters):
        x, y = run_get_batch(tokens, batch_size, context_length, "cpu")
        assert x.shape == y.shape == (batch_size, context_length)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(context_length))
        counts.update(x[:, 0].tolist())
    starts = len(tokens) - context_length
    assert min(counts) == 0 and max(counts) == starts - 1
    n = iters * batch_size
    mean, sd = n / starts, math.sqrt(n * (1 / starts) * (1 - 1 / starts))
    assert all(abs(c - mean) < 5 * sd for c in counts.values())


def test_get_batch_generator_reproducible_and_from_tensor():
    tokens = np.random.default_rng(0).integers(0, 500, size=1000).astype(np.uint16)
    g1 = torch.Generator().manual_seed(123)
    state = g1.get_state()
    a = fnlm.get_batch(tokens, 4, 16, "cpu", generator=g1)
    g2 = torch.Generator()
    g2.set_state(state)
    b = fnlm.get_batch(torch.from_numpy(tokens.astype(np.int64)), 4, 16, "cpu", generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = fnlm.get_batch(tokens, 4, 16, "cpu", generator=g1)
    assert not torch.equal(a[0], c[0])


def test_get_batch_from_memmap(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(50, dtype=np.uint16).tofile(path)
    tokens = fnlm.load_tokens(path, vocab_size=50, context_length=8)
    x, y = fnlm.get_batch(tokens, 3, 8, "cpu")
    assert torch.equal(y, x + 1) and int(x.max()) <= 48


def test_get_batch_exact_fit():
    x, y = fnlm.get_batch(np.arange(5), 6, 4, "cpu")
    assert torch.equal(x, torch.arange(4).expand(6, 4)) and torch.equal(y, x + 1)


def test_get_batch_errors():
    with pytest.raises(ValueError, match="at least context_length"):
        fnlm.get_batch(np.arange(5), 2, 5, "cpu")
    with pytest.raises(ValueError, match="1-D"):
        fnlm.get_batch(np.zeros((4, 4), dtype=np.int64), 2, 2, "cpu")
    with pytest.raises(ValueError, match="integers"):
        fnlm.get_batch(np.zeros(20, dtype=np.float32), 2, 2, "cpu")
    with pytest.raises(ValueError, match=">= 1"):
        fnlm.get_batch(np.arange(20), 0, 2, "cpu")
    with pytest.raises((RuntimeError, AssertionError)):
        run_get_batch(np.arange(100), 4, 7, "cuda:99")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_batch_cuda():
    x, y = fnlm.get_batch(np.arange(100), 4, 8, "cuda")
    assert x.is_cuda and y.is_cuda and torch.equal(y, x + 1)


def test_load_tokens_npy_and_bin(tmp_path):
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint16)
    np.save(tmp_path / "a.npy", ids)
    ids.tofile(tmp_path / "a.bin")
    ids.astype(np.int32).tofile(tmp_path / "b.bin")
    for path, kw in ((tmp_path / "a.npy", {}), (tmp_path / "a.bin", {}), (tmp_path / "b.bin", {"dtype": np.int32})):
        tokens = fnlm.load_tokens(path, vocab_size=10, context_length=7, chunk_size=3, **kw)
        assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
        assert np.array_equal(tokens, ids)
    assert fnlm.load_tokens(tmp_path / "a.npy", dtype="uint16").dtype == np.uint16


def test_load_tokens_errors(tmp_path):
    ids = np.arange(10, dtype=np.uint16)
    np.save(tmp_path / "ok.npy", ids)
    ids.tofile(tmp_path / "ok.bin")
    with pytest.raises(ValueError, match=r"token id 9 .*vocab_size=9"):
        fnlm.load_tokens(tmp_path / "ok.npy", vocab_size=9, chunk_size=4)
    with pytest.raises(ValueError, match=r"holds 10 tokens; context_length=10"):
        fnlm.load_tokens(tmp_path / "ok.bin", context_length=10)
    with pytest.raises(ValueError, match="expected int32"):
        fnlm.load_tokens(tmp_path / "ok.npy", dtype=np.int32)
    with pytest.raises(ValueError, match="not a multiple"):
        fnlm.load_tokens(tmp_path / "ok.bin", dtype=np.int64)
    np.save(tmp_path / "f.npy", ids.astype(np.float32))
    with pytest.raises(ValueError, match="integers"):
        fnlm.load_tokens(tmp_path / "f.npy")
    np.save(tmp_path / "2d.npy", ids.reshape(2, 5))
    with pytest.raises(ValueError, match="1-D"):
        fnlm.load_tokens(tmp_path / "2d.npy")
    np.save(tmp_path / "neg.npy", np.array([1, 2, -3, 4], dtype=np.int32))
    with pytest.raises(ValueError, match=r"negative token id \(-3\)"):
        fnlm.load_tokens(tmp_path / "neg.npy")
    (tmp_path / "t.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=".npy or .bin"):
        fnlm.load_tokens(tmp_path / "t.txt")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        fnlm.load_tokens(tmp_path / "empty.bin")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="junk.npy"):
        fnlm.load_tokens(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError):
        fnlm.load_tokens(tmp_path / "missing.bin")


def test_load_tokens_checks_every_chunk(tmp_path):
    ids = np.zeros(1001, dtype=np.uint16)
    ids[-1] = 700
    ids.tofile(tmp_path / "late.bin")
    with pytest.raises(ValueError, match="token id 700 at position 1000"):
        fnlm.load_tokens(tmp_path / "late.bin", vocab_size=512, chunk_size=100)
    assert fnlm.load_tokens(tmp_path / "late.bin", vocab_size=701, chunk_size=100).shape == (1001,)


def test_get_batch_refuses_uint64_ids_that_do_not_fit_int64():
    """Before: `np.asarray(..., dtype=np.int64)` wrapped 2**63 + 5 to -9223372036854775803."""
    tokens = np.full(64, 2**63 + 5, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"id 9223372036854775813 .*does not fit int64"):
        fnlm.get_batch(tokens, 2, 4, "cpu")
    ok = np.arange(64, dtype=np.uint64)
    ok[10] = 2**63 - 1
    x, _ = fnlm.get_batch(ok, 200, 4, "cpu", generator=torch.Generator().manual_seed(0))
    assert int(x.max()) == 2**63 - 1 and int(x.min()) >= 0


def test_get_batch_checks_only_the_drawn_windows():
    tokens = np.arange(1000, dtype=np.int64)
    tokens[-1] = -7
    starts = torch.randint(0, 1000 - 8, (3,), generator=torch.Generator().manual_seed(1))
    clean = bool((starts + 8 < 999).all())
    assert clean
    x, y = fnlm.get_batch(tokens, 3, 8, "cpu", generator=torch.Generator().manual_seed(1))
    assert int(y.min()) >= 0
    with pytest.raises(ValueError, match=r"negative id \(-7\)"):
        fnlm.get_batch(np.full(20, -7), 2, 4, "cpu")
    with pytest.raises(ValueError, match=r"negative id \(-3\)"):
        fnlm.get_batch(torch.full((20,), -3), 2, 4, "cpu")


def test_get_batch_with_vocab_size_refuses_ids_the_model_cannot_embed():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = fnlm.get_batch(tokens, 4, 8, "cpu", vocab_size=100)
    assert int(y.max()) < 100
    with pytest.raises(ValueError, match=r"id 95 in the drawn windows, not below vocab_size=90"):
        fnlm.get_batch(np.full(100, 95, dtype=np.uint16), 4, 8, "cpu", vocab_size=90)
    with pytest.raises(ValueError, match="vocab_size=90"):
        fnlm.get_batch(torch.full((100,), 95), 4, 8, "cpu", vocab_size=90)


def test_get_batch_refuses_sizes_that_are_not_ints():
    """With type checking off (as users run it) a float size reached torch.randint / arange."""
    from tests.fresh_process import run_python

    out = run_python(
        """
        import json, numpy as np, fnlm
        errors = []
        for b, c in [(2.0, 4), (2, 4.5), (True, 4)]:
            try:
                fnlm.get_batch(np.arange(50), b, c, "cpu")
                errors.append(None)
            except TypeError as e:
                errors.append(str(e))
        print("RESULT " + json.dumps(errors))
        """
    )
    assert [e and e.split(" must")[0] for e in out] == ["batch_size", "context_length", "batch_size"], out
