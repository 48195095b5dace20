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
