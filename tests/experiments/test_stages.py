"""The end-to-end script through a subprocess, as a user types it: the smoke preset, stage caching,
moved and copied run folders, generation, and exact determinism and resumption with the machine's
default thread count (two identical runs; SIGKILL or Ctrl-C at a random step, then --resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinystories import cli, presets, stages

import fnlm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "train_tinystories.py"
TIMING = ["time", "tokens_per_sec", "mfu"]
TRAIN_ARGS = ["--preset", "smoke", "--quiet", "--stage", "data,tokenizer,encode,train", "--steps", "30",
              "--log-interval", "1", "--checkpoint-interval", "4", "--eval-interval", "15"]


def _env(typecheck: bool = False, *, default_threads: bool = False) -> dict[str, str]:
    """The test process's environment; one intra-op thread unless `default_threads` (then torch's own choice)."""
    env = dict(os.environ, FNLM_TYPECHECK="1" if typecheck else "0", PYTHONPATH=str(REPO))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FNLM_NUM_THREADS"):
        env.pop(name, None)
    if not default_threads:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _script(args, *, cwd=REPO, typecheck=False, default_threads=False, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=_env(typecheck, default_threads=default_threads),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=_default_sigint)


def _run(args, **kw) -> subprocess.CompletedProcess:
    proc = _script(args, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _final(run: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, object]]:
    ck = fnlm.load_checkpoint(run / "checkpoints" / "latest.pt")
    return ck["step"], fnlm.tree_flatten(ck["params"]), fnlm.tree_flatten(ck["opt_state"])


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    step_a, pa, oa = _final(a)
    step_b, pb, ob = _final(b)
    assert step_a == step_b
    for ta, tb in ((pa, pb), (oa, ob)):
        assert ta.keys() == tb.keys()
        for name in ta:
            if isinstance(ta[name], torch.Tensor):
                assert torch.equal(ta[name], tb[name]), (name, (ta[name] - tb[name]).abs().max().item())
            else:
                assert ta[name] == tb[name], name


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in fnlm.train.read_metrics(run / "metrics.jsonl")]


def _snapshot(run: Path) -> dict[str, str]:
    files = sorted((run / "checkpoints").glob("*.pt")) + [run / "metrics.jsonl", run / "stages.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _interrupt_at_random_step(out: Path, sig: int) -> tuple[int, str, int]:
    """Start training in `out`, send `sig` once a random step in 5..22 (of 30) has been logged."""
    target = random.Random().randint(5, 22)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TRAIN_ARGS, "--out", str(out)],
                            env=_env(default_threads=True), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= target:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, target


def _thread_count() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=_env(default_threads=True), capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.slow
def test_smoke_preset_end_to_end_cached_moved_and_copied(tmp_path):
    """30-65 s on the 2 shared cores while other jobs ran (one thread, shape checks on)."""
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
    manifest = json.loads((run / "stages.json").read_text())
    for stage in stages.STAGES:
        assert stage in manifest
    assert str(tmp_path) not in json.dumps(manifest), "the run folder must refer to its files by relative paths"

    again = _run(["--preset", "smoke", "--out", str(run), "--quiet"])
    for stage in stages.STAGES:
        assert f"{stage}: cached" in again.stderr

    resample = _run(["--preset", "smoke", "--out", str(run), "--quiet", "--stage", "sample", "--temperature", "0.5"])
    assert "sample: cached" not in resample.stderr and "train:" not in resample.stderr
    assert "temperature 0.5" in (run / "samples.txt").read_text()

    gen = subprocess.run([sys.executable, str(REPO / "experiments" / "generate.py"), "--checkpoint", str(run),
                          "--prompt", "Once upon a time", "--max-new-tokens", "20", "--seed", "1"],
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("Once upon a time") and len(gen.stdout) > len("Once upon a time") + 5

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = tmp_path / "moved"
    run.rename(moved)
    before = _snapshot(moved)
    rerun = _run(["--preset", "smoke", "--out", "../moved", "--quiet", "--temperature", "0.5"], cwd=elsewhere)
    for stage in stages.STAGES:
        assert f"{stage}: cached" in rerun.stderr, rerun.stderr
    assert _snapshot(moved) == before

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved)
    copied = _run(["--preset", "smoke", "--out", "../copy", "--quiet", "--stage", "evaluate,sample", "--temperature",
                   "0.7", "--final-eval-tokens", "2048"], cwd=elsewhere)
    assert "evaluate: val loss" in copied.stderr and "sample: 2 samples" in copied.stderr
    assert "temperature 0.7" in (copy / "samples.txt").read_text()
    assert json.loads((copy / "eval.json").read_text())["tokens"] == 2048
    assert _run(["--preset", "smoke", "--out", "../copy", "--quiet", "--temperature", "0.7", "--final-eval-tokens",
                 "2048"], cwd=elsewhere).stderr.count(": cached") == 6


@pytest.mark.slow
def test_default_threads_two_runs_bitwise_equal_and_ctrl_c_then_resume(tmp_path):
    """Two identical runs with torch's default threads end with the same bits; Ctrl-C at a random
    step prints one line, and --resume ends with the bits and the log of a run that never stopped.
    45-130 s on the 2 shared cores while other jobs ran (default threads suffer most from the load)."""
    threads = _thread_count()
    assert threads >= min(2, os.cpu_count() or 1)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _run([*TRAIN_ARGS, "--out", str(a)], default_threads=True)
    _run([*TRAIN_ARGS, "--out", str(b)], default_threads=True)
    _assert_bitwise_equal(a, b)

    code, err, target = _interrupt_at_random_step(c, signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    after = lines[[i for i, line in enumerate(lines) if line.startswith("fnlm: training")][0] + 1:]
    assert len(after) == 1, err
    saved = re.fullmatch(r"saved step (\d+) to (\S+); continue with --resume", after[0])
    assert saved, after
    step = int(saved.group(1))
    assert target <= step < 30
    assert fnlm.load_checkpoint(REPO / saved.group(2))["step"] == step
    assert _final(c)[0] == step
    _run([*TRAIN_ARGS, "--out", str(c), "--resume"], default_threads=True)
    _assert_bitwise_equal(a, c)
    assert _metrics(a) == _metrics(c)


@pytest.mark.slow
def test_sigkill_rerun_refuses_then_resume_is_bitwise_equal(tmp_path):
    """SIGKILL at a random step; the same command again refuses in one line and touches nothing;
    --resume ends bitwise equal (default threads); changed settings and a corrupt checkpoint are
    refused in one line; --overwrite starts over. 50-130 s on the 2 shared cores while other jobs ran."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run([*TRAIN_ARGS, "--out", str(ref)], default_threads=True)
    code, _, target = _interrupt_at_random_step(run, signal.SIGKILL)
    assert code == -signal.SIGKILL
    killed_at = _final(run)[0]
    assert 4 <= killed_at < 30
    before = _snapshot(run)

    again = _script([*TRAIN_ARGS, "--out", str(run)])
    assert again.returncode == 2, again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr and "unfinished run" in again.stderr
    assert _snapshot(run) == before

    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    _run([*TRAIN_ARGS, "--out", str(run), "--resume"], default_threads=True)
    _assert_bitwise_equal(ref, run)
    assert _metrics(ref) == _metrics(run)

    changed = _script([*TRAIN_ARGS, "--out", str(run), "--lr", "0.01"])
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1
    assert "finished run" in changed.stderr and "--lr 0.003 -> 0.01" in changed.stderr
    changed = _script([*TRAIN_ARGS, "--out", str(run), "--lr", "0.01", "--resume"])
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1
    assert "cannot resume" in changed.stderr and "--lr 0.003 (now 0.01)" in changed.stderr

    latest = damaged / "checkpoints" / "latest.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    intact = sorted(p.name for p in (damaged / "checkpoints").glob("step_*.pt"))
    bad = _script([*TRAIN_ARGS, "--out", str(damaged), "--resume"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "cannot resume" in bad.stderr and all(name in bad.stderr for name in intact)
    assert "weights_only" not in bad.stderr
    _run([*TRAIN_ARGS, "--out", str(damaged), "--overwrite", "--steps", "6"])
    assert sorted(p.name for p in (damaged / "checkpoints").glob("*.pt")) == ["latest.pt", "step_0000004.pt",
                                                                               "step_0000006.pt"]
    assert [r["step"] for r in fnlm.train.read_metrics(damaged / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_steps_below_the_warmup_are_clamped_with_a_note(tmp_path):
    """`--steps 5` under the smoke preset's 10 warm-up steps trains, saying so. 3-11 s."""
    proc = _run(["--preset", "smoke", "--quiet", "--stage", "data,tokenizer,encode,train", "--steps", "5",
                 "--out", str(tmp_path / "r")])
    assert "note: the preset's warm-up (10) is longer than the run's steps (5)" in proc.stderr
    ck = fnlm.load_checkpoint(tmp_path / "r" / "checkpoints" / "latest.pt")
    assert ck["step"] == 5 and ck["train_config"]["step"]["warmup_steps"] == 5


def test_presets_and_flags_resolve():
    s = cli.resolve_settings([])
    assert s.preset == "demo" and s.data is None and s.out == Path("runs/demo")
    cpu = cli.resolve_settings(["--preset", "cpu"])
    m = cpu.model
    assert (m.d_model, m.num_layers, m.num_heads, m.d_ff, m.context_length) == (512, 4, 16, 1344, 256)
    assert cpu.model.rope_theta == 10000.0
    assert cpu.train.batch_size * cpu.train.total_steps(256) * 256 == 32 * 5000 * 256
    h100 = cli.resolve_settings(["--preset", "h100"])
    assert h100.train.total_steps(256) * h100.train.batch_size * 256 == 327_680_000
    real = cli.resolve_settings(["--data", "somewhere"])
    assert real.preset == ("h100" if torch.cuda.is_available() else "cpu") and real.data == "somewhere"
    assert cli.resolve_settings(["--data"]).data == "data/tinystories"
    s = cli.resolve_settings(["--d-model", "96", "--num-heads", "3", "--lr", "0.01", "--steps", "7", "--seed", "3",
                              "--device", "cpu", "--compile", "--vocab-size", "32000", "--top-p", "0.5", "--overwrite"])
    assert (s.model.d_model, s.model.num_heads, s.model.vocab_size) == (96, 3, 32000)
    assert (s.train.step.lr, s.train.steps, s.train.seed, s.train.device, s.train.compile) == (0.01, 7, 3, "cpu", True)
    assert s.pipeline.top_p == 0.5 and s.overwrite and not s.resume
    assert s.train.step.warmup_steps == 7 and "warming up over 7 steps" in s.notes[0]
    with pytest.raises(SystemExit):
        cli.resolve_settings(["--stage", "nonsense"])
    with pytest.raises(SystemExit):
        cli.resolve_settings(["--train-file", "x"])
    with pytest.raises(SystemExit):
        cli.resolve_settings(["--resume", "--overwrite"])
    with pytest.raises(cli.ConfigError, match=r"--d-model=100 is not divisible by --num-heads=3"):
        cli.resolve_settings(["--d-model", "100", "--num-heads", "3"])


def test_warmup_clamp_respects_cosine_steps_and_explicit_flags():
    s = cli.resolve_settings(["--preset", "smoke", "--steps", "50", "--cosine-steps", "8"])
    assert s.train.step.warmup_steps == 8 and "--cosine-steps (8)" in s.notes[0]
    s = cli.resolve_settings(["--preset", "smoke", "--steps", "4", "--warmup-steps", "6"])
    assert s.train.step.warmup_steps == 4 and s.notes[0].startswith("--warmup-steps (6)")
    assert cli.resolve_settings(["--preset", "smoke", "--steps", "50"]).notes == ()
    tc = cli.resolve_settings(["--preset", "smoke", "--steps", "3"]).train
    config = tc.step_config(tc.total_steps(64))
    assert [fnlm.cosine_schedule(t, config.lr, config.min_lr, config.warmup_steps, config.cosine_steps)
            for t in range(3)] == pytest.approx([0.0, 1e-3, 2e-3])


def test_every_config_field_is_a_flag_with_a_description():
    parser = cli.build_parser()
    help_text = parser.format_help()
    assert "(default: None)" not in help_text and "default: None" not in help_text
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for cls in (fnlm.TransformerConfig, fnlm.train.TrainConfig, fnlm.StepConfig, presets.PipelineConfig):
        docs = cli.field_docs(cls)
        names = cls._fields if cls is fnlm.StepConfig else [f.name for f in dataclasses.fields(cls)]
        for name in names:
            if name in ("progress", "step"):  # step: its fields are the flags (the StepConfig row)
                continue
            flag = cli.flag_name(name)
            assert flag in help_text, name
            assert docs.get(name), f"{cls.__name__}.{name} has no '- `{name}`: ...' line in its docstring"
            assert by_flag[flag].help and not by_flag[flag].help.startswith("(default"), flag


def test_manifest_says_why_a_stage_reruns(tmp_path):
    m = stages.Manifest(tmp_path)
    result = stages.SampleResult("samples.txt", 3, 0.1)
    (tmp_path / "samples.txt").write_text("x")
    inputs = {"settings": {"temperature": 0.8, "top_p": 0.95}}
    assert m.why_stale("sample", inputs) == "it has not finished in this folder"
    m.done("sample", inputs, [tmp_path / "samples.txt"], result)
    again = stages.Manifest(tmp_path)
    assert again.why_stale("sample", inputs) is None and again.result("sample", stages.SampleResult) == result
    assert again.why_stale("sample", {"settings": {"temperature": 0.5, "top_p": 0.95}}) == \
        "its inputs changed (--temperature 0.8 -> 0.5)"
    (tmp_path / "samples.txt").unlink()
    assert again.why_stale("sample", inputs) == "its output samples.txt is missing"
    assert json.loads((tmp_path / "stages.json").read_text())["sample"]["outputs"] == ["samples.txt"]


def test_unigram_entropy_matches_a_direct_computation():
    tokens = np.array([0, 1, 1, 2, 2, 2, 2, 3], dtype=np.uint16)
    p = np.array([1, 2, 4, 1]) / 8
    assert stages.unigram_entropy(tokens, 10) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert stages.unigram_entropy(np.zeros(5, dtype=np.uint16), 3) == 0.0
