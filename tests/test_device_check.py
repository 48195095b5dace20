"""`benchmarks/device_check.py` runs end to end without CUDA (its tiny CPU version) and prints every
figure it promises: the CUDA tests' summary, tokens/s, MFU, peak memory, the projected time for
327,680,000 tokens and the ratio to the fused-kernel baseline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_device_check_runs_its_tiny_cpu_version():
    env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "benchmarks/device_check.py", "--steps", "3", "--warmup", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"CUDA tests: \d+ skipped.*tests/test_cuda\.py", out), out
    for name in ("fnlm.train_step", "baseline: ReferenceLM"):
        line = next(line for line in out.splitlines() if name in line)
        assert re.search(r"[\d,]+ tokens/s +MFU +[\d.]+% +peak memory +[\d.]+ GiB.*327\.68M tokens in +[\d.]+ min", line), line
    assert re.search(r"fnlm / baseline: tokens/s [\d.]+, step time [\d.]+", out), out
    for mode in ("unsharded", "ZeRO-1", "FSDP"):
        line = next(line for line in out.splitlines() if f"sharded, 1 rank (gloo): {mode} " in line)
        diff = re.search(r"(\d+) steps, loss [\d.]+, max \|param - unsharded\| ([\d.e+-]+)", line)
        assert diff and int(diff.group(1)) == 3 and float(diff.group(2)) <= 1e-4, line
