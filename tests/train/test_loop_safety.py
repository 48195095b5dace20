"""The loop never loses work: a fresh run refuses an earlier run's folder before touching it, and
Ctrl-C ends in `TrainingInterrupted` with a checkpoint of the last completed step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import fnlm
from fnlm import train as trainer
from fnlm.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]
TC = TrainConfig(batch_size=4, steps=12, eval_interval=6, eval_batches=2, checkpoint_interval=5, keep_checkpoints=2, log_interval=1, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=2))
CONFIG = fnlm.TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32, 2000).astype(np.uint16)


def _run(out, tc=TC, **kw):
    return trainer.train(CONFIG, tc, _tokens(), _tokens(1), out, **kw)


def _bits(out):
    return fnlm.tree_flatten(fnlm.load_checkpoint(out / "checkpoints" / "latest.pt")["params"])


def _log(out):
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_sec", "mfu")}
            for r in trainer.read_metrics(out / "metrics.jsonl")]


def test_refusing_an_earlier_run_touches_no_file(tmp_path):
    _run(tmp_path)
    files = {p: p.read_bytes() for p in [*(tmp_path / "checkpoints").glob("*.pt"), tmp_path / "metrics.jsonl"]}
    with pytest.raises(FileExistsError, match="resume it, or overwrite it"):
        _run(tmp_path, replace(TC, steps=3))
    assert {p: p.read_bytes() for p in files} == files
    (tmp_path / "checkpoints" / "latest.pt").unlink()
    with pytest.raises(FileExistsError, match="step_0000012.pt"):
        _run(tmp_path, replace(TC, steps=3), resume=True)


def test_keyboard_interrupt_saves_the_last_step_and_resumes_exactly(tmp_path):
    _run(tmp_path / "a")

    def interrupt(record):
        if record["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(trainer.TrainingInterrupted) as caught:
        _run(tmp_path / "b", callbacks=[interrupt])
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.step == 7 and caught.value.checkpoint == tmp_path / "b" / "checkpoints" / "step_0000007.pt"
    assert fnlm.load_checkpoint(caught.value.checkpoint)["step"] == 7
    assert _run(tmp_path / "b", resume=True)["resumed_from"] == 7
    a, b = _bits(tmp_path / "a"), _bits(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_stops_at_the_end_of_a_step(tmp_path):
    """A real SIGINT in the middle of a step (sent from inside the loss): the step completes, every
    hook sees it, and the run resumes to the bits and the log of one that never stopped."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        import fnlm
        from fnlm import train as trainer
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_loop_safety import CONFIG, TC, _tokens
        calls = []
        def model_fn(params, x, config):
            calls.append(1)
            if len(calls) == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return fnlm.transformer_lm(params, x, config)
        try:
            trainer.train(CONFIG, TC, _tokens(), _tokens(1), sys.argv[1], model_fn=model_fn)
        except trainer.TrainingInterrupted as e:
            print(e.step, e.checkpoint)
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=dict(os.environ, FNLM_TYPECHECK="0"),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 0, proc.stderr
    step, path = proc.stdout.split()
    assert int(step) == 6 and Path(path).name == "step_0000006.pt"
    _run(tmp_path / "a")
    _run(tmp_path / "b", resume=True)
    a, b = _bits(tmp_path / "a"), _bits(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "a") == _log(tmp_path / "b")


def test_resume_mismatches_names_each_setting(tmp_path):
    _run(tmp_path, replace(TC, steps=5))
    ck = fnlm.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert trainer.resume_mismatches(ck, CONFIG, replace(TC, steps=5, eval_batches=9)) == {}
    got = trainer.resume_mismatches(ck, replace(CONFIG, d_ff=48), replace(TC, steps=5).with_step(lr=3e-2), world_size=2)
    assert got == {"model.d_ff": (32, 48), "train.step.lr": (1e-2, 3e-2), "world_size, data_shards": ((1, 1), (2, 2))}
