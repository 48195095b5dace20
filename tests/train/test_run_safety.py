"""No run is ever lost, from Python: earlier runs are refused (by `train` and `train_vectorized`),
a run folder has one writer (`RunLock`), non-finite params are never saved, settings are checked
before anything is deleted, and `latest.pt` is a pointer that copying over cannot damage."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import fnlm
from fnlm import train as trainer
from fnlm.checkpoint import NonFiniteParams, load_checkpoint, model_fn_of, resolve_checkpoint
from fnlm.train import RunFolderLocked, RunLock, TrainConfig
from fnlm.train.sweep import train_vectorized

REPO = Path(__file__).resolve().parents[2]
CONFIG = fnlm.TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
TC = TrainConfig(batch_size=4, steps=12, eval_interval=6, eval_batches=2, checkpoint_interval=3, keep_checkpoints=2, log_interval=4, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=2))


def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32, 2000).astype(np.uint16)


def _run(out, tc=TC, **kw):
    return trainer.train(CONFIG, tc, _tokens(), _tokens(1), out, **kw)


def _files(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


class _Crash(Exception):
    pass


def test_train_vectorized_refuses_folders_of_earlier_runs(tmp_path):
    """Issue 22, item 1: `overwrite=False` used to replace metrics.jsonl and repoint latest.pt."""
    old, new = tmp_path / "old", tmp_path / "new"
    _run(old)
    before = _files(old)
    configs = [TC, TC.with_step(lr=3e-3)]
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run"):
        train_vectorized(CONFIG, configs, _tokens(), _tokens(1), [new, old])
    assert _files(old) == before
    assert not (new / "metrics.jsonl").exists()
    summaries = train_vectorized(CONFIG, configs, _tokens(), _tokens(1), [new, old], overwrite=True)
    assert [s["step"] for s in summaries] == [12, 12]
    assert load_checkpoint(old / "checkpoints" / "latest.pt")["train_config"]["step"]["lr"] == 3e-3


def test_a_folder_holding_only_a_metrics_log_is_an_earlier_run(tmp_path):
    """Issue 22, item 6: a run that died before its first checkpoint left metrics.jsonl, which the
    next `train` emptied."""
    def crash(record):
        if record["step"] >= 8:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path, dataclasses.replace(TC, checkpoint_interval=100), callbacks=[crash])
    log = (tmp_path / "metrics.jsonl").read_bytes()
    assert log and not list((tmp_path / "checkpoints").glob("*.pt"))
    for resume in (False, True):
        with pytest.raises(FileExistsError, match=r"metrics\.jsonl holds the log of an earlier run \(3 records, up to "
                                                  r"step 8\).*overwrite"):
            _run(tmp_path, resume=resume)
        assert (tmp_path / "metrics.jsonl").read_bytes() == log
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert _run(tmp_path / "empty", dataclasses.replace(TC, steps=2))["step"] == 2
    assert _run(tmp_path, overwrite=True)["step"] == 12


_HOLDER = textwrap.dedent("""
    import sys, time
    from fnlm.train import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _hold_in_subprocess(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), FNLM_TYPECHECK="0"), cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_lock_refuses_another_process_and_takes_over_a_dead_ones(tmp_path, capsys):
    """Issue 22, item 2: two runs on one folder both ran; now the second is refused, naming the
    first, and a lock whose process is gone is taken over with a note."""
    folder = tmp_path / "run"
    proc = _hold_in_subprocess(folder)
    try:
        with pytest.raises(RunFolderLocked) as caught:
            _run(folder)
        message = str(caught.value)
        assert f"pid {proc.pid} on {socket.gethostname()}, started " in message and "\n" not in message
        assert caught.value.holder["pid"] == proc.pid
        assert not (folder / "metrics.jsonl").exists() and not (folder / "checkpoints").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (folder / RunLock.FILE).exists()
    assert _run(folder)["step"] == 12
    err = capsys.readouterr().err
    assert f"taking over the lock of {folder} from pid {proc.pid}" in err and "whose process is gone" in err
    assert not (folder / RunLock.FILE).exists()


def test_run_lock_is_reentrant_in_a_thread_and_refuses_other_threads(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder):
        assert RunLock.held(folder)
        assert _run(folder)["step"] == 12
        assert (folder / RunLock.FILE).exists()
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_expect_locked(folder)))
        thread.start()
        thread.join()
        assert errors == ["refused"]
    assert not RunLock.held(folder) and not (folder / RunLock.FILE).exists()


def _expect_locked(folder: Path) -> str:
    try:
        RunLock(folder).acquire()
    except RunFolderLocked as e:
        return "refused" if "another thread" in str(e) else str(e)
    return "acquired"


def _nan_grad_at(step: int):
    """A model whose forward stays finite but whose backward is NaN at training step `step`:
    `0 * sqrt(h - h)` is 0 forward, and 0 * inf = NaN backward."""
    calls = {"n": 0}

    def model_fn(params, x, config):
        logits = fnlm.transformer_lm(params, x, config)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                logits = logits + 0.0 * torch.sqrt(logits - logits)
        return logits

    return model_fn


def test_a_nan_gradient_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
    """Issue 22, item 3: one NaN gradient (finite loss) went on to NaN weights and rotated the good
    checkpoints out; now the run stops at that step, saves nothing from it, and says so."""
    res = _run(tmp_path, model_fn=_nan_grad_at(10))
    assert res["diverged"] and res["nonfinite_at"] == 10 and res["step"] == 10
    assert "not finite at step 10" in res["stop_reason"] and "grad norm nan" in res["stop_reason"]
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["latest.pt", "step_0000006.pt", "step_0000009.pt"]
    assert res["checkpoint"] == str(folder / "step_0000009.pt")
    for path in folder.glob("*.pt"):
        ck = load_checkpoint(path)
        assert not fnlm.checkpoint.check_finite(ck["params"]), path
    assert load_checkpoint(folder / "latest.pt")["step"] == 9
    records = trainer.read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 10 and "not finite at step 10" in records[-1]["stop_reason"]
    assert "val_loss" not in records[-1]


def test_a_model_of_a_sweep_that_blows_up_stops_alone_and_saves_nothing_non_finite(tmp_path):
    configs = [TC, TC.with_step(lr=1e30, min_lr=1e29)]
    outs = [tmp_path / "fine", tmp_path / "blown"]
    fine, blown = train_vectorized(CONFIG, configs, _tokens(), _tokens(1), outs)
    assert fine["step"] == 12 and fine["nonfinite_at"] is None and not fine["diverged"]
    assert blown["diverged"] and blown["nonfinite_at"] is not None and blown["step"] == blown["nonfinite_at"] < 12
    for path in (outs[1] / "checkpoints").glob("*.pt"):
        assert not fnlm.checkpoint.check_finite(load_checkpoint(path)["params"]), path


def test_save_checkpoint_refuses_non_finite_params(tmp_path):
    params = {"w": torch.tensor([1.0, float("nan")]), "layers": [{"b": torch.tensor([float("inf")])}]}
    with pytest.raises(NonFiniteParams, match=r"not written: the params hold NaN or inf \(w, layers\.0\.b\); pass "
                                              r"allow_non_finite=True") as caught:
        fnlm.save_checkpoint(tmp_path / "c.pt", params=params, opt_state={}, step=1, config={})
    assert caught.value.names == ["w", "layers.0.b"] and not list(tmp_path.iterdir())
    fnlm.save_checkpoint(tmp_path / "c.pt", params=params, opt_state={}, step=1, config={}, allow_non_finite=True)
    assert math.isnan(load_checkpoint(tmp_path / "c.pt")["params"]["w"][1])


@pytest.mark.parametrize("field", ["grad_clip", "eps", "weight_decay", "lr", "min_lr", "betas", "momentum"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_train_config_refuses_nan_and_inf(field, value):
    """Issue 22, item 4: NaN passed every `<`/`<=` check (and inf the lr's)."""
    given = (0.9, value) if field == "betas" else value
    with pytest.raises(ValueError, match=rf"step\.{field}=.*{value}.* \(every number must be finite\)"):
        TrainConfig(step={field: given})


def test_train_config_refuses_wrong_types_and_a_schedule_that_cannot_work(tmp_path):
    with pytest.raises(TypeError, match=r"(?s)steps.*1000\.0"):
        TrainConfig(steps=1e3)
    with pytest.raises(ValueError, match=r"cosine_steps \(must be >= step.warmup_steps\)"):
        TrainConfig(step=dict(cosine_steps=5, warmup_steps=10))
    _run(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="warmup_steps 100 is longer than the run's 12 steps"):
        _run(tmp_path, TC.with_step(warmup_steps=100), overwrite=True)
    assert _files(tmp_path) == before


def test_latest_is_a_pointer_that_copying_over_cannot_damage(tmp_path):
    """Issue 22, item 5: latest.pt was a hard link, so `cp step_A latest.pt` overwrote step_B."""
    _run(tmp_path)
    folder = tmp_path / "checkpoints"
    latest = folder / "latest.pt"
    assert latest.stat().st_size < 1000 and resolve_checkpoint(latest) == folder / "step_0000012.pt"
    assert load_checkpoint(latest)["step"] == 12
    newest = (folder / "step_0000012.pt").read_bytes()
    shutil.copyfile(folder / "step_0000009.pt", latest)
    assert (folder / "step_0000012.pt").read_bytes() == newest
    assert load_checkpoint(latest)["step"] == 9
    assert _run(tmp_path, resume=True)["resumed_from"] == 9


def test_a_checkpoint_this_device_cannot_hold_is_not_called_unreadable(tmp_path):
    _run(tmp_path)
    latest = tmp_path / "checkpoints" / "latest.pt"
    missing = "cuda" if not torch.cuda.is_available() else "cuda:99"
    with pytest.raises(ValueError) as caught:
        load_checkpoint(latest, map_location=missing)
    message = str(caught.value)
    assert "is intact, but cannot be loaded onto cuda" in message and "map_location='cpu'" in message
    assert "unreadable" not in message and "cp " not in message and "copy" not in message
    assert load_checkpoint(latest, map_location="cpu")["step"] == 12


def test_checkpoints_record_the_model_function(tmp_path):
    """A checkpoint of a custom `model_fn` used to be generated from with the default block."""
    _run(tmp_path / "default", dataclasses.replace(TC, steps=3))
    ck = load_checkpoint(tmp_path / "default" / "checkpoints" / "latest.pt")
    assert ck["model_fn"] == "fnlm.model:transformer_lm" and model_fn_of(ck) is fnlm.transformer_lm

    def local_model(params, x, config):
        return fnlm.transformer_lm(params, x, config)

    _run(tmp_path / "local", dataclasses.replace(TC, steps=3), model_fn=local_model)
    ck = load_checkpoint(tmp_path / "local" / "checkpoints" / "latest.pt")
    with pytest.raises(ValueError, match=r"trained with model function .*local_model.*cannot be rebuilt here: .*"
                                         r"load it with the code that trained it"):
        model_fn_of(ck)
    import functools

    partial = functools.partial(fnlm.transformer_lm, block=fnlm.model.post_norm_block)
    _run(tmp_path / "partial", dataclasses.replace(TC, steps=3), model_fn=partial)
    rebuilt = model_fn_of(load_checkpoint(tmp_path / "partial" / "checkpoints" / "latest.pt"))
    assert rebuilt.func is fnlm.transformer_lm and rebuilt.keywords == {"block": fnlm.model.post_norm_block}
    with pytest.raises(ValueError, match="os is part of Python, not a model"):
        model_fn_of({"model_fn": "os:system"})
    with pytest.raises(ValueError, match="not imported; import it first"):
        model_fn_of({"model_fn": "some_module_nobody_imported:f"})


def test_checkpoints_follow_the_umask_and_orphaned_temporaries_are_removed(tmp_path):
    """Checkpoints were 0600 (mkstemp); a SIGKILL mid-write left `.step_N.pt.*.tmp` forever."""
    old = os.umask(0o022)
    try:
        _run(tmp_path, dataclasses.replace(TC, steps=3))
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoints" / "step_0000003.pt").stat().st_mode & 0o777 == 0o644
    code = textwrap.dedent("""
        import os, sys, torch, fnlm
        from fnlm import checkpoint
        def stop(obj, f, *a, **k):
            f.write(b"partial")
            f.flush()
            os.kill(os.getpid(), 9)
        checkpoint.torch.save = stop
        fnlm.save_checkpoint(sys.argv[1], params={"w": torch.ones(2)}, opt_state={}, step=1, config={})
    """)
    target = tmp_path / "checkpoints" / "step_0000099.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    orphans = list((tmp_path / "checkpoints").glob(".step_0000099.pt.*.tmp"))
    assert len(orphans) == 1 and not target.exists()
    live = tmp_path / "checkpoints" / f".step_0000098.pt.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"being written by this process")
    _run(tmp_path, dataclasses.replace(TC, steps=3), resume=True)
    assert not orphans[0].exists() and live.exists()


def test_evaluate_windows_scores_what_it_reports():
    """`--final-eval-tokens 0` scored 64 tokens and reported it."""
    tokens = _tokens()
    loss_fn = fnlm.train.lm_loss_fn(fnlm.transformer_lm, CONFIG)
    params = fnlm.init_transformer_lm(CONFIG)
    _, count = fnlm.train.evaluate_windows(loss_fn, params, tokens, context_length=8, batch_size=4,
                                           device=torch.device("cpu"), max_tokens=20)
    assert count == 16
    for bad in (0, 5):
        with pytest.raises(ValueError, match="max_tokens"):
            fnlm.train.evaluate_windows(loss_fn, params, tokens, context_length=8, batch_size=4,
                                        device=torch.device("cpu"), max_tokens=bad)
