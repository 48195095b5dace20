"""Speed and memory of a training step at each precision of `fnlm.precision.lm_loss_fn_with`:
`fp32` (nothing cast), `bf16` (the policy: float32 params and AdamW state, the forward and
backward in bfloat16 by casting the params inside the loss) and `autocast` (`torch.autocast` in
bfloat16 around the forward).

Each measurement runs in a fresh process: build the model (default: the 17M TinyStories model,
d_model 512, 4 layers, 16 heads, d_ff 1344, vocab 10,000, at batch 4 x context 128), take
`--warmup` training steps (`fnlm.train_step(..., donate=True)`, what the training loop runs), then
one step inside `harness.PeakMemory` (the peak added above the memory in use before it, with the
params and AdamW state already there: resident set on CPU, `torch.cuda.max_memory_allocated` on
CUDA), then `--steps` timed steps. All runs see the same batches, so their losses are comparable:
the script prints each precision's loss after the last step and its difference from float32's.
On CPU, bfloat16 matmuls are fast only where the CPU has bfloat16 instructions (AVX512-BF16, AMX).

    python benchmarks/precision.py [--precisions fp32 bf16 autocast] [--rounds 3] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakMemory, add_model_args, child_result, model_argv, print_done, print_machine, run_child  # noqa: E402

PRECISIONS = ("fp32", "bf16", "autocast")


def child(args: argparse.Namespace) -> None:
    """One fresh process: build, warm up, measure one step's peak, time `--steps` steps, report."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fnlm
    from fnlm.precision import lm_loss_fn_with

    config = fnlm.TransformerConfig(vocab_size=args.vocab, context_length=args.context, d_model=args.d_model,
                                    num_layers=args.layers, num_heads=args.heads, d_ff=args.d_ff)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, args.vocab, (args.batch, args.context), generator=g).to(device) for _ in "xy")
               for _ in range(4)]
    loss_fn = lm_loss_fn_with(fnlm.transformer_lm, config, args.child, device_type=device.type)
    step_config = fnlm.StepConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, cosine_steps=1000)
    state = fnlm.init_train_state(fnlm.init_transformer_lm(config, seed=0, device=device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int):
        nonlocal state
        x, y = batches[i % len(batches)]
        state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=step_config, donate=True)
        return metrics

    for i in range(args.warmup):
        step(i)
    with PeakMemory(args.device) as peak:
        metrics = step(args.warmup)
    times, cpu = [], []
    for i in range(args.steps):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = step(args.warmup + 1 + i)
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    dtypes = sorted({str(t.dtype) for t in fnlm.tree_leaves(state.params)})
    child_result({
        "peak": peak.bytes, "loss": float(metrics["loss"]), "param_dtypes": dtypes,
        "time": statistics.median(times) if times else None, "cpu": statistics.median(cpu) if cpu else None})


def spawn(args: argparse.Namespace, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, *model_argv(args)]
    return run_child(cmd, f"{precision!r}")


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    mib = 2**20
    base = results.get("fp32")
    print(f"\nper training step (median of {args.rounds} fresh processes; peak above the params and AdamW state):")
    for precision, runs in results.items():
        peak = statistics.median(r["peak"] for r in runs) if runs[0]["peak"] is not None else None
        memory = "n/a" if peak is None else f"{peak / mib:7.1f} MiB"
        timing = ""
        if args.steps:
            wall, cpu = statistics.median(r["time"] for r in runs), statistics.median(r["cpu"] for r in runs)
            timing = f"   {wall * 1e3:8.1f} ms (CPU time {cpu * 1e3:8.1f} ms)"
            if base and precision != "fp32":
                timing += f", time / fp32 {wall / statistics.median(r['time'] for r in base):.3f}"
        loss = runs[0]["loss"]
        versus = f" ({loss - base[0]['loss']:+.2e} vs fp32)" if base and precision != "fp32" else ""
        print(f"  {precision:<9} peak {memory}{timing}   loss {loss:.5f}{versus}   params {','.join(runs[0]['param_dtypes'])}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per precision (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the measured ones")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (0: memory only)")
    p.add_argument("--device", default="cpu")
    add_model_args(p)
    p.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    started = print_machine(args.device, torch=True)
    print(f"model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, vocab "
          f"{args.vocab}; batch {args.batch} x context {args.context}, {args.device}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per process, {args.rounds} processes per precision")
    results: dict[str, list[dict]] = {m: [] for m in args.precisions}
    for _ in range(args.rounds):
        for precision in args.precisions:
            results[precision].append(spawn(args, precision))
    report(args, results)
    print()
    print_done(started)


if __name__ == "__main__":
    main()
