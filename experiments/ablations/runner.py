"""Train variants on the same data, seed and budget; watch for divergence; plot and tabulate.

`experiments/run_ablations.py` is the command line over these functions.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fnlm
from fnlm.trainer import TrainConfig, train

from .variant import Ablation

__all__ = ["Diverged", "DivergenceMonitor", "RunResult", "train_variant", "plot_comparison", "plot_sweep", "results_table"]


class Diverged(Exception):
    """Raised by `DivergenceMonitor` to stop a run; `step` and `reason` say where and why."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class DivergenceMonitor:
    """A `train` callback that stops a run whose loss is not finite or explodes.

    A logged loss (training or validation) diverges when it is NaN/inf, when it exceeds the
    loss of a uniform prediction `log(vocab_size)` by more than `margin` nats, or when it
    exceeds `factor` times the lowest training loss seen so far.
    """

    vocab_size: int
    factor: float = 2.0
    margin: float = 1.0
    best: float = math.inf

    def check(self, step: int, loss: float, what: str) -> None:
        """Raise `Diverged` if `loss` at `step` counts as divergence."""
        if not math.isfinite(loss):
            raise Diverged(step, f"{what} loss is {loss}")
        ceiling = math.log(self.vocab_size) + self.margin
        if loss > ceiling:
            raise Diverged(step, f"{what} loss {loss:.3f} > log(vocab)+{self.margin:g} = {ceiling:.3f}")
        if loss > self.factor * self.best:
            raise Diverged(step, f"{what} loss {loss:.3f} > {self.factor:g} x best {self.best:.3f}")

    def __call__(self, record: dict[str, Any]) -> None:
        for key in ("train_loss", "val_loss"):
            if key in record:
                self.check(record["step"], float(record[key]), key.removesuffix("_loss"))
        if "train_loss" in record:
            self.best = min(self.best, float(record["train_loss"]))


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
    monitor: DivergenceMonitor | None = None,
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
    - `monitor`: stops the run on divergence (default `DivergenceMonitor(config.vocab_size)`).

    **Returns:** a `RunResult`; a stopped run has `diverged_at` set and its records up to there.
    """
    config = ablation.config_for(config)
    monitor = monitor if monitor is not None else DivergenceMonitor(config.vocab_size)
    result = RunResult(label or ablation.name, ablation.name, config, train_config)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    try:
        summary = train(config, train_config, train_tokens, valid_tokens, out, model_fn=ablation.model_fn,
                        init_fn=ablation.init_fn, callbacks=[result.records.append, monitor])
        result.params = summary["params"]
        if summary["diverged"]:
            result.diverged_at, result.reason = summary["step"], "loss is not finite"
    except Diverged as stop:
        result.diverged_at, result.reason = stop.step, stop.reason
    if not result.params:
        result.params = fnlm.tree_size(ablation.init_fn(config, seed=0, device="meta"))
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _val_points(result: RunResult, key: str) -> tuple[list[float], list[float]]:
    pts = [(r[key], r["val_loss"]) for r in result.records if "val_loss" in r and math.isfinite(r["val_loss"])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_comparison(results: Sequence[RunResult], path: str | os.PathLike, *, title: str = "") -> Path:
    """One PNG: validation loss against steps (left) and against wall-clock seconds (right), a
    line per run; a diverged run ends in a cross."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, res in enumerate(results):
        for ax, key in zip(axes, ("step", "time")):
            xs, ys = _val_points(res, key)
            label = res.label + (" (diverged)" if res.diverged else "")
            ax.plot(xs, ys, color=f"C{i % 10}", marker="o", ms=3, lw=1.6, label=label)
            if res.diverged and xs:
                ax.plot(xs[-1:], ys[-1:], color=f"C{i % 10}", marker="x", ms=10, mew=2)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall-clock time (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_sweep(results: Sequence[RunResult], values: Sequence[float], path: str | os.PathLike, *, name: str,
               x_key: str = "step", log_x: bool = True, title: str = "") -> Path:
    """One PNG for a sweep: validation loss against `x_key` per run (left) and the final
    validation loss against the swept value (right, diverged runs as red crosses at their last
    finite loss, or at the top when there is none)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, res in enumerate(results):
        xs, ys = _val_points(res, x_key)
        left.plot(xs, ys, color=f"C{i % 10}", marker="o", ms=3, lw=1.6, label=res.label + (" (diverged)" if res.diverged else ""))
    finite = [r.last("val_loss") for r in results if not r.diverged and math.isfinite(r.last("val_loss"))]
    top = max(finite) * 1.1 if finite else 1.0
    ok = [(v, r.last("val_loss")) for v, r in zip(values, results) if not r.diverged]
    bad = [(v, r.last("val_loss") if math.isfinite(r.last("val_loss")) else top) for v, r in zip(values, results) if r.diverged]
    if ok:
        right.plot([p[0] for p in ok], [p[1] for p in ok], "o-", color="C0", label="final validation loss")
    if bad:
        right.plot([p[0] for p in bad], [min(p[1], top) for p in bad], "x", color="red", ms=10, mew=2, label="diverged")
    if log_x:
        right.set_xscale("log")
    left.set_xlabel(x_key)
    right.set_xlabel(name)
    for ax in (left, right):
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


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
