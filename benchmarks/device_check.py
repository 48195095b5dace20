"""One command for a CUDA machine, under 8 minutes: the CUDA tests, then a short training run of the
17M `h100` preset against the fused-kernel baseline.

1. `pytest -m cuda` over the test files that carry the marker.
2. fnlm: the `h100` preset's model (experiments/tinystories/presets.py: d_model 512, 4 layers,
   16 heads, d_ff 1344, vocab 10,000, context 256) at its batch size (128), bf16 autocast, the whole
   `fnlm.train_step` under `torch.compile(fullgraph=True)`, `--steps` steps on random tokens
   (`fnlm.get_batch` over a fixed random stream; speed does not depend on the text).
3. The baseline: `benchmarks/reference.py`'s `ReferenceLM(fused=True)` (SDPA, `F.rms_norm`,
   `F.silu`, `F.cross_entropy`) with its loss compiled and `torch.optim.AdamW(fused=True)`, same
   batches, same steps.

For each it prints tokens/s, MFU against the device's dense bf16 peak, peak memory and the projected
time for 327,680,000 tokens (the h100 preset's budget), then fnlm/baseline as ratios.

4. Sharded training (`fnlm.train.sharding`) on a one-rank process group (NCCL on CUDA, gloo on CPU):
   `--sharded-steps` eager float32 `fnlm.train_step`s (TF32 off; donated state and clipping, as the
   training loop steps) of the same model unsharded, with ZeRO-1 (`Sharding("optimizer")`) and
   FSDP-style (`Sharding("params")`); it prints each one's final loss, largest parameter
   difference from the unsharded run and peak memory, and fails
   when a difference exceeds 1e-4 (one rank: the same sums, so only the kernels' rounding can
   differ; under bf16 autocast Adam amplifies that rounding to ~1e-2, hence float32). It checks DTensor, the collectives and the fused AdamW on DTensor shards on
   the device; the memory saving itself needs several GPUs (`benchmarks/sharding_memory.py`).

Without CUDA it runs a tiny version of the same (a small model, a few steps, the graph captured with
the `aot_eager` backend instead of inductor's code generation), which proves the script works.

    python benchmarks/device_check.py                  # CUDA if present, else the tiny CPU version
    python benchmarks/device_check.py --steps 300 --warmup 20
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import fnlm  # noqa: E402
from fnlm import accounting  # noqa: E402
from harness import peak_rss_mib, print_done, print_machine  # noqa: E402
from reference import ReferenceLM, load_fnlm_params  # noqa: E402

TARGET_TOKENS = 327_680_000


def cuda_tests(timeout: float) -> str:
    """Run `pytest -m cuda` on the test files that use the marker; return pytest's summary line."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *files]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode not in (0, 5):
        print(done.stdout[-6000:] + done.stderr[-3000:])
        raise SystemExit(f"CUDA tests failed: {summary}")
    return f"{summary} ({len(files)} files: {', '.join(files)})"


def setup(args):
    from tinystories.presets import PRESETS

    preset = PRESETS["h100"]
    if args.device.startswith("cuda"):
        config = fnlm.TransformerConfig(**preset["model"])
        batch = preset["train"]["batch_size"]
    else:
        config = fnlm.TransformerConfig(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=192)
        batch = 8
    hyper = dict(lr=preset["step"]["lr"], weight_decay=preset["step"]["weight_decay"])
    tokens = torch.randint(0, config.vocab_size, (1_000_000,), generator=torch.Generator().manual_seed(0)).numpy()
    return config, batch, hyper, tokens


def batches(tokens, batch, context, device, n):
    g = torch.Generator().manual_seed(1)
    return [fnlm.get_batch(tokens, batch, context, device, generator=g) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def fnlm_runner(config, hyper, device, backend):
    params = fnlm.init_transformer_lm(config, seed=0, device=device)

    def loss_fn(p, x, y):
        with autocast(device):
            logits = fnlm.transformer_lm(p, x, config)
        return fnlm.cross_entropy(logits, y)

    step_config = fnlm.StepConfig(lr=hyper["lr"], min_lr=hyper["lr"] / 10, warmup_steps=10, cosine_steps=10_000,
                                  weight_decay=hyper["weight_decay"])
    step = torch.compile(functools.partial(fnlm.train_step, loss_fn=loss_fn, config=step_config), fullgraph=True, backend=backend)
    box = [fnlm.init_train_state(params, step_tensor=True)]

    def run(x, y):
        box[0], metrics = step(box[0], x, y)
        return metrics["loss"]

    return params, run


def baseline_runner(config, hyper, params, device, backend):
    model = ReferenceLM(config, fused=True).to(device)
    load_fnlm_params(model, {k: v.detach().clone() for k, v in fnlm.tree_flatten(params).items()})
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=hyper["lr"], betas=(0.9, 0.95), weight_decay=hyper["weight_decay"],
                            fused=fused, foreach=not fused)

    def loss(x, y):
        with autocast(device):
            logits = model(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), y.flatten())

    loss = torch.compile(loss, fullgraph=True, backend=backend)

    def run(x, y):
        opt.zero_grad(set_to_none=True)
        value = loss(x, y)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return value.detach()

    return run


def measure(name, run, data, args, config, batch, peak_flops) -> dict:
    device = args.device
    start = time.perf_counter()
    first = float(run(*data[0]))
    for x, y in data[1 : args.warmup]:
        run(x, y)
    sync(device)
    compile_s = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for x, y in data[args.warmup :]:
        last = run(x, y)
    sync(device)
    seconds = time.perf_counter() - start
    tps = (len(data) - args.warmup) * batch * config.context_length / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else peak_rss_mib() / 1024
    util = accounting.mfu(tps, config, peak_flops, seq_len=config.context_length)
    print(f"  {name:<34} {tps:12,.0f} tokens/s  MFU {util * 100:5.1f}%  peak memory {peak:6.2f} GiB"
          f"{' (process RSS)' if not device.startswith('cuda') else ''}  "
          f"327.68M tokens in {TARGET_TOKENS / tps / 60:7.1f} min  "
          f"(first/warm-up {compile_s:.1f} s; loss {first:.3f} -> {float(last):.3f})")
    return {"tps": tps, "peak": peak, "mfu": util}


def _sharded_run(mode, config, hyper, data, device):
    """Eager float32 `fnlm.train_step`s over `data` (CS336 AdamW, clipping at 1.0, donated state, as
    the training loop steps) unsharded or with a `Sharding`; the whole params and the last loss."""
    from fnlm.train import sharding

    step_config = fnlm.StepConfig(lr=hyper["lr"], min_lr=hyper["lr"] / 10, warmup_steps=2, cosine_steps=len(data),
                                  weight_decay=hyper["weight_decay"])
    plan = sharding.Sharding(mode, sharding.device_mesh()) if mode != "unsharded" else None
    optimizer = fnlm.train.build_optimizer(step_config)
    model_fn, sync = fnlm.transformer_lm, (lambda grads: grads)
    params = fnlm.init_transformer_lm(config, seed=0, device=device)
    if plan is not None:
        optimizer, model_fn, sync, params = (plan.optimizer(optimizer), plan.model_fn(), plan.sync_grads,
                                             plan.shard_params(params))
    state = fnlm.init_train_state(params, optimizer)

    def loss_fn(p, x, y):
        return fnlm.cross_entropy(model_fn(p, x, config), y)

    for x, y in data:
        state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=step_config, optimizer=optimizer,
                                         sync_grads=sync, donate=True)
    return sharding.full_tree(state.params), float(metrics["loss"])


def sharded_check(config, hyper, data, device) -> None:
    """ZeRO-1 (`"optimizer"`) and FSDP-style (`"params"`) against the unsharded step on a one-rank group:
    parameter differences and peak memory."""
    import socket

    import torch.distributed as dist

    on_cuda = device.startswith("cuda")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = {"device_id": torch.device(device)} if on_cuda else {}
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **extra)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        baseline = None
        for mode in ("unsharded", "optimizer", "params"):
            if on_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            params, loss = _sharded_run(mode, config, hyper, data, device)
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if on_cuda else "n/a on CPU"
            baseline = params if baseline is None else baseline
            diff = max(float((a - b).abs().max()) for a, b in zip(fnlm.tree_leaves(params), fnlm.tree_leaves(baseline)))
            label = {"optimizer": "ZeRO-1", "params": "FSDP"}.get(mode, mode)
            print(f"  sharded, 1 rank ({dist.get_backend()}): {label:<10} {len(data)} steps, loss {loss:.4f}, "
                  f"max |param - unsharded| {diff:.2e}, peak memory {peak}")
            if diff > 1e-4:
                raise SystemExit(f"sharded check failed: {label} params differ from the unsharded run by {diff:.2e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 300 on CUDA, 6 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compile included (default 20 / 2)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--sharded-steps", type=int, default=None, help="eager steps per sharded mode (default 10 / 3)")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (300 if on_cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (20 if on_cuda else 2)
    args.sharded_steps = args.sharded_steps if args.sharded_steps is not None else (10 if on_cuda else 3)
    backend = "inductor" if on_cuda else "aot_eager"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    started = print_machine(args.device)
    if not args.skip_tests:
        print(f"CUDA tests: {cuda_tests(timeout=300)}  [{time.perf_counter() - started:.0f} s]")
    config, batch, hyper, tokens = setup(args)
    peak_flops = accounting.measure_matmul_peak(args.device, torch.bfloat16 if on_cuda else torch.float32)
    print(f"model: {accounting.parameter_count(config):,} parameters (d_model {config.d_model}, {config.num_layers} layers, "
          f"{config.num_heads} heads, d_ff {config.d_ff}, vocab {config.vocab_size}); batch {batch} x {config.context_length}; "
          f"bf16 autocast; torch.compile backend {backend}; {args.warmup} warm-up + {args.steps} timed steps; "
          f"MFU against {peak_flops / 1e12:.1f} TFLOP/s")
    data = batches(tokens, batch, config.context_length, args.device, args.warmup + args.steps)
    params, run = fnlm_runner(config, hyper, args.device, backend)
    ours = measure("fnlm.train_step (compiled, fullgraph)", run, data, args, config, batch, peak_flops)
    with contextlib.suppress(AttributeError):
        torch.cuda.empty_cache()
    base = measure("baseline: ReferenceLM(fused=True)", baseline_runner(config, hyper, params, args.device, backend),
                   data, args, config, batch, peak_flops)
    memory = f"{ours['peak'] / base['peak']:.3f}" if on_cuda else "n/a (the CPU figure is the process's peak RSS so far)"
    print(f"  fnlm / baseline: tokens/s {ours['tps'] / base['tps']:.3f}, step time {base['tps'] / ours['tps']:.3f}, "
          f"peak memory {memory}")
    if args.sharded_steps > 0:
        sharded_check(config, hyper, data[: args.sharded_steps], args.device)
    print_done(started)


if __name__ == "__main__":
    main()
