"""Edge cases of `fnlm.optim`'s transformations: empty trees, zero norms, rates and counters given as
tensors, every mask form (and wrong ones), donation, `chain()` of nothing, states from another
optimizer, states through `torch.save(..., weights_only=True)`, extra arguments in combinators."""

from __future__ import annotations

import io

import pytest
import torch

import fnlm
from fnlm import optim
from tests.optim.helpers import grad_stream, random_tree

ALIASES = {
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1),
    "adamw masked": lambda: optim.adamw(1e-2, weight_decay=0.1, mask=fnlm.default_decay_mask),
    "adamw_cs336": lambda: optim.adamw_cs336(1e-2),
    "sgd": lambda: optim.sgd(1e-2, 0.9),
    "lion": lambda: optim.lion(1e-3),
    "muon": lambda: optim.muon(1e-2),
    "chain": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.scale_by_adam(), optim.scale(-1e-2)),
    "masked": lambda: optim.masked(optim.sgd(1e-2), {"a": True, "c": False, "d": True}),
    "multi_transform": lambda: optim.multi_transform({"x": optim.adamw(1e-2), "y": optim.set_to_zero()},
                                                     lambda n, leaf: "x" if leaf.ndim == 2 else "y"),
    "MultiSteps": lambda: optim.MultiSteps(optim.adamw(1e-2), 2).gradient_transformation(),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_an_empty_tree_gives_an_empty_tree(name):
    """(`adamw`'s fused `apply` read `params[0]` of an empty list; `clip_by_global_norm` raised.)"""
    tx = ALIASES[name]() if name != "masked" else optim.masked(optim.sgd(1e-2), {})
    state = tx.init({})
    updates, state = tx.update({}, state, {})
    assert updates == {}
    params, _ = optim.optimizer_step(tx, {}, state, {})
    assert params == {}


def test_clip_by_global_norm_of_zeros_with_max_norm_0_is_zeros_not_nan():
    zeros = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    for max_norm in (0.0, 1.0):
        out, _ = optim.clip_by_global_norm(max_norm).update(zeros, (), None)
        assert all(torch.equal(u, torch.zeros_like(u)) for u in fnlm.tree_leaves(out)), max_norm
    out, _ = optim.clip_by_global_norm(0.0).update({"a": torch.ones(3)}, (), None)
    assert torch.equal(out["a"], torch.zeros(3))


def test_a_rate_as_a_0d_tensor_equals_the_float():
    params, grads = random_tree(0), random_tree(1)
    for make in (optim.scale_by_learning_rate, lambda lr: optim.adamw(lr, weight_decay=0.1), optim.lion,
                 lambda lr: optim.muon(lr, muon_mask=lambda n, leaf: leaf.ndim == 2)):
        a, b = make(3e-3), make(torch.tensor(3e-3, dtype=torch.float64))
        pa, _ = optim.optimizer_step(a, params, a.init(params), grads)
        pb, _ = optim.optimizer_step(b, params, b.init(params), grads)
        for x, y in zip(fnlm.tree_leaves(pa), fnlm.tree_leaves(pb)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def _tensor_counts(state):
    return fnlm.tree._map_keeping_types(lambda x: torch.tensor(x) if type(x) is int else x, state)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "MultiSteps", "multi_transform"])
def test_counters_as_0d_tensors_equal_int_counters(name):
    """`init_train_state(..., step_tensor=True)` makes every count a 0-d tensor (a compiled step);
    schedules then see tensor counts, and MultiSteps takes its branch-free path."""
    lr = optim.warmup_cosine_schedule(1e-2, 1e-3, 3, 10)
    tx = {"adamw": lambda: optim.adamw(lr, weight_decay=0.1), "sgd": lambda: optim.sgd(lr, 0.9),
          "lion": lambda: optim.lion(lr), "MultiSteps": lambda: optim.MultiSteps(optim.adamw(lr), 3)
          .gradient_transformation(),
          "multi_transform": lambda: optim.multi_transform({"a": optim.adamw(lr), "b": optim.sgd(lr)},
                                                           {"a": "a", "c": "b", "d": "a"})}[name]()
    params = tensor_params = random_tree(0)
    state = tx.init(params)
    tensor_state = _tensor_counts(state)
    for grads in grad_stream(7):
        params, state = optim.optimizer_step(tx, params, state, grads)
        tensor_params, tensor_state = optim.optimizer_step(tx, tensor_params, tensor_state, grads)
    for a, b in zip(fnlm.tree_leaves((params, state)), fnlm.tree_leaves((tensor_params, tensor_state))):
        if isinstance(a, torch.Tensor):  # the int path may take the fused kernel, the tensor path not
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
        else:
            assert int(b) == a


def test_mask_forms_agree_and_wrong_masks_are_named():
    params = random_tree(0)
    grads = random_tree(1)
    forms = [{"a": {"b": False, "w": True}, "c": [True, False], "d": True},
             {"a": {"b": False, "w": True}, "c": [True, False], "d": True} | {},
             lambda name, leaf: name in ("a.w", "c.0", "d"),
             lambda p: {"a": {"b": False, "w": True}, "c": [True, False], "d": True}]
    outs = [optim.add_decayed_weights(0.5, m).update(grads, (), params)[0] for m in forms]
    for out in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(fnlm.tree_leaves(out), fnlm.tree_leaves(outs[0])))
    prefix = optim.add_decayed_weights(0.5, {"a": False, "c": True, "d": False}).update(grads, (), params)[0]
    assert torch.equal(prefix["a"]["w"], grads["a"]["w"]) and not torch.equal(prefix["c"][1], grads["c"][1])
    with pytest.raises(ValueError, match=r"mask does not mirror params.*no value for \['d'\]"):
        optim.add_decayed_weights(0.5, {"a": True, "c": True}).update(grads, (), params)
    with pytest.raises(ValueError, match=r"unexpected \['e'\]"):
        optim.masked(optim.identity(), {"a": True, "c": True, "d": True, "e": False}).init(params)
    with pytest.raises(TypeError, match="must give a bool for 'a.b'"):
        optim.masked(optim.identity(), lambda name, leaf: leaf.ndim).init(params)
    with pytest.raises(ValueError, match="labels with no transformation: \\['sgd'\\]"):
        optim.multi_transform({"adam": optim.adamw(1e-3)}, lambda n, leaf: "adam" if leaf.ndim > 1 else "sgd"
                              ).init(params)
    with pytest.raises(TypeError, match="labels must be non-empty strings"):
        optim.multi_transform({0: optim.adamw(1e-3)}, lambda n, leaf: 0)


def test_masked_inner_sees_the_selected_leaves_under_their_names():
    seen = []

    def update(updates, state, params=None):
        seen.append((sorted(fnlm.tree_flatten(updates)), sorted(fnlm.tree_flatten(params))))
        return fnlm.tree_map(lambda u: 2 * u, updates), state

    params = {"layers": [{"w": torch.ones(2)}, {"w": torch.ones(2)}, {"w": torch.ones(2)}], "head": torch.ones(3)}
    tx = optim.masked(optim.GradientTransformation(lambda p: (), update), lambda name, leaf: name != "layers.0.w")
    out, _ = tx.update(params, tx.init(params), params)
    assert seen == [(["head", "layers.1.w", "layers.2.w"],) * 2]
    assert torch.equal(out["layers"][0]["w"], torch.ones(2)) and torch.equal(out["layers"][2]["w"], 2 * torch.ones(2))


def test_combinators_give_their_parts_their_own_norm():
    """`grad_norm` describes the whole incoming tree; a clip inside `masked`, `multi_transform` or
    `MultiSteps` must use the norm of what it sees, as in optax (where no such argument exists)."""
    params, grads = random_tree(0), random_tree(1, 10.0)
    huge = {"grad_norm": torch.tensor(1e9)}
    for tx in (optim.masked(optim.clip_by_global_norm(1.0), {"a": True, "c": False, "d": True}),
               optim.multi_transform({"x": optim.clip_by_global_norm(1.0), "y": optim.identity()},
                                     {"a": "x", "c": "y", "d": "x"}),
               optim.MultiSteps(optim.clip_by_global_norm(1.0), 1).gradient_transformation()):
        plain, _ = tx.update(grads, tx.init(params), params)
        told, _ = tx.update(grads, tx.init(params), params, **huge)
        assert all(torch.equal(a, b) for a, b in zip(fnlm.tree_leaves(plain), fnlm.tree_leaves(told)))
        assert not torch.equal(plain["a"]["w"], grads["a"]["w"])


@pytest.mark.parametrize("name", list(ALIASES))
def test_donated_steps_give_the_same_values(name):
    tx = ALIASES[name]()
    params, donated = random_tree(0), random_tree(0)
    state, donated_state = tx.init(params), tx.init(donated)
    for grads in grad_stream(4):
        params, state = optim.optimizer_step(tx, params, state, grads)
        donated, donated_state = optim.optimizer_step(tx, donated, donated_state, grads, donate=True)
    for a, b in zip(fnlm.tree_leaves((params, state)), fnlm.tree_leaves((donated, donated_state))):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("name", ["adamw", "muon", "multi_transform", "sgd"])
def test_donated_params_are_updated_in_their_buffers(name):
    tx = ALIASES[name]()
    params = random_tree(0)
    ptrs = [p.data_ptr() for p in fnlm.tree_leaves(params)]
    new, _ = optim.optimizer_step(tx, params, tx.init(params), random_tree(1), donate=True)
    assert [p.data_ptr() for p in fnlm.tree_leaves(new)] == ptrs


def test_chain_of_nothing_is_the_identity():
    tx = optim.chain()
    grads = random_tree(1)
    assert tx.init(random_tree(0)) == () and tx.apply is None
    out, state = tx.update(grads, (), None)
    assert out is grads and state == ()


WRONG = [
    ("adamw", "adamw_cs336", "chain of 3 transformation"),
    ("lion", "adamw", "scale_by_lion's state must be a dict with keys \\['count', 'mu'\\]"),
    ("sgd", "adamw", "chain of 2"),
    ("muon", "adamw", "multi_transform's state"),
    ("MultiSteps", "adamw", "MultiSteps's state must be a dict with keys"),
    ("masked", "sgd", "masked's state"),
    ("chain", "lion", "clip_by_global_norm keeps no state"),
]


@pytest.mark.parametrize("ours, other, message", WRONG)
@pytest.mark.parametrize("fused", [False, True])
def test_a_state_from_another_optimizer_is_named(ours, other, message, fused):
    """Before, `adamw`'s fused apply unpacked `adamw_cs336`'s dict state into its three keys, and a
    transformation given another's state with the same keys used it silently or raised `KeyError`."""
    params, grads = random_tree(0), random_tree(1)
    tx, wrong = ALIASES[ours](), ALIASES[other]().init(params)
    with pytest.raises(ValueError, match=message):
        if fused:
            optim.optimizer_step(tx, params, wrong, grads)
        else:
            tx.update(grads, wrong, params)


def test_stateless_transformations_reject_a_state():
    with pytest.raises(ValueError, match="clip_by_global_norm keeps no state"):
        optim.clip_by_global_norm(1.0).update(random_tree(1), {"count": 0}, None)
    with pytest.raises(ValueError, match="trace's state"):
        optim.trace(0.9).update(random_tree(1), optim.scale_by_adam().init(random_tree(0)), None)


@pytest.mark.parametrize("name", list(ALIASES))
def test_states_load_with_weights_only_and_continue_the_same(name):
    tx = ALIASES[name]()
    params = random_tree(0)
    state = tx.init(params)
    for grads in grad_stream(3):
        params, state = optim.optimizer_step(tx, params, state, grads)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    grads = random_tree(50)
    a, sa = optim.optimizer_step(tx, params, state, grads)
    b, sb = optim.optimizer_step(tx, params, loaded, grads)
    for x, y in zip(fnlm.tree_leaves((a, sa)), fnlm.tree_leaves((b, sb))):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_construction_errors_name_the_argument():
    with pytest.raises(TypeError, match="chain's argument 1|parameter 'transforms'"):  # (FNLM_TYPECHECK's)
        optim.chain(optim.identity(), "adam")
    with pytest.raises(TypeError, match="masked's mask"):
        optim.masked(optim.identity(), None)
    with pytest.raises(TypeError, match="transforms must be a dict"):
        optim.multi_transform([optim.identity()], lambda n, leaf: "a")
    with pytest.raises(ValueError, match="every_k_schedule"):
        optim.MultiSteps(optim.identity(), 0)
    with pytest.raises(ValueError, match="every_k_schedule must give an int"):
        tx = optim.MultiSteps(optim.identity(), lambda step: 0)
        tx.update(random_tree(1), tx.init(random_tree(0)))
    with pytest.raises(ValueError, match="beta1"):
        optim.lion(1e-3, b1=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.add_decayed_weights(-1.0)


def test_multi_steps_emits_every_k_and_reports_it():
    ms = optim.MultiSteps(optim.sgd(0.1), 3)
    params = random_tree(0)
    state = ms.init(params)
    emitted = []
    for grads in grad_stream(7):
        updates, state = ms.update(grads, state, params)
        emitted.append(ms.has_updated(state))
        if not emitted[-1]:
            assert all(torch.equal(u, torch.zeros_like(u)) for u in fnlm.tree_leaves(updates))
    assert emitted == [False, False, True, False, False, True, False]
    assert state["gradient_step"] == 2 and state["mini_step"] == 1
