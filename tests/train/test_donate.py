"""Donation (JAX's donate_argnums) in train_step and the training loop: the same values, reused
buffers, checkpoints that later in-place updates do not touch, Ctrl-C held until a step completes."""

from __future__ import annotations


import numpy as np
import torch

import fnlm
from fnlm.train import TrainConfig, draw_batch, loop, train
from tests.fresh_process import run_python

CONFIG = fnlm.TransformerConfig(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
STEP = fnlm.StepConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, cosine_steps=10, weight_decay=0.1)


def loss_fn(params, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(params, x, CONFIG), y)


def _tokens(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CONFIG.vocab_size, n).astype(np.uint16)


def test_donated_train_step_gives_the_same_state_in_the_same_buffers():
    tokens = torch.from_numpy(_tokens().astype(np.int64))
    pure = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=0))
    donated = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=0))
    ptrs = [t.data_ptr() for t in fnlm.tree_leaves((donated.params, donated.opt_state["m"]))]
    for t in range(5):
        x, y = fnlm.get_batch(tokens, 4, 8, "cpu", generator=torch.Generator().manual_seed(t))
        before = [t.clone() for t in fnlm.tree_leaves(pure.params)]
        pure, m1 = fnlm.train_step(pure, x, y, loss_fn=loss_fn, config=STEP)
        donated, m2 = fnlm.train_step(donated, x, y, loss_fn=loss_fn, config=STEP, donate=True)
        assert torch.equal(m1["loss"], m2["loss"]) and torch.equal(m1["grad_norm"], m2["grad_norm"])
    for a, b in zip(fnlm.tree_leaves(pure), fnlm.tree_leaves(donated)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert [t.data_ptr() for t in fnlm.tree_leaves((donated.params, donated.opt_state["m"]))] == ptrs
    assert not all(torch.equal(a, b) for a, b in zip(before, fnlm.tree_leaves(pure.params)))


def test_the_loop_donates_and_its_checkpoints_hold_their_own_step(tmp_path, monkeypatch):
    """`train` steps with donate=True; each checkpoint equals a pure run's state at its step, so the
    in-place updates after it did not reach what it saved."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("donate"))
        return fnlm.train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    tc = TrainConfig(batch_size=4, steps=9, eval_interval=3, eval_batches=1, checkpoint_interval=3, keep_checkpoints=0, log_interval=3, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=2))
    train(CONFIG, tc, _tokens(), _tokens(seed=1), tmp_path)
    assert seen == [True] * 9
    state = fnlm.init_train_state(fnlm.init_transformer_lm(CONFIG, seed=0))
    config = tc.step_config(9)
    for step in range(9):
        x, y = draw_batch(_tokens(), tc, CONFIG.context_length, step, torch.device("cpu"))
        state, _ = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config)
        if state.step % 3 == 0:
            saved = fnlm.load_checkpoint(tmp_path / "checkpoints" / f"step_{state.step:07d}.pt")
            for a, b in zip(fnlm.tree_leaves((state.params, state.opt_state)),
                            fnlm.tree_leaves((saved["params"], saved["opt_state"]))):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_ctrl_c_is_held_until_the_donated_step_completes():
    """Run as a script runs the loop: a fresh process whose main thread has Python's default SIGINT
    handler (a pytest worker's signal state is the harness's, not the user's)."""
    r = run_python("""
        import json, signal
        from fnlm.train import loop
        finished, raised = [], False
        handler = signal.getsignal(signal.SIGINT)
        try:
            with loop._interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                finished.append("step")
        except KeyboardInterrupt:
            raised = True
        restored = signal.getsignal(signal.SIGINT) is handler
        with loop._interrupts_deferred():
            finished.append("quiet")
        print("RESULT " + json.dumps({"raised": raised, "finished": finished, "restored": restored}))
    """, timeout=120)
    assert r["raised"] and r["restored"]
    assert r["finished"] == ["step", "quiet"]