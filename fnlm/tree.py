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
