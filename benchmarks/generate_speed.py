"""Decoding speed: `fnlm.generate` with its KV cache against recomputing the whole prefix, and a
`torch.compile`d one-token decoding step with static cache shapes.

The baseline is `fnlm.generate(..., use_cache=False)`, which recomputes `transformer_lm` over the
whole prefix for every new token: what decoding costs without a cache. All decode the same number of
new tokens greedily from the same prompt on the 17M TinyStories model (random init); the token
sequences are checked to be identical. Each variant first runs once untimed (einx traces each new
shape once per process, ~0.1 s per einx pattern: the recomputing baseline meets a new prefix
length at every token), then runs alternate; medians and the speed-ups are printed.

The cached step has static shapes (the attention reads the whole cache buffer, masked), so with
`--compile` the step `transformer_lm(params, token, config, kv_cache=cache)` is compiled once for
all positions (the position passed as an int argument, which dynamo makes dynamic after its first
recompile) and drives a greedy loop: no Python or einx dispatch per layer.

    python benchmarks/generate_speed.py [--new-tokens 256] [--prompt 16] [--rounds 3] [--threads N] [--compile]
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


def generate_recompute(params, config, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return fnlm.generate(params, config, prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0, use_cache=False)


def generate_cached(params, config, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return fnlm.generate(params, config, prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0, use_cache=True)


class CompiledGreedy:
    """Greedy decoding with a compiled one-token step over a preallocated `KVCache` (prefill eager)."""

    def __init__(self, params, config, device):
        self.params, self.config = params, config
        self.cache = fnlm.init_kv_cache(config, device=device, dtype=params["lm_head"]["weight"].dtype)
        self.device = device

        def step(token, start):
            self.cache.length = start
            return fnlm.transformer_lm(params, token, config, kv_cache=self.cache)[-1].argmax()

        self.step = torch.compile(step, fullgraph=True)

    def __call__(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        self.cache.reset()
        with torch.inference_mode():
            prompt = torch.tensor(prompt_ids, device=self.device)
            token = fnlm.transformer_lm(self.params, prompt, self.config, kv_cache=self.cache)[-1].argmax()
            out = [token]
            for _ in range(max_new_tokens - 1):
                token = self.step(token.reshape(1), self.cache.length)
                out.append(token)
        return [int(t) for t in out]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd one-token step")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = fnlm.TransformerConfig(vocab_size=10_000, context_length=args.context, d_model=512,
                                    num_layers=4, num_heads=16, d_ff=1344)
    params = fnlm.init_transformer_lm(config, seed=0, device=args.device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
    if args.prompt + args.new_tokens > config.context_length:
        raise ValueError(f"prompt {args.prompt} + new tokens {args.new_tokens} exceed the context {config.context_length}")

    started = print_machine(args.device)
    print(f"17M model, greedy, prompt {args.prompt} tokens, {args.new_tokens} new tokens, {args.device}")
    variants = {
        "kv cache (fnlm.generate)": lambda: generate_cached(params, config, prompt, args.new_tokens),
        "recompute prefix": lambda: generate_recompute(params, config, prompt, args.new_tokens),
    }
    if args.compile:
        compiled = CompiledGreedy(params, config, args.device)
        variants["kv cache, compiled step"] = lambda: compiled(prompt, args.new_tokens)
    outputs = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        outputs[name] = fn()
        print(f"  untimed first run of {name}: {time.perf_counter() - start:.1f} s")

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    reference = outputs["kv cache (fnlm.generate)"]
    for name, tokens in outputs.items():
        if len(tokens) != args.new_tokens:
            raise AssertionError(f"{name}: expected {args.new_tokens} tokens, got {len(tokens)}")
        same = next((i for i, (u, v) in enumerate(zip(tokens, reference)) if u != v), len(tokens))
        print(f"  {name}: greedy tokens identical to the cached ones on {same} of {args.new_tokens}")
        if same < min(16, args.new_tokens):
            raise AssertionError(f"{name} and the cached decoding differ from position {same}")
    medians = {n: statistics.median(t) for n, t in times.items()}
    for n, m in medians.items():
        print(f"  {n:<26} {m:8.3f} s   {args.new_tokens / m:8.1f} tokens/s   (median of {args.rounds})")
    recompute = medians["recompute prefix"]
    print(f"  speed-up kv cache / recompute: {recompute / medians['kv cache (fnlm.generate)']:.2f}x")
    if args.compile:
        print(f"  speed-up compiled step / recompute: {recompute / medians['kv cache, compiled step']:.2f}x; "
              f"compiled / eager cached: {medians['kv cache (fnlm.generate)'] / medians['kv cache, compiled step']:.2f}x")
    print_done(started)


if __name__ == "__main__":
    main()
