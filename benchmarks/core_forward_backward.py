"""One forward + backward of fnlm's `transformer_lm` against a hand-written nn.Module of the same
model (eager PyTorch, same weights, same maths: hand-coded attention and RoPE, nn.RMSNorm).

    python benchmarks/core_forward_backward.py [--threads N] [--repeats R]

Prints the fastest of `--repeats` alternated runs (milliseconds per step) for both and the ratio fnlm / baseline, for a tiny model (where
per-call Python overhead dominates) and the assignment's 17M CPU model. Run with
FNLM_TYPECHECK unset: shape checks cost time and are meant for tests.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fnlm


class HandWrittenLM(nn.Module):
    """The pre-norm RoPE/SwiGLU LM as an ordinary nn.Module."""

    def __init__(self, vocab: int, ctx: int, d_model: int, layers: int, heads: int, d_ff: int, theta: float = 10000.0):
        super().__init__()
        self.heads = heads
        self.token_embeddings = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            b = nn.Module()
            b.attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
                setattr(b.attn, name, nn.Linear(d_model, d_model, bias=False))
            b.ffn = nn.Module()
            b.ffn.w1, b.ffn.w3 = nn.Linear(d_model, d_ff, bias=False), nn.Linear(d_model, d_ff, bias=False)
            b.ffn.w2 = nn.Linear(d_ff, d_model, bias=False)
            b.ln1, b.ln2 = nn.RMSNorm(d_model, eps=1e-5), nn.RMSNorm(d_model, eps=1e-5)
            self.layers.append(b)
        self.ln_final = nn.RMSNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        d_head = d_model // heads
        inv = 1.0 / theta ** (torch.arange(0, d_head, 2).float() / d_head)
        ang = torch.arange(ctx).float()[:, None] * inv
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def _rope(self, x: Tensor, seq: int) -> Tensor:
        cos, sin = self.cos[:seq], self.sin[:seq]
        e, o = x[..., 0::2], x[..., 1::2]
        return torch.stack((e * cos - o * sin, e * sin + o * cos), -1).flatten(-2)

    def forward(self, ids: Tensor) -> Tensor:
        b, s = ids.shape
        x = self.token_embeddings(ids)
        mask = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        for blk in self.layers:
            h = blk.ln1(x)
            a = blk.attn
            q, k, v = (m(h).view(b, s, self.heads, -1).transpose(1, 2) for m in (a.q_proj, a.k_proj, a.v_proj))
            q, k = self._rope(q, s), self._rope(k, s)
            att = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
            att = torch.softmax(att.masked_fill(~mask, float("-inf")), -1)
            x = x + a.output_proj((att @ v).transpose(1, 2).reshape(b, s, -1))
            h = blk.ln2(x)
            x = x + blk.ffn.w2(F.silu(blk.ffn.w1(h)) * blk.ffn.w3(h))
        return self.lm_head(self.ln_final(x))


def timeit_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Alternate the two steps so machine noise hits both alike; report each one's fastest run."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(ta) * 1e3, min(tb) * 1e3


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
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cases = [
        ("tiny (d64 L2, 4x32 tokens)", fnlm.TransformerConfig(512, 32, 64, 2, 4, 192), 4),
        ("17M (d512 L4 H16, 8x256 tokens)", fnlm.TransformerConfig(10_000, 256, 512, 4, 16, 1344), 8),
    ]
    print(f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__}")
    for name, c, batch in cases:
        params = fnlm.init_transformer_lm(c, seed=0, device=dev)
        model = HandWrittenLM(c.vocab_size, c.context_length, c.d_model, c.num_layers, c.num_heads, c.d_ff, c.rope_theta).to(dev)
        model.load_state_dict(fnlm.tree_flatten(params), strict=True)
        leaves = fnlm.tree_map(lambda t: t.requires_grad_(True), params)
        ids = torch.randint(0, c.vocab_size, (batch, c.context_length), device=dev)
        with torch.no_grad():
            diff = (fnlm.transformer_lm(leaves, ids, c) - model(ids)).abs().max().item()

        def step_fnlm():
            logits = fnlm.transformer_lm(leaves, ids, c)
            loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
            torch.autograd.grad(loss, fnlm.tree_leaves(leaves))
            sync()

        def step_module():
            logits = model(ids)
            loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
            torch.autograd.grad(loss, list(model.parameters()))
            sync()

        fa, fb = timeit_pair(step_fnlm, step_module, args.repeats)
        print(f"{name:34s} fnlm {fa:8.2f} ms  hand-written {fb:8.2f} ms  ratio {fa / fb:5.3f}  (max |logit diff| {diff:.1e})")


if __name__ == "__main__":
    main()
