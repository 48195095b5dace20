"""Encode throughput of fnlm.Tokenizer against tiktoken, single-threaded, on GPT-2's vocabulary.

Both tokenizers load GPT-2's vocab + merges from ../shared/fixtures (tiktoken offline through
../shared/tools/seed_tiktoken_gpt2.py) with ``<|endoftext|>`` as a special token, encode the
same text, and must give the same ids. Reported: MB/s (UTF-8 bytes of input per second, best of
``--repeats``) for fnlm with an empty pre-token cache ("cold") and a filled one ("warm"), for
tiktoken's ``encode(allowed_special="all")`` (the same work) and ``encode_ordinary``, and the
ratio fnlm / tiktoken.

Texts: "fixtures" (TinyStories sample, corpus.en, german.txt joined by <|endoftext|> and
repeated to --mb MB, so few distinct words) and, where the Debian package dict-gcide is
installed, "gcide" (the first --mb MB of the GCIDE dictionary, real English with many
distinct words and some non-ASCII).

    python benchmarks/tokenizer_encode.py [--mb 8] [--repeats 3] [--text PATH]
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fnlm import Tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
EOT = "<|endoftext|>"


def fixture_text(mb: float) -> str:
    docs = [(FIXTURES / n).read_text(encoding="utf-8") for n in ["tinystories_sample.txt", "corpus.en", "german.txt"]]
    block = EOT.join(docs) + EOT
    reps = max(1, int(mb * 1e6 / len(block.encode("utf-8"))))
    return block * reps


def file_text(path: Path, mb: float) -> str:
    opener = gzip.open if path.suffix in (".dz", ".gz") else open
    with opener(path, "rb") as f:
        data = f.read(int(mb * 1e6))
    return data.decode("utf-8", errors="ignore")


def best_rate(fn, nbytes: int, repeats: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text per benchmark")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", type=Path, default=None, help="benchmark this file (.dz/.gz ok) instead")
    args = ap.parse_args()
    if not FIXTURES.is_dir():
        sys.exit(f"needs {FIXTURES} (GPT-2 vocab and merges)")

    cache = tempfile.mkdtemp(prefix="tiktoken-gpt2-")
    subprocess.run([sys.executable, str(SHARED / "tools" / "seed_tiktoken_gpt2.py"), cache], check=True, capture_output=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    t0 = time.perf_counter()
    tok = Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", [EOT])
    print(f"fnlm: loaded GPT-2 vocab+merges in {time.perf_counter() - t0:.2f} s")

    texts = {}
    if args.text is not None:
        texts[args.text.name] = file_text(args.text, args.mb)
    else:
        texts["fixtures"] = fixture_text(args.mb)
        if GCIDE.is_file():
            texts["gcide"] = file_text(GCIDE, args.mb)

    print(f"python {sys.version.split()[0]}, tiktoken {tiktoken.__version__}, 1 thread each, best of {args.repeats}")
    print(f"{'text':<10} {'MB':>6} {'fnlm cold':>10} {'fnlm warm':>10} {'tiktoken':>10} {'tt ordinary':>12} {'warm/tt':>8} {'cold/tt':>8}")
    for name, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        ours = tok.encode(text)
        theirs = enc.encode(text, allowed_special="all")
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            sys.exit(f"{name}: ids differ from tiktoken at position {first}")
        cold = best_rate(lambda: tok.encode(text), nbytes, args.repeats, before=tok._cache.clear)
        warm = best_rate(lambda: tok.encode(text), nbytes, args.repeats)
        tt = best_rate(lambda: enc.encode(text, allowed_special="all"), nbytes, args.repeats)
        tt_ord = best_rate(lambda: enc.encode_ordinary(text), nbytes, args.repeats)
        print(
            f"{name:<10} {nbytes / 1e6:>6.1f} {cold:>10.2f} {warm:>10.2f} {tt:>10.2f} {tt_ord:>12.2f}"
            f" {warm / tt:>7.2f}x {cold / tt:>7.2f}x"
        )
    print(f"(MB/s of UTF-8 input; ids identical to tiktoken on every text; {len(ours):,} ids in the last)")


if __name__ == "__main__":
    main()
