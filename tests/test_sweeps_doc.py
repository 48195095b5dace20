"""The snippets of docs/drafts/sweeps.md run as written: the python blocks in order in one fresh
process, the `run_ablations.py` commands through the real script; the benchmark commands (minutes
long) are checked to exist and parse their flags (`--help`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "drafts" / "sweeps.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.slow
def test_python_snippets_run_as_written(tmp_path):
    code = "\n".join(_blocks("python"))
    assert "train_vectorized" in code and "per_example_grads" in code and "donate=True" in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "lr0.01" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_shell_snippets_run_as_written(tmp_path):
    lines = [ln.split("#")[0].strip() for block in _blocks("bash") for ln in block.splitlines()]
    commands = [shlex.split(ln) for ln in lines if ln]
    assert commands
    ran = 0
    for cmd in commands:
        assert cmd[0] == "python" and (REPO / cmd[1]).exists(), cmd
        if cmd[1] == "experiments/run_ablations.py":
            run = [sys.executable, str(REPO / cmd[1]), *cmd[2:]]
            ran += 1
        else:
            run = [sys.executable, str(REPO / cmd[1]), "--help"]
        proc = subprocess.run(run, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (cmd, proc.stderr[-3000:])
    assert ran >= 1 and (tmp_path / "runs" / "lr" / "lr_sweep.md").exists()
