"""Loss plots as PNG files: `plot_runs` (loss curves of one or more runs) and `plot_sweep` (final
loss against a swept hyper-parameter). matplotlib is imported when a plot is drawn, never by
`import fnlm`; it comes with `pip install fnlm[plots]`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs", "plot_sweep"]

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
) -> Path:
    """Loss against steps (left) and against wall-clock minutes (right), one colour per run.

    **Arguments:**

    - `runs`: name -> metric records (as in `metrics.jsonl`); the training loss is drawn thin, the
      validation loss with markers.
    - `path`: the PNG to write (replaced atomically).
    - `title`: the figure's title.
    - `train`: also draw the training loss (`False`: validation only, for comparing many runs).
    - `stopped`: names of runs that were stopped (diverged); their last point gets a cross.

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
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    for ax in (left, right):
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, plt)
