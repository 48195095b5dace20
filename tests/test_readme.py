"""README.md's snippets run as written: its python blocks in order in one fresh process (after the
main job has made a small `runs/demo`), and the flags of its `train_tinystories.py` and
`run_ablations.py` command lines parse. A block right after `<!-- not run: why -->` is skipped
(it needs a download)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- not run: [^>]*-->\n)?```(\w+)\n(.*?)```", re.S)


def _blocks(lang: str, *, runnable: bool = True) -> list[str]:
    return [code for skip, kind, code in BLOCK.findall(README.read_text(encoding="utf-8"))
            if kind == lang and not (runnable and skip)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FNLM_TYPECHECK", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "experiments")])
    return env


@pytest.mark.slow
def test_python_snippets_run_as_written(tmp_path):
    demo = subprocess.run([sys.executable, str(REPO / "experiments" / "train_tinystories.py"), "--preset", "smoke",
                           "--out", "runs/demo", "--steps", "6", "--eval-interval", "6", "--checkpoint-interval", "6",
                           "--quiet", "--num-samples", "1", "--sample-tokens", "4"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    code = "\n".join(_blocks("python"))
    assert "fnlm.train_step" in code and "train_vectorized" in code and "export_hf" in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for made in ("ckpt.pt", "runs/parallel_block/metrics.jsonl", "runs/demo/hf/model.safetensors", "tokenizer/vocab.json",
                 "model.safetensors"):
        assert (tmp_path / made).exists(), made


def _command_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("bash", runnable=False):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("python ", "torchrun ")):
                lines.append(shlex.split(line))
    return lines


def test_command_lines_name_real_scripts_and_flags():
    sys.path[:0] = [str(REPO / "experiments")]
    from run_ablations import build_parser as ablations_parser
    from tinystories.cli import build_parser

    checked = 0
    for words in _command_lines():
        script = next((w for w in words if w.endswith(".py")), None)
        if script is None:
            continue
        assert (REPO / script).is_file(), words
        args = words[words.index(script) + 1:]
        if script == "experiments/train_tinystories.py":
            build_parser().parse_args(args)
            checked += 1
        elif script == "experiments/run_ablations.py":
            _, rest = ablations_parser().parse_known_args(args)
            build_parser().parse_args(rest)
            checked += 1
    assert checked >= 8
