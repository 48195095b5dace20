"""The nn.Module shims: CS336 state-dict names load strictly, forward equals the pure function
(and torch's reference op), and gradients reach the module's Parameters."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import fnlm
from fnlm import compat
from tests.reference_lm import reference_lm



def test_linear_embedding_rmsnorm_shims():
    lin = compat.Linear(6, 4)
    w = torch.randn(4, 6)
    lin.load_state_dict({"weight": w}, strict=True)
    x = torch.randn(2, 6)
    torch.testing.assert_close(lin(x), F.linear(x, w))

    emb = compat.Embedding(10, 3)
    e = torch.randn(10, 3)
    emb.load_state_dict({"weight": e}, strict=True)
    ids = torch.tensor([[1, 9, 0]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, e))

    norm = compat.RMSNorm(5, eps=1e-6)
    g = torch.rand(5)
    norm.load_state_dict({"weight": g}, strict=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (5,), g, eps=1e-6))


def test_swiglu_and_rope_shims():
    ffn = compat.SwiGLU(8, 16)
    state = {"w1.weight": torch.randn(16, 8), "w2.weight": torch.randn(8, 16), "w3.weight": torch.randn(16, 8)}
    ffn.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 8)
    ref = F.linear(F.silu(F.linear(x, state["w1.weight"])) * F.linear(x, state["w3.weight"]), state["w2.weight"])
    torch.testing.assert_close(ffn(x), ref)

    rope = compat.RotaryPositionalEmbedding(10000.0, 8, 32)
    assert rope.state_dict() == {}
    pos = torch.arange(3)
    torch.testing.assert_close(rope(x, pos), fnlm.rope(x, pos, fnlm.rope_cache(8, 32)))


def test_attention_and_block_shims_match_pure_functions():
    mha = compat.MultiHeadSelfAttention(16, 4, max_seq_len=12, theta=10000.0)
    params = fnlm.init_multihead_self_attention(16, generator=torch.Generator().manual_seed(0))
    mha.load_state_dict(fnlm.tree_flatten(params), strict=True)
    x = torch.randn(2, 5, 16)
    pos = torch.tensor([2, 3, 4, 5, 6])
    ref = fnlm.multihead_self_attention(params, x, num_heads=4, rope_cache=fnlm.rope_cache(4, 12), positions=pos)
    torch.testing.assert_close(mha(x, pos), ref)

    block = compat.TransformerBlock(16, 4, 24, 12, 10000.0)
    config = fnlm.TransformerConfig(50, 12, 16, 1, 4, 24)
    layer = fnlm.tree_map(lambda t: t + 0.1, fnlm.init_transformer_lm(config, seed=1)["layers"][0])
    block.load_state_dict(fnlm.tree_flatten(layer), strict=True)
    ctx = fnlm.attention_context(num_heads=4, seq_len=5, d_head=4)
    torch.testing.assert_close(block(x), fnlm.transformer_block(layer, x, ctx))


def test_transformer_lm_shim_loads_cs336_state_dict_and_trains():
    config = fnlm.TransformerConfig(vocab_size=40, context_length=10, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    model = compat.TransformerLM(40, 10, 16, 2, 2, 32, 10000.0)
    assert set(model.state_dict()) == fnlm.param_names(config)
    flat = fnlm.tree_flatten(fnlm.tree_map(lambda t: t * 1.1, fnlm.init_transformer_lm(config, seed=9)))
    model.load_state_dict(flat, strict=True)
    ids = torch.randint(0, 40, (2, 10))
    out = model(ids)
    torch.testing.assert_close(out, reference_lm(flat, ids, num_layers=2, num_heads=2), atol=1e-4, rtol=1e-4)
    F.cross_entropy(out.flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_transformer_lm_shim_from_config_with_ablation():
    config = fnlm.TransformerConfig(40, 10, 16, 1, 2, 64, norm="none", ffn="silu")
    model = compat.TransformerLM.from_config(config, seed=4)
    assert set(model.state_dict()) == fnlm.param_names(config)
    params = fnlm.init_transformer_lm(config, seed=4)
    ids = torch.randint(0, 40, (1, 7))
    torch.testing.assert_close(model(ids), fnlm.transformer_lm(params, ids, config))
    assert dataclasses.asdict(model.config) == dataclasses.asdict(config)
