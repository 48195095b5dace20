"""Checkpoint round trips (params, optimizer state, RNG), atomic writes, and load-time errors."""

from __future__ import annotations

import dataclasses
import io
import os
import random

import numpy as np
import pytest
import torch

import fnlm
from fnlm import checkpoint as ckpt_mod
from tests.adapters import get_adamw_cls, run_load_checkpoint, run_save_checkpoint


@dataclasses.dataclass(frozen=True)
class _Config:
    vocab_size: int = 32
    d_model: int = 8
    rope_theta: float = 10000.0
    name: str = "tiny"


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "token_embeddings": {"weight": torch.randn(32, 8, generator=g)},
        "layers": [{"ln1": {"weight": torch.ones(8)}, "ffn": {"w1": {"weight": torch.randn(16, 8, generator=g)}}}],
        "lm_head": {"weight": torch.randn(32, 8, generator=g, dtype=torch.bfloat16)},
    }


def _trained_state():
    params = _params()
    state = fnlm.adamw_init(params)
    for i in range(3):
        grads = fnlm.tree_map(lambda t: torch.randn_like(t), params)
        params, state = fnlm.adamw_step(params, state, grads, lr=1e-2)
    return params, state


def _assert_flat_equal(fa, fb):
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


def _assert_tree_equal(a, b):
    _assert_flat_equal(fnlm.tree_flatten(a), fnlm.tree_flatten(b))


def test_round_trip_params_state_config_rng_extras(tmp_path):
    params, state = _trained_state()
    gen = torch.Generator().manual_seed(7)
    gen_state = gen.get_state()
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    path = tmp_path / "run" / "latest.pt"
    fnlm.save_checkpoint(
        path, params=params, opt_state=state, step=3, config=_Config(), generator=gen_state, best_val=2.5
    )
    expected_draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ck = fnlm.load_checkpoint(path, expected_params=_params(), expected_config=_Config())
    _assert_tree_equal(ck["params"], params)
    _assert_tree_equal(ck["opt_state"], state)
    assert ck["step"] == 3 and ck["opt_state"]["step"] == 3
    assert ck["config"] == dataclasses.asdict(_Config()) and isinstance(ck["config"], dict)
    assert ck["config_class"].endswith("test_checkpoint._Config")
    assert ck["best_val"] == 2.5
    g2 = torch.Generator()
    g2.set_state(ck["generator"])
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=gen))
    torch.rand(5), np.random.rand(5), random.random()
    fnlm.restore_rng_state(ck["rng"])
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1])
    assert [random.random() for _ in range(3)] == expected_draws[2]
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]


def test_resume_continues_identically(tmp_path):
    params, state = _trained_state()
    fnlm.save_checkpoint(tmp_path / "c.pt", params=params, opt_state=state, step=3, config={"lr": 1e-2})
    ck = fnlm.load_checkpoint(tmp_path / "c.pt")
    grads = fnlm.tree_map(lambda t: torch.full_like(t, 0.5), params)
    a, sa = fnlm.adamw_step(params, state, grads, lr=1e-2)
    b, sb = fnlm.adamw_step(ck["params"], ck["opt_state"], grads, lr=1e-2)
    _assert_tree_equal(a, b)
    _assert_tree_equal(sa, sb)


def test_file_object_round_trip_and_weights_only():
    params, state = _trained_state()
    buf = io.BytesIO()
    fnlm.save_checkpoint(buf, params=params, opt_state=state, step=1, config={"a": [1, 2]}, rng=False)
    buf.seek(0)
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert raw["format"] == "fnlm-checkpoint"
    ck = fnlm.load_checkpoint(buf)
    assert ck["rng"] is None and ck["config"] == {"a": [1, 2]}
    _assert_tree_equal(ck["params"], params)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    params, state = _trained_state()
    path = tmp_path / "latest.pt"
    fnlm.save_checkpoint(path, params=params, opt_state=state, step=1, config={})
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fnlm.save_checkpoint(path, params=params, opt_state=state, step=2, config={})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["latest.pt"]
    assert fnlm.load_checkpoint(path)["step"] == 1


def test_truncated_tampered_and_foreign_files(tmp_path):
    params, state = _trained_state()
    path = tmp_path / "c.pt"
    fnlm.save_checkpoint(path, params=params, opt_state=state, step=1, config={})
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc\.pt.*unreadable"):
        fnlm.load_checkpoint(tmp_path / "trunc.pt")
    blob = params["token_embeddings"]["weight"].numpy().tobytes()
    at = data.find(blob[:64])
    assert at > 0
    tampered = bytearray(data)
    tampered[at + 10] ^= 0x40
    (tmp_path / "tampered.pt").write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match=r"tampered\.pt.*corrupt"):
        fnlm.load_checkpoint(tmp_path / "tampered.pt")
    torch.save({"model": params}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt.*not an fnlm checkpoint"):
        fnlm.load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt"):
        fnlm.load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fnlm.load_checkpoint(tmp_path / "nope.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_code_on_save_and_load(tmp_path):
    with pytest.raises(TypeError, match="extra.hook"):
        fnlm.save_checkpoint(tmp_path / "x.pt", params={}, opt_state={}, step=0, config={}, hook=_Evil())
    payload = {"format": "fnlm-checkpoint", "version": 1, "body": {"x": _Evil()}, "sha256": ""}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        fnlm.load_checkpoint(tmp_path / "evil.pt")


def test_mismatch_errors(tmp_path):
    params, state = _trained_state()
    path = tmp_path / "c.pt"
    fnlm.save_checkpoint(path, params=params, opt_state=state, step=1, config=_Config())
    other = _params()
    other["lm_head"]["weight"] = torch.zeros(31, 8)
    with pytest.raises(ValueError, match=r"lm_head\.weight.*\(32, 8\).*\(31, 8\)"):
        fnlm.load_checkpoint(path, expected_params=other)
    del other["lm_head"]
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        fnlm.load_checkpoint(path, expected_params=other)
    with pytest.raises(ValueError, match=r"d_model.*\(8, 16\)"):
        fnlm.load_checkpoint(path, expected_config=_Config(d_model=16))
    with pytest.raises(ValueError, match="missing"):
        fnlm.check_params_match({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(1)})
    meta = fnlm.tree_map(lambda t: torch.empty(t.shape, device="meta"), params)
    fnlm.check_params_match(params, meta)


def test_save_argument_errors(tmp_path):
    p = tmp_path / "x.pt"
    with pytest.raises(ValueError, match="reserved"):
        fnlm.save_checkpoint(p, params={}, opt_state={}, step=0, config={}, config_class="x")
    with pytest.raises(ValueError, match="step"):
        fnlm.save_checkpoint(p, params={}, opt_state={}, step=-1, config={})
    with pytest.raises(TypeError, match="config"):
        fnlm.save_checkpoint(p, params={}, opt_state={}, step=0, config=object())
    assert not p.exists()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("as_file", [False, True])
def test_module_checkpoint_adapters(tmp_path, as_file):
    torch.manual_seed(42)
    model = _Net()
    opt = get_adamw_cls()(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(5):
        opt.zero_grad()
        x = torch.rand(4, 10)
        ((model(x) - x[:, :3]) ** 2).sum().backward()
        opt.step()
    out = io.BytesIO() if as_file else tmp_path / "ck.pt"
    run_save_checkpoint(model, opt, 5, out)
    if as_file:
        out.seek(0)
    new_model = _Net()
    new_opt = get_adamw_cls()(new_model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    assert run_load_checkpoint(out, new_model, new_opt) == 5
    _assert_flat_equal(model.state_dict(), new_model.state_dict())
    a, b = opt.state_dict(), new_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    _assert_tree_equal({str(k): v for k, v in a["state"].items()}, {str(k): v for k, v in b["state"].items()})
    x = torch.rand(4, 10)
    for m, o in ((model, opt), (new_model, new_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    _assert_flat_equal(model.state_dict(), new_model.state_dict())


def test_code_running_pickle_is_refused_without_torchs_unsafe_advice(tmp_path):
    payload = {"format": "fnlm-checkpoint", "version": 1, "body": {"x": _Evil()}, "sha256": ""}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as caught:
        fnlm.load_checkpoint(tmp_path / "evil.pt")
    message = str(caught.value)
    assert "evil.pt" in message and "was refused" in message and f"{os.system.__module__}.system" in message
    assert "weights_only" not in message and "Re-running" not in message and "trusted source" not in message
    assert "none of its code ran" in message and "\n" not in message


def _train_like_folder(folder):
    """Checkpoints as the training loop leaves them: step files, latest.pt a hard link to the newest."""
    folder.mkdir()
    params, state = _trained_state()
    for step in (10, 20, 30):
        fnlm.save_checkpoint(folder / f"step_{step:07d}.pt", params=params, opt_state=state, step=step, config={})
    os.link(folder / "step_0000030.pt", folder / "latest.pt")
    return params


def test_a_bad_latest_names_the_intact_step_files(tmp_path):
    folder = tmp_path / "checkpoints"
    params = _train_like_folder(folder)
    latest = folder / "latest.pt"
    data = bytearray(latest.read_bytes())
    blob = params["token_embeddings"]["weight"].numpy().tobytes()
    data[data.find(blob[:64]) + 3] ^= 0x01
    with open(latest, "r+b") as f:
        f.write(bytes(data))
    assert ckpt_mod.intact_alternatives(latest) == [(folder / "step_0000020.pt", 20), (folder / "step_0000010.pt", 10)]
    with pytest.raises(ValueError, match=r"latest\.pt' is corrupt.*intact checkpoints beside it: step_0000020\.pt "
                                         r"\(step 20\), step_0000010\.pt \(step 10\): to resume from one, replace "
                                         r"latest\.pt by it \(in .*: rm latest\.pt && cp step_0000020\.pt latest\.pt\)"):
        fnlm.load_checkpoint(latest)
    with pytest.raises(ValueError, match=r"step_0000030\.pt' is corrupt.*step_0000020.*use one of them instead"):
        fnlm.load_checkpoint(folder / "step_0000030.pt")
    (folder / "step_0000020.pt").write_bytes(data[: len(data) // 3])
    latest.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"unreadable \(truncated or not a torch file: .*\); intact checkpoints beside "
                                         r"it: step_0000010\.pt \(step 10\): to resume from one, replace"):
        fnlm.load_checkpoint(latest)
    latest.unlink()
    with pytest.raises(FileNotFoundError, match=r"latest\.pt' does not exist; intact checkpoints beside it: "
                                                r"step_0000010\.pt"):
        fnlm.load_checkpoint(latest)


def test_a_good_checkpoint_among_bad_ones_loads_and_names_nothing(tmp_path):
    folder = tmp_path / "checkpoints"
    _train_like_folder(folder)
    assert fnlm.load_checkpoint(folder / "latest.pt")["step"] == 30
    (tmp_path / "alone.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as caught:
        fnlm.load_checkpoint(tmp_path / "alone.pt")
    assert "intact" not in str(caught.value)
