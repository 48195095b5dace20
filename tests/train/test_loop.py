"""The training loop: metrics, plots, checkpoints, exact resumption, hooks, divergence."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

import fnlm
from fnlm import train as trainer
from fnlm.train import Parallel, TrainConfig


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 32
    context_length: int = 8
    d_model: int = 16


def tiny_init(config, *, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": fnlm.init_embedding(config.vocab_size, config.d_model, generator=g, device=device),
        "mix": fnlm.init_linear(config.d_model, config.d_model, generator=g, device=device),
        "out": fnlm.init_linear(config.d_model, config.vocab_size, generator=g, device=device),
    }


def tiny_lm(params, x, config):
    h = fnlm.embedding(params["emb"], x)
    h = h + fnlm.silu(fnlm.linear(params["mix"], h))
    return fnlm.linear(params["out"], h)


def _tokens(n=4000, vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    base = np.arange(n) % vocab
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


TC = TrainConfig(batch_size=8, steps=24, eval_interval=8, eval_batches=3, checkpoint_interval=5, keep_checkpoints=2, log_interval=2, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=3))


def _run(tmp, tc=TC, **kw):
    return trainer.train(TinyConfig(), tc, _tokens(), _tokens(seed=1), tmp, model_fn=tiny_lm, init_fn=tiny_init, **kw)


def _params(path):
    return fnlm.tree_flatten(fnlm.load_checkpoint(path)["params"])


def test_train_writes_metrics_plot_checkpoints_and_learns(tmp_path):
    res = _run(tmp_path, replace(TC, plot=True))
    assert res["step"] == 24 and res["tokens"] == 24 * 8 * 8 and not res["diverged"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(2, 25, 2))
    assert [r["step"] for r in val] == [8, 16, 24]
    assert all({"tokens", "time", "lr", "grad_norm", "tokens_per_sec"} <= set(r) for r in train)
    assert not any("mfu" in r for r in train)  # TinyConfig: no FLOP accounting, so no MFU
    assert val[-1]["val_perplexity"] == pytest.approx(np.exp(val[-1]["val_loss"]))
    assert val[-1]["val_loss"] < np.log(32) - 0.5
    assert res["val_loss"] == val[-1]["val_loss"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_0000020.pt", "step_0000024.pt"]
    latest = fnlm.load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["step"] == 24 and latest["train_config"]["steps"] == 24 and latest["world_size"] == 1
    assert latest["rng"] is not None and latest["opt_state"]["step"] == 24


def test_learning_rate_follows_the_schedule(tmp_path):
    _run(tmp_path)
    for r in trainer.read_metrics(tmp_path / "metrics.jsonl"):
        if "lr" in r:
            assert r["lr"] == fnlm.cosine_schedule(r["step"] - 1, 1e-2, 1e-3, 3, 24)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [7, 10, 23])
def test_resume_after_crash_is_bitwise_identical(tmp_path, crash_at):
    _run(tmp_path / "a")

    def crash(record):
        if record["step"] >= crash_at:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path / "b", callbacks=[crash])
    stopped = fnlm.load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.pt")["step"]
    assert stopped < 24
    res = _run(tmp_path / "b", resume=True)
    assert res["resumed_from"] == stopped
    a, b = _params(tmp_path / "a" / "checkpoints" / "latest.pt"), _params(tmp_path / "b" / "checkpoints" / "latest.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_sec", "mfu")} for r in trainer.read_metrics(tmp_path / "a" / "metrics.jsonl")]
    rb = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_sec", "mfu")} for r in trainer.read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert ra == rb


def test_resume_refuses_changed_settings(tmp_path):
    _run(tmp_path, replace(TC, steps=10))
    with pytest.raises(ValueError, match=r"train\.step\.lr"):
        _run(tmp_path, replace(TC, steps=10).with_step(lr=5e-3), resume=True)
    res = _run(tmp_path, replace(TC, steps=10, eval_batches=5, log_interval=1), resume=True)
    assert res["resumed_from"] == 10 and res["step"] == 10


def test_a_fresh_run_never_deletes_checkpoints_unless_told_to(tmp_path):
    _run(tmp_path, replace(TC, steps=20))
    before = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    with pytest.raises(FileExistsError, match="resume it, or overwrite it"):
        _run(tmp_path, replace(TC, steps=6))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == before
    _run(tmp_path, replace(TC, steps=6), overwrite=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["latest.pt", "step_0000005.pt", "step_0000006.pt"]
    assert max(r["step"] for r in trainer.read_metrics(tmp_path / "metrics.jsonl")) == 6


def test_batches_depend_only_on_seed_rank_and_step():
    a = fnlm.data.batch_generator(0, 0, 5)
    b = fnlm.data.batch_generator(0, 0, 5)
    assert torch.equal(torch.randint(0, 1000, (10,), generator=a), torch.randint(0, 1000, (10,), generator=b))
    draws = {tuple(torch.randint(0, 10**9, (4,), generator=fnlm.data.batch_generator(*k)).tolist())
             for k in [(0, 0, 5), (0, 1, 5), (0, 0, 6), (1, 0, 5)]}
    assert len(draws) == 4


def test_parallel_hooks_are_called_and_non_main_writes_nothing(tmp_path):
    calls = {"sync": 0, "mean": 0}

    def sync(grads):
        calls["sync"] += 1
        return fnlm.tree_map(lambda g: g * 1.0, grads)

    def mean(t):
        calls["mean"] += 1
        return t

    res = _run(tmp_path, replace(TC, steps=6), parallel=Parallel(rank=1, world_size=2, sync_grads=sync, all_reduce_mean=mean))
    assert calls["sync"] == 6 and calls["mean"] == 3 + 1 + 2  # log points, final evaluation, checkpoints at 5 and 6
    assert res["tokens"] == 6 * 8 * 8
    assert not any(tmp_path.iterdir())


def test_non_finite_loss_stops_as_diverged(tmp_path):
    def bad_init(config, *, seed=0, device=None):
        p = tiny_init(config, seed=seed, device=device)
        p["out"]["weight"][0, 0] = float("nan")
        return p

    res = trainer.train(TinyConfig(), TC, _tokens(), _tokens(seed=1), tmp_path, model_fn=tiny_lm, init_fn=bad_init)
    assert res["diverged"] and res["step"] == 1 and res["nonfinite_at"] == 1
    assert res["checkpoint"] is None and not list((tmp_path / "checkpoints").glob("*.pt"))


def test_token_budget_sets_the_steps():
    tc = TrainConfig(batch_size=4, max_tokens=1000)
    assert tc.total_steps(context_length=10) == 25


def test_bad_config_values_are_reported():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="step.optimizer"):
        TrainConfig(step=dict(optimizer="adam"))
    with pytest.raises(ValueError, match="step.grad_accum_steps"):
        TrainConfig(batch_size=8, step=dict(grad_accum_steps=3))
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(step=dict(lr=float("nan")))
    with pytest.raises(ValueError, match="shard"):
        TrainConfig(shard="layers")
    with pytest.raises(TypeError, match="no field"):
        TrainConfig(step=dict(learning_rate=1e-3))


def test_resolve_device():
    assert trainer.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert trainer.resolve_device("auto").type == expected


def test_flops_per_token_for_mfu():
    config = fnlm.TransformerConfig(vocab_size=100, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    assert fnlm.train.loop._flops_per_token(config) == fnlm.accounting.training_flops_per_token(config)
    assert fnlm.train.loop._flops_per_token(TinyConfig(vocab_size=32, context_length=8, d_model=16)) is None
