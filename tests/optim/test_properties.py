"""Algebraic properties of the combinators, over transformations and hyper-parameters Hypothesis
draws: `chain` is associative, `masked` with an all-True mask is its inner transformation (and
with an all-False one the identity), `MultiSteps` with K = 1 is its inner transformation,
`multi_transform` with one label is that transformation. All hold bitwise: the same operations run
on the same tensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm import optim
from tests.optim.helpers import grad_stream, random_tree

STEPS = 3

_unit = st.floats(0.0, 0.99)
_rate = st.floats(1e-4, 1.0)
LINKS = st.one_of(
    st.builds(lambda s: optim.scale(s), st.floats(-2.0, 2.0)),
    st.builds(lambda d, n: optim.trace(d, n), _unit, st.booleans()),
    st.builds(lambda b1, b2, n: optim.scale_by_adam(b1, b2, nesterov=n), _unit, _unit, st.booleans()),
    st.builds(lambda b1, b2: optim.scale_by_lion(b1, b2), _unit, _unit),
    st.builds(lambda m: optim.clip_by_global_norm(m), st.floats(0.01, 10.0)),
    st.builds(lambda w: optim.add_decayed_weights(w), _rate),
    st.builds(lambda lr: optim.scale_by_learning_rate(lr), _rate),
    st.just(optim.identity()),
)


def _updates(tx, steps: int = STEPS) -> list:
    params = random_tree(0)
    state = tx.init(params)
    out = []
    for grads in grad_stream(steps):
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        out.append(updates)
    return out


def _equal(a: list, b: list) -> None:
    for x, y in zip(a, b):
        for u, v in zip(fnlm.tree_leaves(x), fnlm.tree_leaves(y)):
            assert torch.equal(u, v)


@settings(max_examples=25, deadline=None)
@given(LINKS, LINKS, LINKS)
def test_chain_is_associative(a, b, c):
    flat = _updates(optim.chain(a, b, c))
    _equal(flat, _updates(optim.chain(a, optim.chain(b, c))))
    _equal(flat, _updates(optim.chain(optim.chain(a, b), c)))


@settings(max_examples=20, deadline=None)
@given(LINKS, st.sampled_from(["tree", "predicate", "optax_fn", "prefix"]))
def test_masked_with_everything_in_is_the_inner_transformation(inner, form):
    mask = {"tree": fnlm.tree_map(lambda p: True, random_tree(0)), "predicate": lambda name, leaf: True,
            "optax_fn": lambda params: fnlm.tree_map(lambda p: True, params), "prefix": True}[form]
    _equal(_updates(optim.masked(inner, mask)), _updates(inner))


@settings(max_examples=15, deadline=None)
@given(LINKS)
def test_masked_with_nothing_in_is_the_identity(inner):
    _equal(_updates(optim.masked(inner, lambda name, leaf: False)), _updates(optim.identity()))


@settings(max_examples=20, deadline=None)
@given(LINKS, LINKS, st.booleans())
def test_multi_steps_with_k_1_is_the_inner_transformation(a, b, mean):
    inner = optim.chain(a, b)
    _equal(_updates(optim.MultiSteps(inner, 1, use_grad_mean=mean).gradient_transformation()), _updates(inner))


@settings(max_examples=15, deadline=None)
@given(LINKS)
def test_multi_transform_with_one_label_is_that_transformation(tx):
    _equal(_updates(optim.multi_transform({"all": tx}, lambda name, leaf: "all")), _updates(tx))


@settings(max_examples=15, deadline=None)
@given(LINKS, st.integers(0, 4))
def test_a_frozen_group_does_not_move_and_the_rest_moves_as_alone(tx, frozen_leaf):
    names = list(fnlm.tree_flatten(random_tree(0)))
    frozen = names[frozen_leaf]
    labels = lambda name, leaf: "frozen" if name == frozen else "train"  # noqa: E731
    both = _updates(optim.multi_transform({"train": tx, "frozen": optim.set_to_zero()}, labels))
    alone = _updates(optim.masked(tx, lambda name, leaf: name != frozen))
    for x, y in zip(both, alone):
        fx, fy = fnlm.tree_flatten(x), fnlm.tree_flatten(y)
        assert torch.equal(fx[frozen], torch.zeros_like(fx[frozen]))
        for n in names:
            if n != frozen:
                assert torch.equal(fx[n], fy[n])
