"""The LM: config checks, flat names, init, the forward against a plain-torch reference, the
ablations, user-written blocks, and the adapters."""

from __future__ import annotations

import dataclasses
import functools

import jaxtyping
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from tests.adapters import run_transformer_block, run_transformer_lm
from tests.reference_lm import reference_block, reference_lm


SMALL = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def perturbed_params(config: fnlm.TransformerConfig, seed: int = 0) -> dict:
    """Initial params with the norm gains moved off 1, so a test can tell whether they are used."""
    params = fnlm.init_transformer_lm(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def jiggle(name, t):
        return t + 0.3 * torch.randn(t.shape, generator=g) if name.startswith("ln") or ".ln" in name else t

    return fnlm.tree_map_with_path(jiggle, params)


# --- config ------------------------------------------------------------------------------


def test_config_round_trips_through_asdict():
    config = dataclasses.replace(SMALL, rope_theta=500.0, norm="none", position="nope", ffn="silu", norm_position="post")
    assert fnlm.TransformerConfig(**dataclasses.asdict(config)) == config
    assert config.d_head == 8


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(d_model=30), r"d_model=30.*num_heads=4"),
        (dict(vocab_size=0), r"vocab_size.*0"),
        (dict(num_layers=-1), r"num_layers.*-1"),
        (dict(d_ff=2.5), r"(?s)d_ff.*2\.5"),
        (dict(norm="layernorm"), r"norm.*'layernorm'"),
        (dict(norm_position="sandwich"), r"norm_position.*'sandwich'"),
        (dict(position="alibi"), r"position.*'alibi'"),
        (dict(ffn="gelu"), r"ffn.*'gelu'"),
        (dict(rope_theta=0.0), r"rope_theta.*0\.0"),
        (dict(d_model=36, num_heads=4), r"even head size.*9"),
    ],
)
def test_config_rejects_bad_values_naming_them(change, pattern):
    # a non-int is a ValueError from __post_init__, or a TypeError from the type checker when on
    with pytest.raises((ValueError, TypeError), match=pattern):
        dataclasses.replace(SMALL, **change)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SMALL.d_model = 64  # type: ignore[misc]


# --- parameter names and init --------------------------------------------------------------


def test_flat_param_names_are_exactly_the_cs336_names():
    names = set(fnlm.tree_flatten(fnlm.init_transformer_lm(SMALL)))
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {
            f"layers.{i}.attn.q_proj.weight",
            f"layers.{i}.attn.k_proj.weight",
            f"layers.{i}.attn.v_proj.weight",
            f"layers.{i}.attn.output_proj.weight",
            f"layers.{i}.ln1.weight",
            f"layers.{i}.ln2.weight",
            f"layers.{i}.ffn.w1.weight",
            f"layers.{i}.ffn.w2.weight",
            f"layers.{i}.ffn.w3.weight",
        }
    assert names == expected == fnlm.param_names(SMALL)


def test_ablation_param_names_drop_only_what_they_must():
    base = fnlm.param_names(SMALL)
    no_norm = dataclasses.replace(SMALL, norm="none")
    assert set(fnlm.tree_flatten(fnlm.init_transformer_lm(no_norm))) == fnlm.param_names(no_norm)
    assert base - fnlm.param_names(no_norm) == {"ln_final.weight"} | {f"layers.{i}.ln{j}.weight" for i in range(2) for j in (1, 2)}
    silu = dataclasses.replace(SMALL, ffn="silu")
    assert set(fnlm.tree_flatten(fnlm.init_transformer_lm(silu))) == fnlm.param_names(silu)
    assert base - fnlm.param_names(silu) == {f"layers.{i}.ffn.w3.weight" for i in range(2)}
    for other in (dict(position="nope"), dict(norm_position="post")):
        assert set(fnlm.tree_flatten(fnlm.init_transformer_lm(dataclasses.replace(SMALL, **other)))) == base


def test_param_shapes_and_init_distributions():
    config = fnlm.TransformerConfig(vocab_size=500, context_length=8, d_model=64, num_layers=1, num_heads=4, d_ff=192)
    flat = fnlm.tree_flatten(fnlm.init_transformer_lm(config, seed=3))
    assert flat["token_embeddings.weight"].shape == (500, 64)
    assert flat["lm_head.weight"].shape == (500, 64)
    assert flat["layers.0.ffn.w1.weight"].shape == (192, 64)
    assert flat["layers.0.ffn.w2.weight"].shape == (64, 192)
    assert torch.equal(flat["layers.0.ln1.weight"], torch.ones(64))
    assert torch.equal(flat["ln_final.weight"], torch.ones(64))
    emb = flat["token_embeddings.weight"]
    assert emb.abs().max() <= 3 and abs(emb.std().item() - 0.9866) < 0.03
    w1 = flat["layers.0.ffn.w1.weight"]
    sigma = (2 / (64 + 192)) ** 0.5
    assert w1.abs().max() <= 3 * sigma + 1e-7 and abs(w1.std().item() / sigma - 0.9866) < 0.03


def test_init_seed_device_dtype():
    a = fnlm.tree_flatten(fnlm.init_transformer_lm(SMALL, seed=7))
    b = fnlm.tree_flatten(fnlm.init_transformer_lm(SMALL, seed=7))
    c = fnlm.tree_flatten(fnlm.init_transformer_lm(SMALL, seed=8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    d = fnlm.tree_flatten(fnlm.init_transformer_lm(SMALL, seed=7, dtype=torch.float64, device="cpu"))
    assert all(v.dtype == torch.float64 for v in d.values())
    torch.testing.assert_close(d["lm_head.weight"].float(), a["lm_head.weight"])


# --- forward ---------------------------------------------------------------------------------


def test_lm_matches_plain_torch_reference():
    params = perturbed_params(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (3, 11))
    ref = reference_lm(fnlm.tree_flatten(params), ids, num_layers=2, num_heads=4)
    torch.testing.assert_close(fnlm.transformer_lm(params, ids, SMALL), ref, atol=1e-4, rtol=1e-4)


def test_adapters_block_and_lm_match_reference():
    params = perturbed_params(SMALL, seed=2)
    flat = fnlm.tree_flatten(params)
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    ref = reference_lm(flat, ids, num_layers=2, num_heads=4)
    c = SMALL
    out = run_transformer_lm(c.vocab_size, c.context_length, c.d_model, c.num_layers, c.num_heads, c.d_ff, c.rope_theta, flat, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    layer = {k[len("layers.1.") :]: v for k, v in flat.items() if k.startswith("layers.1.")}
    x = torch.randn(2, 9, c.d_model)
    out = run_transformer_block(c.d_model, c.num_heads, c.d_ff, c.context_length, c.rope_theta, layer, x)
    torch.testing.assert_close(out, reference_block(layer, x, c.num_heads, c.rope_theta), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "fields, ref_kw",
    [
        (dict(norm="none"), dict(norm=False)),
        (dict(norm_position="post"), dict(post=True)),
        (dict(position="nope"), dict(theta=None)),
        (dict(ffn="silu", d_ff=128), dict(gated=False)),
    ],
)
def test_ablations_selected_by_name_match_reference(fields, ref_kw):
    config = dataclasses.replace(SMALL, **fields)
    params = perturbed_params(config, seed=4)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    ref = reference_lm(fnlm.tree_flatten(params), ids, num_layers=2, num_heads=4, **ref_kw)
    torch.testing.assert_close(fnlm.transformer_lm(params, ids, config), ref, atol=1e-4, rtol=1e-4)


def test_ablations_as_functions_passed_in_equal_the_named_ones():
    params = perturbed_params(SMALL, seed=5)
    ids = torch.randint(0, SMALL.vocab_size, (2, 10))
    post = fnlm.transformer_lm(params, ids, SMALL, block=fnlm.post_norm_block)
    torch.testing.assert_close(post, fnlm.transformer_lm(params, ids, dataclasses.replace(SMALL, norm_position="post")))
    nope = fnlm.transformer_lm(params, ids, SMALL, block=functools.partial(fnlm.transformer_block, attention=fnlm.nope_self_attention))
    torch.testing.assert_close(nope, fnlm.transformer_lm(params, ids, dataclasses.replace(SMALL, position="nope")))
    default = fnlm.transformer_lm(params, ids, SMALL)
    assert torch.equal(fnlm.transformer_lm(params, ids, SMALL, block=fnlm.transformer_block), default)
    assert not torch.allclose(post, default) and not torch.allclose(nope, default)


def test_user_written_parallel_block():
    def parallel_block(params, x, ctx):
        h = fnlm.rmsnorm(params["ln1"], x)
        return x + fnlm.self_attention(params["attn"], h, ctx) + fnlm.swiglu(params["ffn"], h)

    params = perturbed_params(SMALL, seed=6)
    ids = torch.randint(0, SMALL.vocab_size, (2, 9))
    out = fnlm.transformer_lm(params, ids, SMALL, block=parallel_block)
    flat = fnlm.tree_flatten(params)
    x = torch.nn.functional.embedding(ids, flat["token_embeddings.weight"])
    for i in range(2):
        w = {k[len(f"layers.{i}.") :]: v for k, v in flat.items() if k.startswith(f"layers.{i}.")}
        h = torch.nn.functional.rms_norm(x, (32,), w["ln1.weight"], eps=1e-5)
        zero_ffn = {**w, "ffn.w2.weight": torch.zeros_like(w["ffn.w2.weight"])}
        attn_only = reference_block(zero_ffn, h, 4, 10000.0, norm=False) - h
        ffn_only = reference_block({**w, "attn.output_proj.weight": torch.zeros_like(w["attn.output_proj.weight"])}, h, 4, 10000.0, norm=False) - h
        x = x + attn_only + ffn_only
    ref = torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (32,), flat["ln_final.weight"], eps=1e-5), flat["lm_head.weight"])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_custom_init_block_changes_the_tree():
    def init_block(config, *, generator, device, dtype):
        layer = fnlm.init_transformer_block(config, generator=generator, device=device, dtype=dtype)
        del layer["ln2"]
        return layer

    params = fnlm.init_transformer_lm(SMALL, init_block=init_block)
    assert "layers.0.ln2.weight" not in fnlm.tree_flatten(params)


def test_batch_dims_and_short_sequences():
    params = perturbed_params(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (2, 3, 7))
    out = fnlm.transformer_lm(params, ids, SMALL)
    assert out.shape == (2, 3, 7, SMALL.vocab_size)
    torch.testing.assert_close(out[1, 2], fnlm.transformer_lm(params, ids[1, 2], SMALL), atol=1e-5, rtol=1e-5)
    assert fnlm.transformer_lm(params, ids[0, 0, :1], SMALL).shape == (1, SMALL.vocab_size)


def test_positions_default_and_explicit_agree_and_shift_matters():
    params = perturbed_params(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (2, 6))
    default = fnlm.transformer_lm(params, ids, SMALL)
    explicit = fnlm.transformer_lm(params, ids, SMALL, positions=torch.arange(6).expand(2, 6))
    torch.testing.assert_close(explicit, default)
    shifted = fnlm.transformer_lm(params, ids, SMALL, positions=torch.arange(6) + 3)
    assert not torch.allclose(shifted, default)


def test_causality_future_tokens_do_not_change_past_logits():
    params = perturbed_params(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (1, 12))
    other = ids.clone()
    other[0, 8:] = (other[0, 8:] + 1) % SMALL.vocab_size
    a, b = fnlm.transformer_lm(params, ids, SMALL), fnlm.transformer_lm(params, other, SMALL)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_any_length_up_to_context_is_finite_and_batch_consistent(seq, seed):
    params = fnlm.init_transformer_lm(SMALL, seed=0)
    ids = torch.randint(0, SMALL.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    out = fnlm.transformer_lm(params, ids, SMALL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], fnlm.transformer_lm(params, ids[0], SMALL), atol=1e-5, rtol=1e-5)


def test_too_long_and_bad_ids_give_clear_errors():
    params = fnlm.init_transformer_lm(SMALL)
    with pytest.raises(ValueError, match="0 cached \\+ 17 new tokens > 16"):
        fnlm.transformer_lm(params, torch.zeros(1, 17, dtype=torch.long), SMALL)
    with pytest.raises(ValueError, match=r"\[0, 61\).*max 61"):
        fnlm.transformer_lm(params, torch.tensor([[1, 2, 61]]), SMALL)
    with pytest.raises(ValueError, match="min -5"):
        fnlm.transformer_lm(params, torch.tensor([[1, -5]]), SMALL)
    with pytest.raises(ValueError, match="3 layers but config.num_layers=2"):
        fnlm.transformer_lm({**params, "layers": params["layers"] + params["layers"][:1]}, torch.tensor([[1]]), SMALL)
    with pytest.raises(jaxtyping.TypeCheckError, match="token_ids"):
        fnlm.transformer_lm(params, torch.rand(1, 4), SMALL)


def test_gradients_reach_every_parameter():
    params = fnlm.tree_map(lambda t: t.requires_grad_(True), fnlm.init_transformer_lm(SMALL))
    ids = torch.randint(0, SMALL.vocab_size, (2, 8))
    loss = torch.nn.functional.cross_entropy(fnlm.transformer_lm(params, ids, SMALL).flatten(0, 1), ids.flatten())
    grads = torch.autograd.grad(loss, fnlm.tree_leaves(params))
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bf16_autocast_forward_runs():
    params = fnlm.init_transformer_lm(SMALL)
    ids = torch.randint(0, SMALL.vocab_size, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fnlm.transformer_lm(params, ids, SMALL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), fnlm.transformer_lm(params, ids, SMALL), atol=0.15, rtol=0.05)


def test_bf16_params_forward_and_generate():
    params = fnlm.init_transformer_lm(SMALL, seed=0, dtype=torch.bfloat16)
    ids = torch.randint(0, SMALL.vocab_size, (2, 8))
    out = fnlm.transformer_lm(params, ids, SMALL)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = fnlm.transformer_lm(fnlm.tree_map(lambda t: t.float(), params), ids, SMALL)
    torch.testing.assert_close(out.float(), ref, atol=0.2, rtol=0.05)
    assert len(fnlm.generate(params, SMALL, [1, 2], max_new_tokens=4, seed=0)) == 4
