import pytest
import torch

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
