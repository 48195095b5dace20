"""`torch.compile(fullgraph=True)` of the loss and of the whole training step (`fnlm.train_step`:
value_and_grad + clip + adamw_step + schedule), each in a fresh process with shape checks off:
one graph, no break, one compile over many steps, and the same loss, gradients and parameters as
eager within float tolerance. The graphs go through dynamo and AOTAutograd (`aot_eager`);
inductor's code generation is exercised by `benchmarks/train_step.py --compile` and
`benchmarks/device_check.py`."""

from __future__ import annotations

import textwrap

import pytest

from tests.fresh_process import run_python

pytestmark = pytest.mark.slow

SETUP = """
import functools, json
import torch, torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
import fnlm
from fnlm.types import tracing
torch.set_num_threads(1)
assert not fnlm.typecheck_enabled()
config = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
params = fnlm.init_transformer_lm(config, seed=0)
g = torch.Generator().manual_seed(0)
x, y = torch.randint(0, 61, (2, 16), generator=g), torch.randint(0, 61, (2, 16), generator=g)

def loss_fn(p, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(p, x, config), y)

def max_diff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(fnlm.tree_leaves(a), fnlm.tree_leaves(b)))
"""


def test_the_loss_compiles_to_one_graph_with_eager_values_and_grads():
    r = run_python(SETUP + textwrap.dedent("""
    explained = torch._dynamo.explain(loss_fn)(params, x, y)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    loss_c, grads_c = fnlm.value_and_grad(compiled)(params, x, y)
    loss_e, grads_e = fnlm.value_and_grad(loss_fn)(params, x, y)
    inside = torch.compile(lambda t: t + 1 if tracing() else t - 1, fullgraph=True, backend="eager")(torch.zeros(()))
    print("RESULT " + json.dumps({
        "graphs": explained.graph_count, "breaks": explained.graph_break_count, "frames": counter.frame_count,
        "loss_diff": abs(float(loss_c) - float(loss_e)), "grad_diff": max_diff(grads_c, grads_e),
        "tracing_inside": float(inside), "tracing_outside": tracing()}))
    """))
    assert (r["graphs"], r["breaks"], r["frames"]) == (1, 0, 1)
    assert r["loss_diff"] < 1e-6 and r["grad_diff"] < 1e-6
    assert r["tracing_inside"] == 1.0 and r["tracing_outside"] is False


def test_the_whole_train_step_compiles_once_to_one_graph_and_tracks_eager():
    r = run_python(SETUP + textwrap.dedent("""
    step_config = fnlm.StepConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, cosine_steps=5)
    step = functools.partial(fnlm.train_step, loss_fn=loss_fn, config=step_config)
    state = fnlm.init_train_state(params, step_tensor=True)
    explained = torch._dynamo.explain(step)(state, x, y)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager = fnlm.init_train_state(params)
    losses, lrs, diffs = [], [], []
    for _ in range(7):
        state, m = compiled(state, x, y)
        eager, em = step(eager, x, y)
        losses.append((float(m["loss"]), float(em["loss"])))
        lrs.append((float(m["lr"]), float(em["lr"])))
        diffs.append(max_diff(state.params, eager.params))
    print("RESULT " + json.dumps({
        "graphs": explained.graph_count, "breaks": explained.graph_break_count, "frames": counter.frame_count,
        "losses": losses, "lrs": lrs, "param_diffs": diffs, "step": int(state.step), "opt_step": int(state.opt_state["step"])}))
    """))
    assert (r["graphs"], r["breaks"]) == (1, 0)
    assert r["frames"] == 1, "the step recompiled as its counters changed"
    assert r["step"] == r["opt_step"] == 7
    for compiled_lr, eager_lr in r["lrs"]:
        assert abs(compiled_lr - eager_lr) <= 1e-12
    assert [lr for _, lr in r["lrs"]] == pytest.approx([0, 1.5e-3, 3e-3, 2.325e-3, 0.975e-3, 3e-4, 3e-4])
    for compiled_loss, eager_loss in r["losses"]:
        assert abs(compiled_loss - eager_loss) < 1e-5
    assert r["losses"][-1][0] < r["losses"][0][0] - 0.05, "training lowers the loss"
    assert max(r["param_diffs"]) < 1e-5
