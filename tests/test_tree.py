import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm.tree import tree_flatten, tree_map, tree_map_with_path, tree_unflatten


def _tree():
    return {
        "emb": {"weight": torch.zeros(3, 2)},
        "layers": [{"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)}],
        "head": {"weight": torch.arange(4.0)},
    }


def test_flatten_names_and_order():
    flat = tree_flatten(_tree())
    assert list(flat) == ["emb.weight", "layers.0.w", "layers.1.w", "head.weight"]


def test_unflatten_inverts_flatten_and_rebuilds_lists():
    tree = _tree()
    back = tree_unflatten(tree_flatten(tree))
    assert isinstance(back["layers"], list) and len(back["layers"]) == 2
    for (n1, a), (n2, b) in zip(tree_flatten(tree).items(), tree_flatten(back).items()):
        assert n1 == n2 and a is b


def test_unflatten_order_independent():
    flat = tree_flatten(_tree())
    shuffled = dict(reversed(list(flat.items())))
    back = tree_unflatten(shuffled)
    assert back["layers"][0]["w"] is flat["layers.0.w"]


def test_unflatten_non_contiguous_digits_stay_dict():
    back = tree_unflatten({"a.0": 1, "a.2": 2})
    assert back == {"a": {"0": 1, "2": 2}}


def test_unflatten_conflict_raises():
    with pytest.raises(ValueError, match="conflicting"):
        tree_unflatten({"a": 1, "a.b": 2})


def test_tree_map_multiple_trees_and_structure_mismatch():
    a, b = _tree(), _tree()
    s = tree_map(lambda x, y: x + y, a, b)
    assert torch.equal(s["layers"][1]["w"], torch.full((2,), 4.0))
    with pytest.raises(ValueError):
        tree_map(lambda x, y: x, {"a": 1}, {"b": 1})


def test_tree_map_with_path_names():
    names = []
    tree_map_with_path(lambda n, x: names.append(n), _tree())
    assert names == list(tree_flatten(_tree()))


def test_dotted_key_rejected():
    with pytest.raises(ValueError, match="dots"):
        tree_flatten({"a.b": 1})


def test_tree_size():
    assert fnlm.tree_size(_tree()) == 6 + 2 + 2 + 4


def _model(seed):
    g = torch.Generator().manual_seed(seed)
    return {"emb": {"weight": torch.randn(5, 3, generator=g)}, "layers": [{"w": torch.randn(3, generator=g)}],
            "state": {"step": 7, "m": [torch.randn(2, 2, generator=g)]}}


def test_tree_stack_puts_a_model_axis_first_and_unstack_inverts_it():
    trees = [_model(s) for s in range(3)]
    stacked = fnlm.tree_stack(trees)
    assert stacked["emb"]["weight"].shape == (3, 5, 3) and stacked["layers"][0]["w"].shape == (3, 3)
    assert isinstance(stacked["layers"], list) and stacked["state"]["step"] == 7
    for k, tree in enumerate(trees):
        assert torch.equal(stacked["state"]["m"][0][k], tree["state"]["m"][0])
    back = fnlm.tree_unstack(stacked)
    assert len(back) == 3
    for tree, again in zip(trees, back):
        assert tree_flatten(tree).keys() == tree_flatten(again).keys()
        for a, b in zip(fnlm.tree_leaves(tree), fnlm.tree_leaves(again)):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert back[1]["emb"]["weight"].data_ptr() != trees[1]["emb"]["weight"].data_ptr()
    storage = back[1]["emb"]["weight"].untyped_storage()
    assert storage.data_ptr() == stacked["emb"]["weight"].untyped_storage().data_ptr()


def test_tree_stack_keeps_named_tuples():
    states = [fnlm.init_train_state(_model(s)["emb"]) for s in range(2)]
    stacked = fnlm.tree_stack(states)
    assert type(stacked) is fnlm.TrainState and stacked.step == 0 and stacked.opt_state["step"] == 0
    assert stacked.params["weight"].shape == (2, 5, 3) and stacked.opt_state["m"]["weight"].shape == (2, 5, 3)
    assert all(type(s) is fnlm.TrainState for s in fnlm.tree_unstack(stacked))


@pytest.mark.parametrize("change, message", [
    (lambda t: t["emb"].pop("weight"), r"trees\[1\] differs from trees\[0\] at 'emb': missing keys \['weight'\]"),
    (lambda t: t["emb"].update(bias=torch.zeros(3)), r"at 'emb': missing keys \[\], extra keys \['bias'\]"),
    (lambda t: t["layers"].append({"w": torch.zeros(3)}), r"at 'layers': length 2 vs 1"),
    (lambda t: t["layers"][0].update(w=torch.zeros(4)), r"at 'layers.0.w': shape \(4,\)"),
    (lambda t: t["layers"][0].update(w=torch.zeros(3, dtype=torch.float64)), r"at 'layers.0.w': .*float64"),
    (lambda t: t["state"].update(step=8), r"at 'state.step': 8 vs 7 \(non-tensor leaves must be equal"),
    (lambda t: t["layers"].__setitem__(0, [torch.zeros(3)]), r"at 'layers.0': list vs dict"),
])
def test_tree_stack_names_where_the_trees_differ(change, message):
    other = _model(1)
    change(other)
    with pytest.raises(ValueError, match=message):
        fnlm.tree_stack([_model(0), other])


def test_tree_stack_and_unstack_bad_input():
    with pytest.raises(ValueError, match="at least one tree"):
        fnlm.tree_stack([])
    with pytest.raises(TypeError, match="list or tuple of trees, got dict"):
        fnlm.tree_stack(_model(0))
    with pytest.raises(ValueError, match="'a' has 2, 'b' has 3"):
        fnlm.tree_unstack({"a": torch.zeros(2, 4), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="'a' is 0-d"):
        fnlm.tree_unstack({"a": torch.zeros(())})
    with pytest.raises(ValueError, match="no tensor leaf"):
        fnlm.tree_unstack({"step": 3})


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.lists(st.lists(st.integers(1, 3), max_size=3), min_size=1, max_size=4), st.integers(0, 99))
def test_tree_unstack_inverts_tree_stack(k, shapes, seed):
    g = torch.Generator().manual_seed(seed)
    trees = [{"leaves": [torch.randn(tuple(s), generator=g) for s in shapes], "n": len(shapes)} for _ in range(k)]
    back = fnlm.tree_unstack(fnlm.tree_stack(trees))
    assert len(back) == k
    for tree, again in zip(trees, back):
        assert again["n"] == tree["n"]
        assert all(torch.equal(a, b) for a, b in zip(tree["leaves"], again["leaves"]))
