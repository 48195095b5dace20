"""experiments/run_ablations.py on the smoke preset: the comparison and both sweeps write their
plot and table, the tables list the runs, and the data stages are made once and reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "run_ablations.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FNLM_TYPECHECK", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--quiet", "--threads", "1", "--eval-batches", "1", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smoke_comparison_and_sweeps(tmp_path):
    out = tmp_path / "abl"
    _run(["--out", str(out), "--only", "baseline,nope", "--steps", "3"])
    png, table = out / "ablations.png", (out / "ablations.md").read_text()
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith(("| variant", "| ---"))]
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "nope"]
    assert all(" ok |" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["steps"] for r in summary["ablations"]] == [3, 3]
    assert summary["ablations"][1]["model"]["position"] == "nope"

    proc = _run(["--out", str(out), "--steps", "2", "--lrs", "1e-3,50", "--batch-sizes", "8,16"])
    assert "data: cached" in proc.stderr and "tokenizer: cached" in proc.stderr
    lr_table = (out / "lr_sweep.md").read_text()
    assert "| lr0.001 |" in lr_table and "| lr50 |" in lr_table and (out / "lr_sweep.png").exists()
    bs = json.loads((out / "summary.json").read_text())["batch_size_sweep"]
    assert [(r["batch_size"], r["steps"]) for r in bs] == [(8, 4), (16, 2)]
    assert (out / "batch_size_sweep.png").exists() and "| bs8 |" in (out / "batch_size_sweep.md").read_text()


@pytest.mark.slow
def test_vectorized_sweeps_give_the_sequential_outputs(tmp_path):
    """--vectorize trains the lr and seed sweeps as one vectorized run: the same files, rows and
    per-run records as one run after another, every loss within float tolerance, and a diverging
    run stopped alone at the same step for the same reason."""
    args = ["--steps", "6", "--lrs", "1e-3,1e-2,200", "--seeds", "0,3", "--log-interval", "2", "--eval-interval", "3"]
    _run(["--out", str(tmp_path / "seq"), *args])
    proc = _run(["--out", str(tmp_path / "vec"), *args, "--vectorize"])
    assert "5 runs at once" in proc.stderr and "stopping at step" in proc.stderr
    seq, vec = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("seq", "vec"))
    assert vec["vectorized"] and not seq["vectorized"]
    for sweep in ("lr_sweep", "seed_sweep"):
        assert [r["label"] for r in vec[sweep]] == [r["label"] for r in seq[sweep]]
        for a, b in zip(seq[sweep], vec[sweep]):
            assert (a["diverged_at"], a["steps"]) == (b["diverged_at"], b["steps"])
            assert a["reason"].split(" ")[:2] == b["reason"].split(" ")[:2]
            assert a["reason"].partition(">")[2].split()[1:] == b["reason"].partition(">")[2].split()[1:]
            if a["diverged_at"] is None:
                assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
                assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        for stem in (sweep + ".md", sweep + ".png"):
            assert (tmp_path / "vec" / stem).stat().st_size > 100
    assert [r["diverged_at"] is not None for r in vec["lr_sweep"]] == [False, False, True]
    assert [r["seed"] for r in vec["seed_sweep"]] == [0, 3]
    for label in ("lr0.001", "lr200", "seed3"):
        a, b = ((tmp_path / d / "runs" / label / "metrics.jsonl").read_text().splitlines() for d in ("seq", "vec"))
        assert [sorted(json.loads(x)) for x in a] == [sorted(json.loads(x)) for x in b]
    assert "vectorized run" in (tmp_path / "vec" / "lr_sweep.md").read_text()


@pytest.mark.parametrize(("args", "message", "code"), [
    (["--vectorize"], "--vectorize needs a learning-rate or seed sweep (--lrs, --seeds)", 2),
    (["--seeds", "1.5"], "expected comma-separated non-negative integers, got '1.5'", 2),
    (["--seeds", "0,-1"], "expected comma-separated non-negative integers, got '0,-1'", 2),
])
def test_wrong_sweep_flags_stop_before_any_stage(tmp_path, args, message, code):
    """What users mistype with the sweep flags: one message, a non-zero exit, and no run folder made."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "abl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
