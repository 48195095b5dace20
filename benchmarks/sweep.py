"""A learning-rate sweep trained one run after another against the same sweep as one vectorized run.

Both are the real command line, each in a fresh process, on the same data:

    python experiments/run_ablations.py --preset smoke --steps 150 --lrs <8 rates> --out DIR    # sequential
    python experiments/run_ablations.py --preset smoke --steps 150 --lrs <8 rates> --out DIR --vectorize

(the smoke preset's model: d_model 64, 2 layers, 2 heads, d_ff 192, context 64, batch 16, on the
embedded story corpus; its BPE vocabulary, 2,110 tokens, sets the model's vocab). The data, tokenizer and
token files are made once before timing and copied into each run's folder, so both find them cached.
`--no-mmap` runs both with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**36` (glibc), which keeps freed
blocks over 32 MB for reuse. Printed: the sweep's training time as the script reports it (`summary.json`
`seconds`: all runs, evaluation and outputs, without the data stages), the whole process's wall and CPU time, the ratio
sequential / vectorized, and every run's final validation loss both ways with the largest
difference. The machine's load average is printed before and after: on a shared machine the
times are noisy, the CPU times less so.

    python benchmarks/sweep.py [--steps 150] [--lrs 1e-3,...] [--rounds 1] [--threads N] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import print_done, print_machine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "run_ablations.py"
LRS = "1e-3,1.5e-3,2e-3,3e-3,5e-3,7e-3,1e-2,1.5e-2"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


NO_MMAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def _env(no_mmap: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **NO_MMAP} if no_mmap else env


def prepare(work: Path, preset: str) -> Path:
    """The data, tokenizer and token files of the preset, made once (untimed)."""
    data = work / "data"
    cmd = [sys.executable, str(REPO / "experiments" / "train_tinystories.py"), "--preset", preset, "--out", str(data),
           "--stage", "data,tokenizer,encode", "--quiet"]
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True)
    return data


def run_sweep(work: Path, data: Path, args: argparse.Namespace, vectorize: bool, tag: str) -> dict:
    out = work / tag
    shutil.copytree(data, out)
    cmd = [sys.executable, str(SCRIPT), "--preset", args.preset, "--steps", str(args.steps), "--lrs", args.lrs,
           "--out", str(out), "--quiet"] + (["--vectorize"] if vectorize else [])
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--chunk-size", str(args.chunk_size)] if vectorize and args.chunk_size else []
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=_env(args.no_mmap), capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if "data: cached" not in proc.stderr:
        raise RuntimeError(f"the data stages were not cached in {out}:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["seconds"], "wall": wall, "cpu": cpu, "rows": summary["lr_sweep"]}


def _fmt(x: float | None) -> str:
    return "diverged" if x is None or not math.isfinite(x) else f"{x:.4f}"


def report(seq: list[dict], vec: list[dict], args: argparse.Namespace) -> None:
    def med(runs: list[dict], key: str) -> float:
        values = sorted(r[key] for r in runs)
        return values[len(values) // 2]

    print(f"\n{len(args.lrs.split(','))}-rate sweep, {args.steps} steps each (median of {len(seq)} run(s) per mode):")
    print(f"{'':>12} {'sweep (s)':>10} {'process wall (s)':>17} {'process CPU (s)':>16}")
    for name, runs in (("sequential", seq), ("vectorized", vec)):
        print(f"{name:>12} {med(runs, 'seconds'):10.1f} {med(runs, 'wall'):17.1f} {med(runs, 'cpu'):16.1f}")
    ratios = [med(seq, key) / med(vec, key) for key in ("seconds", "wall", "cpu")]
    print(f"{'ratio':>12} {ratios[0]:10.2f} {ratios[1]:17.2f} {ratios[2]:16.2f}   "
          "(sequential / vectorized; target >= 3)")
    print("\nfinal validation loss per run (last round):")
    print(f"{'run':>10} {'sequential':>11} {'vectorized':>11} {'|diff|':>9}  status")
    worst = 0.0
    for a, b in zip(seq[-1]["rows"], vec[-1]["rows"]):
        both = a["val_loss"] is not None and b["val_loss"] is not None
        diff = abs(a["val_loss"] - b["val_loss"]) if both else 0.0
        worst = max(worst, diff if math.isfinite(diff) else math.inf)
        status = ("ok" if a["diverged_at"] == b["diverged_at"] is None
                  else f"diverged at {a['diverged_at']} / {b['diverged_at']}")
        print(f"{a['label']:>10} {_fmt(a['val_loss']):>11} {_fmt(b['val_loss']):>11} {diff:9.2e}  {status}")
    print(f"largest |difference| of the final validation losses: {worst:.2e} (target <= 2e-3)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lrs", default=LRS, help="the swept peak learning rates")
    p.add_argument("--rounds", type=int, default=1, help="sequential/vectorized pairs, alternating")
    p.add_argument("--threads", type=int, help="torch threads in the runs (default: torch's choice)")
    p.add_argument("--chunk-size", type=int, help="the vectorized run's --chunk-size (default: all models at once)")
    p.add_argument("--keep", help="keep the run folders in this directory")
    p.add_argument("--no-mmap", action="store_true",
                   help="run both with glibc's mmap for big blocks off (MALLOC_MMAP_MAX_=0): freed blocks over 32 MB "
                        "(K models' logits) are then reused instead of returned to the OS and faulted back in")
    args = p.parse_args(argv)
    if args.no_mmap:
        print("glibc mmap off in both runs: " + " ".join(f"{k}={v}" for k, v in NO_MMAP.items()))
    started = print_machine(torch=True, threads=f"{args.threads or 'torch default'} threads in the runs")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fnlm-sweep-bench-"))
    try:
        data = prepare(work, args.preset)
        seq, vec = [], []
        for r in range(args.rounds):
            seq.append(run_sweep(work, data, args, False, f"sequential{r}"))
            vec.append(run_sweep(work, data, args, True, f"vectorized{r}"))
        report(seq, vec, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_done(started)


if __name__ == "__main__":
    main()
