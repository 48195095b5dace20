"""Vectorized sweeps (fnlm.train.sweep): K models trained at once equal K separate runs."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import fnlm
from fnlm.train import DivergenceGuard, TrainConfig, default_hooks, train
from fnlm.train.sweep import init_stacked, stack_step_configs, train_vectorized, vectorized_step

CONFIG = fnlm.TransformerConfig(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def loss_fn(params, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(params, x, CONFIG), y)


def _tokens(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    base = (np.arange(n) * 7) % CONFIG.vocab_size
    return np.where(rng.random(n) < 0.2, rng.integers(0, CONFIG.vocab_size, n), base).astype(np.uint16)


def _close(a, b, what):
    for x, y in zip(fnlm.tree_leaves(a), fnlm.tree_leaves(b)):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-6, msg=what)
        else:
            assert x == y, what


@pytest.mark.parametrize("per_model_batches, chunk_size", [(False, None), (True, None), (False, 2)])
def test_vectorized_step_equals_train_step_for_each_model(per_model_batches, chunk_size):
    seeds, lrs, wds = [0, 1, 2], [3e-3, 1e-2, 3e-2], [0.0, 0.1, 0.3]
    configs = [fnlm.StepConfig(lr=lr, min_lr=lr / 10, warmup_steps=2, cosine_steps=6, weight_decay=wd)
               for lr, wd in zip(lrs, wds)]
    state = init_stacked(fnlm.init_transformer_lm, CONFIG, seeds)
    singles = [fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=s)) for s in seeds]
    _close(state, fnlm.tree_stack(singles), "init_stacked")
    stacked_config = stack_step_configs(configs)
    tokens = torch.from_numpy(_tokens().astype(np.int64))
    for t in range(6):
        batches = [fnlm.get_batch(tokens, 4, 8, "cpu", generator=torch.Generator().manual_seed(10 * t + k))
                   for k in range(3)]
        if per_model_batches:
            x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        else:
            x, y = batches[0]
            batches = [batches[0]] * 3
        state, metrics = vectorized_step(state, x, y, loss_fn=loss_fn, config=stacked_config,
                                         per_model_batches=per_model_batches, chunk_size=chunk_size)
        for k in range(3):
            singles[k], m = fnlm.train_step(singles[k], *batches[k], loss_fn=loss_fn, config=configs[k])
            torch.testing.assert_close(metrics["loss"][k], m["loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(metrics["grad_norm"][k], m["grad_norm"], rtol=1e-4, atol=1e-6)
            assert metrics["lr"][k].item() == pytest.approx(m["lr"], rel=1e-12)
    assert state.step == 6 and state.opt_state["step"] == 6
    for k, one in enumerate(fnlm.tree_unstack(state)):
        _close(one, singles[k], f"model {k}")


def test_stack_step_configs_and_vectorized_step_check_their_input():
    with pytest.raises(ValueError, match=r"StepConfig.warmup_steps must be the same .* \[1, 2\]"):
        stack_step_configs([fnlm.StepConfig(warmup_steps=1), fnlm.StepConfig(warmup_steps=2)])
    cfg = stack_step_configs([fnlm.StepConfig(lr=1e-3), fnlm.StepConfig(lr=2e-3)])
    assert cfg.lr.dtype == torch.float64 and cfg.lr.tolist() == [1e-3, 2e-3] and cfg.warmup_steps == 100
    state = init_stacked(fnlm.init_transformer_lm, CONFIG, [0, 1])
    x = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"config.lr must be a float or a tensor of shape \(2,\)"):
        vectorized_step(state, x, x, loss_fn=loss_fn, config=fnlm.StepConfig(lr=torch.ones(3)))
    x3 = torch.zeros(3, 4, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"leading model axis of size 2, got x \(3, 4, 8\)"):
        vectorized_step(state, x3, x3, loss_fn=loss_fn, config=cfg, per_model_batches=True)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        vectorized_step(state, x, x, loss_fn=loss_fn, config=cfg, chunk_size=0)


TC = TrainConfig(batch_size=4, steps=16, eval_interval=5, eval_batches=2, checkpoint_interval=8, keep_checkpoints=0, log_interval=3, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=2))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_vectorized_equals_separate_runs_and_a_diverging_model_stops_alone(tmp_path):
    """An lr sweep (shared batches), a model with another seed (its own batches) and one whose lr
    makes it diverge: each model's records, checkpoints and summary are its own `train` run's; the
    diverging one stops at the same step with the same reason, and the others go on."""
    configs = [TC, TC.with_step(lr=3e-2, min_lr=3e-3, weight_decay=0.3), dataclasses.replace(TC, seed=7),
               TC.with_step(lr=300.0, min_lr=30.0)]

    def hooks(run):
        return [*default_hooks(run), DivergenceGuard(CONFIG.vocab_size)]

    data = dict(train_tokens=_tokens(), valid_tokens=_tokens(seed=1))
    outs = [tmp_path / f"vec{k}" for k in range(4)]
    vec = train_vectorized(CONFIG, configs, out_dirs=outs, hooks=hooks, chunk_size=3, **data)
    seq = [train(CONFIG, tc, out_dir=tmp_path / f"seq{k}", hooks=hooks, **data) for k, tc in enumerate(configs)]
    assert [s["diverged"] for s in seq] == [False, False, False, True]
    assert [s["step"] for s in vec] == [s["step"] for s in seq] and seq[3]["step"] < 16
    # the same reason; the loss in it agrees to float tolerance (8.4e6 may differ in its last digits)
    number = r"[-+]?\d+\.\d+"
    assert re.sub(number, "#", vec[3]["stop_reason"]) == re.sub(number, "#", seq[3]["stop_reason"])
    losses = [float(re.findall(number, s[3]["stop_reason"])[0]) for s in (vec, seq)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in range(4):
        for key in ("train_loss", "val_loss", "tokens", "params", "diverged"):
            assert vec[k][key] == pytest.approx(seq[k][key], rel=1e-4, nan_ok=True), (k, key)
        a, b = _records(outs[k] / "metrics.jsonl"), _records(tmp_path / f"seq{k}" / "metrics.jsonl")
        assert [sorted(r) for r in a] == [sorted(r) for r in b] and [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            for key in ("train_loss", "val_loss", "grad_norm", "lr"):
                if key in ra and k != 3:
                    assert ra[key] == pytest.approx(rb[key], rel=1e-4), (k, ra["step"], key)
        ckpts = sorted(p.name for p in (outs[k] / "checkpoints").glob("step_*.pt"))
        assert ckpts == sorted(p.name for p in (tmp_path / f"seq{k}" / "checkpoints").glob("step_*.pt"))
        for name in ckpts:
            va, sb = (fnlm.load_checkpoint(d / "checkpoints" / name) for d in (outs[k], tmp_path / f"seq{k}"))
            assert va["step"] == sb["step"] and va["train_config"] == sb["train_config"]
            _close(va["params"], sb["params"], f"model {k} {name}")
            _close(va["opt_state"], sb["opt_state"], f"model {k} {name}")
            sizes = [(d / "checkpoints" / name).stat().st_size for d in (outs[k], tmp_path / f"seq{k}")]
            assert abs(sizes[0] - sizes[1]) < 2000, sizes


def test_train_vectorized_checks_its_configs(tmp_path):
    data = dict(train_tokens=_tokens(), valid_tokens=_tokens(seed=1))
    with pytest.raises(ValueError, match=r"train_configs\[1\].batch_size = 8 differs .* only step.lr, step.min_lr, step.weight_decay"):
        train_vectorized(CONFIG, [TC, dataclasses.replace(TC, batch_size=8)], out_dirs=[tmp_path / "a", tmp_path / "b"],
                         **data)
    with pytest.raises(ValueError, match="one out_dir per TrainConfig: 2 configs, 1 out_dirs"):
        train_vectorized(CONFIG, [TC, TC], out_dirs=[tmp_path / "a"], **data)
    with pytest.raises(ValueError, match="a different out_dir for every model"):
        train_vectorized(CONFIG, [TC, TC], out_dirs=[tmp_path / "a", tmp_path / "a"], **data)
    with pytest.raises(ValueError, match="does not compile"):
        train_vectorized(CONFIG, [dataclasses.replace(TC, compile=True)], out_dirs=[tmp_path / "a"], **data)
