"""Time fnlm.value_and_grad's two back ends on a ~17M-parameter workload.

Back ends: reverse-mode autograd over fresh leaves (`torch.autograd.grad`, fnlm's default) and
`torch.func.grad_and_value`. The workload is a residual stack of SwiGLU-style matmuls on a params
tree (`layers.i.{w1,w2,w3}.weight`, `ln.i.weight`), sized like the TinyStories model's 17M
non-embedding parameters. Prints the median time per call of each and the ratio func / autograd.

    python benchmarks/value_and_grad.py [--device cuda] [--iters 20] [--d-model 512] [--layers 4]
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
from fnlm.autodiff import value_and_grad  # noqa: E402
from harness import print_done, print_machine  # noqa: E402


def init(d_model: int, d_ff: int, layers: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) / i**0.5).to(device)

    return {
        "layers": [
            {"w1": {"weight": w(d_ff, d_model)}, "w2": {"weight": w(d_model, d_ff)}, "w3": {"weight": w(d_ff, d_model)}}
            for _ in range(layers)
        ],
        "ln": [{"weight": torch.ones(d_model, device=device)} for _ in range(layers)],
    }


def loss_fn(params: dict, x: torch.Tensor) -> torch.Tensor:
    for block, ln in zip(params["layers"], params["ln"]):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ln["weight"]
        a = h @ block["w1"]["weight"].T
        b = h @ block["w3"]["weight"].T
        x = x + (torch.nn.functional.silu(a) * b) @ block["w2"]["weight"].T
    return x.pow(2).mean()


def time_it(f, params, x, iters: int, device: str) -> float:
    for _ in range(3):
        f(params, x)
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, grads = f(params, x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1344)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512, help="rows of the input (batch * seq)")
    args = ap.parse_args()
    started = print_machine(args.device)
    params = init(args.d_model, args.d_ff, args.layers, args.device)
    x = torch.randn(args.tokens, args.d_model, device=args.device)
    n = fnlm.tree_size(params)
    print(f"device={args.device} params={n / 1e6:.2f}M tokens={args.tokens} iters={args.iters} torch={torch.__version__}")
    la, ga = value_and_grad(loss_fn, backend="autograd")(params, x)
    lf, gf = value_and_grad(loss_fn, backend="func")(params, x)
    diff = max((a - b).abs().max().item() for a, b in zip(fnlm.tree_leaves(ga), fnlm.tree_leaves(gf)))
    print(f"loss autograd={la.item():.6f} func={lf.item():.6f} max|grad diff|={diff:.2e}")
    results = {}
    for backend in ("autograd", "func"):
        results[backend] = time_it(value_and_grad(loss_fn, backend=backend), params, x, args.iters, args.device)
        print(f"{backend:>8}: {results[backend] * 1e3:9.2f} ms / call (median)")
    print(f"ratio func / autograd = {results['func'] / results['autograd']:.3f}")
    print_done(started)


if __name__ == "__main__":
    main()
