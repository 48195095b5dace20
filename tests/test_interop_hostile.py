"""fnlm.interop on hostile or malformed input: every refusal is a ValueError naming the file and
the field, raised before anything large is allocated or anything outside the model folder is read.

- `config.json` sizes of the wrong type or range, or that disagree with the tensors on disk
  (a billion layers is refused from the safetensors headers, under a memory limit);
- shard names in `model.safetensors.index.json` that lead outside the folder;
- bad shapes, quantized weights, a missing `weight_map`; `load_params` with garbled metadata;
- the files `save_params` / `export_hf` write get the mode the umask gives, as `open()` would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fnlm
from fnlm import interop

safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[1]
CONFIG = fnlm.TransformerConfig(vocab_size=97, context_length=40, d_model=64, num_layers=3, num_heads=4, d_ff=176)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    params = fnlm.init_transformer_lm(CONFIG, seed=1)
    return params, fnlm.export_hf(params, CONFIG, tmp_path_factory.mktemp("hf") / "model")


def edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    hf.update(changes)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def edit_weights(folder: Path, fn) -> None:
    state = safetensors_torch.load_file(folder / "model.safetensors")
    fn(state)
    safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_billion_layers_is_refused_from_the_headers_under_a_memory_limit(exported, tmp_path):
    """`num_hidden_layers: 1000000000` made `import_hf` build 9e9 expected names (> 10 GB) before
    looking at the weights; now the layer count is compared with the names on disk first."""
    _, out = exported
    bad = edited(out, tmp_path / "m", num_hidden_layers=10**9)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "import fnlm\n"
        "try:\n"
        "    fnlm.import_hf(sys.argv[1])\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "num_hidden_layers=1000000000, but the weights hold 3 layers (indices [0, 1, 2])" in proc.stdout


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"num_hidden_layers": 1e9}, r"config\.json: num_hidden_layers=1000000000\.0: must be a positive int"),
        ({"num_hidden_layers": 2}, r"num_hidden_layers=2, but the weights hold 3 layers"),
        ({"vocab_size": "97"}, r"config\.json: vocab_size='97': must be a positive int"),
        ({"hidden_size": 64.0}, r"hidden_size=64\.0: must be a positive int"),
        ({"intermediate_size": -1}, r"intermediate_size=-1: must be a positive int"),
        ({"max_position_embeddings": True}, r"max_position_embeddings=True: must be a positive int"),
        ({"num_attention_heads": 0}, r"num_attention_heads=0: must be a positive int"),
        ({"num_attention_heads": 5}, r"hidden_size=64: is not divisible by num_attention_heads=5"),
        ({"num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": None}, r"config\.json: .*RoPE needs an even head size"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads=0: must be a positive int"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3: does not divide num_attention_heads=4"),
        ({"num_key_value_heads": "4"}, r"num_key_value_heads='4': must be a positive int"),
        ({"head_dim": 0}, r"head_dim=0: must be a positive int"),
        ({"tie_word_embeddings": "false"}, r"tie_word_embeddings='false': must be true or false"),
        ({"rope_theta": "500", "rope_parameters": None}, r"rope_theta='500': must be a finite number > 0"),
        ({"rope_theta": float("nan"), "rope_parameters": None}, r"rope_theta=nan: must be a finite number > 0"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, r"rope_parameters\.rope_theta=-1"),
        ({"rms_norm_eps": "1e-05"}, r"rms_norm_eps='1e-05'"),
        ({"vocab_size": 98}, r"model\.safetensors: tensor 'model\.embed_tokens\.weight' has shape \(97, 64\), but "
                             r"config\.json means \(98, 64\)"),
        ({"intermediate_size": 175}, r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(176, 64\)"),
        ({"hidden_size": 32, "head_dim": None}, r"has shape \(97, 64\), but config\.json means \(97, 32\)"),
    ],
)
def test_config_values_of_the_wrong_type_range_or_size_are_refused(exported, tmp_path, changes, match):
    _, out = exported
    with pytest.raises(ValueError, match=match):
        fnlm.import_hf(edited(out, tmp_path / "m", **changes))


@pytest.mark.parametrize("text, match", [("[1, 2]", "expected a JSON object, got list"),
                                         ("{'model_type': 'llama'", "not a valid JSON config"),
                                         ("\udcff", "not a valid JSON config")])
def test_config_json_that_is_not_an_object_is_refused(exported, tmp_path, text, match):
    _, out = exported
    bad = edited(out, tmp_path / "m")
    (bad / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=match) as err:
        fnlm.import_hf(bad)
    assert "config.json" in str(err.value)


def test_a_tensor_of_a_wrong_shape_names_the_tensor_and_file(exported, tmp_path):
    """Before: `_half_split_to_interleaved` failed with a bare RuntimeError from `reshape`."""
    _, out = exported
    bad = edited(out, tmp_path / "m")
    edit_weights(bad, lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(63, 64)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' "
                                         r"has shape \(63, 64\), but config\.json means \(64, 64\)"):
        fnlm.import_hf(bad)


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.uint8, "U8"), (torch.int32, "I32"), (torch.bool, "BOOL")])
def test_quantized_or_integer_weights_are_refused(exported, tmp_path, dtype, name):
    """Before: int8 weights were imported as int8 params, which `transformer_lm` cannot use."""
    _, out = exported
    bad = edited(out, tmp_path / "m")
    edit_weights(bad, lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(176, 64, dtype=dtype)}))
    with pytest.raises(ValueError, match=rf"'model\.layers\.2\.mlp\.up_proj\.weight' has dtype {name}; fnlm reads floating"):
        fnlm.import_hf(bad)


def test_an_unreadable_weights_file_is_a_value_error(exported, tmp_path):
    _, out = exported
    bad = edited(out, tmp_path / "m")
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        fnlm.import_hf(bad)


def sharded(out: Path, dst: Path, weight_map: object) -> Path:
    d = edited(out, dst)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize(
    "doc, match",
    [({"metadata": {}}, "no 'weight_map' object"), ({"weight_map": []}, "no 'weight_map' object"),
     ({"weight_map": {}}, "no 'weight_map' object"), ({"weight_map": {"a": 3}}, "values must be file names, got 3")],
)
def test_an_index_without_a_weight_map_is_a_value_error(exported, tmp_path, doc, match):
    """Before: a missing `weight_map` was a bare KeyError."""
    _, out = exported
    d = edited(out, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as err:
        fnlm.import_hf(d)
    assert "model.safetensors.index.json" in str(err.value)


def test_shard_names_that_lead_outside_the_folder_are_refused(exported, tmp_path):
    """Before: `../secret.safetensors` and absolute paths were read (any readable file on the machine)."""
    _, out = exported
    (tmp_path / "secret.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    for i, name in enumerate(["../secret.safetensors", str(tmp_path / "secret.safetensors"), "sub/../../secret.safetensors"]):
        d = sharded(out, tmp_path / f"m{i}", {"model.embed_tokens.weight": name})
        (d / "model.safetensors").unlink()
        with pytest.raises(ValueError, match="points outside the model folder") as err:
            fnlm.import_hf(d)
        assert "model.safetensors.index.json" in str(err.value) and repr(name) in str(err.value)
    d = sharded(out, tmp_path / "link", {"model.embed_tokens.weight": "shard.safetensors"})
    (d / "model.safetensors").unlink()
    (d / "shard.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(ValueError, match=r"'shard\.safetensors' resolves to .*secret\.safetensors', outside the model folder"):
        fnlm.import_hf(d)
    d = edited(out, tmp_path / "plain-link")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(ValueError, match="outside the model folder"):
        fnlm.import_hf(d)


def test_links_inside_the_folder_and_the_hub_cache_layout_are_read(exported, tmp_path):
    """What is refused is leaving the folder, not links: a link to a file in the folder reads, and so
    does a Hugging Face hub cache snapshot, whose files link to `../../blobs/`."""
    params, out = exported
    d = edited(out, tmp_path / "inner")
    (d / "real").mkdir()
    (d / "model.safetensors").rename(d / "real" / "w.safetensors")
    (d / "model.safetensors").symlink_to(d / "real" / "w.safetensors")
    back, _ = fnlm.import_hf(d)
    assert torch.equal(back["lm_head"]["weight"], params["lm_head"]["weight"])
    repo = tmp_path / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(out / name, repo / "blobs" / f"blob-{name}")
        (snap / name).symlink_to(Path("..", "..", "blobs", f"blob-{name}"))
    back, config = fnlm.import_hf(snap)
    assert config == CONFIG and torch.equal(back["layers"][2]["ffn"]["w2"]["weight"], params["layers"][2]["ffn"]["w2"]["weight"])


def test_a_tensor_in_two_shards_is_refused(exported, tmp_path):
    _, out = exported
    d = sharded(out, tmp_path / "m", {"model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors"})
    (d / "model.safetensors").rename(d / "a.safetensors")
    safetensors_torch.save_file({"model.norm.weight": torch.ones(64)}, d / "b.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' is also in .*a\.safetensors"):
        fnlm.import_hf(d)


# ---- load_params


def test_load_params_refuses_garbled_fnlm_metadata(tmp_path):
    """Before: garbled `__fnlm_names__` was a bare JSONDecodeError (or a TypeError from `sorted`)."""
    w = {"a.w": torch.ones(2), "b.w": torch.zeros(3)}
    for i, (names, match) in enumerate([("not json", "is not valid JSON"), ('{"a.w": 1}', "must be a JSON list"),
                                        ('["a.w", "a.w", "b.w"]', "distinct names"), ('["a.w", 3]', "JSON list"),
                                        ('["a.w"]', r"does not match the tensors: unlisted \['b\.w'\]")]):
        path = tmp_path / f"{i}.safetensors"
        safetensors_torch.save_file(w, path, metadata={"__fnlm_names__": names})
        with pytest.raises(ValueError, match=match) as err:
            fnlm.load_params(path)
        assert str(path) in str(err.value) and "__fnlm_names__" in str(err.value)


def test_load_params_refuses_a_file_that_is_not_safetensors_and_conflicting_names(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fnlm.load_params(tmp_path / "x.safetensors")
    safetensors_torch.save_file({"a.b": torch.ones(1), "a.b.c": torch.ones(1)}, tmp_path / "y.safetensors")
    with pytest.raises(ValueError, match="do not form a params tree"):
        fnlm.load_params(tmp_path / "y.safetensors")


def test_load_params_checks_the_tensors_against_a_config(tmp_path):
    params = fnlm.init_transformer_lm(CONFIG, seed=0)
    fnlm.save_params(params, tmp_path / "p.safetensors")
    back = fnlm.load_params(tmp_path / "p.safetensors", config=CONFIG)
    assert torch.equal(back["lm_head"]["weight"], params["lm_head"]["weight"])
    other = fnlm.TransformerConfig(**{**CONFIG.__dict__, "d_ff": 128})
    with pytest.raises(ValueError, match=r"p\.safetensors'?: the tensors do not fit the config: .*ffn"):
        fnlm.load_params(tmp_path / "p.safetensors", config=other)
    fewer = fnlm.TransformerConfig(**{**CONFIG.__dict__, "num_layers": 2})
    with pytest.raises(ValueError, match="3 layers but config.num_layers=2"):
        fnlm.load_params(tmp_path / "p.safetensors", config=fewer)
    with pytest.raises(TypeError, match="config"):
        fnlm.load_params(tmp_path / "p.safetensors", config={"d_ff": 128})


# ---- file modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """`safetensors.torch.save_file` creates 0600 files; fnlm's follow the umask like `open()`'s."""
    code = (
        "import os, sys, torch, fnlm\n"
        f"os.umask({umask})\n"
        "cfg = fnlm.TransformerConfig(vocab_size=300, context_length=8, d_model=8, num_layers=1, num_heads=2, d_ff=8)\n"
        "p = fnlm.init_transformer_lm(cfg)\n"
        "fnlm.save_params(p, sys.argv[1] + '/p.safetensors')\n"
        "tok = fnlm.Tokenizer({i: bytes([i]) for i in range(256)}, [], ['<|e|>'])\n"
        "fnlm.export_hf(p, cfg, sys.argv[1] + '/hf', tokenizer=tok)\n"
        "tok.save(sys.argv[1] + '/tok')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    files = [tmp_path / "p.safetensors", *sorted((tmp_path / "hf").iterdir()), *sorted((tmp_path / "tok").iterdir())]
    assert len(files) == 8
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}


# ---- llama2.c's tokenizer


def run_c_encode(tok: interop.Llama2cTokenizer, text: str, bos: bool = True) -> list[int]:
    """run.c's `encode`, transcribed: rescan every pair after each merge (quadratic)."""
    tokens = [tok.bos_id] if bos else []
    if text:
        tokens.append(tok._ids[b" "])
    for char in text:
        raw = char.encode("utf-8")
        tokens += [tok._ids[raw]] if raw in tok._ids else [3 + b for b in raw]
    while True:
        best, best_score, best_id = -1, -1e10, -1
        for i in range(len(tokens) - 1):
            idx = tok._ids.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]])
            if idx is not None and tok.scores[idx] > best_score:
                best, best_score, best_id = i, tok.scores[idx], idx
        if best < 0:
            return tokens
        tokens[best : best + 2] = [best_id]


def random_llama2c_tokenizer(seed: int) -> interop.Llama2cTokenizer:
    rng = random.Random(seed)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)] + [b" ", b"a", b"b", b"c"]
    while len(pieces) < 300:
        piece = b"".join(rng.choice([b"a", b"b", b"c", b" ", b"ab", "é".encode()]) for _ in range(rng.randint(2, 4)))
        if piece not in pieces:
            pieces.append(piece)
    scores = [0.0] * 259 + [float(rng.choice([-5, -3, -1, -1e11, float("nan")]) if rng.random() < 0.2 else rng.randint(-20, 0))
                            for _ in pieces[259:]]
    return interop.Llama2cTokenizer(pieces, scores)


@pytest.mark.parametrize("seed", range(6))
def test_llama2c_encode_equals_run_c_with_ties_and_unmergeable_scores(seed):
    tok = random_llama2c_tokenizer(seed)
    rng = random.Random(seed + 100)
    for _ in range(40):
        text = "".join(rng.choice(["a", "b", "c", " ", "é", "ab", "x", "\n"]) for _ in range(rng.randint(0, 40)))
        for bos in (True, False):
            assert tok.encode(text, bos=bos) == run_c_encode(tok, text, bos), (seed, text)


def test_llama2c_encode_of_a_long_prompt_is_not_quadratic():
    """Before: run.c's rescan after every merge, ~10**8 lookups for 20,000 characters."""
    tok = random_llama2c_tokenizer(0)
    text = "ab c" * 5000
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 10
    assert tok.decode(ids) == text and ids[0] == tok.bos_id


def test_llama2c_tokenizer_without_a_space_piece_is_a_value_error():
    tok = random_llama2c_tokenizer(1)
    pieces = [p if p != b" " else b"  x" for p in tok.pieces]
    with pytest.raises(ValueError, match="no ' ' piece"):
        interop.Llama2cTokenizer(pieces, tok.scores).encode("abc")
    with pytest.raises(ValueError, match="259"):
        interop.Llama2cTokenizer([b"a"] * 10, [0.0] * 10)
