"""The hook protocol (issue 21): the loop calls each hook's `step` at its `every` cadence and every
hook once at the final step, in phase order, so what is evaluated, logged and checkpointed when a
run stops does not depend on the order of the hook list; the summary reports the run's average
throughput; a CPU run warns once when its throughput collapses on a busy machine."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

import fnlm
from fnlm import train as trainer
from fnlm.train import Hook, TrainConfig, default_hooks, hooks as hooks_mod

CONFIG = fnlm.TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
TC = TrainConfig(batch_size=4, steps=12, eval_interval=5, eval_batches=2, checkpoint_interval=4, keep_checkpoints=0, log_interval=3, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=2))
TIMING = ("time", "tokens_per_sec", "mfu")


def _tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32, 2000).astype(np.uint16)


class StopAt(Hook):
    """Stops the run at a given step (a stand-in for a divergence guard)."""

    name = "stop_at"
    phase = "check"

    def __init__(self, at: int):
        self.at = at

    def step(self, run, state, metrics):
        if state.step == self.at:
            run.stop(f"asked to stop at {self.at}")


class Calls(Hook):
    name = "calls"

    def __init__(self, every: int):
        self.every, self.seen, self.finals = every, [], []

    def step(self, run, state, metrics):
        self.seen.append(state.step)
        if run.final:
            self.finals.append(state.step)


def _records(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in trainer.read_metrics(out / "metrics.jsonl")]


def test_a_stop_is_evaluated_logged_and_checkpointed_whatever_the_hook_order(tmp_path):
    """With the guard after the checkpointer (or the log before the evaluator), a stop at step 7 was
    not checkpointed, or its record missed the evaluation; now every order gives the same."""
    orders = {"stop first": lambda base: [StopAt(7), *base], "stop last": lambda base: [*base, StopAt(7)],
              "reversed": lambda base: [StopAt(7), *reversed(base)]}
    for order, arrange in orders.items():
        res = trainer.train(CONFIG, TC, _tokens(), _tokens(1), tmp_path / order,
                            hooks=lambda run: arrange(default_hooks(run)))
        assert res["diverged"] and res["step"] == 7 and res["stop_reason"] == "asked to stop at 7"
        folder = tmp_path / order / "checkpoints"
        assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_0000004.pt", "step_0000007.pt"]
        assert fnlm.load_checkpoint(folder / "latest.pt")["step"] == 7
        last = _records(tmp_path / order)[-1]
        assert last["step"] == 7 and {"train_loss", "val_loss", "stop_reason"} <= set(last), order
        assert res["val_loss"] == last["val_loss"]
        assert _records(tmp_path / order) == _records(tmp_path / "stop first"), order


def test_the_loop_calls_each_hook_at_its_cadence_and_once_at_the_final_step(tmp_path):
    every3, every5 = Calls(3), Calls(5)
    trainer.train(CONFIG, dataclasses.replace(TC, steps=11), _tokens(), _tokens(1), tmp_path,
                  hooks=lambda run: [every3, *default_hooks(run), every5])
    assert every3.seen == [3, 6, 9, 11] and every3.finals == [11]
    assert every5.seen == [5, 10, 11] and every5.finals == [11]
    steps = [r["step"] for r in _records(tmp_path) if "train_loss" in r]
    assert steps == [3, 6, 9, 11]


def test_hooks_are_checked():
    class Bad(Hook):
        every = 0

    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        trainer.loop.check_hooks([Bad()])

    class Late(Hook):
        phase = "later"

    with pytest.raises(ValueError, match=r"phase must be one of \('measure', 'check', 'write', 'save'\)"):
        trainer.loop.check_hooks([Late()])
    with pytest.raises(ValueError, match="Checkpointer: every must be a positive int"):
        hooks_mod.Checkpointer(0, 1)


def test_the_summary_reports_the_average_throughput_not_the_last_window(tmp_path):
    """The summary's tokens/s was the last log window's: a run slow for most of its steps and fast
    at the end reported the fast figure."""
    calls = {"n": 0}

    def model_fn(params, x, config):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] <= 6:
                time.sleep(1.0)
        return fnlm.transformer_lm(params, x, config)

    tc = dataclasses.replace(TC, steps=12, log_interval=6, eval_interval=100, checkpoint_interval=100)
    res = trainer.train(CONFIG, tc, _tokens(), _tokens(1), tmp_path, model_fn=model_fn)
    last_window = [r for r in trainer.read_metrics(tmp_path / "metrics.jsonl") if "tokens_per_sec" in r][-1]
    tokens = 12 * tc.batch_size * CONFIG.context_length
    assert res["tokens_per_sec"] < last_window["tokens_per_sec"] / 1.5
    assert res["tokens_per_sec"] <= tokens / 6.0
    assert res["mfu"] / last_window["mfu"] == pytest.approx(res["tokens_per_sec"] / last_window["tokens_per_sec"])


def test_a_collapse_on_a_busy_machine_is_warned_about_once(monkeypatch):
    load = {"value": (0.5, 2)}
    monkeypatch.setattr(hooks_mod, "machine_load", lambda: load["value"])
    watch = hooks_mod._Slowdown()
    assert [watch.feed(v, 2) for v in (50.0, 1000.0, 900.0, 950.0)] == [None] * 4
    assert watch.feed(200.0, 2) is None  # slow, but the machine is idle: nothing to say
    load["value"] = (3.9, 2)
    assert watch.feed(500.0, 2) is None  # busy, but not far below the first windows
    message = watch.feed(200.0, 2)
    assert "slowed to 200 tokens/s from 1,000" in message and "load average 3.9 on 2 CPUs" in message
    assert "--threads 1" in message
    assert watch.feed(100.0, 2) is None  # once
    load["value"] = None
    other = hooks_mod._Slowdown()
    assert [other.feed(v, 2) for v in (1000.0, 1000.0, 1000.0, 1000.0, 10.0)] == [None] * 5


def test_machine_load_never_fails(monkeypatch):
    got = hooks_mod.machine_load()
    assert got is None or (got[0] >= 0 and got[1] >= 1)
    monkeypatch.delattr(hooks_mod.os, "getloadavg")
    got = hooks_mod.machine_load()
    assert got is None or got[1] >= 1
