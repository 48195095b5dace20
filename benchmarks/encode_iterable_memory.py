"""Peak memory of ``Tokenizer.encode_iterable`` streaming a large file: it should stay flat.

Builds a text file of at least --mb MB (default 120) of generated English-like sentences in
documents joined by ``<|endoftext|>`` (or uses --path), then streams
``encode_iterable(open(file))`` with GPT-2's tokenizer into a counter, never a list. It prints
the process RSS at intervals and compares the peak with the RSS at the start of streaming.
The baseline for comparison is what a list of the ids would cost (8 bytes per id for the
pointers alone), printed beside it.

    python benchmarks/encode_iterable_memory.py [--mb 120] [--path FILE] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fnlm.tokenizer import ENDOFTEXT as EOT  # noqa: E402
from fnlm.tokenizer import Tokenizer  # noqa: E402
from harness import print_done, print_machine  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"

SUBJECTS = ["The little dog", "A girl named Lily", "Tom", "The old man", "Her brother", "A small bird", "The teacher", "Émile"]
VERBS = ["saw", "found", "wanted", "liked", "painted", "lost", "shared", "carried", "didn't want"]
OBJECTS = ["a red ball", "the big tree", "some cookies", "a shiny stone", "his friend's kite", "the café", "3 apples", "a boat"]
ENDINGS = [".", "!", " in the park.", " every day.", ", and smiled.", " because it was fun.", "?", " near the river."]


def build_file(path: Path, megabytes: float, seed: int = 0) -> None:
    """Write generated documents until the file holds `megabytes` MB; a 4 MB block is reused."""
    rng = random.Random(seed)
    docs = []
    size = 0
    while size < 4_000_000:
        n = rng.randint(3, 12)
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}" for _ in range(n)]
        story = " ".join(sentences)
        if rng.random() < 0.3:
            story += f"\n\n\"We counted {rng.randint(0, 99999)} stars,\" she said.  "
        doc = story + "\n" + EOT + "\n"
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    block = "".join(docs)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            f.write(block)
            written += len(block.encode("utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=120.0)
    ap.add_argument("--path", type=Path, default=None, help="stream this text file instead of a generated one")
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--reports", type=int, default=12, help="RSS lines to print")
    args = ap.parse_args()
    started = print_machine(threads="one thread")

    tok = Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", [EOT])
    tmpdir = None
    path = args.path
    if path is None:
        tmpdir = tempfile.mkdtemp(prefix="fnlm-encode-mem-")
        path = Path(tmpdir) / "big.txt"
        t0 = time.perf_counter()
        build_file(path, args.mb)
        print(f"built {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    size = path.stat().st_size

    proc = psutil.Process()
    start_rss = proc.memory_info().rss
    peak = start_rss
    count = 0
    next_report = size / args.reports
    t0 = time.perf_counter()
    print(f"{'MB read':>8} {'ids':>12} {'RSS MiB':>8} {'MB/s':>6}")
    with open(path, encoding="utf-8") as f:
        for count, _ in enumerate(tok.encode_iterable(f), 1):
            if count & 0xFFFF == 0:
                rss = proc.memory_info().rss
                peak = max(peak, rss)
                pos = f.buffer.tell()
                if pos >= next_report:
                    elapsed = time.perf_counter() - t0
                    print(f"{pos / 1e6:>8.1f} {count:>12,} {rss / 2**20:>8.1f} {pos / 1e6 / elapsed:>6.2f}")
                    next_report += size / args.reports
    elapsed = time.perf_counter() - t0
    peak = max(peak, proc.memory_info().rss)
    print(
        f"streamed {size / 1e6:.1f} MB -> {count:,} ids in {elapsed:.1f} s ({size / 1e6 / elapsed:.2f} MB/s)\n"
        f"RSS at start {start_rss / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, growth {(peak - start_rss) / 2**20:.1f} MiB; "
        f"a list of the ids would need >= {count * 8 / 2**20:.0f} MiB (ratio growth/list "
        f"{(peak - start_rss) / max(1, count * 8):.4f})"
    )
    if tmpdir is not None and not args.keep:
        os.remove(path)
        os.rmdir(tmpdir)
    print_done(started)


if __name__ == "__main__":
    main()
