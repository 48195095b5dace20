"""Peak memory of one training step with a batch in one piece against the same batch in
micro-batches (`StepConfig(grad_accum_steps=K)`), each in a fresh process; and how far apart the
two steps' loss and params are.

Each child process imports torch and fnlm, records its resident set size (the import baseline),
builds the model, its AdamW state (`train_step`'s default, CS336's Algorithm 2) and one batch, and
takes `--steps` donated training steps (`fnlm.train_step(..., donate=True)`, as the training loop
takes them). Its figure is the peak resident set size over its lifetime minus the baseline, as in
`benchmarks/step_memory.py`. The modes alternate, `--rounds` processes each, and the medians are
printed:

- `one piece`: the batch of `--batch` sequences through one forward and backward;
- `accumulated`: `grad_accum_steps=--accum`, `--accum` micro-batches of `--batch / --accum`
  sequences, their gradients averaged (one micro-batch's activations alive at a time).

A third child takes one step of each kind from the same params and prints the difference of the
losses and the largest difference of the new params (absolute, and relative to the largest
param): the two steps compute the same mean gradient in a different order of float32 sums.

Default: the 17M TinyStories model (d_model 512, 4 layers, 16 heads, d_ff 1344, vocab 10,000) at
batch 32 x context 128 against 4 micro-batches of 8, float32, CPU.

    python benchmarks/grad_accum_memory.py [--rounds 3] [--steps 1] [--accum 4] [--batch 32 ...]
    python benchmarks/grad_accum_memory.py --tiny        # a quick end-to-end run at a tiny size
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import MODEL_17M, add_model_args, child_result, model_argv, print_done, print_machine, run_child  # noqa: E402  (torch-free)

MODES = ("one piece", "accumulated", "compare")
TINY = dict(batch=8, context=16, vocab=128, d_model=32, layers=2, heads=4, d_ff=64)
LR, WEIGHT_DECAY, MAX_NORM = 1e-3, 0.1, 1.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(args: argparse.Namespace):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fnlm

    config = fnlm.TransformerConfig(vocab_size=args.vocab, context_length=args.context, d_model=args.d_model,
                                    num_layers=args.layers, num_heads=args.heads, d_ff=args.d_ff)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.context), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.context), generator=g)

    def loss_fn(p, xb, yb):
        return fnlm.cross_entropy(fnlm.transformer_lm(p, xb, config), yb)

    def step_config(accum: int):
        return fnlm.StepConfig(lr=LR, min_lr=LR, warmup_steps=0, cosine_steps=max(args.steps, 1),
                               weight_decay=WEIGHT_DECAY, grad_clip=MAX_NORM, grad_accum_steps=accum)

    return fnlm, config, x, y, loss_fn, step_config


def child(args: argparse.Namespace) -> None:
    """One fresh process: import, record the baseline, build, step, report the peak above the baseline."""
    import resource

    import torch

    baseline = _rss()
    fnlm, config, x, y, loss_fn, step_config = _setup(args)
    if args.child == "compare":
        compare(fnlm, config, x, y, loss_fn, step_config, args.accum)
        return
    state = fnlm.init_train_state(fnlm.init_transformer_lm(config, seed=0))
    accum = args.accum if args.child == "accumulated" else 1
    for _ in range(args.steps):
        state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=step_config(accum), donate=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child_result({"peak_above_imports": peak - baseline, "imports": baseline,
                                        "loss": float(metrics["loss"]), "threads": torch.get_num_threads()})


def compare(fnlm, config, x, y, loss_fn, step_config, accum: int) -> None:
    """One step in one piece and one accumulated, from the same params: their loss and param differences."""
    params = fnlm.init_transformer_lm(config, seed=0)
    whole, m1 = fnlm.train_step(fnlm.init_train_state(params), x, y, loss_fn=loss_fn, config=step_config(1))
    split, m2 = fnlm.train_step(fnlm.init_train_state(params), x, y, loss_fn=loss_fn, config=step_config(accum))
    a, b = fnlm.tree_flatten(whole.params), fnlm.tree_flatten(split.params)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(v.abs().max()) for v in a.values())
    moved = max(float((a[k] - v).abs().max()) for k, v in fnlm.tree_flatten(params).items())
    child_result({"loss_one_piece": float(m1["loss"]), "loss_accumulated": float(m2["loss"]),
                                        "grad_norm_one_piece": float(m1["grad_norm"]),
                                        "grad_norm_accumulated": float(m2["grad_norm"]),
                                        "max_param_diff": diff, "max_param": scale, "max_param_change": moved})


def spawn(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--accum", str(args.accum),
           *model_argv(args)]
    return run_child(cmd, f"{mode!r}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per mode (alternating)")
    p.add_argument("--steps", type=int, default=1, help="training steps per process")
    p.add_argument("--accum", type=int, default=4, help="micro-batches of the accumulated step")
    p.add_argument("--tiny", action="store_true", help=f"a tiny model and batch ({TINY}), one round")
    add_model_args(p, batch=32)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        defaults = {**MODEL_17M, "batch": 32}
        for name, value in TINY.items():
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
        args.rounds = 1
    if args.accum < 1 or args.batch % args.accum:
        p.error(f"--accum must be >= 1 and divide --batch, got --accum {args.accum}, --batch {args.batch}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        child(args)
        return
    started = print_machine(torch=False)
    print(f"model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, vocab "
          f"{args.vocab}; batch {args.batch} x context {args.context} in one piece vs {args.accum} micro-batches of "
          f"{args.batch // args.accum}; float32, CPU; {args.steps} donated step(s) per process, {args.rounds} "
          "process(es) per mode")
    results: dict[str, list[dict]] = {m: [] for m in MODES[:2]}
    for _ in range(args.rounds):
        for mode in results:
            results[mode].append(spawn(args, mode))
    mib = 2**20
    base = statistics.median(r["peak_above_imports"] for r in results["one piece"])
    print(f"\npeak resident memory above the import baseline (median of {args.rounds} fresh processes):")
    for mode, runs in results.items():
        peak = statistics.median(r["peak_above_imports"] for r in runs)
        print(f"  {mode:<12} {peak / mib:8.1f} MiB   ratio to one piece: {peak / base:.3f}   "
              f"(imports {statistics.median(r['imports'] for r in runs) / mib:.0f} MiB; loss {runs[-1]['loss']:.4f})")
    c = spawn(args, "compare")
    print(f"\none step from the same params: loss {c['loss_one_piece']:.7f} (one piece) vs "
          f"{c['loss_accumulated']:.7f} (accumulated), difference {abs(c['loss_one_piece'] - c['loss_accumulated']):.2e}; "
          f"gradient norm {c['grad_norm_one_piece']:.6f} vs {c['grad_norm_accumulated']:.6f}; largest param difference "
          f"{c['max_param_diff']:.2e} ({c['max_param_diff'] / c['max_param']:.2e} of the largest param, "
          f"{c['max_param_diff'] / c['max_param_change']:.2e} of the largest change the step made)")
    print_done(started)


if __name__ == "__main__":
    main()
