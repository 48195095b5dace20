"""Benchmark: fnlm.train_bpe against HF `tokenizers`' BpeTrainer (time, CPU time, peak memory).

Corpus: the GCIDE dictionary (GNU Collaborative International Dictionary of English), from the
Debian package `dict-gcide` (``apt-get install -y dict-gcide``) at
``/usr/share/dictd/gcide.dict.dz``. That file is dictzip, which is gzip-compatible, so Python's
`gzip` reads it. The entries are located with ``gcide.index`` (dictd's base64 offsets and
lengths; each distinct entry once, in file order), decoded as UTF-8 (the three stray cp1252
bytes in the 0.48 release become U+FFFD) and joined with ``<|endoftext|>`` into a temporary
text file of about 41.5 MB. Another text file can be given with ``--input``.

Each trainer runs in its own fresh child process. Memory is sampled every 200 ms with psutil
over that process and all its descendants (the fnlm pre-tokenization workers): the figure is
the peak of the summed PSS (proportional set size, so pages shared between a forked worker and
its parent are not counted twice). The child's footprint right after its imports is printed
too (fnlm's child imports only `fnlm.tokenizer`: no torch). CPU time
(user + system, the trainer process and its reaped workers, training only) is printed beside the
wall time: on a shared machine it is the steadier figure.

HF setup: ``Tokenizer(BPE())``, ``ByteLevel(add_prefix_space=False)`` pre-tokenizer (the
GPT-2 regex), ``BpeTrainer(vocab_size, special_tokens=[<|endoftext|>],
initial_alphabet=ByteLevel.alphabet(), show_progress=False)``, trained with
``train([path])``. HF does not split documents on the special token before pre-tokenizing
(the separator's bytes are counted as text) and breaks ties between equally frequent pairs its
own way, so the two merge lists differ a little; this script measures cost, the tests measure
correctness.

Usage: ``python benchmarks/bpe_train.py [--vocab-size 10000] [--workers N] [--input FILE]``.
`benchmarks/bpe_train_long_line.py` runs the same children on a file of one 1 MB line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fnlm.tokenizer import ENDOFTEXT as EOT  # noqa: E402
from harness import print_done, print_machine  # noqa: E402

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    v = 0
    for ch in s:
        v = v * 64 + B64.index(ch)
    return v


def build_gcide_corpus(out: Path) -> int:
    """Write the GCIDE entries joined by ``<|endoftext|>`` to `out`; returns its size in bytes."""
    if not GCIDE.exists() or not GCIDE_INDEX.exists():
        raise SystemExit(
            f"{GCIDE} not found: install it with `apt-get update && apt-get install -y dict-gcide`, "
            "or pass --input FILE"
        )
    data = gzip.open(GCIDE).read()
    spans = set()
    with open(GCIDE_INDEX, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                spans.add((_b64(parts[1]), _b64(parts[2])))
    entries = [data[o : o + n].decode("utf-8", errors="replace") for o, n in sorted(spans)]
    out.write_text(EOT.join(entries), encoding="utf-8")
    return out.stat().st_size


CHILD = r"""
import json, resource, sys, time
which, path, vocab_size, workers, EOT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
if which == "fnlm":
    from fnlm.tokenizer import train_bpe
else:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
import psutil
print(json.dumps({"import_mb": psutil.Process().memory_full_info().pss / 2**20}), flush=True)
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
c0, t0 = cpu(), time.perf_counter()
if which == "fnlm":
    vocab, merges = train_bpe(path, vocab_size, [EOT], progress=False,
                                   num_workers=None if workers == "auto" else int(workers))
    n = len(vocab)
else:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([path], trainer)
    n = tok.get_vocab_size()
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": cpu() - c0, "vocab": n}), flush=True)
"""


def _tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_child(which: str, path: Path, vocab_size: int, workers: str, cap: float | None = None) -> dict | None:
    """Run one trainer in a fresh process; returns seconds, vocab size, peak and import PSS (MB),
    or None when it ran longer than `cap` seconds (then it is killed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FNLM_TYPECHECK", None)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, which, str(path), str(vocab_size), workers, EOT],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    proc = psutil.Process(child.pid)
    peak = 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    start = time.perf_counter()
    while child.poll() is None:
        if cap is not None and time.perf_counter() - start > cap:
            for p in [*proc.children(recursive=True), proc]:
                p.kill()
            child.wait()
            return None
        try:
            peak = max(peak, _tree_pss(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    reader.join()
    if child.returncode != 0:
        raise SystemExit(f"{which} trainer failed with exit code {child.returncode}")
    result: dict = {}
    for line in lines:
        result.update(json.loads(line))
    result["peak_mb"] = peak / 2**20
    result["cap"] = cap
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--workers", default="auto", help="fnlm pre-tokenization workers (default: cpu count)")
    parser.add_argument("--input", type=Path, default=None, help="text file (default: GCIDE, built on the fly)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each trainer; the best time is kept")
    args = parser.parse_args()
    started = print_machine(threads=f"fnlm pre-tokenization workers: {args.workers}")

    with tempfile.TemporaryDirectory() as tmp:
        if args.input is None:
            path = Path(tmp) / "gcide.txt"
            size = build_gcide_corpus(path)
            name = "GCIDE (entries joined by <|endoftext|>)"
        else:
            path, size, name = args.input, args.input.stat().st_size, str(args.input)
        print(f"corpus: {name}, {size / 1e6:.1f} MB; vocab_size={args.vocab_size}; "
              f"cpu_count={os.cpu_count()}; fnlm workers={args.workers}")
        results = {}
        for which in ("hf", "fnlm"):
            runs = [run_child(which, path, args.vocab_size, args.workers) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_mb"] = max(r["peak_mb"] for r in runs)
            results[which] = best
            print(f"{which:>5}: {best['seconds']:7.2f} s (CPU {best['cpu']:6.1f} s)   peak PSS {best['peak_mb']:7.1f} MB "
                  f"(after imports {best['import_mb']:.0f} MB)   vocab {best['vocab']}   "
                  f"times {[round(r['seconds'], 2) for r in runs]}")
        f, h = results["fnlm"], results["hf"]
        print(f"ratio fnlm/HF: time {f['seconds'] / h['seconds']:.2f}x   CPU time {f['cpu'] / h['cpu']:.2f}x   peak PSS {f['peak_mb'] / h['peak_mb']:.2f}x   "
              f"peak PSS above imports {(f['peak_mb'] - f['import_mb']) / (h['peak_mb'] - h['import_mb']):.2f}x")
    print_done(started)

if __name__ == "__main__":
    main()
