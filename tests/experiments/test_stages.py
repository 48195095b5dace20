"""The end-to-end script: the smoke preset, stage caching, generation, and SIGKILL + --resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinystories import cli, presets, stages

import fnlm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "train_tinystories.py"


def _env(typecheck: bool) -> dict[str, str]:
    env = dict(os.environ, FNLM_TYPECHECK="1" if typecheck else "0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _run(args, *, typecheck=False, timeout=300):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=_env(typecheck), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _final_params(run: Path) -> dict[str, torch.Tensor]:
    ck = fnlm.load_checkpoint(run / "checkpoints" / "latest.pt")
    return ck["step"], fnlm.tree_flatten(ck["params"])


@pytest.mark.slow
def test_smoke_preset_end_to_end_then_cached(tmp_path):
    run = tmp_path / "smoke"
    first = _run(["--preset", "smoke", "--out", str(run), "--quiet"], typecheck=True)
    assert (run / "checkpoints" / "latest.pt").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert val and val[-1]["step"] == 60
    assert all(0 < r["mfu"] < 10 for r in records if "train_loss" in r)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["val_loss"] < ev["unigram_entropy"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    samples = (run / "samples.txt").read_text()
    assert samples.count("--- sample") == 2 and "Once upon a time" in samples
    assert "validation loss" in first.stdout and "unigram baseline" in first.stdout
    for stage in stages.STAGES:
        assert stage in json.loads((run / "stages.json").read_text())

    again = _run(["--preset", "smoke", "--out", str(run), "--quiet"])
    for stage in stages.STAGES:
        assert f"{stage}: cached" in again.stderr

    resample = _run(["--preset", "smoke", "--out", str(run), "--quiet", "--stage", "sample", "--temperature", "0.5"])
    assert "sample: cached" not in resample.stderr and "train:" not in resample.stderr
    assert "temperature 0.5" in (run / "samples.txt").read_text()

    gen = subprocess.run([sys.executable, str(REPO / "experiments" / "generate.py"), "--checkpoint", str(run),
                          "--prompt", "Once upon a time", "--max-new-tokens", "20", "--seed", "1"],
                         env=_env(False), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Once upon a time") and len(gen.stdout) > len("Once upon a time") + 5


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    args = ["--preset", "smoke", "--quiet", "--stage", "data,tokenizer,encode,train", "--steps", "60",
            "--checkpoint-interval", "10", "--eval-interval", "30"]
    _run([*args, "--out", str(tmp_path / "a")])
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--out", str(b)], env=_env(False), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = b / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at, _ = _final_params(b)
    assert killed_at < 60
    _run([*args, "--out", str(b), "--resume"])
    step_a, pa = _final_params(tmp_path / "a")
    step_b, pb = _final_params(b)
    assert step_a == step_b == 60
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_presets_and_flags_resolve():
    s = cli.resolve_settings([])
    assert s.preset == "demo" and s.data is None and s.out == Path("runs/demo")
    cpu = cli.resolve_settings(["--preset", "cpu"])
    assert (cpu.model.d_model, cpu.model.num_layers, cpu.model.num_heads, cpu.model.d_ff, cpu.model.context_length) == (512, 4, 16, 1344, 256)
    assert cpu.model.rope_theta == 10000.0
    assert cpu.train.batch_size * cpu.train.total_steps(256) * 256 == 32 * 5000 * 256
    h100 = cli.resolve_settings(["--preset", "h100"])
    assert h100.train.total_steps(256) * h100.train.batch_size * 256 == 327_680_000
    real = cli.resolve_settings(["--data", "somewhere"])
    assert real.preset == ("h100" if torch.cuda.is_available() else "cpu") and real.data == "somewhere"
    assert cli.resolve_settings(["--data"]).data == "data/tinystories"
    s = cli.resolve_settings(["--d-model", "96", "--num-heads", "3", "--lr", "0.01", "--steps", "7", "--seed", "3",
                                   "--device", "cpu", "--compile", "--vocab-size", "32000", "--top-p", "0.5"])
    assert (s.model.d_model, s.model.num_heads, s.model.vocab_size) == (96, 3, 32000)
    assert (s.train.lr, s.train.steps, s.train.seed, s.train.device, s.train.compile) == (0.01, 7, 3, "cpu", True)
    assert s.pipeline.top_p == 0.5
    with pytest.raises(SystemExit):
        cli.resolve_settings(["--stage", "nonsense"])
    with pytest.raises(SystemExit):
        cli.resolve_settings(["--train-file", "x"])
    with pytest.raises(SystemExit):
        cli.resolve_settings(["--d-model", "100", "--num-heads", "3"])


def test_every_config_field_is_a_flag():
    help_text = cli.build_parser().format_help()
    import dataclasses

    for cls in (fnlm.TransformerConfig, fnlm.train.TrainConfig, presets.PipelineConfig):
        for f in dataclasses.fields(cls):
            if f.name != "progress":
                assert "--" + f.name.replace("_", "-") in help_text, f.name


def test_unigram_entropy_matches_a_direct_computation():
    import numpy as np

    tokens = np.array([0, 1, 1, 2, 2, 2, 2, 3], dtype=np.uint16)
    p = np.array([1, 2, 4, 1]) / 8
    assert stages.unigram_entropy(tokens, 10) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert stages.unigram_entropy(np.zeros(5, dtype=np.uint16), 3) == 0.0
