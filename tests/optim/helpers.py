"""Shared by the tests of `fnlm.optim`: random trees, and running fnlm and optax side by side.

optax runs with `jax_enable_x64` on float32 arrays: see `test_vs_optax.py`'s docstring for why.
"""

from __future__ import annotations

import numpy as np
import torch

import fnlm

SHAPES = {"a": {"b": (3,), "w": (5, 3)}, "c": [(4, 2, 2), (7,)], "d": (6, 4)}
"""A params tree's leaf shapes: a few leaves of different ranks, dict keys in sorted order (jax sorts
a dict's keys when it flattens it, fnlm keeps their order; sorted keys make the two orders one)."""


def random_tree(seed: int, scale: float = 1.0, shapes=SHAPES) -> dict:
    """A tree of `shapes` with standard normal float32 entries times `scale`."""
    g = torch.Generator().manual_seed(seed)

    def build(node):
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, list):
            return [build(v) for v in node]
        return scale * torch.randn(*node, generator=g)

    return build(shapes)


def grad_stream(steps: int, seed: int = 100, shapes=SHAPES) -> list[dict]:
    """`steps` random gradient trees whose scales vary over two decades (so that clipping is
    sometimes active and sometimes not)."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (2 * torch.rand(steps, generator=g) - 1)
    return [random_tree(seed + 1 + i, float(s), shapes) for i, s in enumerate(scales)]


def to_jax(tree):
    import jax.numpy as jnp

    if isinstance(tree, dict):
        return {k: to_jax(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_jax(v) for v in tree]
    return jnp.asarray(tree.detach().to(torch.float32).numpy()) if tree.dtype != torch.bfloat16 else \
        jnp.asarray(tree.detach().float().numpy()).astype(jnp.bfloat16)


def leaves(tree) -> list:
    """fnlm-side leaves in order: tensors and ints (a state's counts), through dicts, tuples, lists."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()
    return np.asarray(x, dtype=np.float32) if x.dtype.name == "bfloat16" else np.asarray(x)


class Worst:
    """The largest `max|ours - ref| / max|ref|` seen, for the report of a comparison."""

    def __init__(self) -> None:
        self.value = 0.0

    def close(self, ours, ref, what: str) -> None:
        """`torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * max|ref|)`: 1e-6 relative to
        the reference's largest entry (and elementwise), and record the relative difference."""
        a, b = torch.from_numpy(np.array(as_numpy(ours), dtype=np.float64)), torch.from_numpy(
            np.array(as_numpy(ref), dtype=np.float64))
        scale = float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale, msg=what)
        if scale > 0:
            self.value = max(self.value, float((a - b).abs().max()) / scale)


def compare_trees(ours, ref, worst: Worst, what: str) -> None:
    """Every leaf of `ours` (fnlm: tensors, ints) against the same leaf of `ref` (jax), in order."""
    import jax

    mine, theirs = leaves(ours), jax.tree.leaves(ref)
    assert len(mine) == len(theirs), f"{what}: {len(mine)} leaves vs optax's {len(theirs)}"
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if isinstance(a, int):
            assert a == int(b), f"{what} leaf {i}: {a} vs {int(b)}"
        else:
            assert tuple(a.shape) == tuple(b.shape), f"{what} leaf {i}: shape {tuple(a.shape)} vs {b.shape}"
            worst.close(a, b, f"{what} leaf {i}")


def run_both(ours, theirs, *, steps: int = 100, params=None, fused: bool = False, shapes=SHAPES,
             check_state: bool = True, resync: bool = False) -> float:
    """Run fnlm's transformation `ours` and optax's `theirs` on the same `steps` gradient trees from
    the same params, each applying its own updates to its own params; compare updates, states and
    params at every step. `fused`: fnlm takes its steps with `optimizer_step` (the fused `apply`
    path where there is one) and only states and params are compared. `resync`: after each step's
    comparison optax continues from fnlm's params (the states keep their own trajectories), so
    each step is compared from the same params. Returns the worst relative difference seen."""
    import optax

    params = random_tree(0, shapes=shapes) if params is None else params
    jparams = to_jax(params)
    state, jstate = ours.init(params), theirs.init(jparams)
    worst = Worst()
    compare_trees(state, jstate, worst, "init state") if check_state else None
    for t, grads in enumerate(grad_stream(steps, shapes=shapes)):
        jupdates, jstate = theirs.update(to_jax(grads), jstate, jparams)
        jparams = optax.apply_updates(jparams, jupdates)
        if fused:
            params, state = fnlm.optim.optimizer_step(ours, params, state, grads)
        else:
            updates, state = ours.update(grads, state, params)
            compare_trees(updates, jupdates, worst, f"updates at step {t}")
            params = fnlm.optim.apply_updates(params, updates)
        if check_state:
            compare_trees(state, jstate, worst, f"state at step {t}")
        compare_trees(params, jparams, worst, f"params at step {t}")
        if resync:
            jparams = to_jax(params)
    return worst.value
