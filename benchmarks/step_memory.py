"""Peak memory of one training step: fnlm's `train_step` (pure, and with donation) against an in-place
`torch.optim.AdamW` step of a hand-written module, each in a fresh process.

Each child process imports torch and fnlm, records its resident set size (the *import baseline*),
builds the model, its optimizer state and a batch, and takes `--steps` training steps (forward,
backward, gradient clipping, AdamW). Its figure is the peak resident set size over its lifetime
minus the import baseline. The runs alternate between the modes, `--rounds` processes each, and
the medians are printed with their ratios to the baseline:

- `fnlm pure`: `fnlm.train_step(state, x, y, ...)`, which keeps the old state intact (a step holds
  the old and the new parameters and moments at once);
- `fnlm donate`: `fnlm.train_step(..., donate=True)` (JAX's donation: the old state is updated in
  place; what `fnlm.train.train`'s loop does);
- `torch AdamW` (the baseline): `benchmarks/reference.py`'s module with `torch.optim.AdamW` at its
  defaults (on CPU: the in-place single-tensor loop), `clip_grad_norm_`, `zero_grad(set_to_none=True)`;
- `torch AdamW foreach`: the same with `foreach=True` (the multi-tensor path, torch's default on CUDA);
- `fnlm model + torch AdamW`: fnlm's model and loss on leaves that require grad, `.backward()`,
  `clip_grad_norm_` and an in-place `torch.optim.AdamW` (defaults): the same maths as fnlm's step
  with torch's optimizer, so it isolates what the optimizer step costs.

All use the same model (default: the 17M TinyStories model, d_model 512, 4 layers, 16 heads, d_ff 1344,
vocab 10,000; 22.7M parameters with the embeddings) at batch 4 x context 128, float32, on CPU.

    python benchmarks/step_memory.py [--rounds 3] [--steps 3] [--batch 4 --context 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_model_args, child_result, model_argv, print_done, print_machine, run_child  # noqa: E402

MODES = ("fnlm pure", "fnlm donate", "torch AdamW", "torch AdamW foreach", "fnlm model + torch AdamW")
BASELINE = "torch AdamW"
LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> None:
    """One fresh process: import, record the baseline, build, step, report the peak above the baseline."""
    import resource

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference import ReferenceLM, cross_entropy, load_fnlm_params

    import fnlm

    baseline = _rss()
    config = fnlm.TransformerConfig(vocab_size=args.vocab, context_length=args.context, d_model=args.d_model,
                                    num_layers=args.layers, num_heads=args.heads, d_ff=args.d_ff)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.context), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.context), generator=g)
    params = fnlm.init_transformer_lm(config, seed=0)
    if args.child.startswith("fnlm"):
        state = fnlm.init_train_state(params)
        step_config = fnlm.StepConfig(lr=LR, min_lr=LR, warmup_steps=0, cosine_steps=args.steps, betas=BETAS, eps=EPS,
                                      weight_decay=WEIGHT_DECAY, grad_clip=MAX_NORM)

        def loss_fn(p, xb, yb):
            return fnlm.cross_entropy(fnlm.transformer_lm(p, xb, config), yb)

        donate = args.child == "fnlm donate"
        for _ in range(args.steps):
            state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=step_config, donate=donate)
        loss = float(metrics["loss"])
    elif args.child == "fnlm model + torch AdamW":
        leaves = fnlm.tree_map(lambda t: t.requires_grad_(), params)
        opt = torch.optim.AdamW(fnlm.tree_leaves(leaves), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            out = fnlm.cross_entropy(fnlm.transformer_lm(leaves, x, config), y)
            out.backward()
            torch.nn.utils.clip_grad_norm_(fnlm.tree_leaves(leaves), MAX_NORM)
            opt.step()
        loss = float(out.detach())
    else:
        model = ReferenceLM(config, fused=False)
        load_fnlm_params(model, fnlm.tree_flatten(params))
        del params
        kw = {"foreach": True} if args.child.endswith("foreach") else {}
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kw)
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            out = cross_entropy(model(x), y)
            out.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
        loss = float(out.detach())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child_result({"peak_above_imports": peak - baseline, "imports": baseline, "loss": loss,
                                        "threads": torch.get_num_threads()})


def spawn(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), *model_argv(args)]
    return run_child(cmd, f"{mode!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per mode (alternating)")
    p.add_argument("--steps", type=int, default=3, help="training steps per process")
    add_model_args(p)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return

    started = print_machine(torch=True)
    print(f"model: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {args.d_ff}, vocab "
          f"{args.vocab}; batch {args.batch} x context {args.context}, float32, CPU; {args.steps} steps per process, "
          f"{args.rounds} processes per mode")
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            results[mode].append(spawn(args, mode))
    mib = 2**20
    base = statistics.median(r["peak_above_imports"] for r in results[BASELINE])
    print(f"\npeak resident memory above the import baseline (median of {args.rounds} fresh processes):")
    for mode, runs in results.items():
        peak = statistics.median(r["peak_above_imports"] for r in runs)
        imports = statistics.median(r["imports"] for r in runs)
        print(f"  {mode:<20} {peak / mib:8.1f} MiB   ratio to {BASELINE}: {peak / base:.3f}   "
              f"(imports {imports / mib:.0f} MiB; final loss {runs[-1]['loss']:.4f})")
    donate = statistics.median(r["peak_above_imports"] for r in results["fnlm donate"])
    same = statistics.median(r["peak_above_imports"] for r in results["fnlm model + torch AdamW"])
    print(f"\nfnlm donate / {BASELINE}: {donate / base:.3f}; fnlm donate / fnlm model + torch AdamW: "
          f"{donate / same:.3f} (target <= 1.02)")
    print_done(started)


if __name__ == "__main__":
    main()
