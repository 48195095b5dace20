"""One full training step of fnlm against hand-written PyTorch, in one process.

fnlm's step is `fnlm.train_step` (the one pure step: `value_and_grad` over
`cross_entropy(transformer_lm(...))`, `clip_grad_norm`, `adamw_step`, the schedule). The baselines
are `benchmarks/reference.py`'s `ReferenceLM` with `torch.optim.AdamW(foreach=True)` and
`clip_grad_norm_`:

- (a) the same maths written as an `nn.Module` (softmax, masked attention, RMSNorm, SiLU by hand);
- (b) the same module on torch's fused kernels (SDPA `is_causal`, `F.rms_norm`, `F.silu`,
  `F.cross_entropy`).

All start from fnlm's initial weights (the losses are checked to agree before timing and again
after). One run prints, eager, fnlm/(a) and fnlm/(b); then, compiled, fnlm's whole step under
`torch.compile(fullgraph=True)` (and/or its loss alone) against (b) with its loss compiled. Steps
alternate between the runners; medians of wall time, fastest steps and process CPU time are given
with the machine's name and load. Default sizes: the 17M TinyStories model (d_model 512, 4 layers,
16 heads, d_ff 1344, vocab 10,000) at batch 4 x context 128 on CPU.

    python benchmarks/train_step.py                       # eager ratios, then compiled (CPU: minutes to compile)
    python benchmarks/train_step.py --no-compile          # eager ratios only
    python benchmarks/train_step.py --no-compile --isolated  # and each runner alone in fresh processes
    python benchmarks/train_step.py --no-compile --pure   # the pure step (no donation) instead of the loop's
    python benchmarks/train_step.py --compile-modes step,loss
    python benchmarks/train_step.py --typecheck           # shape checks on vs off (subprocesses)
    python benchmarks/train_step.py --memory              # peak memory, fnlm vs (a) (subprocesses)
    python benchmarks/train_step.py --device cuda --dtype bf16 --batch 128 --context 256
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fnlm  # noqa: E402
from fnlm import accounting  # noqa: E402
from harness import add_model_args, child_result, model_argv, print_done, print_machine, run_child, tune_malloc  # noqa: E402
from reference import ReferenceLM, load_fnlm_params  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
TARGET_TOKENS = 327_680_000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_config(args) -> fnlm.TransformerConfig:
    return fnlm.TransformerConfig(
        vocab_size=args.vocab, context_length=max(args.context, 256), d_model=args.d_model,
        num_layers=args.layers, num_heads=args.heads, d_ff=args.d_ff,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class FnlmRunner:
    """`fnlm.train_step` at a constant learning rate; holds the current `TrainState`.

    `compile_mode`: `None` (eager), `"loss"` (the loss compiled, gradients and optimizer eager, as
    (b) compiled is) or `"step"` (the whole `train_step` under `torch.compile(fullgraph=True)`, from
    a state with tensor step counters so that it compiles once). `donate`: step with
    `train_step(..., donate=True)`, as `fnlm.train.train` does (the optimizer updates the state in
    place, like the baselines' `torch.optim.AdamW`); `--pure` measures the pure step instead.
    """

    def __init__(self, config, params, device, autocast, compile_mode: str | None, donate: bool = True):
        def loss_fn(p, x, y):
            with autocast():
                logits = fnlm.transformer_lm(p, x, config)
            return fnlm.cross_entropy(logits, y)

        if compile_mode == "loss":
            loss_fn = torch.compile(loss_fn, fullgraph=True)
        step_config = fnlm.StepConfig(lr=LR, min_lr=LR, warmup_steps=0, cosine_steps=0, betas=BETAS, eps=EPS,
                                      weight_decay=WEIGHT_DECAY, grad_clip=MAX_NORM)
        donate = donate and compile_mode != "step"
        step = functools.partial(fnlm.train_step, loss_fn=loss_fn, config=step_config, donate=donate)
        self.name = ("fnlm" if donate else "fnlm pure") if compile_mode is None else f"fnlm compiled {compile_mode}"
        self._loss_fn = loss_fn
        self._step = torch.compile(step, fullgraph=True) if compile_mode == "step" else step
        self.state = fnlm.init_train_state(params, step_tensor=compile_mode == "step")

    def loss(self, x, y) -> float:
        with torch.no_grad():
            return float(self._loss_fn(self.state.params, x, y))

    def step(self, x, y):
        self.state, metrics = self._step(self.state, x, y)
        return metrics["loss"]


class TorchRunner:
    """A hand-written module with torch.optim.AdamW(foreach=True) and clip_grad_norm_."""

    def __init__(self, name, config, flat_params, device, autocast, fused: bool, compile_model: bool):
        self.name = name + (" compiled loss" if compile_model else "")
        self.model = ReferenceLM(config, fused=fused).to(device)
        load_fnlm_params(self.model, flat_params)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WEIGHT_DECAY, foreach=True)

        def loss_fn(x, y):
            with autocast():
                logits = self.model(x)
            if fused:
                return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
            from reference import cross_entropy

            return cross_entropy(logits, y)

        self._loss_fn = torch.compile(loss_fn, fullgraph=True) if compile_model else loss_fn

    def loss(self, x, y) -> float:
        with torch.no_grad():
            return float(self._loss_fn(x, y))

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
        self.opt.step()
        return loss.detach()


def build(args, which: tuple[str, ...], compile_mode: str | None = None):
    device = args.device
    dtype = DTYPES[args.dtype]
    config = make_config(args)
    torch.manual_seed(0)
    params = fnlm.init_transformer_lm(config, seed=0, device=device)
    flat = {k: v.detach().clone() for k, v in fnlm.tree_flatten(params).items()}

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

    runners = []
    for w in which:
        if w == "fnlm":
            runners.append(FnlmRunner(config, fnlm.tree_map(torch.clone, params), device, autocast, compile_mode,
                                      donate=not args.pure))
        elif w == "a":
            runners.append(TorchRunner("(a) module", config, flat, device, autocast, fused=False, compile_model=False))
        elif w == "b":
            runners.append(TorchRunner("(b) fused", config, flat, device, autocast, fused=True, compile_model=compile_mode is not None))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.context), generator=g).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.context), generator=g).to(device)
    return config, runners, x, y


def check_agree(runners, x, y, when: str, tol: float) -> list[float]:
    losses = [r.loss(x, y) for r in runners]
    ref = losses[0]
    for r, value in zip(runners, losses):
        if abs(value - ref) > tol * max(1.0, abs(ref)):
            raise AssertionError(f"losses disagree {when}: " + ", ".join(f"{q.name}={v:.6f}" for q, v in zip(runners, losses)))
    return losses


def time_runners(runners, x, y, device, warmup: int, steps: int, cpu_times: dict | None = None) -> dict[str, list[float]]:
    """Alternate the runners' steps, rotating which goes first each round (a fixed order measurably
    favours some positions); wall-clock seconds per step by name (and process CPU seconds into
    ``cpu_times``, a figure less disturbed by other processes on a shared machine)."""
    for _ in range(warmup):
        for r in runners:
            r.step(x, y)
    sync(device)
    times = {r.name: [] for r in runners}
    if cpu_times is not None:
        cpu_times.update({r.name: [] for r in runners})
    for i in range(steps):
        for r in runners[i % len(runners):] + runners[: i % len(runners)]:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            r.step(x, y)
            sync(device)
            times[r.name].append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times[r.name].append(time.process_time() - cpu_start)
    return times


def report(times: dict[str, list[float]], args, config, baseline_names: list[str], label: str = "",
           cpu_times: dict[str, list[float]] | None = None, over: str | None = None) -> dict[str, float]:
    tokens = args.batch * args.context
    peak = accounting.measure_matmul_peak(args.device, DTYPES[args.dtype] if args.device.startswith("cuda") else torch.float32)
    medians = {n: statistics.median(t) for n, t in times.items()}
    cpu = {n: statistics.median(t) for n, t in (cpu_times or {}).items()}
    over = over or f"{args.steps} alternating steps (after {args.warmup} warm-up)"
    print(f"\n{label}median step time over {over}:")
    for n, m in medians.items():
        tps = tokens / m
        util = accounting.mfu(tps, config, peak, seq_len=args.context)
        spread = f"[{min(times[n]) * 1e3:.1f}..{max(times[n]) * 1e3:.1f}]"
        cpu_col = f"  cpu {cpu[n] * 1e3:9.2f} ms" if n in cpu else ""
        print(f"  {n:<24} {m * 1e3:9.2f} ms {spread:>20}{cpu_col}  {tps:10.0f} tok/s  MFU {util * 100:5.1f}%")
        if args.device.startswith("cuda"):
            print(f"  {'':<24} projected time for {TARGET_TOKENS:,} tokens: {TARGET_TOKENS / tps / 60:.1f} min")
    for f in (n for n in medians if n.startswith("fnlm")):
        for b in baseline_names:
            if b in medians:
                cpu_ratio = f", of median process CPU time {cpu[f] / cpu[b]:.3f}" if f in cpu and b in cpu else ""
                print(f"  ratio {f}/{b}: {medians[f] / medians[b]:.3f}   "
                      f"(of fastest steps {min(times[f]) / min(times[b]):.3f}{cpu_ratio})")
    source = "table/measured" if args.device.startswith("cuda") else "measured fp32 matmul"
    print(f"  (MFU against a {peak / 1e12:.3f} TFLOP/s {source} peak)")
    return medians


def run_eager(args) -> None:
    config, runners, x, y = build(args, ("fnlm", "a", "b"))
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    losses = check_agree(runners, x, y, "at step 0", tol)
    print("eager; loss at step 0: " + ", ".join(f"{r.name} {v:.5f}" for r, v in zip(runners, losses)))
    cpu_times: dict[str, list[float]] = {}
    times = time_runners(runners, x, y, args.device, args.warmup, args.steps, cpu_times)
    losses = check_agree(runners, x, y, f"after {args.warmup + args.steps} steps", 50 * tol)
    print(f"loss after {args.warmup + args.steps} steps: " + ", ".join(f"{r.name} {v:.5f}" for r, v in zip(runners, losses)))
    report(times, args, config, ["(a) module", "(b) fused"], cpu_times=cpu_times)


def run_compiled(args) -> None:
    import torch._dynamo

    modes = [m for m in args.compile_modes.split(",") if m]
    config, runners, x, y = build(args, ("b",), compile_mode="loss")
    for mode in modes:
        runners.insert(len(runners) - 1, build(args, ("fnlm",), compile_mode=mode)[1][0])
    explanation = torch._dynamo.explain(lambda p, ids: fnlm.transformer_lm(p, ids, config))(runners[0].state.params, x)
    print(f"\ncompiled; dynamo explain over transformer_lm: {explanation.graph_count} graph(s), "
          f"{explanation.graph_break_count} graph break(s)")
    torch._dynamo.reset()
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    start = time.perf_counter()
    losses = check_agree(runners, x, y, "at step 0", tol)
    for r in runners:
        r.step(x, y)
    sync(args.device)
    print(f"compile + first steps: {time.perf_counter() - start:.1f} s; loss at step 0: "
          + ", ".join(f"{r.name} {v:.5f}" for r, v in zip(runners, losses)))
    cpu_times: dict[str, list[float]] = {}
    times = time_runners(runners, x, y, args.device, args.warmup, args.steps, cpu_times)
    check_agree(runners, x, y, f"after {args.warmup + args.steps + 1} steps", 50 * tol)
    report(times, args, config, ["(b) fused compiled loss"], cpu_times=cpu_times, label="compiled: ")


def child(args) -> None:
    """Runs in a fresh process: time fnlm only (``--typecheck``) or measure one step's memory."""
    import psutil

    start_rss = psutil.Process().memory_info().rss
    which = (args.child_runner,)
    config, runners, x, y = build(args, which)
    r = runners[0]
    if args.child_mode == "time":
        cpu_times: dict[str, list[float]] = {}
        times = time_runners(runners, x, y, args.device, args.warmup, args.steps, cpu_times)
        out = {"median_s": statistics.median(times[r.name]), "typecheck": fnlm.typecheck_enabled(),
               "name": r.name, "times_s": times[r.name], "cpu_s": cpu_times[r.name]}
    elif args.device.startswith("cuda"):
        r.step(x, y)
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            r.step(x, y)
        sync(args.device)
        out = {"peak_bytes": torch.cuda.max_memory_allocated(), "before_bytes": before}
    else:
        import resource

        for _ in range(3):
            r.step(x, y)
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = {"peak_bytes": max_rss - start_rss, "before_bytes": 0}
    child_result(out)


def spawn(args, runner: str, mode: str, env_extra: dict[str, str | None]) -> dict:
    cmd = [sys.executable, __file__, "--child-runner", runner, "--child-mode", mode,
           "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
           *model_argv(args), *(["--pure"] if args.pure else []), *(["--tune-malloc"] if args.tune_malloc else []),
           *(["--threads", str(args.threads)] if args.threads else [])]
    return run_child(cmd, f"{runner} {mode}", env=env_extra)


def run_isolated(args) -> None:
    """Each runner alone in a fresh process, as a user runs one: `--rounds` rounds, the order of the
    runners rotating each round; the medians are over all steps of all rounds.

    In one process the runners share glibc's heap. Freed blocks at its top are returned to the OS
    once they pass the trim threshold, and the next step touches fresh pages again: alone, each of
    the three took thousands of page faults a step (fnlm about 14k, (b) about 24k, 17M model), but
    alternated in one process the runner with the highest peak pays them while the others reuse
    its pages. This mode gives each the allocator to itself."""
    config = make_config(args)
    names = ["fnlm", "a", "b"]
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for i in range(args.rounds):
        for runner in names[i % 3:] + names[: i % 3]:
            out = spawn(args, runner, "time", {})
            times.setdefault(out["name"], []).extend(out["times_s"])
            cpu.setdefault(out["name"], []).extend(out["cpu_s"])
    times = {n: times[n] for n in sorted(times, key=lambda n: (not n.startswith("fnlm"), n))}
    report(times, args, config, ["(a) module", "(b) fused"], cpu_times=cpu,
           label=f"each alone in a fresh process ({args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up), ",
           over="all steps")


def run_typecheck(args) -> None:
    rounds = []
    for _ in range(args.rounds):
        off = spawn(args, "fnlm", "time", {"FNLM_TYPECHECK": None})
        on = spawn(args, "fnlm", "time", {"FNLM_TYPECHECK": "1"})
        assert on["typecheck"] and not off["typecheck"], (on, off)
        rounds.append((off["median_s"], on["median_s"]))
    off_s = statistics.median(r[0] for r in rounds)
    on_s = statistics.median(r[1] for r in rounds)
    print(f"\nfnlm training step, shape checks off vs on ({args.rounds} alternating subprocess pairs, "
          f"median of {args.steps} steps each):")
    print(f"  FNLM_TYPECHECK unset: {off_s * 1e3:9.2f} ms")
    print(f"  FNLM_TYPECHECK=1:     {on_s * 1e3:9.2f} ms")
    print(f"  ratio on/off: {on_s / off_s:.3f}")


def run_memory(args) -> None:
    results = {}
    for runner, name in (("fnlm", "fnlm"), ("a", "(a) module")):
        vals = [spawn(args, runner, "memory", {"FNLM_TYPECHECK": None}) for _ in range(args.rounds)]
        results[name] = vals
    mib = 2**20
    what = ("torch.cuda.max_memory_allocated; 'before' = allocated after one step" if args.device.startswith("cuda")
            else "peak RSS of a fresh process over 3 steps minus its RSS before building the model")
    print(f"\npeak memory of a training step ({what}; median over {args.rounds} processes):")
    for name, vals in results.items():
        peak = statistics.median(v["peak_bytes"] for v in vals)
        before = statistics.median(v["before_bytes"] for v in vals)
        extra = f"   before {before / mib:8.1f} MiB" if before else ""
        print(f"  {name:<12} peak {peak / mib:8.1f} MiB{extra}")
    pf = statistics.median(v["peak_bytes"] for v in results["fnlm"])
    pa = statistics.median(v["peak_bytes"] for v in results["(a) module"])
    print(f"  ratio fnlm/(a) peak: {pf / pa:.3f}")
    config = make_config(args)
    est = accounting.adamw_memory(config, batch_size=args.batch, seq_len=args.context)
    print("  accounting estimate (float32): " + ", ".join(f"{k} {v / mib:.1f} MiB" for k, v in est.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="subprocess pairs for --typecheck / --memory")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tune-malloc", action="store_true",
                   help="keep freed memory in glibc's heap (mallopt), so fresh tensors do not page-fault")
    p.add_argument("--no-compile", action="store_true", help="eager ratios only")
    p.add_argument("--pure", action="store_true",
                   help="step fnlm without donation (new params and moments each step) instead of as the training loop does")
    p.add_argument("--compile-only", action="store_true", help="compiled ratios only")
    p.add_argument("--compile-modes", default="step",
                   help="comma-separated fnlm compile modes: step (the whole train_step, fullgraph), loss")
    p.add_argument("--typecheck", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--isolated", action="store_true",
                   help="eager: also time each runner alone in a fresh process (--rounds of them), as a user runs one")
    p.add_argument("--child-runner", help=argparse.SUPPRESS)
    p.add_argument("--child-mode", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.tune_malloc else None
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.child_runner:
        child(args)
        return
    config = make_config(args)
    started = print_machine(args.device)
    print(f"model: d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads, "
          f"d_ff {config.d_ff}, vocab {config.vocab_size}; {accounting.parameter_count(config):,} parameters; "
          f"batch {args.batch} x context {args.context}, {args.device} {args.dtype}; "
          f"shape checks {'ON' if fnlm.typecheck_enabled() else 'off'}; "
          f"glibc malloc {'tuned (mallopt)' if malloc else 'default' if malloc is None else 'tuning failed'}")
    if args.typecheck:
        run_typecheck(args)
    elif args.memory:
        run_memory(args)
    else:
        if not args.compile_only:
            run_eager(args)
            if args.isolated:
                run_isolated(args)
        if not args.no_compile:
            run_compiled(args)
    print_done(started)


if __name__ == "__main__":
    main()
