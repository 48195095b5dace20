"""Train the baseline and the ablations on identical data, seed and token budget; compare them.

    python experiments/run_ablations.py --preset smoke --out runs/ablations-smoke
    python experiments/run_ablations.py --preset demo --out runs/ablations --only baseline,nope --steps 300
    python experiments/run_ablations.py --preset demo --out runs/lr --lrs 1e-4,3e-4,1e-3,3e-3,1e-2
    python experiments/run_ablations.py --preset demo --out runs/bs --batch-sizes 1,4,16,64
    python experiments/run_ablations.py --preset demo --out runs/lr --lrs 1e-3,3e-3,1e-2 --seeds 0,1,2 --vectorize
    python experiments/run_ablations.py --preset smoke --out runs/optimizers --optimizers
    python experiments/run_ablations.py --preset smoke --out runs/opt --optimizers adamw,lion:3e-4
    python experiments/run_ablations.py --preset smoke --out runs/lion --optimizer lion --lrs 1e-4,3e-4,1e-3

The data, tokenizer and token files come from the `train_tinystories.py` pipeline stages, made
once in DIR and reused by every run (and by later invocations). Every model and training flag of
`train_tinystories.py` is accepted too (`--d-model 256`, `--lr 2e-3`, `--data DIR`, ...) and
applies to every run. Outputs in DIR:

- `ablations.png`, `ablations.md`: validation loss against steps and wall-clock, one line per
  variant; the table of final losses (comparison mode, the default).
- `lr_sweep.png`, `lr_sweep.md` with `--lrs`: one run per peak learning rate (min lr scaled with
  it), same steps.
- `batch_size_sweep.png`, `batch_size_sweep.md` with `--batch-sizes`: the **token budget** is
  fixed (steps = preset steps × preset batch / batch size; warm-up, evaluation interval and
  evaluation batches scaled the same way), the learning rate is not changed.
- `optimizer_sweep.png`, `optimizer_sweep.md` with `--optimizers`: one run per optimizer of
  `ablations.OPTIMIZER_ABLATION` (AdamW, Lion, Muon, SGD; all, or a comma list of names), each at its
  own tuned peak learning rate (`name:lr` overrides it; min lr a tenth of the peak) and momentum;
  everything else (data, seed, steps, warm-up, weight decay, clipping) identical.
- `seed_sweep.png`, `seed_sweep.md` with `--seeds`: one run per seed (initialisation, batch order and
  evaluation windows), same settings otherwise; the plot shows each seed's final loss as a point
  with the mean ± standard deviation.

The pipeline's step flags apply to every run, so `--optimizer lion --lrs 1e-4,3e-4,1e-3` sweeps the
learning rate of Lion (the way the optimizer ablation's rates were tuned), and `--momentum 0.8 --optimizer
sgd --seeds 0,1` the seeds of SGD; under `--optimizers` each run's optimizer, rates and momentum are
the ablation's.

Loss plots draw the unigram baseline (the validation tokens' entropy) as a dashed line;
`--log-loss` puts their loss axes on a log scale.
- `runs/<label>/metrics.jsonl` per run; `summary.json` with every table's rows.

`--vectorize` trains the learning-rate and seed sweeps of a variant as one vectorized run: all its
models at once, `torch.func.vmap` over their stacked parameters (`fnlm.train.sweep`). The outputs are
the same files with the same records (each model's equal to its sequential run's up to float
rounding); a run's wall time is then the shared run's, and its tokens/s its own share. The
comparison of variants and the batch-size sweep change the model or the batch shape, so they run one
after another as before.

A run stops early and is marked diverged when a loss or gradient norm is NaN/inf, a logged loss
exceeds log(vocab)+1, or exceeds `--explode-factor` × the lowest training loss so far.

The output folder is locked while the script runs (`fnlm.train.RunLock`: a second invocation on
the same `--out` is refused). Settings that cannot work are reported before any stage runs, in one
line (exit code 2); `--threads N` (a flag of the pipeline) sets torch's CPU threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ablations import ABLATIONS, OPTIMIZER_ABLATION, optimizer_configs, parse_optimizers
from ablations.runner import (
    RunResult,
    optimizer_table,
    plot_comparison,
    plot_seed_sweep,
    plot_sweep_results,
    results_table,
    train_variant,
    train_variant_sweep,
)
from tinystories import stages
from tinystories.cli import ConfigError, resolve_settings
from tinystories.presets import PRESETS

from fnlm.train import RunFolderLocked, RunLock


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    values = _floats(text)
    if any(v != int(v) or v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [int(v) for v in values]


def _seeds(text: str) -> list[int]:
    values = _floats(text)
    if any(v != int(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return [int(v) for v in values]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare fnlm ablations (and sweep learning rate / batch size) on identical data, seed and budget. "
                    "Any other flag is passed to the train_tinystories.py pipeline (model, training, data flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # else the pipeline's --lr, --seed, --optimizer would be read as --lrs, --seeds, --optimizers
    )
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="the pipeline preset")
    p.add_argument("--out", help="output folder (default runs/ablations-<preset>)")
    p.add_argument("--only", help=f"comma-separated variants, from {', '.join(ABLATIONS)} (default: all; "
                                  "with a sweep: baseline)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (overrides the preset's steps/token budget)")
    p.add_argument("--lrs", type=_floats, help="learning-rate sweep, e.g. 1e-4,3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--batch-sizes", type=_ints, help="batch-size sweep at a fixed token budget, e.g. 1,8,32")
    p.add_argument("--seeds", type=_seeds,
                   help="seed sweep, e.g. 0,1,2 (initialisation, batch order, evaluation windows)")
    p.add_argument("--optimizers", nargs="?", const="", metavar="NAMES",
                   help=f"optimizer ablation: one run per optimizer at its tuned learning rate; all of "
                        f"{', '.join(OPTIMIZER_ABLATION)}, or a comma list, name:lr to override a rate (e.g. adamw,lion:3e-4)")
    p.add_argument("--vectorize", action="store_true",
                   help="train each variant's learning-rate and seed sweeps at once, as one vectorized run")
    p.add_argument("--chunk-size", type=int, help="with --vectorize: vmap over at most this many runs at a time, "
                                                  "to bound memory (default: all at once)")
    p.add_argument("--compare", action="store_true", help="also run the variant comparison when sweeping")
    p.add_argument("--explode-factor", type=float, default=2.0,
                   help="a loss above this multiple of the best training loss so far counts as divergence")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--log-loss", action="store_true", help="draw the plots' loss axes on a log scale")
    return p


def _variants(args: argparse.Namespace, sweeping: bool) -> list[str]:
    if not args.only:
        return ["baseline"] if sweeping else list(ABLATIONS)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"--only: unknown variant(s) {unknown}; choose from {list(ABLATIONS)}")
    return names


def _sweeping(args: argparse.Namespace) -> bool:
    return bool(args.lrs or args.batch_sizes or args.seeds) or args.optimizers is not None


def _check_args(args: argparse.Namespace) -> None:
    """`ConfigError` for a flag of this script that cannot work (the pipeline's own flags are
    checked by `resolve_settings`)."""
    factor = args.explode_factor
    if not (math.isfinite(factor) and factor > 1):
        raise ConfigError(f"--explode-factor {factor:g}: a run counts as diverged when its loss exceeds this multiple "
                          "of its best loss so far, so it must be a finite number above 1 (default 2)")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError(f"--chunk-size {args.chunk_size}: give a number of runs >= 1 (or leave it out: all at once)")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: a run needs at least one optimizer step")
    if args.optimizers is not None:
        try:
            args.optimizer_choice = parse_optimizers(args.optimizers)
        except ValueError as e:
            raise ConfigError(f"--optimizers {args.optimizers!r}: {e}") from None
    bad = [lr for lr in args.lrs or [] if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise ConfigError(f"--lrs: every learning rate must be a finite number above 0, got {bad}")
    if args.vectorize and not (args.lrs or args.seeds):
        raise ConfigError("--vectorize needs a learning-rate or seed sweep (--lrs, --seeds)")


def _rows(results: list[RunResult]) -> list[dict]:
    return [{"label": r.label, "ablation": r.ablation, "params": r.params, "steps": r.steps,
             "train_loss": r.last("train_loss"), "val_loss": r.last("val_loss"), "wall_time": r.wall_time,
             "tokens_per_sec": r.last("tokens_per_sec"), "diverged_at": r.diverged_at, "reason": r.reason,
             "lr": r.train_config.step.lr, "optimizer": r.train_config.step.optimizer,
             "momentum": r.train_config.step.momentum, "batch_size": r.train_config.batch_size, "seed": r.train_config.seed,
             "model": dataclasses.asdict(r.config)} for r in results]


def _write(out: Path, stem: str, heading: str, note: str, table: str) -> None:
    (out / f"{stem}.md").write_text(f"## {heading}\n\n{note}\n\n{table}\n![{heading}]({stem}.png)\n", encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class _Job:
    """One run of a sweep: its variant, settings, row label, sweep and swept value."""

    name: str
    tc: Any
    label: str
    sweep: str
    value: float


def _sweep_jobs(args: argparse.Namespace, names: list[str], base_tc: Any) -> list[_Job]:
    """The runs of the learning-rate and seed sweeps, per variant."""
    jobs = []
    for n in names:
        prefix = f"{n}_" if len(names) > 1 else ""
        for lr in args.lrs or []:
            tc = base_tc.with_step(lr=lr, min_lr=lr * base_tc.step.min_lr / base_tc.step.lr)
            jobs.append(_Job(n, tc, f"{prefix}lr{lr:g}", "lr", lr))
        for seed in args.seeds or []:
            jobs.append(_Job(n, dataclasses.replace(base_tc, seed=seed), f"{prefix}seed{seed}", "seed", seed))
    return jobs


def _run_jobs(args: argparse.Namespace, jobs: list[_Job], config: Any, train_ids: Any, valid_ids: Any, out: Path,
              run: Any) -> dict[str, RunResult]:
    """Train the sweeps' runs: one after another, or with `--vectorize` one vectorized run per variant."""
    if not args.vectorize:
        return {j.label: run(j.name, j.tc, j.label) for j in jobs}
    done = {}
    for n in dict.fromkeys(j.name for j in jobs):
        mine = [j for j in jobs if j.name == n]
        print(f"[ablations] {n}: {len(mine)} runs at once ({', '.join(j.label for j in mine)})", file=sys.stderr,
              flush=True)
        results = train_variant_sweep(ABLATIONS[n], config, [j.tc for j in mine], train_ids, valid_ids,
                                      [out / "runs" / j.label for j in mine], [j.label for j in mine],
                                      explode_factor=args.explode_factor, keep_checkpoints=args.keep_checkpoints,
                                      chunk_size=args.chunk_size)
        done.update({j.label: r for j, r in zip(mine, results)})
    return done


def _spread(results: list[RunResult]) -> str:
    finals = [r.last("val_loss") for r in results if not r.diverged and r.last("val_loss") == r.last("val_loss")]
    if len(finals) < 2:
        return ""
    mean = sum(finals) / len(finals)
    std = (sum((v - mean) ** 2 for v in finals) / (len(finals) - 1)) ** 0.5
    return f"Final validation loss over {len(finals)} seeds: mean {mean:.4f}, standard deviation {std:.4f}."


def _sweeps(args: argparse.Namespace, jobs: list[_Job], done_runs: dict[str, RunResult], out: Path, budget: str,
            what: str, lr: float, unigram: float) -> dict:
    """Plots, tables and summary rows of the learning-rate and seed sweeps."""
    summary = {}
    vec_note = (" All runs of a variant were trained at once, as one vectorized run (`--vectorize`): a run's wall "
                "time is the shared run's, its tokens/s its own share.") if args.vectorize else ""
    if args.lrs:
        results = [done_runs[j.label] for j in jobs if j.sweep == "lr"]
        plot_sweep_results(results, [j.value for j in jobs if j.sweep == "lr"], out / "lr_sweep.png",
                           name="peak learning rate", title=f"learning-rate sweep: {what}", baseline=unigram,
                           log_y=args.log_loss)
        _write(out, "lr_sweep", "Learning-rate sweep",
               f"Budget: {budget}. Only the peak learning rate changes (min lr kept at the same fraction of it)."
               f"{vec_note}",
               results_table(results, first_column="run"))
        summary["lr_sweep"] = _rows(results)
    if args.seeds:
        results = [done_runs[j.label] for j in jobs if j.sweep == "seed"]
        plot_seed_sweep(results, [j.value for j in jobs if j.sweep == "seed"], out / "seed_sweep.png",
                        title=f"seed sweep: {what}, lr {lr:g}", baseline=unigram, log_y=args.log_loss)
        _write(out, "seed_sweep", "Seed sweep",
               f"Budget: {budget}. Only the seed changes (initialisation, batch order, evaluation windows). "
               f"{_spread(results)}{vec_note}", results_table(results, first_column="run"))
        summary["seed_sweep"] = _rows(results)
    return summary


def _optimizer_sweep(args: argparse.Namespace, names: list[str], base_tc: Any, out: Path, budget: str, steps: int,
                     tokens: int, unigram: float, run: Any) -> list[dict]:
    """Train each variant once per optimizer of the ablation (`optimizer_configs`); write
    `optimizer_sweep.{md,png}`; return the summary rows."""
    configs = optimizer_configs(base_tc, args.optimizer_choice)
    results = [run(n, tc, f"{n}_{opt}" if len(names) > 1 else opt) for n in names for opt, tc in configs.items()]
    plot_comparison(results, out / "optimizer_sweep.png", baseline=unigram, log_y=args.log_loss,
                    title=f"optimizers, each at its tuned lr: {steps} steps, {tokens:,} tokens per run")
    legend = "\n".join(f"- `{o}`: {OPTIMIZER_ABLATION[o].description}" for o in configs)
    _write(out, "optimizer_sweep", "Optimizers",
           f"Budget: {budget}. Each optimizer at its own peak learning rate (the table's; min lr a tenth of it) "
           f"and momentum; everything else identical. Unigram baseline {unigram:.3f}.\n\n{legend}",
           optimizer_table(results))
    return _rows(results)


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, check it, and run the comparison and sweeps under the output
    folder's lock; `ConfigError` (before any stage runs) for settings that cannot work."""
    args, passthrough = build_parser().parse_known_args(argv)
    out = Path(args.out) if args.out else Path("runs") / f"ablations-{args.preset}"
    sweeping = _sweeping(args)
    _check_args(args)
    names = _variants(args, sweeping)
    flags = ["--preset", args.preset, "--out", str(out)] + (["--steps", str(args.steps)] if args.steps else [])
    flags += (["--quiet"] if args.quiet else []) + passthrough
    settings = resolve_settings(flags + ["--stage", "data,tokenizer,encode"])
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        lock = RunLock(out).acquire()
    except RunFolderLocked as e:
        raise ConfigError(str(e)) from None
    try:
        return _compare(args, names, flags, settings, out)
    finally:
        lock.release()


def _compare(args: argparse.Namespace, names: list[str], flags: list[str], settings: Any, out: Path) -> dict:
    sweeping = _sweeping(args)
    done = stages.main(flags + ["--stage", "data,tokenizer,encode"])
    config = stages.model_config_for(settings, done["tokenizer"])
    train_ids, valid_ids = stages.load_token_files(stages.Manifest(settings.out), done["encode"], config)
    base_tc = dataclasses.replace(settings.train, plot=False, checkpoint_interval=10**9, keep_checkpoints=1)
    steps = base_tc.total_steps(config.context_length)
    base_tc = dataclasses.replace(base_tc, steps=steps, max_tokens=None).with_step(warmup_steps=min(base_tc.step.warmup_steps, steps))
    tokens = steps * base_tc.batch_size * config.context_length
    lr_part = f", {base_tc.step.optimizer} lr {base_tc.step.lr:g} → {base_tc.step.min_lr:g}"
    budget = (f"preset `{args.preset}`, {steps} steps × {base_tc.batch_size} × {config.context_length} tokens = "
              f"{tokens:,} tokens per run{lr_part}, seed {base_tc.seed}; "
              f"model d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads, "
              f"d_ff {config.d_ff}, context {config.context_length}, vocab {config.vocab_size}")
    unigram = done["encode"].unigram_entropy
    summary: dict = {"budget": budget, "unigram_entropy": unigram}
    t0 = time.perf_counter()

    def run(name: str, tc, label: str) -> RunResult:
        print(f"[ablations] {label}", file=sys.stderr, flush=True)
        return train_variant(ABLATIONS[name], config, tc, train_ids, valid_ids, out / "runs" / label, label=label,
                             explode_factor=args.explode_factor, keep_checkpoints=args.keep_checkpoints)

    if not sweeping or args.compare:
        results = [run(n, base_tc, n) for n in names]
        plot_comparison(results, out / "ablations.png", title=f"fnlm ablations: {steps} steps, {tokens:,} tokens per run",
                        baseline=unigram, log_y=args.log_loss)
        legend = "\n".join(f"- `{n}`: {ABLATIONS[n].description}" for n in names)
        _write(out, "ablations", "Ablations", f"Budget: {budget}. Unigram baseline {unigram:.3f}.\n\n{legend}",
               results_table(results))
        summary["ablations"] = _rows(results)
    jobs = _sweep_jobs(args, names, base_tc)
    summary.update(_sweeps(args, jobs, _run_jobs(args, jobs, config, train_ids, valid_ids, out, run), out, budget,
                           f"{steps} steps, batch {base_tc.batch_size}", base_tc.step.lr, unigram))
    if args.optimizers is not None:
        summary["optimizer_sweep"] = _optimizer_sweep(args, names, base_tc, out, budget.replace(lr_part, ""), steps, tokens, unigram, run)
    if args.batch_sizes:
        results, values = [], []
        for n in names:
            for bs in args.batch_sizes:
                scale = base_tc.batch_size / bs
                bs_steps = max(1, round(steps * scale))
                tc = dataclasses.replace(base_tc, batch_size=bs, steps=bs_steps, eval_interval=max(1, round(base_tc.eval_interval * scale)), eval_batches=max(1, round(base_tc.eval_batches * scale)), log_interval=max(1, round(base_tc.log_interval * scale))).with_step(warmup_steps=min(bs_steps, round(base_tc.step.warmup_steps * scale)))
                results.append(run(n, tc, f"{n}_bs{bs}" if len(names) > 1 else f"bs{bs}"))
                values.append(bs)
        plot_sweep_results(results, values, out / "batch_size_sweep.png", name="batch size", x_key="tokens",
                           title=f"batch-size sweep at a fixed budget of {tokens:,} tokens, lr {base_tc.step.lr:g}",
                           baseline=unigram, log_y=args.log_loss)
        _write(out, "batch_size_sweep", "Batch-size sweep",
               f"Budget: {budget}. The token budget is fixed ({tokens:,} tokens): steps, warm-up and evaluation "
               "intervals scale with 1/batch size; the learning rate does not change.",
               results_table(results, first_column="run"))
        summary["batch_size_sweep"] = _rows(results)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["vectorized"] = bool(args.vectorize)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    for stem in ("ablations", "lr_sweep", "seed_sweep", "optimizer_sweep", "batch_size_sweep"):
        if stem in summary:
            print((out / f"{stem}.md").read_text(encoding="utf-8"))
    print(f"[ablations] done in {summary['seconds']:.0f}s; outputs in {out}", file=sys.stderr)
    return summary


def script(argv: list[str] | None = None) -> int:
    """The command line: `main`, with settings that cannot work (and a folder another run holds)
    reported in one line (exit code 2), and Ctrl-C in one line (exit code 130)."""
    try:
        main(argv)
    except ConfigError as e:
        print(f"run_ablations.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (stages.TrainingDiverged, stages.StageFailed) as e:
        print(f"run_ablations.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("run_ablations.py: interrupted; the finished stages and runs are kept", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(script())
