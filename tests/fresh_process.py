"""Run a snippet in a fresh Python process: what `torch.compile` (a first compile in a clean
process), the thread count a user gets, and `FNLM_TYPECHECK` being unset all need."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_python(code: str, *, env: dict[str, str | None] | None = None, timeout: float = 300) -> dict:
    """Run `code` with `FNLM_TYPECHECK` unset (unless `env` sets it) and the repo on the path;
    the snippet prints one line `RESULT <json>`, which is returned as a dict.

    The child starts with SIGINT at its default, as an interactive shell starts a script: an
    ignored SIGINT is inherited through `exec`, and Python then installs no `KeyboardInterrupt`
    handler. pytest itself may run with SIGINT ignored: a non-interactive shell ignores it in a
    background job (`pytest -n 2 &`), and the Ctrl-C test failed twice that way before this."""
    full_env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=timeout,
        cwd=REPO, preexec_fn=_default_sigint,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
