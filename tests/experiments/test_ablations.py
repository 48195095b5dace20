"""The ablations in experiments/ablations: forward/backward, parameter trees, an independent
plain-torch reference (tests/reference_lm.py) for each, and the properties that define them."""

from __future__ import annotations

import dataclasses

import inspect
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ablations import ABLATIONS, BASELINE, NO_RMSNORM, NOPE, POST_NORM, QK_NORM, SILU_FFN, qk_norm
from ablations.runner import train_variant

import fnlm
from fnlm.train import DivergenceGuard, Parallel, Run
from fnlm.tree import tree_flatten, tree_map
from tests.reference_lm import reference_lm

CFG = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=96)
IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))


def _build(ab, config=CFG, seed=0):
    config = ab.config_for(config)
    return config, ab.init_fn(config, seed=seed)


def _perturbed(params, seed=3):
    """Random norm gains, so that tests see whether each gain is used where it should be."""
    g = torch.Generator().manual_seed(seed)
    return fnlm.tree_map_with_path(
        lambda path, t: t + 0.3 * torch.randn(t.shape, generator=g) if "norm" in path or ".ln" in f".{path}" else t, params
    )


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_forward_and_backward(name):
    ab = ABLATIONS[name]
    config, params = _build(ab)
    logits = ab.model_fn(params, IDS, config)
    assert logits.shape == (*IDS.shape, CFG.vocab_size)
    assert torch.isfinite(logits).all()
    loss, grads = fnlm.value_and_grad(lambda p, x: fnlm.cross_entropy(ab.model_fn(p, x[:, :-1], config), x[:, 1:]))(params, IDS)
    assert math.isfinite(float(loss))
    flat_p, flat_g = tree_flatten(params), tree_flatten(grads)
    assert flat_p.keys() == flat_g.keys()
    for k, g in flat_g.items():
        assert g.shape == flat_p[k].shape and torch.isfinite(g).all(), k
        assert g.abs().sum() > 0, f"{name}: no gradient reaches {k}"


@pytest.mark.parametrize("ab", [NO_RMSNORM, POST_NORM, NOPE, SILU_FFN], ids=lambda a: a.name)
def test_each_assignment_ablation_is_one_config_change(ab):
    config, params = _build(ab)
    assert ab.block is None and ab.init_block is None
    assert ab.model_fn is fnlm.transformer_lm and ab.init_fn is fnlm.init_transformer_lm
    assert config != CFG and set(tree_flatten(params)) == fnlm.param_names(config)
    rebuilt = fnlm.TransformerConfig(**fnlm.checkpoint.config_to_data(config)[0])
    torch.testing.assert_close(fnlm.transformer_lm(params, IDS, rebuilt), ab.model_fn(params, IDS, config), rtol=0, atol=0)


@pytest.mark.parametrize(
    "ab, ref",
    [(BASELINE, {}), (NO_RMSNORM, dict(norm=False)), (POST_NORM, dict(post=True)), (NOPE, dict(theta=None)),
     (SILU_FFN, dict(gated=False))],
    ids=lambda v: v.name if hasattr(v, "name") else "",
)
def test_matches_plain_torch_reference(ab, ref):
    config, params = _build(ab)
    params = _perturbed(params)
    want = reference_lm(tree_flatten(params), IDS, num_layers=config.num_layers, num_heads=config.num_heads, **ref)
    torch.testing.assert_close(ab.model_fn(params, IDS, config), want, rtol=1e-4, atol=1e-4)


def test_no_rmsnorm_has_no_gains_and_keeps_the_other_weights():
    _, base = _build(BASELINE)
    config, params = _build(NO_RMSNORM)
    names = set(tree_flatten(params))
    assert not [n for n in names if "ln" in n.split(".")[-2] or "norm" in n]
    want = {k: v for k, v in tree_flatten(base).items() if not k.split(".")[-2].startswith("ln")}
    assert names == set(want)
    for k, v in tree_flatten(params).items():
        assert torch.equal(v, want[k]), k
    assert not torch.allclose(NO_RMSNORM.model_fn(params, IDS, config), BASELINE.model_fn(base, IDS, CFG))


def test_silu_ffn_has_only_w1_w2_and_matches_swiglu_parameter_count():
    config, params = _build(SILU_FFN)
    assert config.d_ff == 4 * CFG.d_model and config.ffn == "silu"
    for layer in params["layers"]:
        assert set(layer["ffn"]) == {"w1", "w2"}
        assert layer["ffn"]["w1"]["weight"].shape == (4 * CFG.d_model, CFG.d_model)
        assert layer["ffn"]["w2"]["weight"].shape == (CFG.d_model, 4 * CFG.d_model)
    for d_model in (512, 768, 1024):
        d_ff = 64 * round(8 * d_model / 3 / 64)
        swiglu = fnlm.tree_size(fnlm.init_swiglu(d_model, d_ff, device="meta"))
        silu = fnlm.tree_size(fnlm.init_silu_ffn(d_model, 4 * d_model, device="meta"))
        assert swiglu == 3 * d_model * d_ff and silu == 8 * d_model**2
        assert abs(silu / swiglu - 1) < 0.02, (d_model, silu, swiglu)
    assert fnlm.tree_size(fnlm.init_silu_ffn(512, 2048, device="meta")) / fnlm.tree_size(fnlm.init_swiglu(512, 1344, device="meta")) == pytest.approx(
        2_097_152 / 2_064_384
    )


def test_post_norm_differs_from_pre_norm_on_the_same_weights():
    config, params = _build(BASELINE)
    assert set(tree_flatten(POST_NORM.init_fn(POST_NORM.config_for(CFG), seed=0))) == set(tree_flatten(params))
    pre, post = BASELINE.model_fn(params, IDS, config), POST_NORM.model_fn(params, IDS, POST_NORM.config_for(CFG))
    assert (pre - post).abs().max() > 1e-2
    layer = params["layers"][0]
    x = 5 * torch.randn(2, 12, CFG.d_model)
    ctx = fnlm.attention_context(num_heads=CFG.num_heads, seq_len=12, d_head=CFG.d_head)
    rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
    torch.testing.assert_close(rms(fnlm.post_norm_block(layer, x, ctx)), torch.ones(2, 12), rtol=1e-3, atol=1e-3)
    assert (rms(fnlm.transformer_block(layer, x, ctx)) - 1).abs().max() > 0.5


def test_nope_has_no_positional_parameters_and_no_rotation(monkeypatch):
    config, params = _build(NOPE)
    _, base = _build(BASELINE)
    assert set(tree_flatten(params)) == set(tree_flatten(base))
    assert not [n for n in tree_flatten(params) if "pos" in n or "rope" in n]

    def boom(*a, **k):
        raise AssertionError("RoPE was used")

    monkeypatch.setattr(fnlm.nn.attention, "rope_rotate_tables", boom)
    NOPE.model_fn(params, IDS, config)
    monkeypatch.setattr(fnlm.nn.attention, "rope_cos_sin", boom)
    NOPE.model_fn(params, IDS, config)
    with pytest.raises(AssertionError, match="RoPE was used"):
        BASELINE.model_fn(base, IDS, CFG)


@settings(max_examples=15, deadline=None)
@given(j=st.integers(0, 11), new=st.integers(0, 60))
def test_nope_is_causal(j, new):
    config, params = _build(NOPE)
    ids = IDS.clone()
    ids[:, j] = (ids[:, j] + 1 + new % 60) % 61
    a, b = NOPE.model_fn(params, IDS, config), NOPE.model_fn(params, ids, config)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=0)
    assert (a[:, j] - b[:, j]).abs().max() > 0


def test_one_layer_nope_sees_the_prefix_as_a_set():
    one = fnlm.TransformerConfig(**{**CFG.__dict__, "num_layers": 1})
    config, params = _build(NOPE, one)
    _, base = _build(BASELINE, one)
    perm = torch.tensor([4, 0, 5, 2, 1, 3, 6, 7, 8, 9, 10, 11])
    shuffled = IDS[:, perm]
    torch.testing.assert_close(NOPE.model_fn(params, shuffled, config)[:, 6], NOPE.model_fn(params, IDS, config)[:, 6])
    assert not torch.allclose(BASELINE.model_fn(base, shuffled, one)[:, 6], BASELINE.model_fn(base, IDS, one)[:, 6])


def test_qk_norm_example_is_short_and_does_what_it_says():
    source = inspect.getsource(qk_norm)
    code = [ln for ln in source.splitlines() if ln.strip() and not ln.startswith(("import", "from", '"""'))]
    assert len(code) <= 20, "\n".join(code)
    config, params = _build(QK_NORM)
    layer = params["layers"][0]["attn"]
    assert layer["q_norm"]["weight"].shape == layer["k_norm"]["weight"].shape == (CFG.d_head,)
    out = QK_NORM.model_fn(params, IDS, config)
    assert not torch.allclose(out, BASELINE.model_fn(params, IDS, config))
    scaled = tree_map(lambda t: t, params)
    for lay in scaled["layers"]:
        lay["attn"]["q_proj"] = {"weight": 10 * lay["attn"]["q_proj"]["weight"]}
        lay["attn"]["k_proj"] = {"weight": 3 * lay["attn"]["k_proj"]["weight"]}
    torch.testing.assert_close(QK_NORM.model_fn(scaled, IDS, config), out, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(BASELINE.model_fn(scaled, IDS, config), BASELINE.model_fn(params, IDS, config), atol=1e-3)


def _run_with(record):
    run = Run(CFG, fnlm.TrainConfig(), Path("."), torch.device("cpu"), Parallel(), 10, 1, 16, lambda *a: None, None,
              False, {})
    run.record = record
    return run


def test_divergence_guard():
    guard = DivergenceGuard(vocab_size=100)
    state = fnlm.TrainState({}, {}, 1)
    for record in ({"train_loss": 4.0}, {"train_loss": 2.5, "val_loss": 2.6}, {"train_loss": 4.9}, {}):
        run = _run_with(record)
        guard.step(run, state, {})
        assert run.stop_reason is None, record
    for record, why in [({"train_loss": float("nan")}, "nan"), ({"val_loss": float("inf")}, "inf"),
                        ({"train_loss": 5.1}, "x best"), ({"train_loss": math.log(100) + 1.01}, "log")]:
        run = _run_with(record)
        guard.step(run, state, {})
        assert run.stop_reason is not None and why in run.stop_reason, (record, run.stop_reason)


def test_train_variant_stops_a_divergent_run_early(tmp_path):
    config = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    tokens = torch.randint(0, 61, (4000,), generator=torch.Generator().manual_seed(0)).numpy()
    tc = fnlm.TrainConfig(batch_size=4, steps=60, eval_interval=20, eval_batches=2, log_interval=1, progress=False, plot=False, device="cpu", step=dict(lr=30.0, min_lr=30.0, warmup_steps=0, grad_clip=0.0))
    bad = train_variant(NO_RMSNORM, config, tc, tokens, tokens, tmp_path / "bad")
    assert bad.diverged and bad.diverged_at < 60 and bad.reason
    ok = train_variant(BASELINE, config, dataclasses.replace(tc, steps=5).with_step(lr=1e-3, min_lr=1e-4),
                       tokens, tokens, tmp_path / "ok")
    assert not ok.diverged and ok.steps == 5 and math.isfinite(ok.last("val_loss"))
    assert not (tmp_path / "ok" / "checkpoints").exists() and (tmp_path / "ok" / "metrics.jsonl").exists()
