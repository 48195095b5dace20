"""Loss plots as PNG files: `plot_runs` (loss curves of one or more runs), `plot_sweep` (final
loss against a swept hyper-parameter) and `plot_seeds` (final loss per seed, with the mean and
spread). Every plot takes `log_y` (a log-scale loss axis) and `baseline` (a loss to draw as a
horizontal line, e.g. the unigram entropy of the validation tokens, the loss of a model that
ignores context). matplotlib is imported when a plot is drawn, never by `import fnlm`; it comes
with `pip install fnlm[plots]`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs", "plot_sweep", "plot_seeds"]

Records = list[dict[str, Any]]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'fnlm[plots]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(records: Records, key: str) -> Records:
    return [r for r in records if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]


def _loss_axis(ax: Any, label: str, *, log_y: bool, baseline: float | None) -> None:
    """The loss axis's label and grid, the baseline as a dashed line, and the log scale if asked."""
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="0.35", ls="--", lw=1.2, label=f"unigram baseline {baseline:.3f}")
    if log_y:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_ylabel(label + (" (log scale)" if log_y else ""))
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    ax.legend(fontsize=8)


def _save(fig: Any, path: str | os.PathLike, plt: Any) -> Path:
    """Write `fig` to `path` atomically (a temporary file, then a rename)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_runs(
    runs: dict[str, Records],
    path: str | os.PathLike,
    *,
    title: str = "",
    train: bool = True,
    stopped: Sequence[str] = (),
    baseline: float | None = None,
    log_y: bool = False,
) -> Path:
    """Loss against steps (left) and against wall-clock minutes (right), one colour per run.

    **Arguments:**

    - `runs`: name -> metric records (as in `metrics.jsonl`); the training loss is drawn thin, the
      validation loss with markers.
    - `path`: the PNG to write (replaced atomically).
    - `title`: the figure's title.
    - `train`: also draw the training loss (`False`: validation only, for comparing many runs).
    - `stopped`: names of runs that were stopped (diverged); their last point gets a cross.
    - `baseline`: a loss drawn as a dashed horizontal line (the unigram baseline), or `None`.
    - `log_y`: a log-scale loss axis (early losses near log(vocab) otherwise flatten the end).

    **Returns:** the path written.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        tr, val = _finite(records, "train_loss") if train else [], _finite(records, "val_loss")
        label = f"{name} " if len(runs) > 1 else ""
        mark = " (diverged)" if name in stopped else ""
        for ax, key, scale in ((axes[0], "step", 1.0), (axes[1], "time", 1 / 60)):
            if tr:
                ax.plot([r[key] * scale for r in tr], [r["train_loss"] for r in tr], color=color, alpha=0.45, lw=1,
                        label=f"{label}train")
            if val:
                xs, ys = [r[key] * scale for r in val], [r["val_loss"] for r in val]
                ax.plot(xs, ys, color=color, marker="o", ms=3, lw=1.8, label=f"{label}validation{mark}")
                if mark:
                    ax.plot(xs[-1:], ys[-1:], color=color, marker="x", ms=10, mew=2)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall-clock time (minutes)")
    for ax in axes:
        _loss_axis(ax, "loss (nats/token)", log_y=log_y, baseline=baseline)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, plt)


def _last(records: Records, key: str) -> float:
    values = _finite(records, key)
    return values[-1][key] if values else math.nan


def plot_sweep(
    runs: dict[str, Records],
    values: Sequence[float],
    path: str | os.PathLike,
    *,
    name: str,
    x_key: str = "step",
    log_x: bool = True,
    stopped: Sequence[str] = (),
    groups: Sequence[str] | None = None,
    title: str = "",
    baseline: float | None = None,
    log_y: bool = False,
) -> Path:
    """A sweep: validation loss against `x_key` per run (left) and the final validation loss
    against the swept value (right, one line per group; stopped runs as red crosses at their last
    finite loss, or at the top when they have none).

    **Arguments:**

    - `runs`: label -> metric records, in the order of `values`.
    - `values`: the swept value of each run.
    - `path`: the PNG to write.
    - `name`: the swept quantity (the right plot's x label).
    - `x_key`: the records' key for the left plot's x axis (`"step"`, `"tokens"`, `"time"`).
    - `log_x`: a log scale for the swept value.
    - `stopped`: labels of runs that diverged.
    - `groups`: the group of each run (e.g. the variant swept), one line per group on the right;
      `None` is one group.
    - `title`: the figure's title.
    - `baseline`: a loss drawn as a dashed horizontal line on the curves (the unigram baseline).
    - `log_y`: log-scale loss axes.

    **Returns:** the path written.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, records) in enumerate(runs.items()):
        val = _finite(records, "val_loss")
        left.plot([r[x_key] for r in val], [r["val_loss"] for r in val], color=f"C{i % 10}", marker="o", ms=3, lw=1.6,
                  label=label + (" (diverged)" if label in stopped else ""))
    groups = list(groups) if groups is not None else [""] * len(runs)
    finals = [(v, _last(records, "val_loss"), label in stopped, g)
              for v, (label, records), g in zip(values, runs.items(), groups)]
    finite = [f for _, f, bad, _ in finals if not bad and math.isfinite(f)]
    top = max(finite) * 1.1 if finite else 1.0
    for i, group in enumerate(dict.fromkeys(groups)):
        ok = sorted((v, f) for v, f, bad, g in finals if not bad and g == group)
        if ok:
            right.plot([p[0] for p in ok], [p[1] for p in ok], "o-", color=f"C{i % 10}",
                       label=f"{group} final validation loss" if group else "final validation loss")
    worse = [(v, min(f, top) if math.isfinite(f) else top) for v, f, bad, _ in finals if bad]
    if worse:
        right.plot([p[0] for p in worse], [p[1] for p in worse], "x", color="red", ms=10, mew=2, label="diverged")
    if log_x:
        right.set_xscale("log")
    left.set_xlabel(x_key)
    right.set_xlabel(name)
    _loss_axis(left, "validation loss (nats/token)", log_y=log_y, baseline=baseline)
    _loss_axis(right, "final validation loss (nats/token)", log_y=log_y, baseline=None)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, plt)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _seed_points(ax: Any, finals: list[tuple[int, float, bool, str, str]], names: list[str], order: list[int]) -> None:
    """Each seed's final loss as a point (in its run's colour), per group a mean line and a
    mean ± std band (groups side by side within a seed's slot); diverged runs as red crosses."""
    finite = [f for _, f, bad, _, _ in finals if not bad and math.isfinite(f)]
    top = max(finite) * 1.05 if finite else 1.0
    width = 0.6 / max(len(names), 1)
    for g, group in enumerate(names):
        color, shift = (f"C{g % 10}" if len(names) > 1 else "0.2"), (g - (len(names) - 1) / 2) * width
        ok = [(order.index(s) + shift, f, c) for s, f, bad, grp, c in finals
              if grp == group and not bad and math.isfinite(f)]
        if not ok:
            continue
        mean, std = _mean_std([f for _, f, _ in ok])
        span = (-0.4 + shift, len(order) - 0.6 + shift)
        ax.fill_between(span, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        ax.plot(span, (mean, mean), color=color, lw=1.5,
                label=f"{group + ': ' if group else ''}mean {mean:.3f} ± {std:.3f} (n={len(ok)})")
        ax.scatter([x for x, _, _ in ok], [f for _, f, _ in ok], c=[c for _, _, c in ok], s=50, edgecolors="black",
                   linewidths=0.6, zorder=3)
    worse = [(order.index(s) + (names.index(grp) - (len(names) - 1) / 2) * width, min(f, top) if math.isfinite(f) else top)
             for s, f, bad, grp, _ in finals if bad]
    if worse:
        ax.plot([p[0] for p in worse], [p[1] for p in worse], "x", color="red", ms=10, mew=2, label="diverged")
    ax.set_xticks(range(len(order)), [str(s) for s in order])
    ax.set_xlim(-0.7, len(order) - 0.3)


def plot_seeds(
    runs: dict[str, Records],
    seeds: Sequence[int],
    path: str | os.PathLike,
    *,
    x_key: str = "step",
    stopped: Sequence[str] = (),
    groups: Sequence[str] | None = None,
    title: str = "",
    baseline: float | None = None,
    log_y: bool = False,
) -> Path:
    """A seed sweep: validation loss against `x_key` per run (left), and each seed's final
    validation loss as a point (right), with the mean as a line and the mean ± one (sample)
    standard deviation as a band, one colour per group. Seeds are categories, not a scale: the
    right plot's x axis names them in the order given. Diverged runs are red crosses at their last
    finite loss (or at the top) and are left out of the mean.

    **Arguments:**

    - `runs`: label -> metric records, in the order of `seeds`.
    - `seeds`: the seed of each run.
    - `path`: the PNG to write.
    - `x_key`: the records' key for the left plot's x axis (`"step"`, `"tokens"`, `"time"`).
    - `stopped`: labels of runs that diverged.
    - `groups`: the group of each run (e.g. the variant), `None` for one group.
    - `title`: the figure's title.
    - `baseline`: a loss drawn as a dashed horizontal line on the curves (the unigram baseline).
    - `log_y`: log-scale loss axes.

    **Returns:** the path written.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = list(groups) if groups is not None else [""] * len(runs)
    names = list(dict.fromkeys(groups))
    colors = [f"C{(i if len(names) == 1 else names.index(g)) % 10}" for i, g in enumerate(groups)]
    for (label, records), color in zip(runs.items(), colors):
        val = _finite(records, "val_loss")
        left.plot([r[x_key] for r in val], [r["val_loss"] for r in val], color=color, marker="o", ms=2.5, lw=1.2,
                  alpha=0.8, label=label + (" (diverged)" if label in stopped else ""))
    finals = [(seed, _last(records, "val_loss"), label in stopped, group, color)
              for seed, (label, records), group, color in zip(seeds, runs.items(), groups, colors)]
    _seed_points(right, finals, names, list(dict.fromkeys(seeds)))
    left.set_xlabel(x_key)
    right.set_xlabel("seed")
    _loss_axis(left, "validation loss (nats/token)", log_y=log_y, baseline=baseline)
    _loss_axis(right, "final validation loss (nats/token)", log_y=log_y, baseline=None)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, plt)
