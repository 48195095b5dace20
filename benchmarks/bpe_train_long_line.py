"""Benchmark: train_bpe on a file of one 1 MB line (one pre-token), against HF `tokenizers`.

A line of random letters with no space is a single GPT-2 pre-token of 1,000,000 bytes: every
merge touches it, so a trainer that rewrites the whole word per merge is quadratic. fnlm keeps
such a word as a linked list of symbols with an index from each pair to its positions
(`fnlm.tokenizer.train._Merger`); the target is under 60 s. HF's BpeTrainer is run the same way
(`benchmarks/bpe_train.py`'s children: a fresh process each, peak PSS sampled) and killed after
``--hf-cap`` seconds, in which case its time is printed as "> cap".

    python benchmarks/bpe_train_long_line.py [--mb 1] [--vocab-size 10000] [--hf-cap 400] [--alphabet letters]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from bpe_train import run_child
from harness import print_done, print_machine

TARGET_S = 60.0
ALPHABETS = {"letters": "abcdefghijklmnopqrstuvwxyz", "digits": "0123456789", "base64-letters": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=10_000)
    ap.add_argument("--hf-cap", type=float, default=400.0, help="seconds after which HF's trainer is stopped")
    ap.add_argument("--alphabet", choices=sorted(ALPHABETS), default="letters")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    started = print_machine(threads="fnlm pre-tokenization workers: auto")

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one_line.txt"
        path.write_text("".join(rng.choice(ALPHABETS[args.alphabet]) for _ in range(int(args.mb * 1e6))), encoding="ascii")
        print(f"input: one line of {path.stat().st_size:,} random {args.alphabet} (seed 0), no newline; vocab_size={args.vocab_size}")
        fnlm = run_child("fnlm", path, args.vocab_size, "auto")
        print(f" fnlm: {fnlm['seconds']:7.2f} s (CPU {fnlm['cpu']:6.1f} s)   peak PSS {fnlm['peak_mb']:7.1f} MB   vocab {fnlm['vocab']}")
        verdict = "under" if fnlm["seconds"] < TARGET_S else "NOT under"
        line = f"fnlm {fnlm['seconds']:.1f} s: {verdict} the {TARGET_S:.0f} s target"
        if not args.skip_hf:
            hf = run_child("hf", path, args.vocab_size, "auto", cap=args.hf_cap)
            if hf is None:
                print(f"   hf: > {args.hf_cap:.0f} s (stopped at the cap)")
                line += f"; HF > {args.hf_cap:.0f} s, so fnlm/HF < {fnlm['seconds'] / args.hf_cap:.3f}x"
            else:
                print(f"   hf: {hf['seconds']:7.2f} s (CPU {hf['cpu']:6.1f} s)   peak PSS {hf['peak_mb']:7.1f} MB   vocab {hf['vocab']}")
                line += f"; fnlm/HF time {fnlm['seconds'] / hf['seconds']:.3f}x, peak PSS {fnlm['peak_mb'] / hf['peak_mb']:.2f}x"
        print(line)
    print_done(started)


if __name__ == "__main__":
    main()
