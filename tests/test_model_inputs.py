"""Bad input to `transformer_lm`, `embedding` and `generate` gives a `TypeError`/`ValueError` that
names the argument and the expected against the given, with shape checks off as well as on.

These checks read only types, dtypes, shapes and the params' structure, so they are always on
(not only under `FNLM_TYPECHECK`). Each case runs twice: here, where the suite's jaxtyping +
beartype wrappers may answer first for a wrong type, and in one fresh process without them,
where fnlm's own message must say what is wrong."""

from __future__ import annotations

import dataclasses
import functools
import re
import textwrap

import pytest
import torch

import fnlm

CONFIG = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def _params():
    return fnlm.init_transformer_lm(CONFIG, seed=0)


def _without(path: str):
    params = _params()
    node = params
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    del node[last]
    return params


def _wrong_head():
    params = _params()
    params["lm_head"]["weight"] = params["lm_head"]["weight"][:-3]
    return params


def _parallel_block(p, x, ctx):
    h = fnlm.rmsnorm(p["ln1"], x)
    return x + fnlm.self_attention(p["attn"], h, ctx) + fnlm.swiglu(p["ffn"], h)


IDS = torch.tensor([[1, 2, 3]])

# name -> (call, exception type, pattern of fnlm's own message, pattern that either message matches)
CASES = {
    "lm_float_ids": (lambda: fnlm.transformer_lm(_params(), IDS.float(), CONFIG), TypeError,
                     r"token_ids must hold integer ids .*got dtype torch\.float32", "token_ids"),
    "lm_bool_ids": (lambda: fnlm.transformer_lm(_params(), IDS > 1, CONFIG), TypeError,
                    r"token_ids must hold integer ids .*got dtype torch\.bool", "token_ids"),
    "lm_list_ids": (lambda: fnlm.transformer_lm(_params(), [1, 2, 3], CONFIG), TypeError,
                    r"token_ids must be a torch\.Tensor .*got list; wrap it: torch\.tensor", "token_ids"),
    "lm_empty_sequence": (lambda: fnlm.transformer_lm(_params(), torch.zeros(2, 0, dtype=torch.long), CONFIG), ValueError,
                          r"token_ids must have shape \(\.\.\., seq\) with at least one token, got shape \(2, 0\)", "token_ids"),
    "lm_head_rows": (lambda: fnlm.transformer_lm(_wrong_head(), IDS, CONFIG), ValueError,
                     r"'lm_head\.weight' has shape \(58, 32\).*expects \(vocab_size, d_model\) = \(61, 32\)", r"lm_head\.weight"),
    "config_d_model": (lambda: fnlm.transformer_lm(_params(), IDS, dataclasses.replace(CONFIG, d_model=64, num_heads=8)), ValueError,
                       r"'token_embeddings\.weight' has shape \(61, 32\).*d_model=64.*= \(61, 64\)", "token_embeddings"),
    "config_layers": (lambda: fnlm.transformer_lm(_params(), IDS, dataclasses.replace(CONFIG, num_layers=3)), ValueError,
                      r"params have 2 layers but config\.num_layers=3", "num_layers=3"),
    "config_heads_vs_cache": (
        lambda: fnlm.transformer_lm(_params(), IDS, CONFIG, kv_cache=fnlm.init_kv_cache(dataclasses.replace(CONFIG, num_heads=8))),
        ValueError, r"kv_cache holds 2 layers of \(heads, max_len, d_head\) = \(8, 16, 4\).*num_heads=4, d_head=8", "num_heads=4"),
    "missing_q_proj": (lambda: fnlm.transformer_lm(_without("layers.1.attn.q_proj"), IDS, CONFIG), ValueError,
                       r"params is missing 'layers\.1\.attn\.q_proj\.weight' \(no 'q_proj' under layers\.1\.attn\)", "q_proj"),
    "missing_q_proj_custom_block": (
        lambda: fnlm.transformer_lm(_without("layers.0.attn.q_proj"), IDS, CONFIG, block=_parallel_block), ValueError,
        r"params is missing 'layers\.0\.attn\.q_proj\.weight': the block of layer 0 read it", "q_proj"),
    "embedding_float_ids": (lambda: fnlm.embedding(fnlm.init_embedding(10, 4), torch.rand(3)), TypeError,
                            r"token_ids must be an integer tensor .*got dtype torch\.float32", "token_ids"),
    "embedding_bool_ids": (lambda: fnlm.embedding(fnlm.init_embedding(10, 4), torch.ones(3, dtype=torch.bool)), TypeError,
                           r"token_ids must be an integer tensor .*got dtype torch\.bool", "token_ids"),
    "embedding_list_ids": (lambda: fnlm.embedding(fnlm.init_embedding(10, 4), [1, 2]), TypeError,
                           r"token_ids must be an integer tensor, got list", "token_ids"),
    "generate_float_ids": (lambda: fnlm.generate(_params(), CONFIG, [1, 2.5], max_new_tokens=2), TypeError,
                           r"prompt_ids must be ints, got 2\.5 \(float\) at index 1", "prompt_ids"),
    "generate_bool_tensor": (lambda: fnlm.generate(_params(), CONFIG, torch.ones(3, dtype=torch.bool), max_new_tokens=2), TypeError,
                             r"prompt_ids must hold integer ids, got a tensor of dtype torch\.bool", "prompt_ids"),
    "generate_empty": (lambda: fnlm.generate(_params(), CONFIG, [], max_new_tokens=2), ValueError,
                       r"prompt_ids is empty", "prompt_ids"),
    "generate_missing_q_proj": (lambda: fnlm.generate(_without("layers.0.attn.q_proj"), CONFIG, [1, 2], max_new_tokens=2), ValueError,
                                r"params is missing 'layers\.0\.attn\.q_proj\.weight'", "q_proj"),
    "generate_head_rows": (lambda: fnlm.generate(_wrong_head(), CONFIG, [1, 2], max_new_tokens=2), ValueError,
                           r"'lm_head\.weight' has shape \(58, 32\)", r"lm_head\.weight"),
}


def collect() -> dict[str, list[str]]:
    """Run every case and return `{name: [exception type, message]}` (the fresh process calls it)."""
    out = {}
    for name, (call, *_) in CASES.items():
        try:
            call()
        except Exception as error:  # noqa: BLE001  (recording what each case raises)
            out[name] = [type(error).__name__, str(error)]
        else:
            out[name] = ["none", ""]
    return out


@functools.lru_cache(maxsize=1)
def _unchecked() -> dict[str, list[str]]:
    from tests.fresh_process import run_python

    return run_python(textwrap.dedent("""
        import json, fnlm
        assert not fnlm.typecheck_enabled()
        from tests.test_model_inputs import collect
        print("RESULT " + json.dumps(collect()))
    """))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_naming_it(name):
    call, kind, _, either = CASES[name]
    with pytest.raises(kind, match=either):
        call()


@pytest.mark.parametrize("name", list(CASES))
def test_fnlms_own_message_without_typecheck(name):
    _, kind, own, _ = CASES[name]
    got_kind, message = _unchecked()[name]
    assert got_kind == kind.__name__, (got_kind, message)
    assert re.search(own, message), message


def test_the_checks_do_not_reject_good_input_or_stacked_trees():
    params = _params()
    fnlm.check_params(params, CONFIG)
    extra = {**params, "notes": {"w": torch.zeros(1)}}
    assert fnlm.transformer_lm(extra, IDS, CONFIG).shape == (1, 3, 61)
    assert fnlm.transformer_lm(params, torch.tensor([5], dtype=torch.int32), CONFIG).shape == (1, 61)
    assert len(fnlm.generate(params, CONFIG, torch.tensor([1, 2]), max_new_tokens=2, seed=0)) == 2
