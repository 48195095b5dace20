"""Per-rank memory of sharded training: the bytes of params + grads + optimizer state each rank holds,
with 1 and 2 ranks (gloo processes on CPU), for the unsharded data-parallel step, ZeRO-1 (optimizer
state sharded, `fnlm.train.sharding.shard_optimizer`) and FSDP-style (params, grads and optimizer
state sharded, `sharded_model_fn` over `shard_tree` params), and the same figures projected to 8 ranks.

Each configuration runs in fresh processes (`torch.multiprocessing.spawn`, one per rank, a gloo group
even for one rank) that take `--steps` AdamW steps (`fnlm.optim.adamw_cs336`, state donated as the
training loop does) of the same model on the same global batch, split over the ranks. A rank's figures
are measured by summing the bytes of the tensors it holds after its last step: the params as stored,
the gradients as its optimizer receives them (ZeRO-1: the whole local gradients autograd produced,
which it then reduce-scatters; FSDP: the reduce-scattered shards), and the optimizer state (the AdamW
moments). Also printed: each rank's peak resident set size above its RSS after imports and joining
the group (on CPU that includes activations, the allocator's slack and the communication buffers; at
a tiny size it is mostly noise). The projection computes the same sums from the leaf shapes (the
largest shard: `ceil(rows / N)` rows of each leaf); it is checked against the 1- and 2-rank
measurements before it is printed.

    python benchmarks/sharding_memory.py                      # the 17M model, batch 4 x 128
    python benchmarks/sharding_memory.py --d-model 64 --layers 2 --heads 4 --d-ff 128 --vocab 512 --context 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import add_model_args, print_done, print_machine

MODES = ("data-parallel", "ZeRO-1", "FSDP")
RANKS = (1, 2)
PROJECT = 8
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _held(tree) -> int:
    """Bytes of the tensors this rank holds in `tree` (a DTensor's local shard only)."""
    import torch
    import torch.utils._pytree as pytree

    total = 0
    for x in pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            local = x.to_local() if hasattr(x, "to_local") else x
            total += local.numel() * local.element_size()
    return total


def _config(args):
    import fnlm

    return fnlm.TransformerConfig(vocab_size=args["vocab"], context_length=args["context"], d_model=args["d_model"],
                                  num_layers=args["layers"], num_heads=args["heads"], d_ff=args["d_ff"])


def _steps(mode, params, args, rank, world, mesh):
    """`args["steps"]` steps; the params, the last gradients and the optimizer state as this rank holds them."""
    import torch

    import fnlm
    from fnlm.train import sharding
    from fnlm.train.parallel import all_reduce_grads

    config = _config(args)
    opt, model_fn = fnlm.optim.adamw_cs336(1e-3, 0.9, 0.95, weight_decay=0.1), fnlm.transformer_lm
    if mode == "ZeRO-1":
        opt = sharding.shard_optimizer(opt, mesh)
    elif mode == "FSDP":
        params, model_fn = sharding.shard_tree(params, mesh), sharding.sharded_model_fn()
    state = opt.init(params)

    def loss_fn(p, x, y):
        return fnlm.cross_entropy(model_fn(p, x, config), y)

    per = args["batch"] // world
    g = torch.Generator().manual_seed(1)
    for _ in range(args["steps"]):
        x = torch.randint(0, config.vocab_size, (args["batch"], config.context_length + 1), generator=g)
        x = x[rank * per: (rank + 1) * per]
        _, grads = fnlm.value_and_grad(loss_fn)(params, x[:, :-1], x[:, 1:])
        held = grads
        if mode == "data-parallel":
            grads = held = all_reduce_grads(grads)
        params, state = fnlm.optim.optimizer_step(opt, params, state, grads, donate=True)
    return params, held, state


def _rank(rank: int, world: int, port: int, mode: str, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import fnlm
    from fnlm.train import sharding

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = sharding.device_mesh()
    baseline = _rss()
    params = fnlm.init_transformer_lm(_config(args), seed=0)
    params, grads, state = _steps(mode, params, args, rank, world, mesh)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"params": _held(params), "grads": _held(grads), "state": _held(state), "peak": peak - baseline}
    Path(out, f"{mode}-{world}-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, world: int, args: dict) -> list[dict]:
    """One fresh process per rank; each rank's record."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), mode, args, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"{mode}-{world}-{r}.json").read_text()) for r in range(world)]


def projected(mode: str, world: int, args: dict) -> dict:
    """The largest rank's bytes (rank 0: `ceil(rows / world)` rows of each leaf), from the shapes alone."""
    import fnlm

    shapes = [t.shape for t in fnlm.tree_leaves(fnlm.init_transformer_lm(_config(args), seed=0))]

    def rows(n: int) -> int:
        return -(-n // world)

    whole = sum(s.numel() for s in shapes) * 4
    shard = sum(rows(s[0]) * (s.numel() // s[0]) for s in shapes) * 4
    params = shard if mode == "FSDP" else whole
    grads = shard if mode == "FSDP" else whole
    state = 2 * (whole if mode == "data-parallel" else shard)
    return {"params": params, "grads": grads, "state": state}


def _line(label: str, rec: dict, extra: str = "") -> str:
    total = rec["params"] + rec["grads"] + rec["state"]
    return (f"  {label:<22} params {rec['params'] / MIB:9.3f}  grads {rec['grads'] / MIB:9.3f}  "
            f"optimizer state {rec['state'] / MIB:9.3f}  total {total / MIB:9.3f} MiB{extra}")


def report(args: dict) -> None:
    config = _config(args)
    import fnlm

    n = fnlm.tree_size(fnlm.init_transformer_lm(config, seed=0))
    print(f"model: {n:,} parameters (d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads, "
          f"d_ff {config.d_ff}, vocab {config.vocab_size}); global batch {args['batch']} x {config.context_length}; "
          f"float32; AdamW; {args['steps']} steps; gloo on CPU")
    print("per-rank bytes held after the last step (largest rank), peak RSS above the rank's imports:")
    measured = {}
    for mode in MODES:
        for world in RANKS:
            recs = measure(mode, world, args)
            worst = max(recs, key=lambda r: r["params"] + r["grads"] + r["state"])
            expect = projected(mode, world, args)
            if any(worst[k] != expect[k] for k in expect):
                raise SystemExit(f"{mode} x{world}: measured {worst} differs from the shapes' sums {expect}")
            measured[mode, world] = worst
            peaks = ", ".join(f"{r['peak'] / MIB:.1f}" for r in recs)
            print(_line(f"{mode} x{world} rank(s)", worst, f"   peak RSS {peaks} MiB"))
    print(f"projected to {PROJECT} ranks (the same sums from the leaf shapes):")
    for mode in MODES:
        print(_line(f"{mode} x{PROJECT} ranks", projected(mode, PROJECT, args)))
    base = measured["data-parallel", 1]
    for mode in ("ZeRO-1", "FSDP"):
        ratios = [f"{measured[mode, w]['state'] / base['state']:.3f} ({w} ranks)" for w in RANKS]
        ratios.append(f"{projected(mode, PROJECT, args)['state'] / base['state']:.3f} ({PROJECT} ranks, projected)")
        total = projected(mode, PROJECT, args)
        whole = base["params"] + base["grads"] + base["state"]
        print(f"  {mode}: optimizer state per rank / unsharded: {', '.join(ratios)}; params + grads + state per rank "
              f"at {PROJECT} ranks / unsharded: {(total['params'] + total['grads'] + total['state']) / whole:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    add_model_args(p)
    args = vars(p.parse_args(argv))
    if args["batch"] % 2:
        p.error(f"--batch must split over 2 ranks, got {args['batch']}")
    started = print_machine(torch=True)
    report(args)
    print_done(started)


if __name__ == "__main__":
    main()
