"""Train variants on the same data, seed and budget; watch for divergence; plot and tabulate.

`train_variant` trains one run (`fnlm.train.train`); `train_variant_sweep` trains several runs of one
variant that differ only in learning rate, weight decay or seed at once, as one vectorized run
(`fnlm.train.sweep.train_vectorized`), with the same outputs. `experiments/run_ablations.py` is the
command line over these functions.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fnlm.train import Callback, DivergenceGuard, TrainConfig, default_hooks, train, train_vectorized
from fnlm.train.plots import plot_runs, plot_seeds, plot_sweep

from .variant import Ablation

__all__ = [
    "RunResult",
    "optimizer_table",
    "plot_comparison",
    "plot_seed_sweep",
    "plot_sweep_results",
    "results_table",
    "train_variant",
    "train_variant_sweep",
]


@dataclass
class RunResult:
    """One finished (or stopped) run: its label, settings and metric records."""

    label: str
    ablation: str
    config: Any
    train_config: TrainConfig
    records: list[dict[str, Any]] = field(default_factory=list)
    params: int = 0
    diverged_at: int | None = None
    reason: str = ""

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def last(self, key: str) -> float:
        """The last finite value of `key` in the records (NaN when none)."""
        values = [r[key] for r in self.records if key in r and math.isfinite(r[key])]
        return values[-1] if values else math.nan

    @property
    def wall_time(self) -> float:
        return self.records[-1]["time"] if self.records else 0.0

    @property
    def steps(self) -> int:
        return self.records[-1]["step"] if self.records else 0


def train_variant(
    ablation: Ablation,
    config: Any,
    train_config: TrainConfig,
    train_tokens: Any,
    valid_tokens: Any,
    out_dir: str | os.PathLike,
    *,
    label: str | None = None,
    explode_factor: float = 2.0,
    keep_checkpoints: bool = False,
) -> RunResult:
    """Train one ablation from scratch (the trainer draws the same batches for the same seed).

    **Arguments:**

    - `ablation`: the variant; its `configure` is applied to `config`.
    - `config`: the baseline `TransformerConfig`.
    - `train_config`: steps, batch size, learning rate, seed, ...
    - `train_tokens`, `valid_tokens`: 1-D token ids.
    - `out_dir`: this run's folder (`metrics.jsonl`; `checkpoints/` only with `keep_checkpoints`).
    - `label`: the row name (default the ablation's name).
    - `explode_factor`: a loss above this multiple of the best training loss so far stops the run
      (`fnlm.train.DivergenceGuard`, which also stops a loss above `log(vocab) + 1`).

    **Returns:** a `RunResult`; a stopped run has `diverged_at` set and its records up to there.
    """
    config = ablation.config_for(config)
    result = RunResult(label or ablation.name, ablation.name, config, train_config)
    out = _fresh(out_dir)
    summary = train(config, train_config, train_tokens, valid_tokens, out, model_fn=ablation.model_fn,
                    init_fn=ablation.init_fn, hooks=_hooks(config, explode_factor, {"": result}),
                    extra_checkpoint_data={"ablation": ablation.name})
    _finish(result, summary, out, keep_checkpoints)
    return result


def _fresh(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    return out


def _hooks(config: Any, explode_factor: float, results: dict[str, RunResult]) -> Any:
    """The runner's hooks for a run: the defaults, a divergence guard, and a callback that keeps the
    records in the `RunResult` of the run's folder (`results` is keyed by folder; `""`: any)."""

    def hooks(run: Any) -> list:
        result = results.get(str(run.out)) or results[""]
        return [*default_hooks(run), DivergenceGuard(config.vocab_size, factor=explode_factor),
                Callback(result.records.append)]

    return hooks


def _finish(result: RunResult, summary: dict[str, Any], out: Path, keep_checkpoints: bool) -> None:
    result.params = summary["params"]
    if summary["diverged"]:
        result.diverged_at, result.reason = summary["step"], summary["stop_reason"]
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def train_variant_sweep(
    ablation: Ablation,
    config: Any,
    train_configs: Sequence[TrainConfig],
    train_tokens: Any,
    valid_tokens: Any,
    out_dirs: Sequence[str | os.PathLike],
    labels: Sequence[str],
    *,
    explode_factor: float = 2.0,
    keep_checkpoints: bool = False,
    chunk_size: int | None = None,
) -> list[RunResult]:
    """Train several runs of one ablation at once, as one vectorized run (`torch.func.vmap` over the
    models); each gives what `train_variant` would give for it, up to float rounding.

    **Arguments:**

    - `ablation`, `config`, `train_tokens`, `valid_tokens`, `explode_factor`, `keep_checkpoints`: as
      for `train_variant`.
    - `train_configs`: one per run; they may differ only in `lr`, `min_lr`, `weight_decay` and `seed`.
    - `out_dirs`, `labels`: each run's folder and row name.
    - `chunk_size`: vmap over at most this many runs at a time (`None`: all at once).

    **Returns:** one `RunResult` per run, in order. A run that diverges stops alone (its records end
    there, `diverged_at` set); the others go on.
    """
    config = ablation.config_for(config)
    results = [RunResult(label, ablation.name, config, tc) for label, tc in zip(labels, train_configs)]
    outs = [_fresh(d) for d in out_dirs]
    by_folder = {str(out): r for out, r in zip(outs, results)}
    summaries = train_vectorized(config, train_configs, train_tokens, valid_tokens, outs, model_fn=ablation.model_fn,
                                 init_fn=ablation.init_fn, hooks=_hooks(config, explode_factor, by_folder),
                                 extra_checkpoint_data={"ablation": ablation.name}, chunk_size=chunk_size)
    for result, summary, out in zip(results, summaries, outs):
        _finish(result, summary, out, keep_checkpoints)
    return results


def plot_comparison(results: Sequence[RunResult], path: str | os.PathLike, *, title: str = "",
                    baseline: float | None = None, log_y: bool = False) -> Path:
    """Validation loss against steps and wall-clock time, a line per run; a diverged run ends in a cross;
    `baseline` (the unigram entropy) as a dashed line; `log_y` for a log-scale loss axis."""
    return plot_runs({r.label: r.records for r in results}, path, title=title, train=False,
                     stopped=[r.label for r in results if r.diverged], baseline=baseline, log_y=log_y)


def plot_sweep_results(results: Sequence[RunResult], values: Sequence[float], path: str | os.PathLike, *, name: str,
                       x_key: str = "step", log_x: bool = True, title: str = "", baseline: float | None = None,
                       log_y: bool = False) -> Path:
    """`fnlm.train.plots.plot_sweep` over the runs of a sweep, one per swept value."""
    return plot_sweep({r.label: r.records for r in results}, values, path, name=name, x_key=x_key, log_x=log_x,
                      stopped=[r.label for r in results if r.diverged], groups=[r.ablation for r in results], title=title,
                      baseline=baseline, log_y=log_y)


def plot_seed_sweep(results: Sequence[RunResult], seeds: Sequence[int], path: str | os.PathLike, *, title: str = "",
                    baseline: float | None = None, log_y: bool = False) -> Path:
    """`fnlm.train.plots.plot_seeds` over the runs of a seed sweep: each seed's final loss as a point, with
    the mean ± standard deviation per variant."""
    return plot_seeds({r.label: r.records for r in results}, [int(s) for s in seeds], path,
                      stopped=[r.label for r in results if r.diverged], groups=[r.ablation for r in results], title=title,
                      baseline=baseline, log_y=log_y)


def _fmt(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "—"


def results_table(results: Sequence[RunResult], *, first_column: str = "variant") -> str:
    """A markdown table: one row per run with parameters, steps, final training loss (mean of the
    last logged window), final validation loss and perplexity, wall-clock seconds, tokens/s and
    the status (`ok` or `diverged at step N: why`)."""
    head = f"| {first_column} | params | steps | train loss | val loss | val ppl | wall (s) | tokens/s | status |"
    rows = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        val = r.last("val_loss")
        ppl = math.exp(val) if math.isfinite(val) and val < 700 else math.nan
        status = "ok" if not r.diverged else f"**diverged** at step {r.diverged_at}: {r.reason}"
        rows.append(f"| {r.label} | {r.params:,} | {r.steps} | {_fmt(r.last('train_loss'), '.3f')} | {_fmt(val, '.3f')} | "
                    f"{_fmt(ppl, '.2f')} | {r.wall_time:.0f} | {_fmt(r.last('tokens_per_sec'), ',.0f')} | {status} |")
    return "\n".join(rows) + "\n"


def optimizer_table(results: Sequence[RunResult]) -> str:
    """A markdown table of an optimizer comparison: one row per run with its optimizer's peak
    learning rate and momentum, final training and validation loss, validation perplexity, tokens/s,
    wall-clock seconds and whether it diverged (`no`, or the step and why)."""
    head = "| optimizer | peak lr | momentum | train loss | val loss | val ppl | tokens/s | wall (s) | diverged |"
    rows = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        step, val = r.train_config.step, r.last("val_loss")
        ppl = math.exp(val) if math.isfinite(val) and val < 700 else math.nan
        momentum = "—" if step.momentum is None else f"{step.momentum:g}"
        diverged = "no" if not r.diverged else f"**at step {r.diverged_at}**: {r.reason}"
        rows.append(f"| {r.label} | {step.lr:g} | {momentum} | {_fmt(r.last('train_loss'), '.3f')} | {_fmt(val, '.3f')} | "
                    f"{_fmt(ppl, '.2f')} | {_fmt(r.last('tokens_per_sec'), ',.0f')} | {r.wall_time:.0f} | {diverged} |")
    return "\n".join(rows) + "\n"
