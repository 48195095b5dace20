"""Encode throughput of fnlm.Tokenizer against tiktoken: cold (fresh process, first pass), one thread.

What a user gets the first time they encode a text: each tokenizer runs in its own fresh child
process (``RAYON_NUM_THREADS=1`` for tiktoken, whose ``encode`` is single-threaded anyway),
loads GPT-2's files (from ../shared/fixtures; tiktoken offline through
../shared/tools/seed_tiktoken_gpt2.py) with ``<|endoftext|>`` as its special token, reads the
text, and encodes it: the first pass is "cold" (fnlm's pre-token cache is empty, so every
distinct word is merged by BPE), a second pass is "warm". The children's ids must be equal
(compared by a SHA-256 of the ids). Figures are MB/s of UTF-8 input, wall clock of the
encode call alone (the load time is printed apart), best of ``--runs`` fresh processes; the
best CPU time of the cold pass is printed beside it (steadier on a shared machine).

Texts: "gcide" (the first --mb MB of the GCIDE dictionary, English the tokenizer has not seen,
``apt-get install -y dict-gcide``), and "fixtures" (TinyStories sample, corpus.en and
german.txt joined by <|endoftext|> and repeated to --mb MB: few distinct words, so the cache
makes the cold pass nearly warm). ``--text PATH`` benchmarks a file instead.

    python benchmarks/tokenizer_encode.py [--mb 8] [--runs 3] [--text PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import print_done, print_machine
from tokenizer_refs import FIXTURES, GCIDE, ROOT, gcide_text, seed_tiktoken

CHILD = r"""
import hashlib, json, sys, time
which, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
t0 = time.perf_counter()
if which == "fnlm":
    from tokenizer_refs import gpt2_tokenizer
    encode = gpt2_tokenizer().encode
else:
    from tokenizer_refs import tiktoken_gpt2
    enc = tiktoken_gpt2()
    encode = lambda text: enc.encode(text, allowed_special="all")
load = time.perf_counter() - t0
text = open(path, encoding="utf-8").read()
w, c = time.perf_counter(), time.process_time()
ids = encode(text)
cold, cold_cpu = time.perf_counter() - w, time.process_time() - c
w = time.perf_counter()
encode(text)
warm = time.perf_counter() - w
digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
print(json.dumps({"load": load, "cold": cold, "cold_cpu": cold_cpu, "warm": warm, "ids": len(ids), "sha": digest}))
"""


def fixture_text(mb: float) -> str:
    from fnlm.tokenizer import ENDOFTEXT

    docs = [(FIXTURES / n).read_text(encoding="utf-8") for n in ["tinystories_sample.txt", "corpus.en", "german.txt"]]
    block = ENDOFTEXT.join(docs) + ENDOFTEXT
    return block * max(1, int(mb * 1e6 / len(block.encode("utf-8"))))


def run_child(which: str, path: Path) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("FNLM_TYPECHECK", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(path), str(Path(__file__).parent)],
        check=True, capture_output=True, text=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(which: str, path: Path, runs: int) -> dict:
    results = [run_child(which, path) for _ in range(runs)]
    best = dict(results[0])
    for key in ("load", "cold", "cold_cpu", "warm"):
        best[key] = min(r[key] for r in results)
    if len({r["sha"] for r in results}) != 1:
        sys.exit(f"{which}: ids differ between runs")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text per benchmark")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per tokenizer and text")
    ap.add_argument("--text", type=Path, default=None, help="benchmark this file instead")
    args = ap.parse_args()
    started = print_machine(threads="one thread per tokenizer (RAYON_NUM_THREADS=1 for tiktoken)")
    sys.path.insert(0, str(ROOT))
    seed_tiktoken()

    texts = {}
    if args.text is not None:
        texts[args.text.name] = args.text.read_text(encoding="utf-8")
    else:
        if GCIDE.is_file():
            texts["gcide"] = gcide_text(args.mb)
        else:
            print(f"({GCIDE} not found: `apt-get install -y dict-gcide` adds the unseen-English text)")
        texts["fixtures"] = fixture_text(args.mb)

    import tiktoken

    print(f"python {sys.version.split()[0]}, tiktoken {tiktoken.__version__}; one thread; fresh process per run, best of {args.runs}")
    print(f"{'text':<9} {'MB':>5} {'load s':>11} {'fnlm cold':>10} {'(CPU)':>7} {'fnlm warm':>10} "
          f"{'tiktoken':>9} {'(CPU)':>7} {'cold/tt':>8} {'CPU/CPU':>8} {'warm/tt':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in texts.items():
            path = Path(tmp) / f"{name}.txt"
            path.write_text(text, encoding="utf-8")
            mb = path.stat().st_size / 1e6
            ours, theirs = best_of("fnlm", path, args.runs), best_of("tiktoken", path, args.runs)
            if ours["sha"] != theirs["sha"]:
                sys.exit(f"{name}: fnlm's ids differ from tiktoken's")
            rate = {k: mb / v for k, v in [("cold", ours["cold"]), ("cpu", ours["cold_cpu"]), ("warm", ours["warm"]),
                                           ("tt", theirs["cold"]), ("tt_cpu", theirs["cold_cpu"])]}
            print(f"{name:<9} {mb:>5.1f} {ours['load']:>5.2f}/{theirs['load']:<5.2f} {rate['cold']:>10.2f} {rate['cpu']:>7.2f} "
                  f"{rate['warm']:>10.2f} {rate['tt']:>9.2f} {rate['tt_cpu']:>7.2f} {rate['cold'] / rate['tt']:>7.2f}x "
                  f"{rate['cpu'] / rate['tt_cpu']:>7.2f}x {rate['warm'] / rate['tt']:>7.2f}x")
    print("(MB/s of UTF-8 input; load s = fnlm/tiktoken; ratios > 1 mean fnlm is faster; ids identical to tiktoken)")
    print_done(started)


if __name__ == "__main__":
    main()
