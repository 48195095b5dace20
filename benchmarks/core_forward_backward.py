"""One forward + backward of fnlm's `transformer_lm` against `benchmarks/reference.py`'s `ReferenceLM`
(same weights): (a) the same maths written as an `nn.Module`, (b) that module on torch's fused
kernels. Then the fixed costs of a call: fnlm's always-on input checks and one einx call.

    python benchmarks/core_forward_backward.py [--threads N] [--repeats R] [--device cpu]

Prints, for a tiny model (where per-call Python overhead dominates) and the 17M TinyStories model
at batch 4 x 128, the median of `--repeats` alternated runs (wall and process CPU time) and the
ratios fnlm/(a), fnlm/(b); then the checks' cost per call against a 17M forward and a one-token
decoding step. Run with FNLM_TYPECHECK unset: shape checks cost time and are meant for tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import einx  # noqa: E402

import fnlm  # noqa: E402
from harness import alternate, print_done, print_machine  # noqa: E402
from reference import ReferenceLM, load_fnlm_params  # noqa: E402

CASES = [
    ("tiny (d64 L2, 4x32 tokens)", fnlm.TransformerConfig(512, 32, 64, 2, 4, 192), 4, 32),
    ("17M (d512 L4 H16, 4x128 tokens)", fnlm.TransformerConfig(10_000, 256, 512, 4, 16, 1344), 4, 128),
]


def per_call_us(fn, calls: int = 2000) -> float:
    """Median microseconds per call over five timed loops of `calls` calls."""
    fn()
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - start) / calls)
    return statistics.median(loops) * 1e6


def forward_backward(config, batch, seq, device, repeats, sync) -> tuple[dict, float]:
    params = fnlm.init_transformer_lm(config, seed=0, device=device)
    models = {}
    for name, fused in (("(a) module", False), ("(b) fused", True)):
        models[name] = ReferenceLM(config, fused=fused).to(device)
        load_fnlm_params(models[name], fnlm.tree_flatten(params))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    grad_fn = fnlm.value_and_grad(lambda p, x, y: fnlm.cross_entropy(fnlm.transformer_lm(p, x, config), y))
    with torch.no_grad():
        diff = (fnlm.transformer_lm(params, ids, config) - models["(b) fused"](ids)).abs().max().item()

    def module_step(model):
        leaves = list(model.parameters())
        return lambda: torch.autograd.grad(model.loss(ids, targets), leaves)

    fns = {"fnlm": lambda: grad_fn(params, ids, targets)}
    fns.update({name: module_step(model) for name, model in models.items()})
    return alternate(fns, repeats, warmup=2, sync=sync), diff


def check_costs(device) -> None:
    config = CASES[1][1]
    params = fnlm.init_transformer_lm(config, seed=0, device=device)
    ids = torch.randint(0, config.vocab_size, (4, 128), device=device)
    one = torch.randint(0, config.vocab_size, (1,), device=device)
    checks = per_call_us(lambda: (fnlm.check_token_ids(ids), fnlm.check_params(params, config)))
    with torch.no_grad():
        forward = per_call_us(lambda: fnlm.transformer_lm(params, ids, config), calls=3)
        cache = fnlm.init_kv_cache(config, device=device)

        def decode():
            cache.length = 16
            fnlm.transformer_lm(params, one, config, kv_cache=cache)

        step = per_call_us(decode, calls=50)
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    einx_us = per_call_us(lambda: einx.dot("... [d_in], d_out [d_in] -> ... d_out", x, w))
    matmul_us = per_call_us(lambda: x @ w.T)
    print("\nfixed costs per call (17M model):")
    print(f"  always-on input checks (ids + params tree, {len(fnlm.tree_leaves(params))} leaves): {checks:7.1f} µs"
          f" = {checks / forward * 100:.3f} % of a 4x128 forward ({forward / 1e3:.1f} ms),"
          f" {checks / step * 100:.2f} % of a one-token decoding step ({step / 1e3:.2f} ms)")
    print(f"  one einx.dot call on tiny tensors: {einx_us:.1f} µs (x @ w.T: {matmul_us:.1f} µs); "
          "~80 einx calls per 17M forward, none in the backward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if fnlm.typecheck_enabled():
        print("warning: FNLM_TYPECHECK is on; fnlm timings include shape checks")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started = print_machine(args.device)
    print(f"forward + backward (value_and_grad of the cross-entropy), median of {args.repeats} alternated runs:")
    for name, config, batch, seq in CASES:
        t, diff = forward_backward(config, batch, seq, device, args.repeats, sync)
        print(f"  {name}: fnlm {t.median('fnlm') * 1e3:8.2f} ms, (a) {t.median('(a) module') * 1e3:8.2f} ms, "
              f"(b) {t.median('(b) fused') * 1e3:8.2f} ms  (max |logit diff| vs (b) {diff:.1e})")
        print(f"    {t.line('fnlm', '(a) module')}")
        print(f"    {t.line('fnlm', '(b) fused')}")
    check_costs(device)
    print_done(started)


if __name__ == "__main__":
    main()
