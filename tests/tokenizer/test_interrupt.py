"""Ctrl-C during parallel BPE training or `encode_file`: the terminal sends SIGINT to the whole
process group; the workers ignore it and the parent alone raises KeyboardInterrupt, so the user
sees no worker tracebacks, no worker outlives the call, and no temporary file stays behind.
Also: `encode_file`'s output gets the mode the umask gives (it is written through `mkstemp`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fnlm.tokenizer import Tokenizer, encode_file

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/PID/status (Linux)")
REPO = Path(__file__).resolve().parents[2]
DOC = "Once upon a time there was a little cat named Tom. Tom liked fish and milk, 123 times a day.\n"


def write_corpus(path: Path, mb: float) -> Path:
    block = (DOC * 40 + "<|endoftext|>") * 200
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(int(mb * 1e6 / len(block)) + 1):
            f.write(block)
    return path


def interrupt(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code`; once it has two worker processes, send SIGINT to its process group (as Ctrl-C
    does). The child prints `interrupted` when KeyboardInterrupt reaches it."""
    env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while len(parent.children()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = parent.children()
    assert len(workers) >= 2 and proc.poll() is None, "the child must be interrupted while its workers run"
    time.sleep(0.3)
    ignoring = [ignores_sigint(w.pid) for w in workers]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived the call: {alive}"
    assert all(ignoring), "every worker ignores SIGINT (a busy one would print a traceback only after its C call)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ignores_sigint(pid: int) -> bool:
    """Whether process `pid` ignores SIGINT (the SigIgn mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def test_ctrl_c_during_parallel_bpe_training_is_one_keyboard_interrupt(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 40)
    proc = interrupt("""
        import sys
        from fnlm.tokenizer import train_bpe
        try:
            train_bpe(sys.argv[1], 300, ["<|endoftext|>"], num_workers=2, progress=False, chunk_bytes=1 << 16,
                      min_parallel_bytes=1)
            print("finished")
        except KeyboardInterrupt:
            print("interrupted")
    """, str(corpus))
    assert proc.stdout.strip() == "interrupted", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr


def test_ctrl_c_during_parallel_encode_file_is_one_keyboard_interrupt(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 40)
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"an", 257: b" t"}
    Tokenizer(vocab, [(b"a", b"n"), (b" ", b"t")], ["<|endoftext|>"]).save(tmp_path / "tok")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = interrupt("""
        import sys
        from fnlm.tokenizer import Tokenizer, encode_file
        tok = Tokenizer.from_files(sys.argv[2])
        try:
            encode_file(tok, sys.argv[1], sys.argv[3] + "/ids.npy", num_workers=2, chunk_bytes=1 << 16, progress=False)
            print("finished")
        except KeyboardInterrupt:
            print("interrupted")
    """, str(corpus), str(tmp_path / "tok"), str(out_dir))
    assert proc.stdout.strip() == "interrupted", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert list(out_dir.iterdir()) == [], "neither the output nor a temporary file"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_encode_file_output_follows_the_umask(tmp_path, umask, mode):
    """The output is written through `mkstemp` (0600) and renamed: it gets the umask's mode, as
    `open()` would give it."""
    (tmp_path / "in.txt").write_text(DOC * 10, encoding="utf-8")
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    old = os.umask(umask)
    try:
        encode_file(tok, tmp_path / "in.txt", tmp_path / "ids.bin", num_workers=1, progress=False)
    finally:
        os.umask(old)
    assert oct((tmp_path / "ids.bin").stat().st_mode & 0o777) == oct(mode)
    assert np.fromfile(tmp_path / "ids.bin", dtype="<u2").tolist() == tok.encode(DOC * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.bin", "in.txt"]


@pytest.mark.parametrize("kw, name", [({"num_workers": 2.5}, "num_workers"), ({"num_workers": 0}, "num_workers"),
                                      ({"chunk_bytes": 0}, "chunk_bytes"), ({"chunk_bytes": True}, "chunk_bytes"),
                                      ({"min_parallel_bytes": -1}, "min_parallel_bytes")])
def test_bpe_training_options_are_checked(tmp_path, kw, name):
    """Before: `num_workers=2.5` reached `multiprocessing.Pool` (a TypeError from deep inside)."""
    from fnlm.tokenizer import train_bpe

    (tmp_path / "t.txt").write_text(DOC * 5, encoding="utf-8")
    with pytest.raises((ValueError, TypeError), match=name):  # TypeError: the suite's type-check hook, first
        train_bpe(tmp_path / "t.txt", 260, [], progress=False, **kw)
