"""Any optimizer through the training loop: the one `StepConfig.optimizer` names or a transformation
passed to `train`; its state checkpointed and resumed exactly; a resume with another optimizer
refused in one line; gradient accumulation, precision and remat as run settings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import fnlm
from fnlm import optim
from fnlm import train as trainer
from fnlm.checkpoint import write_latest
from fnlm.train import TrainConfig

CONFIG = fnlm.TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
TC = TrainConfig(batch_size=8, steps=8, eval_interval=4, eval_batches=2, checkpoint_interval=4, keep_checkpoints=0,
                 log_interval=2, progress=False, plot=False, device="cpu",
                 step=fnlm.StepConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2))


def _tokens(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.2, rng.integers(0, 32, n), np.arange(n) % 32).astype(np.uint16)


def _run(tmp, tc=TC, **kw):
    return trainer.train(CONFIG, tc, _tokens(), _tokens(seed=1), tmp, **kw)


def _final(tmp):
    return fnlm.load_checkpoint(tmp / "checkpoints" / "latest.pt")


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "muon"])
def test_every_named_optimizer_trains_and_resumes_exactly(tmp_path, name):
    tc = TC.with_step(optimizer=name, lr=0.05 if name == "sgd" else 1e-2)
    whole = _run(tmp_path / "whole", tc)
    losses = [r["train_loss"] for r in trainer.read_metrics(tmp_path / "whole" / "metrics.jsonl") if "train_loss" in r]
    assert whole["step"] == 8 and losses[-1] < losses[0], losses
    ck = _final(tmp_path / "whole")
    assert ck["train_config"]["step"]["optimizer"] == name
    # a run stopped at step 4 and resumed ends bitwise where the uninterrupted one does
    short = tmp_path / "short"
    _run(short, replace(tc, checkpoint_interval=4))
    (short / "checkpoints" / "step_0000008.pt").unlink()
    write_latest(short / "checkpoints" / "latest.pt", short / "checkpoints" / "step_0000004.pt", step=4)
    _run(short, tc, resume=True)
    a, b = fnlm.tree_flatten(ck["params"]), fnlm.tree_flatten(_final(short)["params"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_optimizer_is_refused_in_one_line(tmp_path):
    _run(tmp_path, replace(TC, steps=4))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"^cannot resume from .*adamw_cs336 optimizer, whose state does not fit lion"
                                         r"[^\n]*$"):
        _run(tmp_path, TC.with_step(optimizer="lion"), resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_a_transformation_passed_to_train_is_used_checkpointed_and_checked_on_resume(tmp_path):
    mine = optim.chain(optim.trace(0.9), optim.scale_by_learning_rate(0.05))
    res = _run(tmp_path, replace(TC, steps=4), optimizer=mine)
    ck = _final(tmp_path)
    assert res["step"] == 4 and ck["optimizer"] == "custom"
    # the state is the trace's momentum, one leaf per param
    momentum = {k for k in fnlm.tree_flatten(ck["opt_state"]) if k.startswith("0.trace.")}
    assert momentum == {f"0.trace.{k}" for k in fnlm.tree_flatten(ck["params"])}
    # the same steps by hand: value_and_grad, clip at 1.0, the transformation
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    state = fnlm.init_train_state(params, mine)
    loss_fn = fnlm.train.lm_loss_fn(fnlm.transformer_lm, CONFIG)
    for t in range(4):
        x, y = trainer.draw_batch(_tokens(), TC, 8, t, torch.device("cpu"))
        state, _ = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=TC.step, optimizer=mine)
    want, got = fnlm.tree_flatten(state.params), fnlm.tree_flatten(ck["params"])
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=1e-6) for k in want)
    # resuming with an optimizer whose state differs is refused before anything is written
    with pytest.raises(ValueError, match="optimizer state does not fit"):
        _run(tmp_path, replace(TC, steps=4), resume=True, optimizer=optim.adamw(1e-3))
    records = trainer.read_metrics(tmp_path / "metrics.jsonl")
    assert all("lr" not in r for r in records)  # the loop cannot know a custom transformation's rate


def test_gradient_accumulation_in_the_loop_equals_the_whole_batch(tmp_path):
    whole = _run(tmp_path / "whole", TC)
    accum = _run(tmp_path / "accum", TC.with_step(grad_accum_steps=4))
    assert abs(whole["train_loss"] - accum["train_loss"]) < 1e-5
    a, b = fnlm.tree_flatten(_final(tmp_path / "whole")["params"]), fnlm.tree_flatten(_final(tmp_path / "accum")["params"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_accumulation_that_does_not_divide_a_process_batch_is_refused_before_anything(tmp_path):
    two = fnlm.train.Parallel(rank=0, world_size=2)
    with pytest.raises(ValueError, match="grad_accum_steps 8 must divide each process's 4 sequences"):
        _run(tmp_path, TC.with_step(grad_accum_steps=8), parallel=two)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_remat_changes_nothing_but_memory_and_precision_bf16_trains(tmp_path):
    plain = _run(tmp_path / "plain", TC)
    remat = _run(tmp_path / "remat", replace(TC, remat=True))
    assert abs(plain["train_loss"] - remat["train_loss"]) < 1e-6
    a, b = fnlm.tree_flatten(_final(tmp_path / "plain")["params"]), fnlm.tree_flatten(_final(tmp_path / "remat")["params"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    bf16 = _run(tmp_path / "bf16", replace(TC, precision="bf16"))
    assert abs(bf16["train_loss"] - plain["train_loss"]) < 0.05
    params = _final(tmp_path / "bf16")["params"]
    assert all(t.dtype == torch.float32 for t in fnlm.tree_leaves(params))  # the policy keeps fp32 params
    # remat is harmless on resume: a run may be continued with or without it
    assert "remat" in trainer.HARMLESS_FIELDS


def test_remat_needs_a_model_function_that_takes_it(tmp_path):
    def plain_lm(params, x, config):
        return fnlm.transformer_lm(params, x, config)

    with pytest.raises(ValueError, match="remat argument"):
        _run(tmp_path, replace(TC, remat=True), model_fn=plain_lm)


def test_a_sweep_trains_any_named_optimizer_like_single_runs(tmp_path):
    tcs = [TC.with_step(optimizer="lion", lr=lr, min_lr=lr / 10) for lr in (1e-3, 3e-3)]
    sweep = trainer.train_vectorized(CONFIG, tcs, _tokens(), _tokens(seed=1), [tmp_path / "a", tmp_path / "b"])
    single = _run(tmp_path / "single", tcs[1])
    assert abs(sweep[1]["train_loss"] - single["train_loss"]) < 1e-4
    assert _final(tmp_path / "b")["train_config"]["step"]["optimizer"] == "lion"


def test_old_flat_train_configs_are_read():
    old = {"batch_size": 4, "steps": 9, "lr": 3e-3, "min_lr": 3e-4, "beta1": 0.8, "beta2": 0.99, "autocast": "none"}
    tc = TrainConfig.from_dict(old)
    assert tc.step.lr == 3e-3 and tc.step.betas == (0.8, 0.99) and tc.precision == "fp32"
    assert TrainConfig.from_dict(tc.to_dict()) == tc
