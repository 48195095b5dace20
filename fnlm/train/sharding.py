"""Sharded training on torch.distributed: the optimizer state (ZeRO-1), or the parameters, gradients and
optimizer state (FSDP-style), split over the ranks of a process group, with fnlm's params trees and
pure functions.

```python
plan = Sharding("optimizer", device_mesh())    # ZeRO-1; Sharding("params", ...) for FSDP-style
optimizer = plan.optimizer(fnlm.optim.adamw(3e-4))                  # shard_optimizer(...) for ZeRO-1
state = fnlm.init_train_state(plan.shard_params(params), optimizer)  # 1/N of the moments per rank
loss_fn = lambda p, x, y: fnlm.cross_entropy(plan.model_fn()(p, x, config), y)
state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, optimizer=optimizer,
                                 sync_grads=plan.sync_grads, donate=True)
```

- **ZeRO-1** (`shard_optimizer`): the params stay whole on every rank; `sync_grads` reduce-scatters
  each rank's gradients into shards (their mean over ranks), `train_step` clips them by their global
  norm, the optimizer steps this rank's shard of every leaf with its shard of the state, and the new
  params are all-gathered. The same transformation also takes each rank's whole gradients directly
  (`fnlm.optim.optimizer_step(optimizer, params, state, local_grads)`) and reduce-scatters them itself.
- **FSDP-style** (`shard_tree`, `sharded_model_fn`): the params are stored as shards; the forward
  all-gathers each layer's params inside its block (the rest of the tree once), and the backward
  reduce-scatters the gradients into shards, so the gradients of the sharded tree come straight out
  of `fnlm.value_and_grad`; the optimizer steps the shards.
- **Checkpoints** (`Sharding.gather_state`): rank 0 gathers the whole params and optimizer state into
  the usual single-file checkpoint; `Sharding.shard_state` cuts a loaded one (from any number of
  processes, including 1) for this rank.

**Layout.** Every tensor leaf of one dimension or more is split along dim 0 into chunks of
`ceil(rows / N)` rows, the last ranks' chunks shorter or empty: exactly `torch.distributed.tensor`'s
`Shard(0)` (FSDP2's layout; the collectives pad each chunk to `ceil(rows / N)` rows). A shard is a
`DTensor` whose local tensor is this rank's rows (contiguous), so a shard keeps its place in the tree,
its dotted name and its global shape (`default_decay_mask`'s `ndim` test, name masks and shape checks
read as for the whole leaf). 0-d leaves are replicated (`Replicate()`), their gradients all-reduced.

**Optimizers on shards.** A transformation runs on DTensor shards with the semantics of the whole
tree: elementwise links act on the local rows; a reduction (`clip_by_global_norm`'s norm) is reduced
over the ranks by DTensor; an op that needs whole matrices (`muon`'s Newton-Schulz `X @ X.T`) makes
DTensor redistribute (all-gather) its operands. So a transformation either computes what it computes
on one process (tested: AdamW, clipping by the global norm, a Newton-Schulz orthogonalisation) or
raises a `ShardingError` naming the operation DTensor has no rule for. The one way to get a wrong
answer is to leave DTensor on purpose (`.to_local()`). Inside the optimizers `Sharding.optimizer`
returns, plain tensors a transformation makes itself (hyper-parameters, constants) count as
replicated, the same on every rank (`implicit_replication`).

**Why not `fully_shard`.** FSDP2's `fully_shard` takes an `nn.Module`, gathers on the module's
`__call__` hooks and writes the reduce-scattered gradients into the sharded parameters' `.grad` from
its own backward hooks: its sharded parameters never take part in autograd, so
`torch.autograd.grad` (fnlm's `value_and_grad`, over a params tree) gets no gradient for them.
Here the same representation (DTensor `Shard(0)` parameters) is gathered by an autograd function over
`torch.distributed` collectives, so the gradients of the sharded tree are the value of a pure function.

**Collectives.** Gradients are packed into buckets (`bucket_mb`, by dtype and device) and
reduce-scattered (`reduce_scatter_single`); shards are all-gathered (`all_gather_single`). NCCL
averages in the collective; other backends sum, then divide. A backend without reduce-scatter
(older gloo builds) falls back to an all-reduce of the bucket and keeps this rank's row: the same
peak memory (the packed bucket exists either way; the row is copied out before the bucket is freed),
but twice the traffic and the whole sum computed on every rank. `reduce_scatter_supported` says which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import implicit_replication
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from fnlm.optim import GradientTransformation, GradientTransformationExtraArgs
from fnlm.train.parallel import DEFAULT_BUCKET_MB, Parallel, _buckets, _reduce_op
from fnlm.tree import Tree

__all__ = [
    "ShardingError",
    "Sharding",
    "device_mesh",
    "shard_bounds",
    "shard_tensor",
    "shard_tree",
    "shard_like",
    "full_tree",
    "gather_tree",
    "reduce_scatter_tree",
    "all_gather_tree",
    "reduce_scatter_supported",
    "global_grad_norm",
    "shard_optimizer",
    "gather_params",
    "sharded_model_fn",
    "make_sharded_parallel",
]

MODES = ("optimizer", "params")
_RS_MODES = ("auto", "native", "all_reduce")
_DTENSOR_FAILURES = ("DTensor", "Sharding propagation", "sharding strategy")


class ShardingError(RuntimeError):
    """A computation failed on sharded (DTensor) leaves, e.g. an op DTensor has no sharding rule for."""


# --- the mesh and the layout ---------------------------------------------------------------------

_MESHES: dict[tuple[Any, str], DeviceMesh] = {}


def device_mesh(group: Any = None, *, device_type: str | None = None) -> DeviceMesh:
    """The 1-D `DeviceMesh` over a process group that the shards live on (cached per group).

    **Arguments:**

    - `group`: a `ProcessGroup` (default: the world), or a 1-D `DeviceMesh` (returned as is).
    - `device_type`: `"cuda"` or `"cpu"`; default `"cuda"` for an NCCL group, else `"cpu"`.

    **Returns:** the `DeviceMesh`. Raises `RuntimeError` when no process group was joined.
    """
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"sharding needs a 1-D device mesh, got one with {group.ndim} dimensions")
        return group
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sharding needs a torch.distributed process group: start under torchrun and join it "
                           "(fnlm.train.parallel.process_group), or call torch.distributed.init_process_group")
    group = dist.group.WORLD if group is None else group
    if device_type is None:
        device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    key = (group, device_type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, device_type)
    return _MESHES[key]


def shard_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """`(start, length)` of the rows rank `rank` of `world` holds of a leaf with `rows` rows.

    Chunks of `ceil(rows / world)` rows in rank order; the last ranks get fewer or none (DTensor's
    `Shard(0)`, `torch.chunk`). Example: 5 rows over 4 ranks -> `(0, 2), (2, 2), (4, 1), (5, 0)`.

    **Arguments:**

    - `rows`: the leaf's size along dim 0 (`>= 0`).
    - `world`: the number of ranks (`>= 1`).
    - `rank`: this rank, `0 <= rank < world`.

    **Returns:** the first row and the number of rows.
    """
    if world < 1 or not 0 <= rank < world or rows < 0:
        raise ValueError(f"shard_bounds needs rows >= 0 and 0 <= rank < world, got rows={rows}, rank={rank}, "
                         f"world={world}")
    per = -(-rows // world)
    start = min(rank * per, rows)
    return start, min(start + per, rows) - start


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _wrap(local: Tensor, mesh: DeviceMesh, shape: torch.Size) -> DTensor:
    """A `Shard(0)` DTensor of global `shape` over this rank's contiguous rows `local`."""
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def _is_shard(x: Any) -> bool:
    return isinstance(x, DTensor) and tuple(x.placements) == (Shard(0),)


def shard_tensor(full: Tensor, mesh: DeviceMesh) -> DTensor:
    """This rank's part of `full` as a DTensor: a contiguous copy of its rows (`Shard(0)`), or of the
    whole value for a 0-d tensor (`Replicate()`). No communication: `full` must hold the same values
    on every rank (e.g. params initialised with one seed, or broadcast from rank 0).

    **Arguments:**

    - `full`: the whole tensor.
    - `mesh`: a 1-D mesh (`device_mesh()`).

    **Returns:** a DTensor with `full`'s global shape and dtype, not requiring grad.
    """
    full = full.detach()
    if full.ndim == 0:
        return DTensor.from_local(full.clone(), mesh, [Replicate()], run_check=False)
    start, length = shard_bounds(full.shape[0], mesh.size(), mesh.get_local_rank())
    return _wrap(full.narrow(0, start, length).clone(memory_format=torch.contiguous_format), mesh, full.shape)


def shard_tree(tree: Tree, mesh: DeviceMesh) -> Tree:
    """`shard_tensor` on every tensor leaf of `tree` (dicts, lists, tuples, NamedTuples keep their
    types; other leaves, such as an int step count, stay as they are). See `shard_tensor`."""
    return pytree.tree_map(lambda x: shard_tensor(x, mesh) if isinstance(x, Tensor) else x, tree)


def _like_placement(full: Any, template: Any, mesh: DeviceMesh, where: str) -> Any:
    if not isinstance(template, DTensor):
        return full
    if not isinstance(full, Tensor) or tuple(full.shape) != tuple(template.shape) or full.dtype != template.dtype:
        got = f"{full.dtype} {tuple(full.shape)}" if isinstance(full, Tensor) else type(full).__name__
        raise ValueError(f"{where}: expected a {template.dtype} tensor of shape {tuple(template.shape)} to shard, "
                         f"got {got}")
    full = full.detach().to(template.device)
    if _is_shard(template):
        return shard_tensor(full, mesh)
    return DTensor.from_local(full.clone(), mesh, template.placements, run_check=False)


def shard_like(tree: Tree, template: Tree, mesh: DeviceMesh) -> Tree:
    """Shard a whole tree (e.g. an optimizer state loaded from a checkpoint) as `template` is sharded.

    **Arguments:**

    - `tree`: a tree of whole tensors on every rank (the same values on each).
    - `template`: a tree of the same structure whose DTensor leaves give each leaf's placement
      (e.g. `optimizer.init(sharded_params)`); its plain leaves mean "keep `tree`'s leaf".
    - `mesh`: the mesh of the template's DTensors.

    **Returns:** `tree` with each leaf where `template` holds a DTensor replaced by this rank's part.
    Raises `ValueError` when the structures, a shape or a dtype differ (no silent cast).
    """
    leaves, spec = pytree.tree_flatten_with_path(tree)
    marks, template_spec = pytree.tree_flatten(template)
    if spec != template_spec:
        raise ValueError(f"shard_like: the tree's structure differs from the template's:\n{spec}\nvs\n{template_spec}")
    out = [_like_placement(x, t, mesh, pytree.keystr(path)) for (path, x), t in zip(leaves, marks)]
    return pytree.tree_unflatten(out, spec)


# --- collectives ---------------------------------------------------------------------------------

_NATIVE_RS: dict[Any, bool] = {}


def _collective(name: str, old: str) -> Callable[..., Any]:
    return getattr(dist, name, None) or getattr(dist, old)


def reduce_scatter_supported(group: Any = None) -> bool:
    """Whether `group`'s backend has a reduce-scatter (`reduce_scatter_single`); probed once per group
    with a one-element collective (every rank must call it together, as all collectives), then cached.

    **Arguments:**

    - `group`: a `ProcessGroup`, a 1-D `DeviceMesh`, or `None` (the world).

    **Returns:** `True` where the native collective works (NCCL; gloo in recent torch), else `False`
    (the sharded paths then all-reduce and slice).
    """
    mesh = device_mesh(group)
    pg = mesh.get_group()
    if pg not in _NATIVE_RS:
        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
        probe, out = torch.zeros(mesh.size(), device=device), torch.zeros(1, device=device)
        try:
            _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, probe, group=pg)
            _NATIVE_RS[pg] = True
        except (RuntimeError, NotImplementedError, ValueError):
            _NATIVE_RS[pg] = False
    return _NATIVE_RS[pg]


class _Slot(NamedTuple):
    """Where one leaf sits in a packed bucket: `per` rows of `width` elements from `offset` in each rank's row."""

    shape: torch.Size
    per: int
    width: int
    offset: int


def _slots(shapes: Sequence[torch.Size], world: int) -> tuple[list[_Slot], int]:
    slots, offset = [], 0
    for shape in shapes:
        per = -(-shape[0] // world)
        width = 1
        for n in shape[1:]:
            width *= n
        slots.append(_Slot(torch.Size(shape), per, width, offset))
        offset += per * width
    return slots, offset


def _pack_full(tensors: Sequence[Tensor], slots: Sequence[_Slot], world: int, numel: int) -> Tensor:
    """`(world, numel)`: row `r` holds every tensor's rank-`r` rows, each zero-padded to `per` rows."""
    buf = torch.empty(world, numel, dtype=tensors[0].dtype, device=tensors[0].device)
    for t, s in zip(tensors, slots):
        if s.shape[0] == s.per * world and t.is_contiguous():
            buf[:, s.offset: s.offset + s.per * s.width].copy_(t.reshape(world, s.per * s.width))
            continue
        for r in range(world):
            start, length = shard_bounds(s.shape[0], world, r)
            seg = buf[r, s.offset: s.offset + s.per * s.width]
            seg[: length * s.width].view(length, *s.shape[1:]).copy_(t.detach().narrow(0, start, length))
            seg[length * s.width:].zero_()
    return buf


def _pack_local(locals_: Sequence[Tensor], slots: Sequence[_Slot], numel: int) -> Tensor:
    """`(numel,)`: this rank's rows of every leaf, each zero-padded to `per` rows."""
    buf = torch.empty(numel, dtype=locals_[0].dtype, device=locals_[0].device)
    for t, s in zip(locals_, slots):
        seg = buf[s.offset: s.offset + s.per * s.width]
        seg[: t.numel()].view_as(t).copy_(t)
        seg[t.numel():].zero_()
    return buf


def _unpack_full(rows: Tensor, slots: Sequence[_Slot], world: int, targets: Sequence[Tensor]) -> None:
    """Copy the `(world, numel)` gathered rows into the whole tensors `targets` (any memory layout)."""
    for t, s in zip(targets, slots):
        if s.shape[0] == s.per * world and t.is_contiguous():
            t.view(world, s.per * s.width).copy_(rows[:, s.offset: s.offset + s.per * s.width])
            continue
        for r in range(world):
            start, length = shard_bounds(s.shape[0], world, r)
            src = rows[r, s.offset: s.offset + length * s.width].view(length, *s.shape[1:])
            t.narrow(0, start, length).copy_(src)


def _reduce_scatter_rows(buf: Tensor, mesh: DeviceMesh, mode: str, average: bool) -> Tensor:
    """This rank's row of the sum (or mean) over ranks of the packed `buf` `(world, numel)`."""
    pg, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    op, divide = _reduce_op(pg) if average else (dist.ReduceOp.SUM, False)
    native = reduce_scatter_supported(mesh) if mode == "auto" else mode == "native"
    if native:
        out = torch.empty(buf.shape[1], dtype=buf.dtype, device=buf.device)
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, buf.view(-1), op=op, group=pg)
    else:
        dist.all_reduce(buf, op=op, group=pg)
        out = buf[rank].clone()
    return out.div_(world) if divide else out


def _all_gather_rows(send: Tensor, mesh: DeviceMesh) -> Tensor:
    out = torch.empty(mesh.size(), send.numel(), dtype=send.dtype, device=send.device)
    _collective("all_gather_single", "all_gather_into_tensor")(out.view(-1), send, group=mesh.get_group())
    return out


def _check_mode(reduce_scatter: str) -> None:
    if reduce_scatter not in _RS_MODES:
        raise ValueError(f"reduce_scatter must be one of {_RS_MODES}, got {reduce_scatter!r}")


def reduce_scatter_tree(
    grads: Tree, mesh: DeviceMesh, *, average: bool = True, bucket_mb: float = DEFAULT_BUCKET_MB,
    reduce_scatter: str = "auto",
) -> Tree:
    """Each rank's whole gradients in; this rank's shard of their mean (or sum) over ranks out.

    **Arguments:**

    - `grads`: a tree of whole tensors, the same structure, shapes and dtypes on every rank (each
      rank's own, unsynchronised gradients). It is not modified.
    - `mesh`: a 1-D mesh (`device_mesh()`).
    - `average`: the mean over ranks (`True`) or the sum.
    - `bucket_mb`: leaves are packed into buckets of about this many MiB (by dtype and device).
    - `reduce_scatter`: `"auto"` (the native collective where the backend has it), `"native"`, or
      `"all_reduce"` (all-reduce the bucket and keep this rank's row).

    **Returns:** the tree with `Shard(0)` DTensors (0-d leaves: all-reduced, `Replicate()`); other
    leaves as given.
    """
    _check_mode(reduce_scatter)
    leaves, spec = pytree.tree_flatten(grads)
    out = list(leaves)
    sharded = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.ndim >= 1]
    world, rank = mesh.size(), mesh.get_local_rank()
    for bucket in _buckets([leaves[i] for i in sharded], int(bucket_mb * 2**20)):
        idx = [sharded[j] for j in bucket]
        slots, numel = _slots([leaves[i].shape for i in idx], world)
        row = _reduce_scatter_rows(_pack_full([leaves[i] for i in idx], slots, world, numel), mesh, reduce_scatter,
                                   average)
        for i, s in zip(idx, slots):
            length = shard_bounds(s.shape[0], world, rank)[1]
            out[i] = _wrap(row[s.offset: s.offset + length * s.width].view(length, *s.shape[1:]), mesh, s.shape)
    op, divide = _reduce_op(mesh.get_group()) if average else (dist.ReduceOp.SUM, False)
    for i, x in enumerate(leaves):
        if isinstance(x, Tensor) and x.ndim == 0:
            total = x.detach().clone()
            dist.all_reduce(total, op=op, group=mesh.get_group())
            out[i] = DTensor.from_local(total.div_(world) if divide else total, mesh, [Replicate()], run_check=False)
    return pytree.tree_unflatten(out, spec)


def all_gather_tree(
    shards: Tree, mesh: DeviceMesh, *, out: Tree | None = None, like: Tree | None = None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
) -> Tree:
    """The whole tensors of a tree of DTensor shards, on every rank (bucketed all-gathers).

    **Arguments:**

    - `shards`: a tree whose DTensor leaves are `Shard(0)` (gathered) or replicated (copied); other
      DTensors are redistributed (`full_tensor`); plain leaves are kept.
    - `mesh`: the shards' 1-D mesh.
    - `out`: a tree of whole tensors to write into (e.g. the params being updated), or `None`.
    - `like`: without `out`, a tree whose leaves give new tensors their memory layout (`empty_like`);
      default contiguous.
    - `bucket_mb`: bucket size in MiB.

    **Returns:** a tree of plain whole tensors (`out`'s tensors when given).
    """
    leaves, spec = pytree.tree_flatten(shards)
    targets = pytree.tree_leaves(out) if out is not None else [None] * len(leaves)
    layouts = pytree.tree_leaves(like) if like is not None else [None] * len(leaves)
    result = list(leaves)
    for i, x in enumerate(leaves):
        if not isinstance(x, DTensor) or _is_shard(x):
            continue
        whole = x.full_tensor()
        result[i] = targets[i].copy_(whole) if targets[i] is not None else whole.clone()
    sharded = [i for i, x in enumerate(leaves) if _is_shard(x)]
    world = mesh.size()
    for bucket in _buckets([leaves[i].to_local() for i in sharded], int(bucket_mb * 2**20)):
        idx = [sharded[j] for j in bucket]
        slots, numel = _slots([leaves[i].shape for i in idx], world)
        rows = _all_gather_rows(_pack_local([leaves[i].to_local() for i in idx], slots, numel), mesh)
        for i in idx:
            if targets[i] is None:
                x = leaves[i]
                layout = layouts[i]
                result[i] = (torch.empty_like(layout, dtype=x.dtype, device=x.device) if layout is not None
                             else torch.empty(x.shape, dtype=x.dtype, device=x.device))
            else:
                result[i] = targets[i]
        _unpack_full(rows, slots, world, [result[i] for i in idx])
    return pytree.tree_unflatten(result, spec)


def full_tree(tree: Tree, mesh: DeviceMesh | None = None, *, bucket_mb: float = DEFAULT_BUCKET_MB) -> Tree:
    """`all_gather_tree` without targets: the whole values of a sharded tree on every rank (e.g. the
    params for an evaluation outside the sharded model function). Plain trees come back unchanged.

    **Arguments:**

    - `tree`: a tree with DTensor leaves (or none).
    - `mesh`: their mesh (default: found on the first DTensor leaf).
    - `bucket_mb`: bucket size in MiB.

    **Returns:** a tree of plain tensors.
    """
    dts = [x for x in pytree.tree_leaves(tree) if isinstance(x, DTensor)]
    if not dts:
        return tree
    return all_gather_tree(tree, mesh or dts[0].device_mesh, bucket_mb=bucket_mb)


def _gather_leaf(x: DTensor, mesh: DeviceMesh, dst: int, device: Any) -> Tensor | None:
    """`x`'s whole value on rank `dst` of the mesh (moved to `device`), `None` on the others."""
    pg, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    if not _is_shard(x):
        whole = x.full_tensor()
        return whole.to(device, copy=True) if rank == dst else None
    per = -(-x.shape[0] // world)
    local = x.to_local()
    send = torch.zeros(per, *x.shape[1:], dtype=local.dtype, device=local.device)
    send[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(send) for _ in range(world)] if rank == dst else None
    dist.gather(send, parts, dst=dist.get_global_rank(pg, dst), group=pg)
    if rank != dst:
        return None
    return torch.cat(parts)[: x.shape[0]].to(device)


def gather_tree(tree: Tree, mesh: DeviceMesh | None = None, *, dst: int = 0, device: Any = "cpu") -> Tree | None:
    """A sharded tree's whole values on one rank (for a checkpoint): every rank calls it together.

    One leaf at a time (`dist.gather` of the padded shards), so no rank but `dst` ever holds a whole
    leaf, and `dst` holds the whole tree only where `device` says (CPU by default: a model that does
    not fit one GPU is written from host memory).

    **Arguments:**

    - `tree`: a tree with DTensor leaves (params, an optimizer state); plain leaves are kept.
    - `mesh`: the DTensors' mesh (default: found on the first DTensor leaf).
    - `dst`: the rank (in the mesh) that receives the tree.
    - `device`: where the gathered tensors go on `dst`.

    **Returns:** on `dst`, the tree of plain tensors (types of containers kept); `None` on the others.
    """
    leaves, spec = pytree.tree_flatten(tree)
    dts = [x for x in leaves if isinstance(x, DTensor)]
    mesh = mesh or (dts[0].device_mesh if dts else None)
    rank = mesh.get_local_rank() if mesh is not None else dist.get_rank()
    out = [_gather_leaf(x, mesh, dst, device) if isinstance(x, DTensor) else x for x in leaves]
    return pytree.tree_unflatten(out, spec) if rank == dst else None


# --- ZeRO-1: the optimizer state sharded ---------------------------------------------------------


def global_grad_norm(grads: Tree, mesh: DeviceMesh | None = None) -> Tensor:
    """The l2 norm of a whole gradient tree held as shards: the local squared norms of the `Shard(0)`
    leaves summed over ranks (one all-reduce), plus those of replicated and plain leaves (counted once).

    **Arguments:**

    - `grads`: a tree of DTensor shards (as `reduce_scatter_tree` returns) and/or plain tensors.
    - `mesh`: their mesh (default: found on the first DTensor leaf).

    **Returns:** a plain 0-d tensor, the same on every rank (float32, float64 if a leaf is float64).
    """
    leaves = [x for x in pytree.tree_leaves(grads) if isinstance(x, Tensor)]
    if not leaves:
        raise ValueError("global_grad_norm of a tree with no tensor leaves")
    acc = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    mesh = mesh or next((x.device_mesh for x in leaves if isinstance(x, DTensor)), None)
    local = [x.to_local() if isinstance(x, DTensor) else x for x in leaves]
    device = local[0].device
    shard_sq = torch.zeros((), dtype=acc, device=device)
    whole_sq = torch.zeros((), dtype=acc, device=device)
    for x, t in zip(leaves, local):
        sq = torch.linalg.vector_norm(t.detach(), dtype=acc).square()
        if _is_shard(x):
            shard_sq = shard_sq + sq
        else:
            whole_sq = whole_sq + sq
    if mesh is not None:
        dist.all_reduce(shard_sq, group=mesh.get_group())
    return (shard_sq + whole_sq).sqrt()


def _inner_call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on DTensor shards, plain 0-d tensors mixing in as replicated values; an
    op DTensor cannot run on shards becomes a `ShardingError` that says so."""
    try:
        with implicit_replication():
            return fn(*args, **kwargs)
    except NotImplementedError as e:
        raise ShardingError(f"the sharded optimizer's inner {what} ran an op that DTensor cannot run on Shard(0) "
                            f"shards; use this transformation unsharded, or write it with ops DTensor supports: {e}"
                            ) from e
    except RuntimeError as e:
        if isinstance(e, ShardingError) or not any(m in str(e) for m in _DTENSOR_FAILURES):
            raise
        raise ShardingError(f"the sharded optimizer's inner {what} failed on DTensor shards: {e}") from e


def _inner_update(inner: GradientTransformation, grads: Tree, state: Tree, params: Tree | None,
                  extra: dict[str, Any]) -> tuple[Tree, Tree]:
    """`inner.update`, given the extra arguments only when it takes them (as `fnlm.optim.chain` does)."""
    if extra and isinstance(inner, GradientTransformationExtraArgs):
        return _inner_call("update", inner.update, grads, state, params, **extra)
    return _inner_call("update", inner.update, grads, state, params)


def _add_to_shards(params: Tree, updates: Tree) -> Tree:
    """`params + updates` in place on this rank's shard copies (an update of another placement is
    redistributed to the param's first)."""
    p_leaves, spec = pytree.tree_flatten(params)
    u_leaves = pytree.tree_leaves(updates)
    if len(u_leaves) != len(p_leaves):
        raise ValueError(f"the inner update returned {len(u_leaves)} leaves for {len(p_leaves)} params")
    pairs = [(p, u) for p, u in zip(p_leaves, u_leaves) if isinstance(p, DTensor)]
    with torch.no_grad():
        locals_p = [p.to_local() for p, _ in pairs]
        locals_u = []
        for p, u in pairs:
            if not isinstance(u, DTensor):
                u = DTensor.from_local(u, p.device_mesh, [Replicate()], run_check=False)
            if tuple(u.placements) != tuple(p.placements):
                u = u.redistribute(p.device_mesh, p.placements)
            locals_u.append(u.to_local().to(p.dtype))
        if locals_p:
            torch._foreach_add_(locals_p, locals_u)
    return pytree.tree_unflatten(p_leaves, spec)


def _on_shards(inner: GradientTransformation) -> GradientTransformationExtraArgs:
    """`inner` for params that are already DTensor shards (FSDP-style): the same steps, run as
    `shard_optimizer` runs its inner transformation (plain tensors replicated; `ShardingError`)."""

    def init(params: Tree) -> Tree:
        return _inner_call("init", inner.init, params)

    def update(grads: Tree, state: Tree, params: Tree | None = None, **extra: Any) -> tuple[Tree, Tree]:
        return _inner_update(inner, grads, state, params, extra)

    def apply(grads: Tree, state: Tree, params: Tree, *, donate: bool = False, **extra: Any) -> tuple[Tree, Tree]:
        return _inner_call("apply", inner.apply, grads, state, params, donate=donate, **extra)

    return GradientTransformationExtraArgs(init, update, apply if inner.apply is not None else None)


def _reduced(grads: Tree) -> bool:
    """Whether `grads` already holds DTensor shards (reduce-scattered by `Sharding.sync_grads`)."""
    leaves = [x for x in pytree.tree_leaves(grads) if isinstance(x, Tensor)]
    sharded = [isinstance(x, DTensor) for x in leaves]
    if any(sharded) and not all(sharded):
        raise TypeError("the gradients mix DTensor shards and whole tensors; pass either each rank's whole "
                        "gradients or all of them reduce-scattered (reduce_scatter_tree)")
    return bool(leaves) and all(sharded)


def shard_optimizer(
    inner: GradientTransformation, group: Any = None, *, bucket_mb: float = DEFAULT_BUCKET_MB,
    reduce_scatter: str = "auto",
) -> GradientTransformationExtraArgs:
    """ZeRO-1: `inner` run on this rank's shard of every leaf, its state kept only for that shard.

    The params stay whole on every rank (the forward and backward are the data-parallel ones).

    - `init(params)`: `inner.init` on this rank's rows of `params` (DTensor shards): about `1/N` of
      the state on each of `N` ranks.
    - `update(grads, state, params=None, **extra)`: the gradients are either each rank's own
      whole gradients (then reduce-scattered here: their mean over ranks, this rank's rows) or
      already DTensor shards (`reduce_scatter_tree`, as `Sharding.sync_grads` gives `train_step`);
      `inner.update` runs on the shards; the updates are all-gathered: whole updates on every rank.
    - `apply(grads, state, params, *, donate=False, **extra)`: the same, but the new param shards
      (from `inner.apply` when it has one, else shard + update) are all-gathered into the new params;
      with `donate` into `params`' own tensors (and the inner step may reuse the state's).
    - Extra arguments reach `inner` as `fnlm.optim.chain` passes them. For whole local gradients a
      `grad_norm` (their norm, one rank's) is replaced by the global norm of the averaged gradients
      (`global_grad_norm`), and the reduce-scattered shards, this wrapper's own, are handed on
      with `donate_updates=True`.

    `inner` sees DTensors (see the module docstring): elementwise links, `clip_by_global_norm`
    and whole-matrix links (`muon`) compute what they compute unsharded; an op DTensor cannot shard
    raises `ShardingError`.

    **Arguments:**

    - `inner`: any `GradientTransformation` (a `chain`, `adamw(...)`, ...).
    - `group`: a `ProcessGroup` or 1-D `DeviceMesh` (default: the world), looked up at first use.
    - `bucket_mb`, `reduce_scatter`: as for `reduce_scatter_tree`.

    **Returns:** a `GradientTransformationExtraArgs` with `init`, `update` and `apply`.
    """
    _check_mode(reduce_scatter)

    def prepare(grads: Tree, params: Tree | None, extra: dict[str, Any]) -> tuple[Any, Tree, Tree, dict[str, Any]]:
        mesh = device_mesh(group)
        if not _reduced(grads):
            grads = reduce_scatter_tree(grads, mesh, bucket_mb=bucket_mb, reduce_scatter=reduce_scatter)
            extra = {**extra, "donate_updates": True}
            if "grad_norm" in extra:
                extra["grad_norm"] = global_grad_norm(grads, mesh)
        p = shard_tree(params, mesh) if params is not None else None
        return mesh, grads, p, extra

    def init(params: Tree) -> Tree:
        return _inner_call("init", inner.init, shard_tree(params, device_mesh(group)))

    def update(grads: Tree, state: Tree, params: Tree | None = None, **extra: Any) -> tuple[Tree, Tree]:
        mesh, g, p, extra = prepare(grads, params, extra)
        updates, state = _inner_update(inner, g, state, p, extra)
        return all_gather_tree(updates, mesh, like=params, bucket_mb=bucket_mb), state

    def apply(grads: Tree, state: Tree, params: Tree, *, donate: bool = False, **extra: Any) -> tuple[Tree, Tree]:
        mesh, g, p, extra = prepare(grads, params, extra)
        if inner.apply is not None:
            new_p, state = _inner_call("apply", inner.apply, g, state, p, donate=donate, **extra)
        else:
            updates, state = _inner_update(inner, g, state, p, extra)
            new_p = _add_to_shards(p, updates)
        return all_gather_tree(new_p, mesh, out=params if donate else None, like=params, bucket_mb=bucket_mb), state

    return GradientTransformationExtraArgs(init, update, apply)


# --- FSDP-style: parameters sharded, gathered per block --------------------------------------------


class _Plan(NamedTuple):
    mesh: DeviceMesh
    bucket_mb: float
    reduce_scatter: str


class _Gather(torch.autograd.Function):
    """Forward: the whole tensors of DTensor shards (all-gather). Backward: the gradients of the whole
    tensors, averaged over ranks and cut to this rank's shards (reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *shards: DTensor) -> tuple[Tensor, ...]:
        ctx.plan = plan
        return tuple(all_gather_tree(list(shards), plan.mesh, bucket_mb=plan.bucket_mb))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        plan = ctx.plan
        shards = reduce_scatter_tree(list(grads), plan.mesh, bucket_mb=plan.bucket_mb,
                                     reduce_scatter=plan.reduce_scatter)
        return (None, *shards)


def gather_params(params: Tree, *, bucket_mb: float = DEFAULT_BUCKET_MB, reduce_scatter: str = "auto") -> Tree:
    """The whole params of a sharded tree, differentiably: the forward all-gathers, and the gradient
    that reaches each shard is the mean over ranks of the whole gradients, this rank's rows
    (a reduce-scatter in the backward). Every rank must call it at the same point.

    **Arguments:**

    - `params`: a tree whose every tensor leaf is a DTensor (`shard_tree`).
    - `bucket_mb`, `reduce_scatter`: as for `reduce_scatter_tree`.

    **Returns:** the tree of whole plain tensors (containers' types kept).
    """
    _check_mode(reduce_scatter)
    leaves, spec = pytree.tree_flatten(params)
    bad = [pytree.keystr(p) for p, x in pytree.tree_flatten_with_path(params)[0] if not isinstance(x, DTensor)]
    if bad:
        raise TypeError(f"gather_params needs every leaf sharded (a DTensor from shard_tree); {bad[:4]} are not")
    if not leaves:
        return params
    whole = _Gather.apply(_Plan(leaves[0].device_mesh, bucket_mb, reduce_scatter), *leaves)
    return pytree.tree_unflatten(list(whole), spec)


def sharded_model_fn(
    model_fn: Callable[..., Tensor] | None = None, *, per_layer: bool = True, reshard_after_forward: bool = True,
    bucket_mb: float = DEFAULT_BUCKET_MB, reduce_scatter: str = "auto",
) -> Callable[..., Tensor]:
    """A model function over sharded params: `fn(sharded_params, token_ids, config, **kw) -> logits`.

    With `per_layer` (for `transformer_lm` and any model function that takes `block=` and calls it as
    `block(params["layers"][i], x, ctx)`), the leaves outside `layers` are gathered once and each
    layer's inside its block, so at most one layer's params are whole at a time in the forward. With
    `reshard_after_forward` each block runs under activation checkpointing
    (`torch.utils.checkpoint`, non-reentrant): its whole params and activations are freed after its
    forward, and the backward gathers the params again and recomputes the block (FSDP's
    reshard-after-forward, paid with one more block forward). Without it the whole params of every
    layer stay alive from the forward to the backward. Without `per_layer` the whole tree is gathered
    once. Gradients reach the shards reduce-scattered (`gather_params`).

    **Arguments:**

    - `model_fn`: `(params, token_ids, config, **kw) -> logits`; default `fnlm.transformer_lm`.
    - `per_layer`: gather per block (above), or the whole tree at once.
    - `reshard_after_forward`: free each block's whole params after its forward (above).
    - `bucket_mb`, `reduce_scatter`: as for `reduce_scatter_tree`.

    **Returns:** the model function; a `block=` keyword it is given is the block that runs on the
    gathered layer (default: the config's, `block_from_config`).
    """
    from fnlm.model import block_from_config, transformer_lm

    model_fn = transformer_lm if model_fn is None else model_fn
    gather = {"bucket_mb": bucket_mb, "reduce_scatter": reduce_scatter}

    def fn(params: Tree, token_ids: Tensor, config: Any, **kwargs: Any) -> Tensor:
        if not per_layer:
            return model_fn(gather_params(params, **gather), token_ids, config, **kwargs)
        if not isinstance(params, dict) or not isinstance(params.get("layers"), (list, tuple)):
            raise TypeError("sharded_model_fn(per_layer=True) needs params with a 'layers' list; "
                             "pass per_layer=False to gather the whole tree")
        inner = kwargs.pop("block", None) or block_from_config(config)

        def block(layer: Tree, x: Tensor, ctx: Any) -> Tensor:
            leaves, spec = pytree.tree_flatten(layer)

            def run(x: Tensor, *shards: DTensor) -> Tensor:
                return inner(gather_params(pytree.tree_unflatten(list(shards), spec), **gather), x, ctx)

            if reshard_after_forward and torch.is_grad_enabled():
                with set_checkpoint_early_stop(False):  # its stop signal is an exception that einx re-wraps
                    return checkpoint(run, x, *leaves, use_reentrant=False)
            return run(x, *leaves)

        top = gather_params({k: v for k, v in params.items() if k != "layers"}, **gather)
        return model_fn({**top, "layers": params["layers"]}, token_ids, config, block=block, **kwargs)

    return fn


# --- wiring: what a training loop calls ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a run shards: `mode` `"optimizer"` (ZeRO-1) or `"params"` (FSDP-style), on `mesh`.

    What a training loop calls (see `make_sharded_parallel`):

    - `sync_grads(grads)`: `train_step`'s `sync_grads`: `"optimizer"` reduce-scatters each rank's
      gradients into DTensor shards (the step then clips them by their true global norm, and the
      optimizer steps its shard); `"params"`: the identity (the backward already reduce-scattered).
    - `model_fn(fn)`: the model function to train and evaluate with (`"params"`: `sharded_model_fn`).
    - `optimizer(inner)`: the transformation to step with (`"optimizer"`: `shard_optimizer(inner)`;
      `"params"`: `inner` on the shards, with `shard_optimizer`'s replication rule and errors).
    - `shard_state(state, init)`: a `TrainState` of whole tensors (loaded from a checkpoint and/or
      broadcast) as this rank holds it; `init` is the init of the transformation `optimizer`
      returned (it says which optimizer-state leaves are sharded). A fresh run can instead build
      its state from the sharded params: `init_train_state(shard_params(params), optimizer)`.
    - `gather_state(state)`: every rank calls it; rank 0 gets the `TrainState` of whole tensors (on
      CPU) to write the usual single-file checkpoint, the others `None`.
    - `plain_metrics(metrics)`: the step's metrics with DTensor values (the gradient norm of
      shards) made plain tensors, for hooks that add them to plain tensors.
    """

    mode: str
    mesh: DeviceMesh
    bucket_mb: float = DEFAULT_BUCKET_MB
    reduce_scatter: str = "auto"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"shard mode must be one of {MODES}, got {self.mode!r}")
        _check_mode(self.reduce_scatter)
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {self.bucket_mb!r}")

    def sync_grads(self, grads: Tree) -> Tree:
        if self.mode != "optimizer":
            return grads
        return reduce_scatter_tree(grads, self.mesh, bucket_mb=self.bucket_mb, reduce_scatter=self.reduce_scatter)

    def model_fn(self, model_fn: Callable[..., Tensor] | None = None) -> Callable[..., Tensor]:
        if self.mode != "params":
            if model_fn is None:
                from fnlm.model import transformer_lm
                return transformer_lm
            return model_fn
        return sharded_model_fn(model_fn, reshard_after_forward=self.reshard_after_forward, bucket_mb=self.bucket_mb,
                                reduce_scatter=self.reduce_scatter)

    def optimizer(self, inner: GradientTransformation) -> GradientTransformation:
        if self.mode != "optimizer":
            return _on_shards(inner)
        return shard_optimizer(inner, self.mesh, bucket_mb=self.bucket_mb, reduce_scatter=self.reduce_scatter)

    def shard_params(self, params: Tree) -> Tree:
        return shard_tree(params, self.mesh) if self.mode == "params" else params

    def shard_state(self, state: Any, init: Callable[[Tree], Tree]) -> Any:
        params = self.shard_params(state.params)
        template = init(params)
        return state._replace(params=params, opt_state=shard_like(state.opt_state, template, self.mesh))

    def gather_state(self, state: Any, *, dst: int = 0, device: Any = "cpu") -> Any:
        params = gather_tree(state.params, self.mesh, dst=dst, device=device)
        opt_state = gather_tree(state.opt_state, self.mesh, dst=dst, device=device)
        if self.mesh.get_local_rank() != dst:
            return None
        return state._replace(params=params, opt_state=opt_state)

    @staticmethod
    def plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in metrics.items()}


def make_sharded_parallel(parallel: Parallel, mode: str, *, group: Any = None, **options: Any) -> Parallel:
    """`parallel` (from `fnlm.train.parallel.process_group`) made to shard: its `sharding` set and its
    `sync_grads` the sharding's (`Sharding.sync_grads`: a reduce-scatter for `"optimizer"`, the
    identity for `"params"`).

    **Arguments:**

    - `parallel`: the data-parallel hooks of a joined process group.
    - `mode`: `"optimizer"` (ZeRO-1) or `"params"` (FSDP-style).
    - `group`: the process group or 1-D mesh to shard over (default: the world).
    - `**options`: `Sharding` fields (`bucket_mb`, `reduce_scatter`, `reshard_after_forward`).

    **Returns:** a new `Parallel`.
    """
    if mode not in MODES:
        raise ValueError(f"shard mode must be one of {MODES}, got {mode!r}")
    mesh = device_mesh(group, device_type="cuda" if (parallel.device or "").startswith("cuda") else None)
    sharding = Sharding(mode, mesh, **options)
    return dataclasses.replace(parallel, sync_grads=sharding.sync_grads, sharding=sharding)
