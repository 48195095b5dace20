"""Accounting against hand-computed GPT-2 small / XL figures, and against the model itself.

Every expected number below is written out as its arithmetic (and, for the headline figures,
as the literal it evaluates to), independently of ``fnlm.accounting``.
"""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm import accounting as acc

GPT2_SMALL = SimpleNamespace(
    vocab_size=50257, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=3072
)
GPT2_XL = SimpleNamespace(
    vocab_size=50257, context_length=1024, d_model=1600, num_layers=48, num_heads=25, d_ff=6400
)


def test_parameters_gpt2_small():
    per_layer = 4 * 768 * 768 + 3 * 768 * 3072 + 2 * 768
    assert per_layer == 2_359_296 + 7_077_888 + 1_536
    expected = 12 * per_layer + 50257 * 768 + 768 + 50257 * 768
    assert expected == 190_460_160
    assert acc.parameter_count(GPT2_SMALL) == expected


def test_parameters_gpt2_xl():
    per_layer = 4 * 1600 * 1600 + 3 * 1600 * 6400 + 2 * 1600
    assert per_layer == 10_240_000 + 30_720_000 + 3_200
    expected = 48 * per_layer + 2 * 50257 * 1600 + 1600
    assert expected == 2_127_057_600
    assert acc.parameter_count(GPT2_XL) == expected
    counts = acc.parameter_counts(GPT2_XL)
    assert counts["ffn"] == 48 * 3 * 1600 * 6400
    assert counts["norms"] == 97 * 1600


def test_parameters_silu_ffn_has_two_matrices():
    expected = 12 * (4 * 768 * 768 + 2 * 768 * 3072 + 2 * 768) + 2 * 50257 * 768 + 768
    assert acc.parameter_count(GPT2_SMALL, swiglu=False) == expected


def test_forward_flops_gpt2_xl_by_component():
    flops = acc.forward_flops(GPT2_XL)
    projection = 48 * 2 * 1024 * 1600 * 1600
    assert projection == 251_658_240_000
    attn_square = 48 * 2 * 1024 * 1024 * 1600
    assert attn_square == 161_061_273_600
    ffn = 48 * 2 * 1024 * 1600 * 6400
    assert ffn == 1_006_632_960_000
    head = 2 * 1024 * 1600 * 50257
    assert head == 164_682_137_600
    assert flops == {
        "q_proj": projection,
        "k_proj": projection,
        "v_proj": projection,
        "output_proj": projection,
        "attn_scores": attn_square,
        "attn_values": attn_square,
        "ffn_w1": ffn,
        "ffn_w3": ffn,
        "ffn_w2": ffn,
        "lm_head": head,
    }
    total = 4 * projection + 2 * attn_square + 3 * ffn + head
    assert total == 4_513_336_524_800
    assert acc.forward_flops_total(GPT2_XL) == total
    assert acc.training_flops(GPT2_XL) == 3 * total


def test_forward_flops_gpt2_small_batch_and_seq():
    flops = acc.forward_flops(GPT2_SMALL, seq_len=256, batch_size=8)
    tokens = 8 * 256
    assert flops["q_proj"] == 12 * 2 * tokens * 768 * 768
    assert flops["attn_scores"] == 12 * 2 * 8 * 256 * 256 * 768
    assert flops["ffn_w2"] == 12 * 2 * tokens * 3072 * 768
    assert flops["lm_head"] == 2 * tokens * 768 * 50257
    total_1024 = 4 * 14_495_514_624 + 2 * 19_327_352_832 + 3 * 57_982_058_496 + 79_047_426_048
    assert acc.forward_flops_total(GPT2_SMALL) == total_1024 == 349_630_365_696


def test_adamw_memory_gpt2_xl_batch_1():
    mem = acc.adamw_memory(GPT2_XL, batch_size=1)
    params = 2_127_057_600
    assert mem["parameters"] == 4 * params
    assert mem["gradients"] == 4 * params
    assert mem["optimizer_state"] == 8 * params
    t, d, h, f, v = 1024, 1600, 25, 6400, 50257
    per_layer = (
        2 * t * d  # two RMSNorms
        + 3 * t * d  # Q, K, V
        + h * t * t  # Q K^T
        + h * t * t  # softmax
        + t * d  # weighted sum of values
        + t * d  # output projection
        + t * f  # W1
        + t * f  # SiLU
        + t * d  # W2
        + t * f  # W3 (SwiGLU)
        + t * f  # gate product (SwiGLU)
    )
    assert per_layer == 91_750_400
    activations = 48 * per_layer + t * d + t * v + t * v
    assert activations == 4_508_583_936
    assert mem["activations"] == 4 * activations
    assert mem["total"] == 16 * params + 4 * activations == 52_067_257_344


def test_adamw_memory_activations_scale_with_batch():
    one = acc.adamw_memory(GPT2_SMALL, batch_size=1)
    four = acc.adamw_memory(GPT2_SMALL, batch_size=4)
    assert four["activations"] == 4 * one["activations"]
    assert four["parameters"] == one["parameters"]


def test_mfu_arithmetic():
    tokens_per_s = 10_000.0
    peak = 100e12
    flops_per_token = 3 * 349_630_365_696 / 1024
    assert acc.mfu(tokens_per_s, GPT2_SMALL, peak) == pytest.approx(tokens_per_s * flops_per_token / peak)
    assert acc.mfu(tokens_per_s, GPT2_SMALL, peak) == pytest.approx(0.1024307712, rel=1e-9)
    assert acc.training_flops_per_token(GPT2_SMALL) == pytest.approx(flops_per_token)


@settings(max_examples=30, deadline=None)
@given(
    d_head=st.integers(1, 16),
    heads=st.integers(1, 4),
    layers=st.integers(1, 4),
    vocab=st.integers(1, 500),
    seq=st.integers(1, 64),
    batch=st.integers(1, 8),
)
def test_flops_scale_linearly_in_batch_and_quadratic_term_in_seq(d_head, heads, layers, vocab, seq, batch):
    cfg = SimpleNamespace(
        vocab_size=vocab, context_length=64, d_model=d_head * heads, num_layers=layers,
        num_heads=heads, d_ff=3 * d_head * heads,
    )
    one = acc.forward_flops_total(cfg, seq_len=seq, batch_size=1)
    assert acc.forward_flops_total(cfg, seq_len=seq, batch_size=batch) == batch * one
    attn = acc.forward_flops(cfg, seq_len=seq)["attn_scores"]
    assert attn == layers * 2 * seq * seq * d_head * heads


def test_bad_config_is_rejected():
    with pytest.raises(TypeError, match="lacks attributes"):
        acc.parameter_count(SimpleNamespace(d_model=4))
    with pytest.raises(ValueError, match="not divisible"):
        acc.parameter_count(SimpleNamespace(**{**vars(GPT2_SMALL), "num_heads": 5}))
    with pytest.raises(ValueError, match="peak_flops"):
        acc.mfu(1.0, GPT2_SMALL, 0.0)


def test_measured_cpu_peak_is_plausible():
    peak = acc.measure_matmul_peak("cpu", torch.float32, size=256, min_seconds=0.05)
    assert 1e8 < peak < 1e14


def test_known_gpu_names_resolve_to_specific_entries():
    assert acc._lookup_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert acc._lookup_peak("NVIDIA H100 PCIe") == 756e12
    assert acc._lookup_peak("NVIDIA A10G") == 70e12
    assert acc._lookup_peak("Some Future GPU") is None


@pytest.mark.parametrize(
    "dims",
    [
        dict(vocab_size=10000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
        dict(vocab_size=97, context_length=16, d_model=24, num_layers=3, num_heads=4, d_ff=40),
    ],
)
def test_parameter_count_matches_model(dims):
    config = fnlm.TransformerConfig(**dims)
    params = fnlm.init_transformer_lm(config, seed=0)
    assert fnlm.tree_size(params) == acc.parameter_count(config)
