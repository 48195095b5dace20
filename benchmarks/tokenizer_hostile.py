"""Encode time on hostile text (one pre-token of 100k-300k characters) against tiktoken.

A run of letters, digits or CJK characters with no space is one GPT-2 pre-token, so BPE has
to merge it whole. fnlm merges a long pre-token with a linked list of symbols and pending pairs
grouped by rank (O(n log n), `fnlm.tokenizer.bpe.bpe_long`); tiktoken is the baseline. Both use
GPT-2's files, ids must be equal, and the target is fnlm within 5x tiktoken's time.

Times are the best of ``--repeats`` calls, wall clock and CPU time of the process (the CPU
figure is the steadier one on a shared machine); the ratio uses the CPU times.

    python benchmarks/tokenizer_hostile.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

from harness import print_done, print_machine
from tokenizer_refs import gpt2_tokenizer, hostile_texts, tiktoken_gpt2

TARGET = 5.0


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of `repeats` calls."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpu = min(cpu, time.process_time() - c)
        wall = min(wall, time.perf_counter() - w)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    started = print_machine(threads="one thread")

    tok = gpt2_tokenizer()
    enc = tiktoken_gpt2()
    print(f"python {sys.version.split()[0]}; GPT-2 vocab; best of {args.repeats}; ratio = fnlm CPU / tiktoken CPU")
    print(f"{'text':<14} {'ids':>8} {'tiktoken ms':>12} {'(CPU)':>7} {'fnlm ms':>9} {'(CPU)':>7} {'ratio':>7}  equal")
    worst = 0.0
    for name, text in hostile_texts().items():
        ours, theirs = tok.encode(text), enc.encode(text)
        tt_wall, tt_cpu = best_time(lambda: enc.encode(text), args.repeats)
        fn_wall, fn_cpu = best_time(lambda: tok.encode(text), args.repeats)
        ratio = fn_cpu / tt_cpu
        worst = max(worst, ratio)
        print(f"{name:<14} {len(ours):>8,} {tt_wall * 1e3:>12.1f} {tt_cpu * 1e3:>7.1f} {fn_wall * 1e3:>9.1f} {fn_cpu * 1e3:>7.1f} {ratio:>6.2f}x  {ours == theirs}")
        if ours != theirs:
            sys.exit(f"{name}: ids differ from tiktoken")
    verdict = "within" if worst <= TARGET else "NOT within"
    print(f"worst ratio {worst:.2f}x: {verdict} the {TARGET:.0f}x target; ids equal to tiktoken on every text")
    print_done(started)


if __name__ == "__main__":
    main()
