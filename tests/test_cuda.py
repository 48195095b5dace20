"""The model on a CUDA device: the same values as on the CPU, the gradient layout the fused AdamW
kernel needs, bf16 training, the compiled step, and KV-cache decoding. Marked `cuda`; they skip
without a device. `python benchmarks/device_check.py` runs them (`pytest -m cuda`)."""

from __future__ import annotations

import functools

import pytest
import torch

import fnlm

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CONFIG = fnlm.TransformerConfig(vocab_size=257, context_length=64, d_model=128, num_layers=2, num_heads=4, d_ff=352)


def batch(device, seed=0, shape=(4, 64)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CONFIG.vocab_size, shape, generator=g).to(device),
            torch.randint(0, CONFIG.vocab_size, shape, generator=g).to(device))


def loss_fn(params, x, y):
    return fnlm.cross_entropy(fnlm.transformer_lm(params, x, CONFIG), y)


def test_logits_and_gradients_on_cuda_match_the_cpu():
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    on_gpu = fnlm.init_transformer_lm(CONFIG, seed=0, device="cuda")
    x, y = batch("cpu")
    torch.testing.assert_close(fnlm.transformer_lm(on_gpu, x.cuda(), CONFIG).cpu(), fnlm.transformer_lm(params, x, CONFIG),
                               atol=1e-4, rtol=1e-4)
    _, g_cpu = fnlm.value_and_grad(loss_fn)(params, x, y)
    _, g_gpu = fnlm.value_and_grad(loss_fn)(on_gpu, x.cuda(), y.cuda())
    for name, grad in fnlm.tree_flatten(g_gpu).items():
        torch.testing.assert_close(grad.cpu(), fnlm.tree_flatten(g_cpu)[name], atol=1e-5, rtol=1e-3, msg=name)
        assert grad.stride() == fnlm.tree_flatten(on_gpu)[name].stride(), name


def test_adamw_on_cuda_with_transposed_gradients_equals_contiguous_ones():
    w = torch.randn(64, 48, device="cuda")
    g = torch.randn(48, 64, device="cuda").T
    state = fnlm.adamw_init({"w": w})
    a, _ = fnlm.adamw_step({"w": w}, state, {"w": g}, lr=1e-2, weight_decay=0.1)
    b, _ = fnlm.adamw_step({"w": w}, state, {"w": g.contiguous()}, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(a["w"], b["w"], rtol=1e-6, atol=1e-7)


def test_bf16_autocast_training_on_cuda_lowers_the_loss():
    params = fnlm.init_transformer_lm(CONFIG, seed=1, device="cuda")
    x, y = batch("cuda", seed=1)

    def bf16_loss(p, x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fnlm.transformer_lm(p, x, CONFIG)
        return fnlm.cross_entropy(logits, y)

    step = functools.partial(fnlm.train_step, loss_fn=bf16_loss, config=fnlm.StepConfig(lr=3e-3, warmup_steps=0, cosine_steps=20))
    state = fnlm.init_train_state(params)
    first = None
    for _ in range(20):
        state, metrics = step(state, x, y)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first - 1.0


def test_the_compiled_step_on_cuda_tracks_eager():
    params = fnlm.init_transformer_lm(CONFIG, seed=2, device="cuda")
    x, y = batch("cuda", seed=2)
    step = functools.partial(fnlm.train_step, loss_fn=loss_fn, config=fnlm.StepConfig(lr=1e-3, warmup_steps=2, cosine_steps=10))
    compiled = torch.compile(step, fullgraph=True)
    state, eager = fnlm.init_train_state(params, step_tensor=True), fnlm.init_train_state(params)
    for _ in range(4):
        state, m = compiled(state, x, y)
        eager, em = step(eager, x, y)
        assert abs(float(m["loss"]) - float(em["loss"])) < 1e-3
    for a, b in zip(fnlm.tree_leaves(state.params), fnlm.tree_leaves(eager.params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_kv_cache_decoding_on_cuda_equals_recomputation():
    params = fnlm.init_transformer_lm(CONFIG, seed=3, device="cuda")
    params["lm_head"]["weight"] = params["lm_head"]["weight"] * 8
    cached = fnlm.generate(params, CONFIG, [5, 6, 7], max_new_tokens=24, temperature=0)
    assert cached == fnlm.generate(params, CONFIG, [5, 6, 7], max_new_tokens=24, temperature=0, use_cache=False)
