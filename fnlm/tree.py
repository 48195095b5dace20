"""Parameter trees: nested ``dict`` / ``list`` containers whose leaves are tensors.

A tree's *flat names* are the dotted paths to its leaves, e.g. ``layers.0.attn.q_proj.weight``;
they are exactly the keys a ``torch.nn.Module.state_dict()`` of the same model would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

Tree = Any

__all__ = [
    "Tree",
    "tree_flatten",
    "tree_unflatten",
    "tree_leaves",
    "tree_map",
    "tree_map_with_path",
    "tree_size",
    "tree_stack",
    "tree_unstack",
]


def _items(tree: Tree) -> Iterator[tuple[str, Tree]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str) or "." in key:
                raise ValueError(f"tree keys must be strings without dots, got {key!r}")
            yield key, value
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield str(i), value
    else:
        raise TypeError(f"not a tree container: {type(tree).__name__}")


def _is_container(x: Tree) -> bool:
    return isinstance(x, (dict, list, tuple))


def _flatten_into(node: Tree, path: str, out: dict[str, Any]) -> None:
    if _is_container(node):
        for key, child in _items(node):
            _flatten_into(child, f"{path}.{key}" if path else key, out)
    else:
        out[path] = node


def tree_flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """Flatten a tree to an ordered ``{dotted_name: leaf}`` dict.

    Example: ``tree_flatten({"a": {"w": t}, "b": [u, v]}) == {"a.w": t, "b.0": u, "b.1": v}``.
    """
    out: dict[str, Any] = {}
    _flatten_into(tree, prefix, out)
    return out


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {k: _listify(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        indices = sorted(int(k) for k in node)
        if indices == list(range(len(indices))):
            return [node[str(i)] for i in indices]
    return node


def tree_unflatten(flat: dict[str, Any]) -> Tree:
    """Inverse of :func:`tree_flatten`: a level whose keys are exactly ``0..n-1`` becomes a list.

    Example: ``tree_unflatten({"b.1": v, "b.0": u}) == {"b": [u, v]}``.
    """
    root: dict[str, Any] = {}
    for name, leaf in flat.items():
        parts = name.split(".")
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"conflicting name {name!r}: {part!r} is already a leaf")
            node = child
        if parts[-1] in node:
            raise ValueError(f"duplicate or conflicting name {name!r}")
        node[parts[-1]] = leaf

    return _listify(root)


def tree_leaves(tree: Tree) -> list[Any]:
    """The leaves in flattening order."""
    return list(tree_flatten(tree).values())


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over one or more trees of identical structure; returns a new tree."""
    if _is_container(tree):
        if isinstance(tree, dict):
            for other in rest:
                if not isinstance(other, dict) or other.keys() != tree.keys():
                    raise ValueError(f"tree structures differ: {list(tree)} vs {other!r:.80}")
            return {k: tree_map(fn, v, *(o[k] for o in rest)) for k, v in tree.items()}
        for other in rest:
            if not isinstance(other, (list, tuple)) or len(other) != len(tree):
                raise ValueError("tree structures differ: lists of different length")
        return [tree_map(fn, v, *(o[i] for o in rest)) for i, v in enumerate(tree)]
    return fn(tree, *rest)


def tree_map_with_path(fn: Callable[..., Any], tree: Tree, *rest: Tree, prefix: str = "") -> Tree:
    """Like :func:`tree_map`, but ``fn(name, leaf, *other_leaves)`` also gets the dotted name."""
    if _is_container(tree):
        join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
        if isinstance(tree, dict):
            return {
                k: tree_map_with_path(fn, v, *(o[k] for o in rest), prefix=join(k))
                for k, v in tree.items()
            }
        return [
            tree_map_with_path(fn, v, *(o[i] for o in rest), prefix=join(str(i)))
            for i, v in enumerate(tree)
        ]
    return fn(prefix, tree, *rest)


def tree_size(tree: Tree) -> int:
    """Total number of scalar entries over all tensor leaves."""
    return sum(leaf.numel() for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _rebuild(like: Any, children: list[Any]) -> Any:
    if _is_namedtuple(like):
        return type(like)(*children)
    return type(like)(children) if isinstance(like, tuple) else list(children)


def _map_keeping_types(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """`fn` on every leaf (tensor or not) of one or more trees of one structure; unlike `tree_map`,
    dicts, lists, tuples and NamedTuples (a `TrainState`) keep their types."""
    if isinstance(tree, dict):
        return {k: _map_keeping_types(fn, v, *(o[k] for o in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [_map_keeping_types(fn, v, *(o[i] for o in rest)) for i, v in enumerate(tree)])
    return fn(tree, *rest)


def _where(path: str) -> str:
    return f"at {path!r}" if path else "at the root"


def _stack_node(nodes: list[Any], path: str) -> Any:
    first = nodes[0]
    for i, node in enumerate(nodes[1:], 1):
        if type(node) is not type(first) and not (isinstance(node, torch.Tensor) and isinstance(first, torch.Tensor)):
            raise ValueError(f"tree_stack: trees[{i}] differs from trees[0] {_where(path)}: "
                             f"{type(node).__name__} vs {type(first).__name__}")
        if isinstance(first, dict) and list(node) != list(first):
            missing, extra = sorted(first.keys() - node.keys()), sorted(node.keys() - first.keys())
            raise ValueError(f"tree_stack: trees[{i}] differs from trees[0] {_where(path)}: missing keys {missing}, "
                             f"extra keys {extra}" + ("" if missing or extra else " (same keys, other order)"))
        if isinstance(first, (list, tuple)) and len(node) != len(first):
            raise ValueError(f"tree_stack: trees[{i}] differs from trees[0] {_where(path)}: "
                             f"length {len(node)} vs {len(first)}")
        if isinstance(first, torch.Tensor) and (node.shape, node.dtype, node.device) != (first.shape, first.dtype,
                                                                                          first.device):
            raise ValueError(f"tree_stack: trees[{i}] differs from trees[0] {_where(path)}: shape "
                             f"{tuple(node.shape)} {node.dtype} on {node.device} vs {tuple(first.shape)} "
                             f"{first.dtype} on {first.device}")
        if not isinstance(first, (dict, list, tuple, torch.Tensor)) and node != first:
            raise ValueError(f"tree_stack: trees[{i}] differs from trees[0] {_where(path)}: {node!r} vs {first!r} "
                             "(non-tensor leaves must be equal; they are kept once)")
    if isinstance(first, dict):
        return {k: _stack_node([n[k] for n in nodes], _join(path, k)) for k in first}
    if isinstance(first, (list, tuple)):
        return _rebuild(first, [_stack_node([n[i] for n in nodes], _join(path, i)) for i in range(len(first))])
    if isinstance(first, torch.Tensor):
        return torch.stack(nodes)
    return first


def tree_stack(trees: Any) -> Tree:
    """Stack trees of identical structure into one tree whose every tensor leaf has a new leading
    *model* axis: leaf `[k]` is tree `k`'s leaf (vectorized sweeps, ensembles; `torch.func.vmap`
    over axis 0 then runs one function on every model at once).

    Example: `tree_stack([{"w": torch.zeros(3)}, {"w": torch.ones(3)}])["w"].shape == (2, 3)`.

    Containers keep their type (dict, list, tuple, NamedTuple such as `TrainState`). Non-tensor
    leaves (an optimizer's `step` count) must be equal in every tree and are kept once.

    **Arguments:**

    - `trees`: a non-empty sequence of trees with the same structure, and the same shape, dtype and
      device at every tensor leaf.

    **Returns:**

    The stacked tree (new tensors).

    **Raises:** `ValueError` naming the first leaf or container where a tree differs from `trees[0]`.
    """
    if isinstance(trees, (dict, torch.Tensor)) or not isinstance(trees, (list, tuple)) or _is_namedtuple(trees):
        raise TypeError(f"tree_stack takes a list or tuple of trees, got {type(trees).__name__}")
    if not trees:
        raise ValueError("tree_stack needs at least one tree, got an empty sequence")
    return _stack_node(list(trees), "")


def _model_count(tree: Tree, path: str, found: list[tuple[str, int]]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _model_count(v, _join(path, k), found)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _model_count(v, _join(path, i), found)
    elif isinstance(tree, torch.Tensor):
        if tree.ndim == 0:
            raise ValueError(f"tree_unstack: the leaf {_where(path)} is 0-d, so it has no model axis")
        found.append((path, tree.shape[0]))


def tree_unstack(tree: Tree) -> list[Tree]:
    """Split a tree along the leading model axis of its tensor leaves: the inverse of
    :func:`tree_stack`.

    Example: `tree_unstack({"w": torch.zeros(2, 3)})` is `[{"w": zeros(3)}, {"w": zeros(3)}]`.

    The leaves are views into the stacked tensors (no copy); `.clone()` a model's leaves to keep
    them apart from later in-place changes (or to save one model: `torch.save` of a view writes
    the whole stacked storage). Non-tensor leaves are repeated in every tree.

    **Arguments:**

    - `tree`: a tree whose tensor leaves all have the same size `K >= 1` on axis 0.

    **Returns:**

    A list of `K` trees.

    **Raises:** `ValueError` when the tree has no tensor leaf, or leaves disagree on `K` (naming them).
    """
    found: list[tuple[str, int]] = []
    _model_count(tree, "", found)
    if not found:
        raise ValueError("tree_unstack: the tree has no tensor leaf, so no model axis")
    sizes = {n for _, n in found}
    if len(sizes) > 1:
        first, other = found[0], next(f for f in found if f[1] != found[0][1])
        raise ValueError(f"tree_unstack: leaves disagree on the model axis: {first[0]!r} has {first[1]}, "
                         f"{other[0]!r} has {other[1]}")
    return [_map_keeping_types(lambda t, k=k: t[k] if isinstance(t, torch.Tensor) else t, tree)
            for k in range(found[0][1])]
