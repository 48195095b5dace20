"""Decoding speed: ``fnlm.generate`` with its KV cache against recomputing the whole prefix.

The baseline is ``fnlm.generate(..., use_cache=False)``, which recomputes ``transformer_lm`` over the
whole prefix for every new token: what decoding costs without a cache. Both decode the same number of new
tokens greedily from the same prompt on the 17M TinyStories model (random init); the token
sequences are checked to be identical. Runs alternate; medians and the speed-up are printed.

    python benchmarks/generate_speed.py [--new-tokens 256] [--prompt 16] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fnlm  # noqa: E402
from harness import machine_name  # noqa: E402


def generate_recompute(params, config, prompt_ids: list[int], max_new_tokens: int, device) -> list[int]:
    return fnlm.generate(params, config, prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0, use_cache=False)


def generate_cached(params, config, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return fnlm.generate(params, config, prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0, use_cache=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args(argv)

    config = fnlm.TransformerConfig(vocab_size=10_000, context_length=args.context, d_model=512,
                                    num_layers=4, num_heads=16, d_ff=1344)
    params = fnlm.init_transformer_lm(config, seed=0, device=args.device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
    if args.prompt + args.new_tokens > config.context_length:
        raise ValueError(f"prompt {args.prompt} + new tokens {args.new_tokens} exceed the context {config.context_length}")

    print(f"machine: {machine_name(args.device)}")
    print(f"17M model, greedy, prompt {args.prompt} tokens, {args.new_tokens} new tokens, {args.device}")
    generate_cached(params, config, prompt, 8)
    generate_recompute(params, config, prompt, 8, args.device)

    times: dict[str, list[float]] = {"kv cache (fnlm.generate)": [], "recompute prefix": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in (("kv cache (fnlm.generate)", lambda: generate_cached(params, config, prompt, args.new_tokens)),
                         ("recompute prefix", lambda: generate_recompute(params, config, prompt, args.new_tokens, args.device))):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    a, b = outputs.values()
    if len(a) != args.new_tokens or len(b) != args.new_tokens:
        raise AssertionError(f"expected {args.new_tokens} tokens, got {len(a)} and {len(b)}")
    same = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
    if same < min(16, args.new_tokens):
        raise AssertionError(f"cached and recomputed greedy tokens differ from position {same}")
    print(f"cached and recomputed greedy decoding agree on {same} of {args.new_tokens} tokens"
          + ("" if same == len(a) else " (then a near-tie in float rounding diverges)"))
    medians = {n: statistics.median(t) for n, t in times.items()}
    for n, m in medians.items():
        print(f"  {n:<26} {m:8.3f} s   {args.new_tokens / m:8.1f} tokens/s   (median of {args.rounds})")
    cached, recompute = medians.values()
    print(f"  speed-up kv cache / recompute: {recompute / cached:.2f}x")


if __name__ == "__main__":
    main()
