"""How long importing fnlm takes, in fresh processes, against `python -c pass` and `import torch`.

    python benchmarks/import_time.py [--repeats 5]

Each statement runs in its own new interpreter (so every import is cold in Python's sense; the OS
file cache is warm after the first run). Printed: the median wall time over `--repeats` runs, the
time above a bare interpreter, and the modules of note each statement loaded (torch, tqdm,
matplotlib, http.client, wandb). The baseline is `import torch`, which any use of fnlm's models pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from harness import print_done, print_machine

STATEMENTS = {
    "bare interpreter": "pass",
    "import fnlm": "import fnlm",
    "from fnlm.tokenizer import train_bpe": "from fnlm.tokenizer import train_bpe",
    "import torch (baseline)": "import torch",
    "import fnlm; fnlm.TransformerConfig": "import fnlm; fnlm.TransformerConfig",
    "import fnlm; fnlm.train.train": "import fnlm; fnlm.train.train",
}
NOTABLE = ("torch", "numpy", "tqdm", "matplotlib", "http.client", "wandb", "einx", "safetensors")


def run(code: str) -> tuple[float, list[str]]:
    probe = f"{code}\nimport sys, json; print(json.dumps([m for m in {NOTABLE!r} if m in sys.modules]))"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    started = print_machine(torch=False, threads="one fresh interpreter at a time")
    results = {}
    for name, code in STATEMENTS.items():
        run(code)
        times, loaded = [], []
        for _ in range(args.repeats):
            seconds, loaded = run(code)
            times.append(seconds)
        results[name] = (statistics.median(times), loaded)
    bare = results["bare interpreter"][0]
    torch_s = results["import torch (baseline)"][0] - bare
    print(f"{'statement':42s} {'median':>9s} {'above bare':>11s} {'/ import torch':>15s}  loads")
    for name, (seconds, loaded) in results.items():
        above = seconds - bare
        print(f"{name:42s} {seconds * 1e3:8.0f}ms {above * 1e3:10.0f}ms {above / torch_s:15.3f}  {', '.join(loaded) or '-'}")
    print_done(started)


if __name__ == "__main__":
    main()
