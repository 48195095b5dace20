"""Peak memory and time of one forward + backward of the LM with and without `fnlm.remat`
(activation checkpointing: `transformer_lm(..., remat=True)` recomputes each block in the backward).

Each measurement runs in a fresh process: build the model (default: the 17M TinyStories model,
d_model 512, 4 layers, 16 heads, d_ff 1344, vocab 10,000, at batch 4 x context 128, float32), take
one warm-up call (which also compiles, for the compiled paths), then one call inside
`harness.PeakMemory` (the peak added above the memory in use before it: resident set on CPU,
`torch.cuda.max_memory_allocated` on CUDA), then `--steps` timed calls. The peak holds the
activations kept for the backward plus the gradient tree; the gradients' size is printed, and the
rest is the activations. The paths:

- `autograd`: `fnlm.value_and_grad(loss_fn)` (autograd over leaves; the training loop on CPU);
- `func`: `fnlm.value_and_grad(loss_fn, backend="func")` (`torch.func.grad_and_value`);
- `compiled-loss`: `value_and_grad(torch.compile(loss_fn))` (the loop's CUDA path);
- `compiled-step`: `torch.compile(value_and_grad(loss_fn, backend="func"), fullgraph=True)`.

The first round's processes also save their loss and gradients, and the script prints how far the
remat run's are from the plain run's (expected: the loss equal, gradients within ~1e-7).

    python benchmarks/remat_memory.py [--paths autograd func] [--rounds 3] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakMemory, add_model_args, child_result, model_argv, print_done, print_machine, run_child  # noqa: E402

PATHS = ("autograd", "func", "compiled-loss", "compiled-step")


def _value_and_grad(path: str, loss_fn):
    import torch

    import fnlm

    if path == "autograd":
        return fnlm.value_and_grad(loss_fn)
    if path == "func":
        return fnlm.value_and_grad(loss_fn, backend="func")
    if path == "compiled-loss":
        return fnlm.value_and_grad(torch.compile(loss_fn))
    return torch.compile(fnlm.value_and_grad(loss_fn, backend="func"), fullgraph=True)


def child(args: argparse.Namespace) -> None:
    """One fresh process: build, warm up, measure one call's peak, time `--steps` calls, report."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fnlm

    remat = args.remat == "on"
    config = fnlm.TransformerConfig(vocab_size=args.vocab, context_length=args.context, d_model=args.d_model,
                                    num_layers=args.layers, num_heads=args.heads, d_ff=args.d_ff)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.context), generator=g).to(args.device)
    y = torch.randint(0, args.vocab, (args.batch, args.context), generator=g).to(args.device)
    params = fnlm.init_transformer_lm(config, seed=0, device=args.device)

    def loss_fn(p, xb, yb):
        return fnlm.cross_entropy(fnlm.transformer_lm(p, xb, config, remat=remat), yb)

    step = _value_and_grad(args.path, loss_fn)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    loss, grads = step(params, x, y)
    del loss, grads
    with PeakMemory(args.device) as peak:
        loss, grads = step(params, x, y)
    times, cpu = [], []
    for _ in range(args.steps):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        step(params, x, y)
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if args.save:
        torch.save({"loss": loss.cpu(), "grads": fnlm.tree_map(lambda t: t.cpu(), grads)}, args.save)
    grad_bytes = sum(t.numel() * t.element_size() for t in fnlm.tree_leaves(grads))
    child_result({"peak": peak.bytes, "grad_bytes": grad_bytes, "loss": float(loss),
                                        "time": statistics.median(times) if times else None,
                                        "cpu": statistics.median(cpu) if cpu else None,
                                        "threads": torch.get_num_threads()})


def spawn(args: argparse.Namespace, path: str, remat: str, save: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--path", path, "--remat", remat, "--steps", str(args.steps),
           "--device", args.device, *model_argv(args)] + (["--save", save] if save else [])
    return run_child(cmd, f"{path} remat={remat}")


def differences(plain: str, remat: str) -> tuple[float, float]:
    """`(|loss difference|, max |gradient difference|)` between two saved runs."""
    import torch

    import fnlm

    a, b = torch.load(plain), torch.load(remat)
    grads = zip(fnlm.tree_leaves(a["grads"]), fnlm.tree_leaves(b["grads"]))
    return float((a["loss"] - b["loss"]).abs()), max(float((u - v).abs().max()) for u, v in grads)


def report(args: argparse.Namespace, path: str, runs: dict[str, list[dict]], diff: tuple[float, float]) -> None:
    mib = 2**20
    grads = runs["off"][0]["grad_bytes"]
    peaks = {m: statistics.median(r["peak"] for r in runs[m]) if runs[m][0]["peak"] is not None else None
             for m in ("off", "on")}
    times = {m: statistics.median(r["time"] for r in runs[m]) if args.steps else None for m in ("off", "on")}
    cpu = {m: statistics.median(r["cpu"] for r in runs[m]) if args.steps else None for m in ("off", "on")}
    print(f"\n{path}: gradients {grads / mib:.1f} MiB; |loss difference| {diff[0]:.2e}, "
          f"max |gradient difference| {diff[1]:.2e}")
    for m in ("off", "on"):
        peak, t = peaks[m], times[m]
        memory = "n/a" if peak is None else f"{peak / mib:8.1f} MiB (activations {(peak - grads) / mib:7.1f} MiB)"
        timing = "" if t is None else f"   {t * 1e3:8.1f} ms per forward + backward (CPU time {cpu[m] * 1e3:.1f} ms)"
        print(f"  remat {m:<3}  peak above the params {memory}{timing}")
    if peaks["off"] and peaks["on"] is not None:
        ratio = (peaks["on"] - grads) / (peaks["off"] - grads) if peaks["off"] > grads else float("nan")
        slower = (f", time ratio {times['on'] / times['off']:.3f} (CPU time {cpu['on'] / cpu['off']:.3f})"
                  if times["off"] else "")
        print(f"  activations with / without remat: {ratio:.3f}{slower}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=["autograd"], help="how the gradients are taken")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per path and setting (alternating)")
    p.add_argument("--steps", type=int, default=3, help="timed calls per process (0: memory only)")
    p.add_argument("--device", default="cpu")
    add_model_args(p)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--remat", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    started = print_machine(args.device, torch=True)
    print(f"model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, vocab "
          f"{args.vocab}; batch {args.batch} x context {args.context}, float32, {args.device}; {args.rounds} "
          f"processes per setting, {args.steps} timed calls each")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            runs: dict[str, list[dict]] = {"off": [], "on": []}
            for r in range(args.rounds):
                for m in ("off", "on"):
                    runs[m].append(spawn(args, path, m, os.path.join(tmp, f"{path}-{m}.pt") if r == 0 else None))
            report(args, path, runs, differences(os.path.join(tmp, f"{path}-off.pt"), os.path.join(tmp, f"{path}-on.pt")))
    print()
    print_done(started)


if __name__ == "__main__":
    main()
