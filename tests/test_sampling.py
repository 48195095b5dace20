"""Decoding: the KV cache agrees with recomputation, and sampling follows the definitions of
temperature and top-p (property tests and fixed-seed frequency tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm


CONFIG = fnlm.TransformerConfig(vocab_size=37, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)


@pytest.fixture(scope="module")
def params():
    p = fnlm.init_transformer_lm(CONFIG, seed=1)
    p["lm_head"]["weight"] = p["lm_head"]["weight"] * 8  # sharper logits: greedy paths are not one repeated token
    return p


def greedy_by_recomputation(params, prompt, n):
    """Independent of generate(): run the full (windowed) prefix through transformer_lm each step."""
    ids = list(prompt)
    for _ in range(n):
        window = torch.tensor(ids[-CONFIG.context_length :])
        ids.append(int(fnlm.transformer_lm(params, window, CONFIG)[-1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("prompt_len, n", [(1, 8), (5, 20), (20, 5)])
def test_kv_cache_greedy_equals_recomputation(params, prompt_len, n):
    prompt = torch.randint(0, CONFIG.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    cached = fnlm.generate(params, CONFIG, prompt, max_new_tokens=n, temperature=0.0)
    uncached = fnlm.generate(params, CONFIG, prompt, max_new_tokens=n, temperature=0.0, use_cache=False)
    assert cached == uncached == greedy_by_recomputation(params, prompt, n)
    assert len(cached) == n and len(set(cached)) > 1


def test_cached_logits_equal_full_forward_logits(params):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 14))
    full = fnlm.transformer_lm(params, ids, CONFIG)
    cache = fnlm.init_kv_cache(CONFIG, batch_shape=(2,))
    with torch.no_grad():
        pieces = [fnlm.transformer_lm(params, ids[:, :5], CONFIG, kv_cache=cache)]
        pieces += [fnlm.transformer_lm(params, ids[:, 5:8], CONFIG, kv_cache=cache)]
        pieces += [fnlm.transformer_lm(params, ids[:, t : t + 1], CONFIG, kv_cache=cache) for t in range(8, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_an_error():
    params = fnlm.init_transformer_lm(CONFIG)
    cache = fnlm.init_kv_cache(CONFIG)
    fnlm.transformer_lm(params, torch.zeros(15, dtype=torch.long), CONFIG, kv_cache=cache)
    with pytest.raises(ValueError, match="15 cached \\+ 2 new tokens > 16"):
        fnlm.transformer_lm(params, torch.zeros(2, dtype=torch.long), CONFIG, kv_cache=cache)


def test_generate_works_with_ablations_and_custom_blocks():
    config = fnlm.TransformerConfig(37, 12, 32, 2, 4, 128, norm_position="post", position="nope", ffn="silu")
    params = fnlm.init_transformer_lm(config, seed=2)
    a = fnlm.generate(params, config, [1, 2, 3], max_new_tokens=15, temperature=0)
    b = fnlm.generate(params, config, [1, 2, 3], max_new_tokens=15, temperature=0, use_cache=False)
    assert a == b

    def parallel_block(p, x, ctx):
        h = fnlm.rmsnorm(p["ln1"], x)
        return x + fnlm.self_attention(p["attn"], h, ctx) + fnlm.swiglu(p["ffn"], h)

    p2 = fnlm.init_transformer_lm(CONFIG, seed=3)
    a = fnlm.generate(p2, CONFIG, [4, 5], max_new_tokens=20, temperature=0, block=parallel_block)
    b = fnlm.generate(p2, CONFIG, [4, 5], max_new_tokens=20, temperature=0, block=parallel_block, use_cache=False)
    assert a == b


def test_eos_stops_generation_and_is_not_returned(params):
    prompt = [3, 1, 4]
    full = fnlm.generate(params, CONFIG, prompt, max_new_tokens=12, temperature=0)
    eos = full[4]
    cut = full.index(eos)
    assert fnlm.generate(params, CONFIG, prompt, max_new_tokens=12, temperature=0, eos_id=eos) == full[:cut]


def test_seeded_sampling_is_reproducible(params):
    kw = dict(max_new_tokens=25, temperature=1.0, top_p=0.9)
    a = fnlm.generate(params, CONFIG, [1, 2], seed=5, **kw)
    assert a == fnlm.generate(params, CONFIG, [1, 2], seed=5, **kw)
    assert a == fnlm.generate(params, CONFIG, [1, 2], seed=5, use_cache=False, **kw)
    assert any(fnlm.generate(params, CONFIG, [1, 2], seed=s, **kw) != a for s in (6, 7, 8))
    assert fnlm.generate(params, CONFIG, torch.tensor([1, 2]), seed=5, **kw) == a


def test_generate_input_checks(params):
    with pytest.raises(ValueError, match="empty"):
        fnlm.generate(params, CONFIG, [], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"\[0, 37\).*\[40\]"):
        fnlm.generate(params, CONFIG, [1, 40], max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature.*-1"):
        fnlm.generate(params, CONFIG, [1], max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p.*1.5"):
        fnlm.generate(params, CONFIG, [1], max_new_tokens=3, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens.*-2"):
        fnlm.generate(params, CONFIG, [1], max_new_tokens=-2)
    assert fnlm.generate(params, CONFIG, [1], max_new_tokens=0) == []


# --- sampling properties -------------------------------------------------------------------

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_most_likely_set_covering_p(row, p):
    probs = torch.softmax(torch.tensor(row, dtype=torch.float32), -1)
    keep = fnlm.top_p_mask(probs, p)
    kept, dropped = probs[keep], probs[~keep]
    assert keep.any()
    assert kept.sum() >= p - 1e-5  # covers p
    assert kept.sum() - kept.min() < p + 1e-5  # minimal: without its least likely token it would not
    if dropped.numel():
        assert kept.min() >= dropped.max()  # most likely first


@settings(max_examples=30, deadline=None)
@given(logit_rows, st.floats(0.05, 0.99), st.floats(0.3, 3.0), st.integers(0, 2**31 - 1))
def test_sampling_never_leaves_the_nucleus(row, p, temperature, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    nucleus = fnlm.top_p_mask(torch.softmax(logits / temperature, -1), p)
    draws = fnlm.sample_next_token(
        logits.expand(200, -1), temperature=temperature, top_p=p, generator=torch.Generator().manual_seed(seed)
    )
    assert nucleus[draws].all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=30, unique=True), st.integers(0, 2**31 - 1))
def test_temperature_to_zero_is_argmax(row, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    top2 = logits.topk(2).values
    best = int(logits.argmax())
    assert int(fnlm.sample_next_token(logits, temperature=0.0)) == best
    if top2[0] - top2[1] > 0.05:  # at T = 1e-3 the runner-up has probability < exp(-50)
        g = torch.Generator().manual_seed(seed)
        assert (fnlm.sample_next_token(logits.expand(50, -1), temperature=1e-3, generator=g) == best).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_frequencies_match_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
    n = 40_000
    draws = fnlm.sample_next_token(logits.expand(n, -1), temperature=temperature, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    expected = torch.softmax(logits.double() / temperature, -1)
    # the standard error of each frequency is at most 0.0025; allow 6 of them
    assert (freq - expected).abs().max() < 0.015, (freq, expected)


def test_top_p_frequencies_are_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    n = 40_000
    draws = fnlm.sample_next_token(logits.expand(n, -1), top_p=0.8, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.tensor([0.4, 0.3, 0.15, 0.0, 0.0], dtype=torch.float64) / 0.85
    assert (freq - expected).abs().max() < 0.015, freq
    assert fnlm.top_p_mask(torch.tensor([0.5, 0.2, 0.3]), 0.7).tolist() == [True, False, True]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature, use_cache", [(0, True), (0, False), (0.8, True)])
def test_non_finite_logits_are_an_error_not_token_zero(params, bad, temperature, use_cache):
    """Before: with NaN weights greedy decoding returned [0, 0, ...] (argmax of all-NaN logits)."""
    broken = fnlm.tree_map(lambda t: t.clone(), params)
    broken["lm_head"]["weight"][5, 0] = bad
    broken["layers"][1]["ffn"]["w2"]["weight"].fill_(bad)
    with pytest.raises(ValueError, match=r"logits for new token 0 hold \d+ non-finite values \((inf|nan)(, nan)?\) of 37"):
        fnlm.generate(broken, CONFIG, [1, 2, 3], max_new_tokens=4, temperature=temperature, seed=0, use_cache=use_cache)


def test_logits_that_turn_non_finite_later_name_the_step(params):
    """A prompt token whose embedding is NaN poisons only the steps that read it."""
    broken = fnlm.tree_map(lambda t: t.clone(), params)
    first = fnlm.generate(params, CONFIG, [1, 2], max_new_tokens=3, temperature=0)
    broken["token_embeddings"]["weight"][first[1]] = float("nan")
    with pytest.raises(ValueError, match=r"logits for new token 2 hold"):
        fnlm.generate(broken, CONFIG, [1, 2], max_new_tokens=3, temperature=0)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, True, "0"])
def test_a_seed_torch_cannot_take_is_a_value_error(params, seed):
    """Before: `manual_seed` failed with a RuntimeError (overflow) or TypeError from inside torch."""
    with pytest.raises((ValueError, TypeError), match="seed"):
        fnlm.generate(params, CONFIG, [1], max_new_tokens=1, seed=seed)
    assert fnlm.generate(params, CONFIG, [1], max_new_tokens=2, temperature=0, seed=2**64 - 1) == \
        fnlm.generate(params, CONFIG, [1], max_new_tokens=2, temperature=0, seed=0)
