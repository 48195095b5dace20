"""The whole LM against `transformers`' LlamaForCausalLM loaded with the same weights.

Llama is the same architecture (pre-norm RMSNorm, SwiGLU, RoPE, untied head) except that its
RoPE rotates half-split pairs (k, k + d_head/2) where fnlm rotates interleaved pairs (2k, 2k+1).
Permuting the rows of each head of W_q and W_k (even rows first, then odd rows) maps one onto the
other; q·k is unchanged because q and k are permuted alike. Run with `-s` to see the max logit
difference.
"""

from __future__ import annotations

import pytest
import torch

import fnlm


transformers = pytest.importorskip("transformers")


def interleaved_to_half_split(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    d_head = w.shape[0] // num_heads
    order = torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])
    return w.reshape(num_heads, d_head, -1)[:, order].reshape(w.shape)


def llama_from_fnlm(params: dict, config: fnlm.TransformerConfig) -> torch.nn.Module:
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.context_length,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    flat = fnlm.tree_flatten(params)
    h = config.num_heads
    state = {"model.embed_tokens.weight": flat["token_embeddings.weight"], "model.norm.weight": flat["ln_final.weight"], "lm_head.weight": flat["lm_head.weight"]}
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        state |= {
            dst + "self_attn.q_proj.weight": interleaved_to_half_split(flat[src + "attn.q_proj.weight"], h),
            dst + "self_attn.k_proj.weight": interleaved_to_half_split(flat[src + "attn.k_proj.weight"], h),
            dst + "self_attn.v_proj.weight": flat[src + "attn.v_proj.weight"],
            dst + "self_attn.o_proj.weight": flat[src + "attn.output_proj.weight"],
            dst + "mlp.gate_proj.weight": flat[src + "ffn.w1.weight"],
            dst + "mlp.up_proj.weight": flat[src + "ffn.w3.weight"],
            dst + "mlp.down_proj.weight": flat[src + "ffn.w2.weight"],
            dst + "input_layernorm.weight": flat[src + "ln1.weight"],
            dst + "post_attention_layernorm.weight": flat[src + "ln2.weight"],
        }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in name for name in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_logits_match_llama(theta):
    config = fnlm.TransformerConfig(vocab_size=101, context_length=48, d_model=64, num_layers=3, num_heads=4, d_ff=176, rope_theta=theta)
    params = fnlm.init_transformer_lm(config, seed=11)
    g = torch.Generator().manual_seed(12)
    params = fnlm.tree_map_with_path(
        lambda name, t: t + 0.2 * torch.randn(t.shape, generator=g) if "ln" in name else t, params
    )
    model = llama_from_fnlm(params, config)
    ids = torch.randint(0, config.vocab_size, (2, config.context_length), generator=g)
    with torch.no_grad():
        ours = fnlm.transformer_lm(params, ids, config)
        theirs = model(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"\nfnlm vs LlamaForCausalLM (theta={theta}): max |logit diff| = {diff:.3e} (logit scale {theirs.abs().max().item():.1f})")
    assert diff < 1e-4
    # the permutation is what makes them agree: without it RoPE pairs differ
    wrong = fnlm.tree_map(lambda t: t, params)
    for layer in wrong["layers"]:
        for name in ("q_proj", "k_proj"):
            layer["attn"][name] = {"weight": interleaved_to_half_split(layer["attn"][name]["weight"], config.num_heads)}
    with torch.no_grad():
        assert (fnlm.transformer_lm(wrong, ids, config) - theirs).abs().max() > 1e-2
