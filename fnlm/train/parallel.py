"""Data-parallel training on PyTorch's own distributed engine: `torch.distributed` under `torchrun`.

    torchrun --nproc_per_node=2 experiments/train_tinystories.py --preset smoke

Every process ("rank") holds the whole params tree and the optimizer state, draws its own share of
the global batch (`fnlm.train.draw_batch`: data shards with their own seeded streams), computes
loss and gradients, and the gradients are averaged over ranks by a few bucketed `all_reduce` calls
(:func:`all_reduce_grads`) before clipping and the same pure `fnlm.adamw_step`. Parameters and
optimizer state are broadcast from rank 0 at start, so every rank begins (and stays) identical.

- **Backends**: NCCL when the ranks train on CUDA (rank on `cuda:LOCAL_RANK`), gloo on CPU. A gloo
  group is always there for host-side coordination (barriers that name a missing rank, gathering
  RNG states for checkpoints).
- **Outputs**: only rank 0 runs the data/tokenizer/encode/evaluate/sample stages and writes
  metrics, plots and checkpoints; the others wait at a barrier and print nothing.
- **Failures**: the rendezvous and a start-up barrier have a timeout (`startup_timeout`), so a rank
  that never starts makes the others fail with a message instead of hanging; under `torchrun` the
  launcher also stops the surviving ranks and names the one that failed.
- **Threads**: on CPU each rank uses `cores // local_world_size` intra-op threads (torchrun would
  otherwise set `OMP_NUM_THREADS=1`); `FNLM_NUM_THREADS` overrides.

Environment read (set by torchrun): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT`. Optional: `FNLM_DIST_STARTUP_TIMEOUT` (seconds, default 300),
`FNLM_DIST_TIMEOUT` (collectives, default 1800), `FNLM_DIST_WAIT_TIMEOUT` (waiting for rank 0's
data stages, default 86400), `FNLM_NUM_THREADS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from fnlm.tree import Tree, tree_leaves, tree_map
from fnlm.types import Float

__all__ = [
    "Parallel",
    "launched",
    "init_distributed",
    "shutdown",
    "process_group",
    "run",
    "all_reduce_grads",
    "broadcast_tree",
    "all_reduce_mean",
    "device_for_rank",
]


def _identity(x):
    return x



def _gather_one(x):
    return [x]



@dataclass(frozen=True)
class Parallel:
    """How this process takes part in a data-parallel run (the default: alone).

    - `rank`, `world_size`: this process and the number of processes.
    - `sync_grads(grads) -> grads`: average a gradient tree over all ranks.
    - `all_reduce_mean(t) -> t`: average a tensor over all ranks (validation loss).
    - `barrier()`: wait for all ranks (after rank 0 writes a checkpoint).
    - `broadcast(tree) -> tree`: rank 0's tensors on every rank (params and optimizer state at start).
    - `all_gather_object(obj) -> list`: every rank's `obj`, by rank (RNG states for checkpoints).
    - `device`: this process's device (e.g. `cuda:LOCAL_RANK`); `None` uses `TrainConfig.device`.
    - `sharding`: `None` (every rank holds everything), or a `fnlm.train.sharding.Sharding` saying how
      the optimizer state (ZeRO-1) or the params too (FSDP-style) are split over the ranks
      (`fnlm.train.sharding.make_sharded_parallel`).

    Only rank 0 (`is_main`) writes metrics, plots and checkpoints; every rank computes.
    """

    rank: int = 0
    world_size: int = 1
    sync_grads: Callable[[Tree], Tree] = _identity
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    barrier: Callable[[], None] = field(default=lambda: None)
    broadcast: Callable[[Tree], Tree] = _identity
    all_gather_object: Callable[[Any], list] = _gather_one
    device: str | None = None
    sharding: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0



DEFAULT_BUCKET_MB = 25.0


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return seconds


def launched() -> bool:
    """True when this process is one of several started by torchrun (`WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for_rank(name: str, local_rank: int) -> torch.device:
    """The device a rank trains on: `"auto"`/`"cuda"` -> `cuda:LOCAL_RANK` when CUDA is there.

    **Arguments:**

    - `name`: the run's device setting (`"auto"`, `"cuda"`, `"cpu"`, `"cuda:3"`, ...).
    - `local_rank`: the rank's index on its machine.

    **Returns:** a `torch.device`; an explicit index or a non-CUDA device is kept as given.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
    return device


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped by (device, dtype) in order, each group cut at `bucket_bytes`."""
    open_: dict[tuple[Any, Any], list[int]] = {}
    sizes: dict[tuple[Any, Any], int] = {}
    done: list[list[int]] = []
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key in open_ and sizes[key] + nbytes > bucket_bytes:
            done.append(open_.pop(key))
            sizes[key] = 0
        open_.setdefault(key, []).append(i)
        sizes[key] = sizes.get(key, 0) + nbytes
    return done + list(open_.values())


def _reduce_op(group: Any) -> tuple[Any, bool]:
    if dist.get_backend(group) == "nccl":
        return dist.ReduceOp.AVG, False
    return dist.ReduceOp.SUM, True


def all_reduce_grads(grads: Tree, *, group: Any = None, bucket_mb: int | float = DEFAULT_BUCKET_MB) -> Tree:
    """The mean of a gradient tree over all ranks, in a few flattened `all_reduce` calls.

    Tensor leaves are grouped by device and dtype and packed (`_flatten_dense_tensors`) into
    buckets of at most `bucket_mb` MiB (a tensor larger than that gets its own bucket); the buckets
    are reduced asynchronously, then waited on together. NCCL averages in the collective
    (`ReduceOp.AVG`); gloo sums, then divides by the world size. The input is not modified.

    **Arguments:**

    - `grads`: a tree of gradients with identical structure, shapes and dtypes on every rank.
    - `group`: the process group (default: the world).
    - `bucket_mb`: bucket size in MiB.

    **Returns:** a new tree of the same structure holding the averages (non-tensor leaves as given).
    """
    leaves = [x for x in tree_leaves(grads) if isinstance(x, Tensor)]
    world = dist.get_world_size(group)
    if world == 1 or not leaves:
        return grads
    op, divide = _reduce_op(group)
    out: list[Tensor | None] = [None] * len(leaves)
    pending = []
    for idx in _buckets(leaves, int(bucket_mb * 2**20)):
        ts = [leaves[i] for i in idx]
        flat = _flatten_dense_tensors(ts) if len(ts) > 1 else ts[0].detach().clone().reshape(-1)
        pending.append((idx, ts, flat, dist.all_reduce(flat, op=op, group=group, async_op=True)))
    for idx, ts, flat, work in pending:
        work.wait()
        if divide:
            flat.div_(world)
        parts = _unflatten_dense_tensors(flat, ts) if len(ts) > 1 else [flat.view_as(ts[0])]
        for i, p in zip(idx, parts):
            out[i] = p
    it = iter(out)
    return tree_map(lambda x: next(it) if isinstance(x, Tensor) else x, grads)


def broadcast_tree(tree: Tree, *, src: int = 0, group: Any = None) -> Tree:
    """Rank `src`'s tensor leaves on every rank (bucketed like :func:`all_reduce_grads`).

    **Arguments:**

    - `tree`: a tree with the same structure, shapes and dtypes on every rank (e.g. freshly
      initialised params, or the optimizer state).
    - `src`: the rank whose values win.
    - `group`: the process group (default: the world).

    **Returns:** a new tree holding `src`'s tensors (non-tensor leaves as given).
    """
    leaves = [x for x in tree_leaves(tree) if isinstance(x, Tensor)]
    if dist.get_world_size(group) == 1 or not leaves:
        return tree
    out: list[Tensor | None] = [None] * len(leaves)
    for idx in _buckets(leaves, int(DEFAULT_BUCKET_MB * 2**20)):
        ts = [leaves[i].detach() for i in idx]
        flat = _flatten_dense_tensors(ts) if len(ts) > 1 else ts[0].clone().reshape(-1)
        dist.broadcast(flat, src=src, group=group)
        parts = _unflatten_dense_tensors(flat, ts) if len(ts) > 1 else [flat.view_as(ts[0])]
        for i, p in zip(idx, parts):
            out[i] = p
    it = iter(out)
    return tree_map(lambda x: next(it) if isinstance(x, Tensor) else x, tree)


def all_reduce_mean(t: Float[Tensor, "*shape"], *, group: Any = None) -> Float[Tensor, "*shape"]:
    """The mean of `t` over all ranks (a new tensor; `t` is not modified).

    **Arguments:**

    - `t`: a tensor of the same shape and dtype on every rank.
    - `group`: the process group (default: the world).

    **Returns:** the element-wise mean, same shape as `t`.
    """
    out = t.detach().clone()
    op, divide = _reduce_op(group)
    dist.all_reduce(out, op=op, group=group)
    return out / dist.get_world_size(group) if divide else out


def _threads_for(device: torch.device, local_world: int) -> int | None:
    forced = os.environ.get("FNLM_NUM_THREADS")
    if forced:
        return max(1, int(forced))
    if device.type != "cpu":
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world))


def _rendezvous(rank: int, world: int, startup: int | float) -> tuple[Any, int, int]:
    """Meet the other ranks at torchrun's address; fail with the missing ranks' numbers after `startup` s."""
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=startup)))
    except (RuntimeError, dist.DistStoreError) as e:
        raise RuntimeError(f"fnlm: rank {rank} of {world}: the ranks did not all reach the rendezvous at {where} "
                           f"within {startup:g}s (a rank failed to start, or cannot reach that address): {e}") from e
    store.set(f"fnlm/alive/{rank}", "1")
    keys = [f"fnlm/alive/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=startup))
    except (RuntimeError, dist.DistStoreError) as e:
        absent = [r for r, k in enumerate(keys) if not store.check([k])]
        raise RuntimeError(f"fnlm: rank {rank} of {world}: rank(s) {absent} did not start within {startup:g}s") from e
    return store, rank, world


def init_distributed(
    *,
    device: str = "auto",
    startup_timeout: int | float | None = None,
    timeout: int | float | None = None,
    wait_timeout: int | float | None = None,
    bucket_mb: int | float = DEFAULT_BUCKET_MB,
) -> Parallel:
    """Join the process group torchrun describes in the environment; return the trainer's hooks.

    **Arguments:**

    - `device`: the run's device setting; CUDA ranks go to `cuda:LOCAL_RANK` with NCCL, others use gloo.
    - `startup_timeout`: seconds for all ranks to join and pass the start-up barrier
      (default `FNLM_DIST_STARTUP_TIMEOUT` or 300).
    - `timeout`: seconds a collective may wait (default `FNLM_DIST_TIMEOUT` or 1800).
    - `wait_timeout`: seconds the other ranks wait at a barrier while rank 0 prepares data
      (default `FNLM_DIST_WAIT_TIMEOUT` or 86400).
    - `bucket_mb`: gradient bucket size for :func:`all_reduce_grads`.

    **Returns:** a `Parallel` with `rank`, `world_size`, `device` and the
    collectives (`sync_grads`, `all_reduce_mean`, `barrier`, `broadcast`, `all_gather_object`).
    A rank that does not join in time raises `RuntimeError` naming the ranks that are missing.
    """
    missing_env = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing_env:
        raise RuntimeError(f"init_distributed needs torchrun's environment; {missing_env} are not set "
                           "(start the script with torchrun --nproc_per_node=N ...)")
    startup = _env_seconds("FNLM_DIST_STARTUP_TIMEOUT", 300.0) if startup_timeout is None else startup_timeout
    coll = _env_seconds("FNLM_DIST_TIMEOUT", 1800.0) if timeout is None else timeout
    wait = _env_seconds("FNLM_DIST_WAIT_TIMEOUT", 86400.0) if wait_timeout is None else wait_timeout
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dev = device_for_rank(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    threads = _threads_for(dev, local_world)
    if threads is not None:
        torch.set_num_threads(threads)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    store, rank, world = _rendezvous(rank, world, startup)
    store.set_timeout(timedelta(seconds=coll))
    kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=coll), **kwargs)
    host = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait)) if backend != "gloo" else None
    try:
        dist.monitored_barrier(group=host, timeout=timedelta(seconds=startup), wait_all_ranks=True)
    except RuntimeError as e:
        raise RuntimeError(f"fnlm: rank {rank} of {world}: start-up barrier failed: {e}") from e

    def barrier() -> None:
        dist.monitored_barrier(group=host, timeout=timedelta(seconds=wait), wait_all_ranks=True)

    def gather(obj: Any) -> list:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj, group=host)
        return out

    return Parallel(
        rank=rank,
        world_size=world,
        sync_grads=lambda g: all_reduce_grads(g, bucket_mb=bucket_mb),
        all_reduce_mean=all_reduce_mean,
        barrier=barrier,
        broadcast=broadcast_tree,
        all_gather_object=gather,
        device=str(dev),
    )


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fingerprint(argv: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]


@contextlib.contextmanager
def process_group(*, device: str = "auto", argv: Sequence[str] | None = None, **options: Any) -> Iterator[Parallel]:
    """`with process_group() as parallel:` joins the group, checks the ranks agree, and leaves it.

    **Arguments:**

    - `device`: as for :func:`init_distributed`.
    - `argv`: the command line; every rank must have been given the same one (checked), since the
      ranks must agree on every setting.
    - `**options`: more :func:`init_distributed` keywords.

    **Yields:** the `Parallel` hooks. An exception on a rank is reported on stderr with the rank
    before it propagates (torchrun then stops the other ranks and exits non-zero).
    """
    rank = os.environ.get("RANK", "?")
    world = os.environ.get("WORLD_SIZE", "?")
    try:
        parallel = init_distributed(device=device, **options)
        if argv is not None:
            prints = parallel.all_gather_object(_fingerprint(list(argv)))
            odd = [r for r, p in enumerate(prints) if p != prints[0]]
            if odd:
                raise ValueError(f"rank(s) {odd} were started with a different command line than rank 0 "
                                 f"(this rank's: {list(argv)}); every rank needs the same settings")
        yield parallel
    except BaseException as e:
        if not isinstance(e, (SystemExit, KeyboardInterrupt)) or (isinstance(e, SystemExit) and e.code not in (0, None)):
            print(f"fnlm: rank {rank} of {world} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        shutdown()


def run(main: Callable[..., Any], *, argv: Sequence[str] | None = None, device: Callable[[], str] | str = "auto") -> Any:
    """Call `main()` alone, or `main(parallel=...)` inside a process group when torchrun started us.

    **Arguments:**

    - `main`: the script's entry point; it must accept a `parallel` keyword.
    - `argv`: the command line the ranks must agree on (default `sys.argv[1:]`).
    - `device`: the device setting, or a function returning it (called only under torchrun).

    **Returns:** what `main` returns.
    """
    if not launched():
        return main()
    argv = list(sys.argv[1:] if argv is None else argv)
    with process_group(device=device() if callable(device) else device, argv=argv) as parallel:
        return main(parallel=parallel)
