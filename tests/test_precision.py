"""Mixed precision as a policy (`fnlm.precision`): float32 params, gradients and optimizer state
around a bfloat16 forward and backward; the layers that must reduce in float32 do; the float32
policy changes nothing, bit for bit.

Tolerances. bfloat16 keeps 8 significant bits: one rounding has relative error up to
u = 2**-8 ≈ 3.9e-3. The loss is a mean over every token of `logsumexp(logits) - logit`, so the
rounding errors of its terms mostly cancel: measured |Δloss|/loss ≤ 3e-4 on these models, and
the bound used is u. A gradient has been through a few roundings on the way forward and back:
measured ≤ 1.05 % relative (l2 over the whole tree) and ≤ 1.8 % for the worst single tensor, and
the bounds used are 4u ≈ 1.6 % and 8u ≈ 3.1 %."""

from __future__ import annotations

import textwrap
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fnlm
from fnlm.precision import PRECISIONS, Policy, get_policy, lm_loss_fn_with, with_policy
from fnlm.train.evaluation import lm_loss_fn
from tests.fresh_process import run_python

U = 2.0**-8
BF16 = Policy(compute_dtype=torch.bfloat16)
CONFIG = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
WIDER = fnlm.TransformerConfig(vocab_size=1000, context_length=64, d_model=128, num_layers=4, num_heads=4, d_ff=384)


def batch(config=CONFIG, shape=(4, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config.vocab_size, shape, generator=g),
            torch.randint(0, config.vocab_size, shape, generator=g))


def plain_loss(config):
    def loss(p, x, y):
        return fnlm.cross_entropy(fnlm.transformer_lm(p, x, config), y)
    return loss


def relative_error(a, b):
    num = sum(float((u - v).double().square().sum()) for u, v in zip(fnlm.tree_leaves(a), fnlm.tree_leaves(b)))
    return (num / sum(float(v.double().square().sum()) for v in fnlm.tree_leaves(b))) ** 0.5


def worst_leaf_error(a, b):
    return max(float((u - v).norm() / v.norm()) for u, v in zip(fnlm.tree_leaves(a), fnlm.tree_leaves(b)))


def bitwise_equal(a, b):
    pairs = list(zip(fnlm.tree_leaves(a), fnlm.tree_leaves(b), strict=True))
    return all(torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in pairs)


def test_get_policy_reads_short_names_and_jmps_form():
    assert get_policy("fp32") == Policy()
    assert get_policy("bf16") == Policy(torch.float32, torch.bfloat16, torch.float32)
    assert get_policy("params=float32,compute=bfloat16,output=float32") == BF16
    assert get_policy("p=f32,c=bf16,o=bf16") == Policy(torch.float32, torch.bfloat16, torch.bfloat16)
    assert get_policy("compute=bf16") == BF16


@pytest.mark.parametrize("name, error, match", [
    ("fp8", ValueError, "cannot read 'fp8'"),
    ("compute=int8", ValueError, "cannot read 'compute=int8'"),
    ("", ValueError, "empty"),
    ("compute=float16", ValueError, "loss scaling"),
    (3, TypeError, "str"),  # beartype says so first when FNLM_TYPECHECK is on
])
def test_get_policy_refuses_what_it_cannot_read(name, error, match):
    with pytest.raises(error, match=match):
        get_policy(name)


def test_policy_fields_must_be_floating_dtypes():
    with pytest.raises(TypeError, match="compute_dtype must be a floating torch.dtype, got torch.int32"):
        Policy(compute_dtype=torch.int32)
    with pytest.raises(TypeError, match="param_dtype.*'float32'"):
        Policy(param_dtype="float32")


class Pair(NamedTuple):
    weights: torch.Tensor
    ids: torch.Tensor


def test_casts_touch_only_floating_tensors_and_keep_every_container_type():
    w, ids, half = torch.randn(3), torch.arange(3), torch.randn(2, dtype=torch.bfloat16)
    tree = {"a": [w, (ids, 2.5)], "b": Pair(w, ids), "c": half, "d": None}
    out = BF16.cast_to_compute(tree)
    assert isinstance(out["a"], list) and isinstance(out["a"][1], tuple) and isinstance(out["b"], Pair)
    assert out["a"][0].dtype == torch.bfloat16 and out["b"].weights.dtype == torch.bfloat16
    assert out["a"][1][0] is ids and out["b"].ids is ids and out["a"][1][1] == 2.5 and out["d"] is None
    assert out["c"] is half, "a leaf already in the compute dtype is not copied"
    assert torch.equal(out["a"][0], w.to(torch.bfloat16))
    back = BF16.cast_to_param(out)
    assert back["c"].dtype == torch.float32 and back["a"][0].dtype == torch.float32
    assert Policy().cast_to_compute(tree)["a"][0] is w


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_the_float32_policy_is_bitwise_the_plain_loss_and_gradients(backend):
    params = fnlm.init_transformer_lm(CONFIG, seed=1)
    x, y = batch(seed=2)
    reference = fnlm.value_and_grad(plain_loss(CONFIG), backend=backend)(params, x, y)
    for loss_fn in (with_policy(plain_loss(CONFIG), Policy()), lm_loss_fn_with(fnlm.transformer_lm, CONFIG, "fp32"),
                    lm_loss_fn_with(fnlm.transformer_lm, CONFIG, "auto", device_type="cpu")):
        loss, grads = fnlm.value_and_grad(loss_fn, backend=backend)(params, x, y)
        assert torch.equal(loss, reference[0]) and bitwise_equal(grads, reference[1])


def test_the_float32_policy_leaves_training_steps_bitwise_unchanged():
    params = fnlm.init_transformer_lm(CONFIG, seed=3)
    config = fnlm.StepConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, cosine_steps=4)
    plain, policed = fnlm.init_train_state(params), fnlm.init_train_state(params)
    for step in range(4):
        x, y = batch(seed=10 + step)
        plain, _ = fnlm.train_step(plain, x, y, loss_fn=lm_loss_fn(fnlm.transformer_lm, CONFIG), config=config)
        policed, _ = fnlm.train_step(policed, x, y, loss_fn=lm_loss_fn_with(fnlm.transformer_lm, CONFIG, "fp32"),
                                     config=config)
    assert bitwise_equal(policed.params, plain.params) and bitwise_equal(policed.opt_state, plain.opt_state)


@pytest.mark.parametrize("config", [CONFIG, WIDER], ids=["tiny", "d128-4-layers"])
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_bf16_compute_gives_a_float32_loss_and_float32_gradients_close_to_the_float32_ones(config, backend):
    params = fnlm.init_transformer_lm(config, seed=4)
    x, y = batch(config, (4, config.context_length), seed=5)
    loss32, grads32 = fnlm.value_and_grad(plain_loss(config), backend=backend)(params, x, y)
    loss16, grads16 = fnlm.value_and_grad(with_policy(plain_loss(config), BF16), backend=backend)(params, x, y)
    assert loss16.dtype == torch.float32 and loss16.shape == ()
    assert {t.dtype for t in fnlm.tree_leaves(grads16)} == {torch.float32}
    assert fnlm.tree_flatten(grads16).keys() == fnlm.tree_flatten(params).keys()
    assert abs(float(loss16 - loss32)) < U * float(loss32)
    assert 0 < relative_error(grads16, grads32) < 4 * U
    assert worst_leaf_error(grads16, grads32) < 8 * U


def test_bf16_training_keeps_params_and_adam_state_float32_and_tracks_float32_training():
    params = fnlm.init_transformer_lm(CONFIG, seed=6)
    config = fnlm.StepConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, cosine_steps=6)
    x, y = batch(seed=7)
    runs = {}
    for precision in ("fp32", "bf16"):
        state = fnlm.init_train_state(fnlm.tree_map(torch.clone, params))  # donate=True updates it in place
        loss_fn = lm_loss_fn_with(fnlm.transformer_lm, CONFIG, precision)
        losses = []
        for _ in range(6):
            state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config, donate=True)
            losses.append(float(metrics["loss"]))
            assert metrics["loss"].dtype == torch.float32 and metrics["grad_norm"].dtype == torch.float32
        runs[precision] = state, losses
    state, losses = runs["bf16"]
    assert {t.dtype for t in fnlm.tree_leaves(state.params)} == {torch.float32}
    moments = [t for t in fnlm.tree_leaves(state.opt_state) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert losses[-1] < losses[0] - 0.5, losses
    assert max(abs(a - b) for a, b in zip(losses, runs["fp32"][1])) < 4 * U * losses[0]


class OpDtypes(TorchDispatchMode):
    """Records `{aten op name: set of its floating input dtypes}` for the ops that run inside."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        dtypes = {a.dtype for a in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(a, torch.Tensor) and a.is_floating_point()}
        self.seen.setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


def test_norms_softmax_and_cross_entropy_reduce_in_float32_while_the_matmuls_run_in_bf16():
    params = fnlm.init_transformer_lm(CONFIG, seed=8)
    x, y = batch(seed=9)
    with OpDtypes() as ops:
        loss, _ = fnlm.value_and_grad(with_policy(plain_loss(CONFIG), BF16))(params, x, y)
    seen = ops.seen
    assert loss.dtype == torch.float32
    for name in ("_softmax", "_log_softmax", "rsqrt", "_softmax_backward_data", "_log_softmax_backward_data"):
        assert seen.get(name) == {torch.float32}, (name, seen.get(name))
    matmuls = seen.get("bmm", set()) | seen.get("mm", set())
    assert torch.bfloat16 in matmuls and torch.float32 not in matmuls, matmuls


def test_each_upcasting_layer_equals_its_float32_computation_rounded_once():
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(4, 8, 32, generator=g) * 3).to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(32, generator=g)).to(torch.bfloat16)
    norm = fnlm.rmsnorm({"weight": weight}, x)
    assert norm.dtype == torch.bfloat16
    assert torch.equal(norm, fnlm.rmsnorm({"weight": weight.float()}, x.float()).to(torch.bfloat16))
    naive = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight  # all in bf16
    assert not torch.equal(norm, naive), "the bf16 computation rounds differently: the check can fail"
    probs = fnlm.softmax(x, dim=-1)
    assert probs.dtype == torch.bfloat16
    assert torch.equal(probs, fnlm.softmax(x.float(), dim=-1).to(torch.bfloat16))
    targets = torch.randint(0, 32, (4, 8), generator=g)
    loss = fnlm.cross_entropy(x, targets)
    assert loss.dtype == torch.float32 and torch.equal(loss, fnlm.cross_entropy(x.float(), targets))
    reference = torch.nn.functional.cross_entropy(x.float().reshape(-1, 32), targets.reshape(-1))
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


def test_with_policy_refuses_params_in_another_dtype_naming_the_parameter():
    params = fnlm.init_transformer_lm(CONFIG, seed=11)
    params["layers"][1]["ffn"]["w2"]["weight"] = params["layers"][1]["ffn"]["w2"]["weight"].double()
    with pytest.raises(TypeError, match=r"'layers\.1\.ffn\.w2\.weight' is torch.float64.*param_dtype is torch.float32"):
        with_policy(plain_loss(CONFIG), BF16)(params, *batch())
    with pytest.raises(TypeError, match="Policy"):  # beartype says it first when FNLM_TYPECHECK is on
        with_policy(plain_loss(CONFIG), "bf16")


def test_a_bf16_param_policy_gives_bf16_gradients():
    policy = get_policy("params=bfloat16,compute=bfloat16,output=float32")
    params = policy.cast_to_param(fnlm.init_transformer_lm(CONFIG, seed=12))
    loss, grads = fnlm.value_and_grad(with_policy(plain_loss(CONFIG), policy))(params, *batch(seed=13))
    assert loss.dtype == torch.float32 and {t.dtype for t in fnlm.tree_leaves(grads)} == {torch.bfloat16}


def test_precision_names():
    params = fnlm.init_transformer_lm(CONFIG, seed=14)
    x, y = batch(seed=15)
    loss32 = lm_loss_fn_with(fnlm.transformer_lm, CONFIG, "fp32")(params, x, y)
    for precision in ("bf16", "autocast", BF16):
        loss = lm_loss_fn_with(fnlm.transformer_lm, CONFIG, precision, device_type="cpu")(params, x, y)
        assert loss.dtype == torch.float32 and 0 < abs(float(loss - loss32)) < U * float(loss32), precision
    assert PRECISIONS == ("auto", "fp32", "bf16", "autocast")
    with pytest.raises(ValueError, match="precision must be one of .* got 'fp16'"):
        lm_loss_fn_with(fnlm.transformer_lm, CONFIG, "fp16")


def test_bf16_policy_composes_with_remat_and_vmap_over_stacked_models():
    models = [fnlm.init_transformer_lm(CONFIG, seed=s) for s in (16, 17)]
    x, y = batch(seed=18)

    def loss(config_kwargs):
        return with_policy(lambda p, x, y: fnlm.cross_entropy(fnlm.transformer_lm(p, x, CONFIG, **config_kwargs), y), BF16)

    _, plain = fnlm.value_and_grad(loss({}))(models[0], x, y)
    _, rematted = fnlm.value_and_grad(loss({"remat": True}))(models[0], x, y)
    assert relative_error(rematted, plain) < 1e-6
    def vmapped(config_kwargs):
        return torch.func.vmap(torch.func.grad(loss(config_kwargs)), in_dims=(0, None, None))(fnlm.tree_stack(models), x, y)

    rematted, plain = vmapped({"remat": True}), vmapped({})
    assert {t.dtype for t in fnlm.tree_leaves(rematted)} == {torch.float32}
    assert relative_error(rematted, plain) < 1e-6
    loop = fnlm.tree_stack([torch.func.grad(loss({}))(m, x, y) for m in models])
    assert relative_error(rematted, loop) < U / 4  # batched bf16 matmuls round a few entries differently (1e-4)


@pytest.mark.slow
def test_the_bf16_policy_compiles_whole_to_one_graph_with_eager_results():
    r = run_python(textwrap.dedent("""
    import json, torch
    from torch._dynamo.testing import CompileCounterWithBackend
    import fnlm
    from fnlm.precision import get_policy, with_policy
    torch.set_num_threads(1)
    config = fnlm.TransformerConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    params = fnlm.init_transformer_lm(config, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 61, (2, 16), generator=g), torch.randint(0, 61, (2, 16), generator=g)
    loss_fn = with_policy(lambda p, x, y: fnlm.cross_entropy(fnlm.transformer_lm(p, x, config), y), get_policy("bf16"))
    loss_e, grads_e = fnlm.value_and_grad(loss_fn)(params, x, y)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fnlm.value_and_grad(loss_fn, backend="func"), fullgraph=True, backend=counter)
    loss_c, grads_c = compiled(params, x, y)
    num = sum(float((a - b).square().sum()) for a, b in zip(fnlm.tree_leaves(grads_c), fnlm.tree_leaves(grads_e)))
    den = sum(float(b.square().sum()) for b in fnlm.tree_leaves(grads_e))
    print("RESULT " + json.dumps({"frames": counter.frame_count, "loss_dtype": str(loss_c.dtype),
        "grad_dtypes": sorted({str(t.dtype) for t in fnlm.tree_leaves(grads_c)}),
        "loss_diff": abs(float(loss_c - loss_e)), "grad_rel": (num / den) ** 0.5}))
    """))
    assert r["frames"] == 1 and r["loss_dtype"] == "torch.float32" and r["grad_dtypes"] == ["torch.float32"]
    assert r["loss_diff"] < 1e-5 and r["grad_rel"] < 1e-2, r
