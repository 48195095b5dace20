"""No run is ever lost, through the real scripts in a subprocess as a user types them (issue 22):
settings checked before anything is deleted, one writer per run folder, a diverging run or a full
disk ends in one line naming the last good checkpoint, a stage's cache checks its outputs, and the
flags do what their help says."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fnlm
from fnlm.checkpoint import write_latest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "train_tinystories.py"
ABLATIONS = REPO / "experiments" / "run_ablations.py"
ARGS = ["--preset", "smoke", "--quiet", "--steps", "6", "--checkpoint-interval", "2", "--eval-interval", "3",
        "--log-interval", "2", "--stage", "data,tokenizer,encode,train"]


def _env() -> dict[str, str]:
    return dict(os.environ, FNLM_TYPECHECK="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")


def _script(args, cwd: Path, *, script: Path = SCRIPT, code: str | None = None) -> subprocess.CompletedProcess:
    """The script as a user runs it; with `code`, that Python runs first in the same process (fault
    injection), then the script as `__main__`."""
    if code is None:
        command = [sys.executable, str(script), *args]
    else:
        runner = code + f"\nimport runpy, sys\nsys.argv = [{str(script)!r}, *sys.argv[1:]]\n" \
                        f"sys.path.insert(0, {str(script.parent)!r})\nrunpy.run_path({str(script)!r}, run_name='__main__')\n"
        command = [sys.executable, "-c", runner, *args]
    return subprocess.run(command, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, code: int, *needles: str, prog: str = "train_tinystories.py") -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("[fnlm]", "fnlm: training", "fnlm: stopping"))]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != "loss.png"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (6 steps, checkpoints every 2) made by the real script."""
    base = tmp_path_factory.mktemp("finished")
    proc = _script([*ARGS, "--out", "run"], base)
    assert proc.returncode == 0, proc.stderr
    return base / "run"


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


BAD = {
    "top-p 0": (["--top-p", "0"], ["--top-p=0", "(0, 1]"]),
    "top-p 2": (["--top-p", "2"], ["--top-p=2"]),
    "top-p nan": (["--top-p", "nan"], ["--top-p=nan", "finite"]),
    "temperature -1": (["--temperature", "-1"], ["--temperature=-1", ">= 0"]),
    "temperature nan": (["--temperature", "nan"], ["--temperature=nan"]),
    "sample-tokens -1": (["--sample-tokens", "-1"], ["--sample-tokens=-1"]),
    "bpe-workers 0": (["--bpe-workers", "0"], ["--bpe-workers=0", "1 or more"]),
    "encode-workers -1": (["--encode-workers", "-1"], ["--encode-workers=-1"]),
    "final-eval-tokens 0": (["--final-eval-tokens", "0"], ["--final-eval-tokens=0"]),
    "final-eval-tokens below a window": (["--final-eval-tokens", "100"], ["--final-eval-tokens 100", "whole windows",
                                                                          "at least 256"]),
    "grad-clip nan": (["--grad-clip", "nan"], ["--grad-clip=nan", "finite"]),
    "eps nan": (["--eps", "nan"], ["--eps=nan"]),
    "weight-decay nan": (["--weight-decay", "nan"], ["--weight-decay=nan"]),
    "lr inf": (["--lr", "inf"], ["--lr=inf"]),
    "momentum nan": (["--momentum", "nan"], ["--momentum=nan", "finite"]),
    "betas inf": (["--betas", "0.9", "inf"], ["--betas=", "inf", "finite"]),
    "betas 1.5": (["--betas", "0.9", "1.5"], ["--betas", "1.5"]),
    "momentum 1": (["--momentum", "1"], ["--momentum"]),
    "grad-accum-steps not dividing the batch": (["--grad-accum-steps", "3"], ["--grad-accum-steps", "--batch-size"]),
    "shard without torchrun": (["--shard", "optimizer"], ["--shard optimizer", "torchrun"]),
    "rope-theta nan": (["--rope-theta", "nan"], ["--rope-theta=nan"]),
    "threads 0": (["--threads", "0"], ["--threads 0"]),
    "out is a file": (["--out", "afile"], ["--out afile is a file"]),
    "out under a file": (["--out", "afile/run"], ["afile is a file"]),
    "dev null as text": (["--train-file", "/dev/null", "--valid-file", "story.txt"],
                         ["--train-file /dev/null is not a regular file"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_settings_that_cannot_work_are_one_line_before_any_stage(tmp_path, case):
    """Each failed only after training (with a traceback), or passed the checks and crashed at step 1."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "story.txt").write_text("Once upon a time there was a cat.<|endoftext|>" * 20)
    args, needles = BAD[case]
    _one_line(_script(["--out", "run", *args], tmp_path), 2, *needles)
    assert not (tmp_path / "run").exists()


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path):
    if os.geteuid() == 0:
        out = "/proc/fnlm-no-such-run"
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        out = str(tmp_path / "locked" / "run")
    line = _one_line(_script(["--out", out, "--preset", "smoke"], tmp_path), 2, "--out")
    assert "writable" in line or "cannot be made" in line
    assert not Path(out).exists()


@pytest.mark.parametrize("args", [["--explode-factor", "-1"], ["--explode-factor", "nan"], ["--top-p", "2"],
                                  ["--chunk-size", "0", "--lrs", "1e-3", "--vectorize"]])
def test_run_ablations_refuses_flags_that_cannot_work(tmp_path, args):
    """`--explode-factor -1` marked every run diverged; a pipeline flag's error was a traceback."""
    proc = _script(["--preset", "smoke", "--out", "abl", *args], tmp_path, script=ABLATIONS)
    _one_line(proc, 2, args[0] if args[0] != "--chunk-size" else "--chunk-size 0", prog="run_ablations.py")
    assert not (tmp_path / "abl").exists()


@pytest.mark.slow
def test_nan_settings_with_overwrite_delete_nothing(finished, tmp_path):
    """Issue 22, item 4: `--grad-clip nan --overwrite` deleted the old checkpoints, then step 1 crashed."""
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    for bad in (["--grad-clip", "nan"], ["--lr", "inf"]):
        _one_line(_script([*ARGS, "--out", "run", "--overwrite", *bad], tmp_path), 2, bad[0])
        assert _snapshot(run) == before


def test_resuming_with_another_optimizer_is_one_line_and_touches_nothing(finished, tmp_path):
    """The optimizer's state would not fit another optimizer: refused before any stage trains."""
    run = _copy(finished, tmp_path)
    write_latest(run / "checkpoints" / "latest.pt", run / "checkpoints" / "step_0000004.pt", step=4)
    before = _snapshot(run)
    _one_line(_script([*ARGS, "--out", "run", "--resume", "--optimizer", "lion"], tmp_path), 2, "cannot resume",
              "--optimizer adamw_cs336 (now lion)")
    assert _snapshot(run) == before


@pytest.mark.slow
def test_overwrite_retrains_a_finished_run_and_refusals_advise_what_works(finished, tmp_path):
    """`--overwrite` on a finished run did nothing without `--force`; a finished run with another
    `--lr` was told to `--resume`, which then refused."""
    run = _copy(finished, tmp_path)
    line = _one_line(_script([*ARGS, "--out", "run", "--lr", "0.01"], tmp_path), 2, "finished run", "--lr 0.003 -> 0.01",
                     "--overwrite")
    assert "--resume" not in line
    line = _one_line(_script([*ARGS, "--out", "run", "--lr", "0.01", "--resume"], tmp_path), 2, "cannot resume",
                     "finished", "--overwrite")
    assert "rerun with those settings" not in line
    again = _script([*ARGS, "--out", "run", "--overwrite"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "train: cached" not in again.stderr and "train: 6 steps" in again.stderr
    assert fnlm.load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 6


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    """Issue 22, item 2: two runs on one --out both exited 0, the second overwriting the first."""
    first = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--steps", "2000", "--out", "run"], env=_env(),
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / fnlm.train.RunLock.FILE
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (lock.exists() and lock.stat().st_size):
            time.sleep(0.05)
        assert lock.exists(), "the first run never took its lock"
        second = _script([*ARGS, "--out", "run", "--lr", "0.01"], tmp_path)
        line = _one_line(second, 2, "is in use by another run", f"pid {first.pid} on {socket.gethostname()}",
                         "started ")
        assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    third = _script([*ARGS, "--out", "run", "--overwrite"], tmp_path)
    assert third.returncode == 0, third.stderr
    assert f"note: taking over the lock of run from pid {first.pid}" in third.stderr
    assert "whose process is gone" in third.stderr
    assert not lock.exists()


@pytest.mark.slow
def test_a_diverging_run_exits_1_and_keeps_only_finite_checkpoints(finished, tmp_path):
    """Issue 22, item 3: a NaN step went on with NaN weights and rotated the good checkpoints out;
    and a diverged CLI run exited 0."""
    run = _copy(finished, tmp_path)
    proc = _script([*ARGS, "--out", "run", "--overwrite", "--lr", "1e30", "--min-lr", "1e29", "--warmup-steps", "1",
                    "--checkpoint-interval", "1", "--keep-checkpoints", "0"], tmp_path)
    line = _one_line(proc, 1, "training stopped at step", "not finite", "start over with --overwrite")
    broke = int(re.search(r"not finite at step (\d+)", line).group(1))
    kept = sorted((run / "checkpoints").glob("step_*.pt"))
    assert [int(p.stem[5:]) for p in kept] == list(range(1, broke))
    assert f"the last good checkpoint is run/checkpoints/{kept[-1].name} (step {broke - 1})" in line
    from fnlm.checkpoint import check_finite

    for path in kept:
        assert not check_finite(fnlm.load_checkpoint(path)["params"])
    assert "train" not in json.loads((run / "stages.json").read_text())


_FULL_DISK = textwrap.dedent("""
    import errno, os, fnlm.checkpoint as ck
    real = ck._atomic_write
    def full(path, write):
        if path.name == os.environ["FULL_AT"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)
    ck._atomic_write = full
""")

_FULL_DISK_TOKENIZER = textwrap.dedent("""
    import errno, os
    from fnlm.tokenizer import gpt2
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    gpt2.write_merges = full
""")


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(finished, tmp_path, monkeypatch):
    run = _copy(finished, tmp_path)
    monkeypatch.setenv("FULL_AT", "step_0000004.pt")
    proc = _script([*ARGS, "--out", "run", "--overwrite"], tmp_path, code=_FULL_DISK)
    good = run / "checkpoints" / "step_0000002.pt"
    _one_line(proc, 1, "the train stage failed: No space left on device", "step_0000004.pt",
              "the last good checkpoint is run/checkpoints/step_0000002.pt (step 2): continue with --resume")
    assert good.exists() and not list((run / "checkpoints").glob(".*.tmp"))
    resumed = _script([*ARGS, "--out", "run", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert fnlm.load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 6

    vocab = (run / "tokenizer" / "vocab.json").read_bytes()
    proc = _script([*ARGS, "--out", "run", "--stage", "tokenizer", "--force"], tmp_path, code=_FULL_DISK_TOKENIZER)
    _one_line(proc, 1, "the tokenizer stage failed: No space left on device", "rerun the same command")
    assert (run / "tokenizer" / "vocab.json").read_bytes() == vocab
    assert "tokenizer" not in json.loads((run / "stages.json").read_text())
    assert not list((run / "tokenizer").glob(".*.tmp"))
    redo = _script([*ARGS, "--out", "run"], tmp_path)
    assert redo.returncode == 0 and "tokenizer: cached" not in redo.stderr and "train: cached" in redo.stderr


@pytest.mark.slow
def test_a_broken_stage_output_is_redone_and_a_broken_stages_json_is_one_line(finished, tmp_path):
    """A kill while the tokenizer saved left a 0-byte vocab.json marked cached in stages.json."""
    run = _copy(finished, tmp_path)
    (run / "tokenizer" / "vocab.json").write_bytes(b"")
    redo = _script([*ARGS, "--out", "run"], tmp_path)
    assert redo.returncode == 0, redo.stderr
    assert "tokenizer: cached" not in redo.stderr and "train: cached" in redo.stderr
    assert json.loads((run / "tokenizer" / "vocab.json").read_text())

    manifest = run / "stages.json"
    state = json.loads(manifest.read_text())
    state["tokenizer"]["info"]["vocab_size"] = "many"
    manifest.write_text(json.dumps(state))
    _one_line(_script([*ARGS, "--out", "run"], tmp_path), 2, "stages.json: the tokenizer stage's entry has "
              "info.vocab_size = 'many'", "delete that entry")
    manifest.write_text("{oops")
    _one_line(_script([*ARGS, "--out", "run"], tmp_path), 2, "stages.json is not valid JSON", "delete it")


@pytest.mark.slow
def test_evaluate_and_sample_refuse_a_model_function_they_cannot_rebuild(finished, tmp_path):
    """A checkpoint of a custom model function was evaluated and sampled with the default block."""
    from tinystories import stages

    run = _copy(finished, tmp_path)

    def my_model(params, x, config):
        return fnlm.transformer_lm(params, x, config)

    monkey_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        stages.main([*ARGS[:-2], "--stage", "train", "--out", "run", "--overwrite"], model_fn=my_model)
    finally:
        os.chdir(monkey_cwd)
    assert "my_model" in json.dumps(fnlm.load_checkpoint(run / "checkpoints" / "latest.pt")["model_fn"])
    for stage in ("evaluate", "sample"):
        _one_line(_script(["--preset", "smoke", "--quiet", "--out", "run", "--stage", stage], tmp_path), 2,
                  f"{stage}: the checkpoint was trained with model function", "my_model", "cannot be rebuilt here")


@pytest.mark.slow
def test_a_small_train_file_names_the_preset_and_warns_of_many_passes(tmp_path):
    """A small --train-file silently picked the cpu preset (83 passes over its tokens)."""
    text = "".join(f"Once upon a time there was a cat number {i}.<|endoftext|>" for i in range(100))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:3000])
    proc = _script(["--train-file", "train.txt", "--valid-file", "valid.txt", "--out", "run", "--quiet",
                    "--stage", "data,tokenizer,encode,train", "--vocab-size", "300", "--context-length", "32",
                    "--d-model", "32", "--num-layers", "1", "--num-heads", "2", "--d-ff", "64", "--steps", "10",
                    "--batch-size", "256", "--threads", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stages data,tokenizer,encode,train, 2 torch thread(s)" in proc.stderr  # OMP_NUM_THREADS is 1
    assert "the cpu preset was chosen because --train-file is given and this machine has no CUDA device" in proc.stderr
    assert re.search(r"note: the run's budget of .* is \d+ passes over the .*M training tokens", proc.stderr)
