"""Every alias and combinator under `torch.func.vmap` over K stacked models, built inside the vmapped
function with a per-model 0-d tensor learning rate: each model gets what its own run with a float
rate gives.

Tolerance: the vmapped step multiplies by a float64 0-d tensor rate where the separate run
multiplies by a Python float, and takes plain per-leaf ops where the separate run may take a fused
or multi-tensor kernel, so the two differ by float32 rounding: `rtol=1e-5, atol=1e-6` after 4
steps. Muon's Newton–Schulz iteration runs in bfloat16; under vmap each `addmm` is computed in
float32 and rounded once, as the unbatched kernel does, which gives the same bits on these small
matrices (larger ones may differ by the float32 summation order, then a few bfloat16 ulps).
"""

from __future__ import annotations

import pytest
import torch

import fnlm
from fnlm import optim
from fnlm.tree import _map_keeping_types

LRS = [1e-3, 3e-3, 1e-2]
SHAPES = {"token_embeddings": {"weight": (9, 4)}, "layers": [{"attn": {"weight": (4, 4)}, "ln": {"weight": (4,)}},
                                                          {"attn": {"weight": (6, 4)}, "ln": {"weight": (4,)}}]}


def _tree(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def build(node):
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, list):
            return [build(v) for v in node]
        return torch.randn(*node, generator=g)

    return build(SHAPES)


def _dims(tree):
    return _map_keeping_types(lambda t: 0 if isinstance(t, torch.Tensor) else None, tree)


MAKERS = {
    "adamw": lambda lr: optim.adamw(lr, weight_decay=0.1, mask=fnlm.default_decay_mask),
    "adamw_cs336": lambda lr: optim.adamw_cs336(lr, weight_decay=0.1),
    "sgd": lambda lr: optim.sgd(lr, 0.9, nesterov=True),
    "lion": lambda lr: optim.lion(lr, weight_decay=0.1),
    "muon": lambda lr: optim.muon(lr, weight_decay=0.1),
    "clipped adam": lambda lr: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr)),
    "masked": lambda lr: optim.masked(optim.sgd(lr, 0.5), fnlm.default_decay_mask),
    "multi_transform": lambda lr: optim.multi_transform(
        {"a": optim.adamw(lr), "s": optim.sgd(lr), "z": optim.set_to_zero()},
        {"token_embeddings": "z", "layers": ["a", "s"]}),
    "MultiSteps": lambda lr: optim.MultiSteps(optim.adamw(lr), 2).gradient_transformation(),
}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("fused", [True, False])
def test_vmapped_optimizer_equals_separate_runs(name, fused):
    make = MAKERS[name]
    models = [_tree(i) for i in range(3)]
    states = [make(lr).init(p) for p, lr in zip(models, LRS)]
    stacked, stacked_state = fnlm.tree_stack(models), fnlm.tree_stack(states)
    lrs = torch.tensor(LRS, dtype=torch.float64)

    def one(p, s, g, lr):
        tx = make(lr)
        if fused:
            return optim.optimizer_step(tx, p, s, g)
        updates, s = tx.update(g, s, p)
        return optim.apply_updates(p, updates), s

    for t in range(4):
        grads = [_tree(100 + 10 * t + i) for i in range(3)]
        dims = _dims(stacked_state)
        stacked, stacked_state = torch.func.vmap(one, in_dims=(0, dims, 0, 0), out_dims=(0, dims))(
            stacked, stacked_state, fnlm.tree_stack(grads), lrs)
        for i, lr in enumerate(LRS):
            models[i], states[i] = optim.optimizer_step(make(lr), models[i], states[i], grads[i])
    for i in range(3):
        ours = fnlm.tree_leaves((fnlm.tree_unstack(stacked)[i], fnlm.tree_unstack(stacked_state)[i]))
        for a, b in zip(ours, fnlm.tree_leaves((models[i], states[i]))):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert a == b
    assert not torch.equal(stacked["layers"][0]["attn"]["weight"][0], _tree(0)["layers"][0]["attn"]["weight"])
