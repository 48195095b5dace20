"""Time one AdamW update: fnlm.adamw_step (pure, new tensors; and with donate=True, in place) vs
torch.optim.AdamW (in place); and one `fnlm.optim.optimizer_step` (donated, as the training loop
takes it) of the gradient transformations `adamw` (torch's fused kernel), `adamw_cs336` (the
default of `train_step`), `lion` and `muon` (Muon for the hidden matrices, AdamW for the rest).

Parameters are a TinyStories-sized tree (~17M non-embedding + embeddings by default: 4 layers,
d_model 512, d_ff 1344, vocab 10000). Baseline: `torch.optim.AdamW(foreach=True)`, the multi-tensor
path torch uses by default on CUDA; also `fused=True` when the device supports it. Prints the
median time per step of each and the ratio fnlm / torch.

    python benchmarks/optim.py [--device cuda] [--iters 20] [--compile]
    python benchmarks/optim.py --iters 2 --vocab 64 --d-model 32 --d-ff 64 --layers 1   # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fnlm  # noqa: E402
from harness import print_done, print_machine  # noqa: E402


def make_params(vocab: int, d_model: int, d_ff: int, layers: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {
        "token_embeddings": {"weight": w(vocab, d_model)},
        "layers": [
            {
                "attn": {k: {"weight": w(d_model, d_model)} for k in ("q_proj", "k_proj", "v_proj", "output_proj")},
                "ln1": {"weight": w(d_model)},
                "ffn": {"w1": {"weight": w(d_ff, d_model)}, "w2": {"weight": w(d_model, d_ff)}, "w3": {"weight": w(d_ff, d_model)}},
                "ln2": {"weight": w(d_model)},
            }
            for _ in range(layers)
        ],
        "ln_final": {"weight": w(d_model)},
        "lm_head": {"weight": w(vocab, d_model)},
    }


def median_time(fn, iters: int, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


TRANSFORMATIONS = {
    "optim.adamw (fused)": lambda: fnlm.optim.adamw(1e-3, weight_decay=0.01),
    "optim.adamw_cs336": lambda: fnlm.optim.adamw_cs336(1e-3, weight_decay=0.01),
    "optim.lion": lambda: fnlm.optim.lion(1e-4, weight_decay=0.1),
    "optim.muon": lambda: fnlm.optim.muon(0.02, adam_learning_rate=1e-3, weight_decay=0.01),
}


def transformation_times(params: dict, grads: dict, iters: int, device: str) -> dict[str, float]:
    """Median seconds of one donated `optimizer_step` of each of `TRANSFORMATIONS`, each on its own
    copy of the params (the grads are not donated: they are reused every step)."""
    out = {}
    for label, make in TRANSFORMATIONS.items():
        tx = make()
        box = {"params": fnlm.tree_map(torch.clone, params)}
        box["state"] = tx.init(box["params"])

        def step(tx=tx, box=box) -> None:
            box["params"], box["state"] = fnlm.optim.optimizer_step(tx, box["params"], box["state"], grads,
                                                                    donate=True, donate_grads=False)

        out[label + " donate"] = median_time(step, iters, device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1344)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(fnlm.adamw_step)")
    args = ap.parse_args()
    started = print_machine(args.device)
    params = make_params(args.vocab, args.d_model, args.d_ff, args.layers, args.device)
    grads = fnlm.tree_map(torch.randn_like, params)
    print(f"device={args.device} params={fnlm.tree_size(params) / 1e6:.2f}M leaves={len(fnlm.tree_leaves(params))} "
          f"iters={args.iters} torch={torch.__version__}")

    box = {"params": params, "state": fnlm.adamw_init(params)}

    def fnlm_step(step=fnlm.adamw_step, **kw) -> None:
        box["params"], box["state"] = step(box["params"], box["state"], grads, lr=1e-3, weight_decay=0.01, **kw)

    results = {"fnlm.adamw_step": median_time(fnlm_step, args.iters, args.device),
               "fnlm.adamw_step donate": median_time(lambda: fnlm_step(donate=True), args.iters, args.device)}
    if args.compile:
        compiled = torch.compile(fnlm.adamw_step)
        results["compiled fnlm.adamw_step"] = median_time(lambda: fnlm_step(compiled), args.iters, args.device)

    results.update(transformation_times(params, grads, args.iters, args.device))

    variants = {"torch AdamW foreach": {"foreach": True}}
    if args.device.startswith("cuda"):
        variants["torch AdamW fused"] = {"fused": True}
    for label, kw in variants.items():
        leaves = [torch.nn.Parameter(p.clone()) for p in fnlm.tree_leaves(params)]
        for p, g in zip(leaves, fnlm.tree_leaves(grads)):
            p.grad = g.clone()
        opt = torch.optim.AdamW(leaves, lr=1e-3, weight_decay=0.01, **kw)
        results[label] = median_time(opt.step, args.iters, args.device)
    base = results["torch AdamW foreach"]
    for label, t in results.items():
        print(f"{label:>32}: {t * 1e3:9.2f} ms / step (median)   ratio to torch foreach = {t / base:.3f}")
    print_done(started)


if __name__ == "__main__":
    main()
