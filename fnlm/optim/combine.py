"""Transformations over parts of the params tree: `masked` (one transformation on some leaves, the
others passed through) and `multi_transform` (optax's `partition`: a transformation per group).

```python
from fnlm import optim

labels = lambda name, leaf: "adam" if leaf.ndim == 2 else "frozen"
tx = optim.multi_transform({"adam": optim.adamw(1e-3), "frozen": optim.set_to_zero()}, labels)
```

The inner transformations see a params tree of their own leaves only, with the flat names kept
(`layers.1.attn.q_proj.weight` stays that name even when `layers.0` is left out), so their
states mirror that sub-tree. Masks and labels take the forms of fnlm's decay masks: a tree (or,
as in optax, a prefix tree: a value at `layers` covers every leaf under it), a per-leaf function
`fn(name, leaf)`, or optax's `fn(params) -> tree`; as in optax, a callable is called on the
params in `init` and on the updates in `update`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fnlm.optim._common import _check_state, _decay_flags, _per_leaf
from fnlm.optim.transform import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    OptState,
    _call,
    _leaves_of,
    _mirror,
    apply_updates,
)
from fnlm.tree import Tree, tree_flatten, tree_unflatten

__all__ = ["masked", "multi_transform", "partition"]


def _sub(names: list[str], leaves: list[Any], keep: list[bool]) -> Tree:
    """The tree of the kept leaves, under their flat names."""
    return tree_unflatten({n: leaf for n, leaf, k in zip(names, leaves, keep) if k})


def _inner_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """Extra arguments for a transformation that sees part of the tree: `grad_norm` is the norm of
    the whole incoming tree, not of the part, so it is dropped; `donate_updates` holds for a part."""
    return {k: v for k, v in extra.items() if k != "grad_norm"}


def _put(flat: dict[str, Any], part_names: list[str], part: Tree, what: str) -> None:
    """Write the leaves of `part` (a transformation's output for the leaves `part_names`) into `flat`."""
    new = tree_flatten(part)
    if new.keys() != set(part_names):
        missing, extra = sorted(set(part_names) - new.keys()), sorted(new.keys() - set(part_names))
        raise ValueError(f"{what} did not return the leaves it was given: missing {missing[:8]}, "
                         f"unexpected {extra[:8]}")
    flat.update(new)


def _check_transformation(tx: Any, what: str) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{what} must be a GradientTransformation, got {type(tx).__name__}")


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformationExtraArgs:
    """Apply `inner` to the masked-in leaves and pass the others through unchanged (optax's
    `masked`, same semantics). State `{"inner_state": inner's state over the masked-in leaves}`.

    Example: `masked(add_decayed_weights(0.1), fnlm.default_decay_mask)` decays the matrices only.

    **Arguments:**

    - `inner`: the transformation of the masked-in leaves; it sees updates and params trees of
      those leaves only (flat names kept).
    - `mask`: a tree of bools mirroring the params (or a prefix of them), a predicate
      `fn(name, leaf) -> bool`, or optax's `fn(params) -> tree of bools`.

    **Returns:**

    A `GradientTransformationExtraArgs` (extra arguments go to `inner`, except `grad_norm`, which
    describes the whole tree).
    """
    _check_transformation(inner, "masked's inner")
    if mask is None:
        raise TypeError("masked's mask must be a tree of bools or a function, got None")

    def flags(names: list[str], leaves: list[Any]) -> list[bool]:
        return _decay_flags(dict(zip(names, leaves)), mask, "mask")

    def init(params: Tree) -> OptState:
        names, leaves = _leaves_of(params)
        return {"inner_state": inner.init(_sub(names, leaves, flags(names, leaves)))}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        _check_state(state, ("inner_state",), "masked")
        names, u_list = _leaves_of(updates)
        keep = flags(names, u_list)
        sub_params = None if params is None else _sub(names, _mirror(names, params, "params"), keep)
        new, inner_state = _call(inner, _sub(names, u_list, keep), state["inner_state"], sub_params,
                                 _inner_extra(extra))
        flat = dict(zip(names, u_list))
        _put(flat, [n for n, k in zip(names, keep) if k], new, "masked's inner transformation")
        return tree_unflatten(flat), {"inner_state": inner_state}

    return GradientTransformationExtraArgs(init, update)


def _labels(names: list[str], leaves: list[Any], param_labels: Any, groups: Mapping[str, Any]) -> list[str]:
    labels = _per_leaf(dict(zip(names, leaves)), param_labels, "param_labels")
    unknown = sorted({lab for lab in labels if not isinstance(lab, str) or lab not in groups}, key=repr)
    if unknown:
        raise ValueError(f"param_labels gave labels with no transformation: {unknown[:8]}; the transformations "
                         f"are {sorted(groups)}")
    return labels


def _check_groups(transforms: Any) -> dict[str, GradientTransformation]:
    if not isinstance(transforms, Mapping):
        raise TypeError(f"transforms must be a dict {{label: GradientTransformation}}, got {type(transforms).__name__}")
    for label, tx in transforms.items():
        if not isinstance(label, str) or not label or "." in label:
            raise TypeError(f"transforms' labels must be non-empty strings without dots, got {label!r}")
        _check_transformation(tx, f"transforms[{label!r}]")
    return dict(transforms)


def multi_transform(transforms: Any, param_labels: Any
                    ) -> GradientTransformationExtraArgs:
    """A different transformation per group of leaves (optax's `multi_transform`, now `partition`;
    same semantics). State `{"inner_states": {label: that group's state}}`, one per transformation
    (a group with no leaves has the state of an empty tree).

    Example: `multi_transform({"muon": muon_part, "adam": adamw(3e-4)}, lambda name, leaf: "muon"
    if leaf.ndim == 2 else "adam")`; `set_to_zero()` as a group's transformation freezes it.

    Has a fused `apply` when some group's transformation has one: that group runs its `apply` on
    its leaves, the others `update` + `apply_updates`.

    **Arguments:**

    - `transforms`: `{label: transformation}`; labels are strings (they key the state).
    - `param_labels`: the label of every leaf: a tree of labels mirroring the params (or a prefix
      of them), a function `fn(name, leaf) -> label`, or optax's `fn(params) -> tree of labels`.

    **Returns:**

    A `GradientTransformationExtraArgs` (extra arguments go to every group, except `grad_norm`).
    """
    groups = _check_groups(transforms)

    def init(params: Tree) -> OptState:
        names, leaves = _leaves_of(params)
        labels = _labels(names, leaves, param_labels, groups)
        return {"inner_states": {g: tx.init(_sub(names, leaves, [lab == g for lab in labels]))
                                 for g, tx in groups.items()}}

    def each_group(updates: Tree, state: OptState, params: Tree | None, base: str, step: Any) -> tuple:
        """`step(tx, sub_updates, sub_state, sub_params) -> (sub_result, sub_state)` per group; the
        results written over the leaves of `updates` (`base="updates"`) or `params`."""
        _check_state(state, ("inner_states",), "multi_transform")
        _check_state(state["inner_states"], tuple(groups), "multi_transform's inner_states")
        names, u_list = _leaves_of(updates)
        p_list = None if params is None else _mirror(names, params, "params")
        labels = _labels(names, u_list, param_labels, groups)
        out, new_states = dict(zip(names, u_list if base == "updates" else p_list)), {}
        for g, tx in groups.items():
            keep = [lab == g for lab in labels]
            sub_p = None if p_list is None else _sub(names, p_list, keep)
            new, new_states[g] = step(tx, _sub(names, u_list, keep), state["inner_states"][g], sub_p)
            _put(out, [n for n, k in zip(names, keep) if k], new, f"transforms[{g!r}]")
        return tree_unflatten(out), {"inner_states": new_states}

    def update(updates: Tree, state: OptState, params: Tree | None = None, **extra: Any) -> tuple[Tree, OptState]:
        return each_group(updates, state, params, "updates",
                          lambda tx, u, s, p: _call(tx, u, s, p, _inner_extra(extra)))

    def apply(updates: Tree, state: OptState, params: Tree, *, donate: bool = False,
              **extra: Any) -> tuple[Tree, OptState]:
        return each_group(updates, state, params, "params",
                          lambda tx, u, s, p: _group_apply(tx, u, s, p, donate, _inner_extra(extra)))

    fused = any(tx.apply is not None for tx in groups.values())
    return GradientTransformationExtraArgs(init, update, apply if fused else None)


def _group_apply(tx: GradientTransformation, updates: Tree, state: OptState, params: Tree, donate: bool,
                 extra: dict[str, Any]) -> tuple[Tree, OptState]:
    """One group's new params: its fused `apply`, or `update` + `apply_updates`."""
    if tx.apply is not None:
        return tx.apply(updates, state, params, donate=donate, **extra)
    new, state = _call(tx, updates, state, params, extra)
    return apply_updates(params, new, donate=donate), state


partition = multi_transform
"""optax's current name for `multi_transform`."""
