"""Run a snippet in a fresh Python process: what `torch.compile` (a first compile in a clean
process), the thread count a user gets, and `FNLM_TYPECHECK` being unset all need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *, env: dict[str, str | None] | None = None, timeout: float = 300) -> dict:
    """Run `code` with `FNLM_TYPECHECK` unset (unless `env` sets it) and the repo on the path;
    the snippet prints one line `RESULT <json>`, which is returned as a dict."""
    full_env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
