"""Many long special tokens: build a `Tokenizer` and encode a text, with `SpecialMatcher` (window
hashes) against the old matcher (one ``regex`` alternation of the tokens, longest first).

The question: what does a tokenizer with `--count` special tokens of `--length` random characters
cost to build, and to encode `--text-kb` KB of text that holds some of them? With the old
alternation, 1,000 tokens of 10,000 characters took 46 s to build and 327 s to encode 10 KB, so
the old matcher runs only with `--with-old` (and then only the matching step is compared; the
ids of both are checked equal). Times are the best of `--repeats` runs, wall and CPU.

    python benchmarks/special_tokens.py [--count 1000] [--length 10000] [--text-kb 10] [--with-old]
    python benchmarks/special_tokens.py --count 20 --length 100 --text-kb 2 --with-old   # tiny
"""

from __future__ import annotations

import argparse
import random
import time

from harness import print_done, print_machine

from fnlm.tokenizer import Tokenizer
from fnlm.tokenizer.pretokenize import SpecialMatcher, special_tokens_regex


def best_of(fn, repeats: int) -> tuple[float, float, object]:
    """Best wall and CPU seconds of `repeats` calls, and the last result."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu, out


def make_case(count: int, length: int, text_kb: float, seed: int) -> tuple[list[str], str]:
    rng = random.Random(seed)
    alphabet = "abcdefgh<|> \n"
    specials = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(count)]
    target = int(text_kb * 1000)
    parts, size = [], 0
    while size < target:
        piece = rng.choice([specials[rng.randrange(count)], specials[rng.randrange(count)][: length // 2],
                            "".join(rng.choice(alphabet) for _ in range(200))])
        parts.append(piece)
        size += len(piece)
    return specials, "".join(parts)[:target]


def old_spans(pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--count", type=int, default=1000, help="special tokens")
    p.add_argument("--length", type=int, default=10_000, help="characters per special token")
    p.add_argument("--text-kb", type=float, default=10.0, help="text to encode, KB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--with-old", action="store_true", help="also time the regex alternation (minutes at full size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    specials, text = make_case(args.count, args.length, args.text_kb, args.seed)
    vocab = {i: bytes([i]) for i in range(256)}
    started = print_machine(threads="one thread", torch=False)
    print(f"{args.count} special tokens of {args.length} characters, {len(text)} characters of text")
    build_wall, build_cpu, tok = best_of(lambda: Tokenizer(vocab, [], specials), args.repeats)
    encode_wall, encode_cpu, ids = best_of(lambda: tok.encode(text), args.repeats)
    matcher = tok._specials
    match_wall, match_cpu, spans = best_of(lambda: list(matcher.finditer(text)), args.repeats)
    assert tok.decode(ids) == text
    print(f"SpecialMatcher: build the tokenizer {build_wall:.3f} s (CPU {build_cpu:.3f}), encode {encode_wall:.3f} s "
          f"(CPU {encode_cpu:.3f}), of which finding the {len(spans)} specials {match_wall:.3f} s (CPU {match_cpu:.3f})")
    if args.with_old:
        c_wall, c_cpu, pattern = best_of(lambda: special_tokens_regex(specials), 1)
        o_wall, o_cpu, old = best_of(lambda: old_spans(pattern, text), 1)
        assert old == spans, "the alternation and SpecialMatcher must find the same specials"
        same = list(SpecialMatcher(specials, small_chars=10**12).finditer(text)) == spans
        print(f"regex alternation: compile {c_wall:.3f} s (CPU {c_cpu:.3f}), find the specials {o_wall:.3f} s "
              f"(CPU {o_cpu:.3f}); same spans: {same}")
    print_done(started)


if __name__ == "__main__":
    main()
