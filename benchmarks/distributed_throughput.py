"""Training throughput (tokens/s) with 1 process and with N data-parallel processes (torchrun, gloo/NCCL).

Each configuration runs `fnlm.train.train` in fresh processes on synthetic uint16 tokens with the
same global batch, so every configuration does the same work per optimizer step:

- `1 proc x T threads`: plain python, `T` = all cores (the baseline);
- `1 proc x 1 thread`: the per-core rate, for reference;
- `N procs x T/N threads`: `torchrun --nproc_per_node=N`, each rank with cores // N intra-op
  threads (`FNLM_NUM_THREADS`), gradients averaged by `fnlm.train.parallel.all_reduce_grads`.

Reported: the median tokens/s over the `metrics.jsonl` log windows after the first (warm-up; the
median over `--repeats` interleaved runs), the
ratio to the baseline, and the time of one bucketed gradient all-reduce of the model's size
(measured in the N-process run after training). On CPU the N processes share the same cores as the
1-process baseline, so data parallelism cannot beat it by more than the gain from running N smaller
matmul streams in parallel instead of one threaded one; the point on CPU is correctness and
overhead, the speed-up is for machines with one GPU per rank.

    python benchmarks/distributed_throughput.py                     # demo-sized model, CPU, 1 vs 2 processes
    python benchmarks/distributed_throughput.py --procs 1,2,4 --device cuda --batch 128 --d-model 512 --layers 4 \\
        --heads 16 --d-ff 1344 --context 256 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fnlm  # noqa: E402
from harness import add_model_args, model_argv, print_done, print_machine  # noqa: E402
from fnlm import train as trainer  # noqa: E402
from fnlm.train import parallel as distributed  # noqa: E402


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2", help="process counts to compare (comma-separated)")
    p.add_argument("--steps", type=int, default=25)
    add_model_args(p, batch=16, context=256, d_model=128, heads=4, d_ff=384)  # --batch: the global batch
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, interleaved; the median is kept")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    return p


def _configs(a: argparse.Namespace) -> tuple[fnlm.TransformerConfig, trainer.TrainConfig]:
    model = fnlm.TransformerConfig(vocab_size=a.vocab, context_length=a.context, d_model=a.d_model,
                                   num_layers=a.layers, num_heads=a.heads, d_ff=a.d_ff)
    tc = trainer.TrainConfig(batch_size=a.batch, steps=a.steps, eval_interval=a.steps, eval_batches=1, checkpoint_interval=a.steps, log_interval=a.log_interval, progress=False, plot=False, device=a.device, step=dict(warmup_steps=2))
    return model, tc


def _worker(a: argparse.Namespace, parallel: trainer.Parallel = trainer.Parallel()) -> None:
    model, tc = _configs(a)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, a.vocab, 400_000).astype(np.uint16)
    out = Path(a.worker)
    trainer.train(model, tc, tokens, tokens[:50_000], out, parallel=parallel)
    if parallel.world_size > 1:
        device = torch.device(parallel.device or "cpu")
        grads = fnlm.init_transformer_lm(model, seed=0, device=device)
        for _ in range(2):
            parallel.sync_grads(grads)
        times = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            parallel.sync_grads(grads)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if parallel.is_main:
            (out / "allreduce.json").write_text(json.dumps({"seconds": statistics.median(times)}))
    if parallel.is_main:
        (out / "threads.json").write_text(json.dumps({"threads": torch.get_num_threads()}))


def _run(a: argparse.Namespace, procs: int, threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"fnlm_dist_{procs}p_"))
    args = [str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(a.steps), *model_argv(a),
            "--device", a.device, "--log-interval", str(a.log_interval)]
    env = {**os.environ, "FNLM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "FNLM_TYPECHECK": "0"}
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
               f"--master_port={port}", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"run with {procs} process(es) failed:\n{proc.stderr[-4000:]}")
    records = [r for r in trainer.read_metrics(out / "metrics.jsonl") if "tokens_per_sec" in r]
    rates = [r["tokens_per_sec"] for r in records[1:]] or [r["tokens_per_sec"] for r in records]
    result = {"procs": procs, "threads": json.loads((out / "threads.json").read_text())["threads"],
              "tokens_per_sec": statistics.median(rates), "windows": len(rates), "wall_s": wall}
    if (out / "allreduce.json").exists():
        result["allreduce_s"] = json.loads((out / "allreduce.json").read_text())["seconds"]
    return result


def main() -> None:
    a = _parser().parse_args()
    if a.worker:
        if distributed.launched():
            distributed.run(lambda parallel: _worker(a, parallel), device=a.device)
        else:
            torch.set_num_threads(int(os.environ.get("FNLM_NUM_THREADS", _cores())))
            _worker(a)
        return
    cores = _cores()
    started = print_machine(a.device, threads=f"{cores} cores shared by the processes of each configuration")
    model, tc = _configs(a)
    n_params = fnlm.tree_size(fnlm.init_transformer_lm(model, seed=0))
    print(f"fnlm data-parallel throughput: {n_params / 1e6:.2f}M params, global batch {a.batch} x {a.context} tokens, "
          f"{a.steps} steps, device {a.device}, {cores} cores, torch {torch.__version__}")
    runs = []
    procs = [int(p) for p in a.procs.split(",")]
    plan = [(1, cores)] + ([(1, 1)] if a.device == "cpu" and cores > 1 else [])
    plan += [(p, max(1, cores // p)) for p in procs if p > 1]
    trials: dict[tuple[int, int], list[dict]] = {}
    for _ in range(a.repeats):
        for p, t in plan:
            trials.setdefault((p, t), []).append(_run(a, p, t))
    for key in plan:
        rs = sorted(trials[key], key=lambda r: r["tokens_per_sec"])
        r = rs[len(rs) // 2]
        r["all"] = [round(x["tokens_per_sec"]) for x in trials[key]]
        runs.append(r)
        extra = f", one gradient all-reduce {r['allreduce_s'] * 1e3:.1f} ms" if "allreduce_s" in r else ""
        print(f"  {r['procs']} proc x {r['threads']} thread(s): {r['tokens_per_sec']:>10,.0f} tokens/s "
              f"(median of {r['windows']} windows; runs {r['all']}; {r['wall_s']:.0f}s with start-up){extra}", flush=True)
    for i, r in enumerate(runs):
        for b in runs[:i]:
            print(f"  ratio {r['procs']} proc x {r['threads']} / {b['procs']} proc x {b['threads']}: "
                  f"{r['tokens_per_sec'] / b['tokens_per_sec']:.2f}")
    print_done(started)


if __name__ == "__main__":
    main()
