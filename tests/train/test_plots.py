"""The loss plots draw what a reader needs: a seed sweep as a point per seed with the mean ± standard
deviation (not a line over seeds), the unigram baseline as a horizontal line, a log-scale option.
The figures are inspected before they are closed (the PNG is written as usual)."""

from __future__ import annotations

import math
import statistics

import pytest

pytest.importorskip("matplotlib")

from fnlm.train import plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    drawn = []
    save = plots._save

    def keep(fig, path, plt):
        drawn.append(fig)
        return save(fig, path, plt)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _records(final: float, steps: int = 40, *, diverge_at: int | None = None) -> list[dict]:
    out = []
    for step in range(10, steps + 1, 10):
        loss = final + (6.0 - final) * math.exp(-step / 10) if step < steps else final   # ends at `final`
        out.append({"step": step, "time": step / 10, "tokens": step * 64, "train_loss": loss + 0.1, "val_loss": loss})
        if diverge_at is not None and step >= diverge_at:
            out[-1] = {"step": step, "time": step / 10, "tokens": step * 64, "train_loss": float("nan")}
            break
    return out


def _lines(ax):
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_label()) for line in ax.get_lines()]


def test_seed_sweep_is_a_point_per_seed_with_mean_and_spread(tmp_path, figures):
    finals = {"seed5": 2.0, "seed1": 2.3, "seed9": 2.45}
    runs = {label: _records(f) for label, f in finals.items()}
    runs["seed4"] = _records(2.2, diverge_at=30)
    path = plots.plot_seeds(runs, [5, 1, 9, 4], tmp_path / "seeds.png", stopped=["seed4"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    right = figures[-1].axes[1]
    points = right.collections[-1].get_offsets()                       # the scatter of finite finals
    assert points[:, 0].tolist() == [0, 1, 2]                           # seeds as categories, in the order given
    assert points[:, 1].tolist() == pytest.approx([2.0, 2.3, 2.45])
    assert [t.get_text() for t in right.get_xticklabels()] == ["5", "1", "9", "4"]
    mean, std = statistics.mean(finals.values()), statistics.stdev(finals.values())
    mean_line = next(line for line in _lines(right) if line[2].startswith("mean"))
    assert mean_line[1] == pytest.approx([mean, mean])
    assert mean_line[2] == f"mean {mean:.3f} ± {std:.3f} (n=3)"
    band = right.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(mean - std) and band.max() == pytest.approx(mean + std)
    assert not any(len(xs) > 2 for xs, _, _ in _lines(right)), "seeds must not be joined by a line"
    crosses = [line for line in _lines(right) if line[2] == "diverged"]
    assert crosses and crosses[0][0] == [3]


def test_seed_sweep_groups_get_their_own_mean(tmp_path, figures):
    runs = {"a0": _records(2.0), "a1": _records(2.2), "b0": _records(3.0), "b1": _records(3.4)}
    plots.plot_seeds(runs, [0, 1, 0, 1], tmp_path / "s.png", groups=["a", "a", "b", "b"])
    labels = [line[2] for line in _lines(figures[-1].axes[1]) if line[2].startswith(("a:", "b:"))]
    assert labels == [f"a: mean 2.100 ± {statistics.stdev([2.0, 2.2]):.3f} (n=2)",
                      f"b: mean 3.200 ± {statistics.stdev([3.0, 3.4]):.3f} (n=2)"]


@pytest.mark.parametrize("log_y", [False, True])
def test_loss_plots_draw_the_baseline_and_take_a_log_scale(tmp_path, figures, log_y):
    runs = {"base": _records(2.5), "nope": _records(2.8)}
    plots.plot_runs(runs, tmp_path / "r.png", baseline=5.466, log_y=log_y)
    for ax in figures[-1].axes:
        assert ax.get_yscale() == ("log" if log_y else "linear")
        flat = [line for line in _lines(ax) if line[1] == [5.466, 5.466]]
        assert flat and flat[0][2] == "unigram baseline 5.466"
    plots.plot_sweep(runs, [1e-3, 1e-2], tmp_path / "s.png", name="lr", baseline=5.466, log_y=log_y)
    left, right = figures[-1].axes
    assert any(line[1] == [5.466, 5.466] for line in _lines(left))
    assert not any(line[1] == [5.466, 5.466] for line in _lines(right)), "the final-loss panel keeps its own scale"
    assert right.get_yscale() == ("log" if log_y else "linear")


def test_no_baseline_no_line(tmp_path, figures):
    plots.plot_runs({"run": _records(2.5)}, tmp_path / "r.png")
    for ax in figures[-1].axes:
        assert not any(label.startswith("unigram") for _, _, label in _lines(ax))
