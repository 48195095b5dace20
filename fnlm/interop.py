"""fnlm models in the formats other tools read: Hugging Face Llama, safetensors, llama2.c.

```python
fnlm.export_hf(params, config, "hf_model", tokenizer=tok)       # transformers loads it as LlamaForCausalLM
params, config = fnlm.import_hf("hf_model")                     # ours, or a Llama checkpoint fnlm can represent
params, config = fnlm.import_llama2c("stories15M.bin")          # llama2.c's legacy .bin
fnlm.save_params(params, "params.safetensors", metadata={"note": "step 5000"})
params = fnlm.load_params("params.safetensors")
```

fnlm's baseline model (pre-norm RMSNorm with eps 1e-5, RoPE, SwiGLU, untied head, no biases) is
the Llama architecture with every key/value head its own (`num_key_value_heads = num_heads`).
One difference is in the weights' layout: fnlm's RoPE (CS336's, and llama2.c's) rotates the
interleaved pairs `(2i, 2i+1)` of each head, Hugging Face's Llama the half-split pairs
`(i, i + d_head/2)`. Reordering the rows of each head of `W_q` and `W_k` (even rows first, then
odd rows) turns one into the other, and leaves `q·k` unchanged because q and k are reordered alike;
`export_hf` applies it and `import_hf` undoes it, exactly.

Name map (fnlm → Hugging Face; `{i}` is the layer):

| fnlm | transformers `LlamaForCausalLM` | llama2.c |
| --- | --- | --- |
| `token_embeddings.weight` | `model.embed_tokens.weight` | `token_embedding_table` |
| `layers.{i}.ln1.weight` | `model.layers.{i}.input_layernorm.weight` | `rms_att_weight` |
| `layers.{i}.attn.{q,k,v}_proj.weight` | `model.layers.{i}.self_attn.{q,k,v}_proj.weight` (q, k reordered) | `wq`, `wk`, `wv` |
| `layers.{i}.attn.output_proj.weight` | `model.layers.{i}.self_attn.o_proj.weight` | `wo` |
| `layers.{i}.ln2.weight` | `model.layers.{i}.post_attention_layernorm.weight` | `rms_ffn_weight` |
| `layers.{i}.ffn.w1.weight` (gate) | `model.layers.{i}.mlp.gate_proj.weight` | `w1` |
| `layers.{i}.ffn.w3.weight` (up) | `model.layers.{i}.mlp.up_proj.weight` | `w3` |
| `layers.{i}.ffn.w2.weight` (down) | `model.layers.{i}.mlp.down_proj.weight` | `w2` |
| `ln_final.weight` | `model.norm.weight` | `rms_final_weight` |
| `lm_head.weight` | `lm_head.weight` (or tied to the embedding) | `wcls` (or shared) |

This module imports `safetensors` but never `transformers`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fnlm._interop_tokenizers import (
    Llama2cTokenizer,
    hf_tokenizer_json,
    load_hf_tokenizer,
    load_llama2c_tokenizer,
    write_hf_tokenizer,
)
from fnlm.model import TransformerConfig, check_params
from fnlm.tokenizer import Tokenizer
from fnlm.tokenizer.files import current_umask
from fnlm.tree import Tree, tree_flatten, tree_unflatten

__all__ = [
    "export_hf",
    "import_hf",
    "import_llama2c",
    "save_params",
    "load_params",
    "load_params_metadata",
    "load_hf_tokenizer",
    "load_llama2c_tokenizer",
    "hf_tokenizer_json",
    "Llama2cTokenizer",
    "RMS_NORM_EPS",
]

RMS_NORM_EPS = 1e-5
"""fnlm's RMSNorm epsilon (`fnlm.rmsnorm`'s default), which Llama configs call `rms_norm_eps`."""

_BASELINE = {"norm": "rmsnorm", "norm_position": "pre", "position": "rope", "ffn": "swiglu"}
_HF_TOP = {
    "token_embeddings.weight": "model.embed_tokens.weight",
    "ln_final.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_LAYER = {
    "ln1.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "ln2.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
_ROPE_ROWS = ("attn.q_proj.weight", "attn.k_proj.weight")
_NAMES_KEY = "__fnlm_names__"


# --- shared helpers ------------------------------------------------------------------------------


def _check_representable(config: TransformerConfig) -> None:
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a fnlm.TransformerConfig, got {type(config).__name__}")
    for field, wanted in _BASELINE.items():
        if getattr(config, field) != wanted:
            raise ValueError(
                f"config.{field}={getattr(config, field)!r}: the Llama format holds only fnlm's baseline "
                f"architecture ({field}={wanted!r})"
            )


def _expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Flat fnlm name -> shape, for the baseline architecture, in `init_transformer_lm`'s order."""
    v, d, f = config.vocab_size, config.d_model, config.d_ff
    layer = {f"attn.{n}_proj.weight": (d, d) for n in ("q", "k", "v", "output")}
    layer |= {"ffn.w1.weight": (f, d), "ffn.w2.weight": (d, f), "ffn.w3.weight": (f, d), "ln1.weight": (d,), "ln2.weight": (d,)}
    shapes = {"token_embeddings.weight": (v, d)}
    shapes |= {f"layers.{i}.{name}": shape for i in range(config.num_layers) for name, shape in layer.items()}
    return shapes | {"ln_final.weight": (d,), "lm_head.weight": (v, d)}


def _check_shapes(flat: dict[str, Any], config: TransformerConfig, where: str) -> None:
    want = _expected_shapes(config)
    missing, extra = sorted(want.keys() - flat.keys()), sorted(flat.keys() - want.keys())
    if missing or extra:
        raise ValueError(f"{where}: parameter names differ from the config's: missing {missing[:8]}, unexpected {extra[:8]}")
    for name, leaf in flat.items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where}: {name!r} is a {type(leaf).__name__}, expected a tensor")
        if tuple(leaf.shape) != want[name]:
            raise ValueError(f"{where}: {name!r} has shape {tuple(leaf.shape)}, expected {want[name]} for this config")


def _umask_mode(path: str | os.PathLike) -> None:
    """Give a file the mode `open()` would have: `safetensors.torch.save_file` writes 0600."""
    os.chmod(path, 0o666 & ~current_umask())


def _interleaved_to_half_split(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's rows from RoPE pairs (2i, 2i+1) to pairs (i, i + d_head/2)."""
    rows, d_in = w.shape
    pairs = w.reshape(num_heads, rows // num_heads // 2, 2, d_in)  # (heads, d_head/2, 2, d_in)
    return pairs.transpose(1, 2).reshape(rows, d_in).contiguous()


def _half_split_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `_interleaved_to_half_split`."""
    rows, d_in = w.shape
    halves = w.reshape(num_heads, 2, rows // num_heads // 2, d_in)  # (heads, 2, d_head/2, d_in)
    return halves.transpose(1, 2).reshape(rows, d_in).contiguous()


def _hf_name(name: str) -> str:
    if name in _HF_TOP:
        return _HF_TOP[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{_HF_LAYER[rest]}"


# --- Hugging Face export -----------------------------------------------------------------------


def _hf_config(config: TransformerConfig, dtype: torch.dtype, eos_id: int | None) -> dict[str, Any]:
    theta = float(config.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "head_dim": config.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(
    params: Tree,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a Hugging Face Llama directory: `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
    loads it as a `LlamaForCausalLM` whose logits equal `fnlm.transformer_lm`'s.

    Writes `model.safetensors` (the weights in their stored dtype, q/k rows reordered for
    Llama's RoPE, see the module docstring), `config.json`, and with a tokenizer `tokenizer.json`
    (HF `tokenizers` encodes to the same ids), `tokenizer_config.json` and
    `special_tokens_map.json` (for `AutoTokenizer`; the first special token is the EOS token).

    **Arguments:**

    - `params`: the params tree of `config`'s model.
    - `config`: a `TransformerConfig` of fnlm's baseline architecture (`norm="rmsnorm"`,
      `norm_position="pre"`, `position="rope"`, `ffn="swiglu"`); the ablations have no Llama
      equivalent and raise ValueError naming the field.
    - `out_dir`: the directory (created if needed; files of the same names are replaced).
    - `tokenizer`: a fnlm `Tokenizer`, or `None` for weights and config only.

    **Returns:** the directory, as a `Path`.
    """
    _check_representable(config)
    flat = tree_flatten(params)
    _check_shapes(flat, config, "params")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a fnlm.Tokenizer or None, got {type(tokenizer).__name__}")
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but config.vocab_size={config.vocab_size}")
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, leaf in flat.items():
        t = leaf.detach().cpu().contiguous()
        if name.split(".", 2)[-1] in _ROPE_ROWS:
            t = _interleaved_to_half_split(t, config.num_heads)
        elif t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        state[_hf_name(name)] = t
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    _umask_mode(out / "model.safetensors")
    eos = tokenizer.special_ids[tokenizer.special_tokens[0]] if tokenizer is not None and tokenizer.special_tokens else None
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(_hf_config(config, flat["token_embeddings.weight"].dtype, eos), f, indent=2)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, out, model_max_length=config.context_length)
    return out


# --- Hugging Face import -----------------------------------------------------------------------


def _refuse(where: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{where}: {key}={value!r}: {why}")


_HF_SIZES = (("vocab_size", 32000), ("max_position_embeddings", 2048), ("hidden_size", 4096),
             ("num_hidden_layers", 32), ("num_attention_heads", 32), ("intermediate_size", 11008))
"""The size fields of a Llama `config.json`, with `transformers.LlamaConfig`'s defaults."""
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,9})\.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hf_size(hf: dict[str, Any], key: str, default: int | None, where: str) -> int:
    """A positive int field (`null` or absent takes `default`)."""
    value = hf.get(key)
    if value is None and default is not None:
        return default
    if not _is_int(value) or value < 1:
        raise _refuse(where, key, value, "must be a positive int")
    return value


def _hf_number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _refuse(where, key, value, "must be a finite number > 0")
    return float(value)


def _hf_rope_theta(hf: dict[str, Any], where: str) -> float:
    scaling = hf.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "default"):
        raise _refuse(where, "rope_scaling", scaling, "fnlm's RoPE has no scaling")
    rope = hf.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise _refuse(where, "rope_parameters", rope, "fnlm's RoPE has no scaling (rope_type must be 'default')")
        if "rope_theta" in rope:
            return _hf_number(rope["rope_theta"], "rope_parameters.rope_theta", where)
    return _hf_number(hf.get("rope_theta", 10000.0), "rope_theta", where)


def _hf_heads(hf: dict[str, Any], sizes: dict[str, int], where: str) -> None:
    """The head fields: `hidden_size` splits into `num_attention_heads`, which the key/value heads
    divide; fnlm represents only one key/value head per query head and the default head size."""
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    if hidden % heads:
        raise _refuse(where, "hidden_size", hidden, f"is not divisible by num_attention_heads={heads}")
    kv = _hf_size(hf, "num_key_value_heads", heads, where)
    if heads % kv:
        raise _refuse(where, "num_key_value_heads", kv, f"does not divide num_attention_heads={heads}")
    if kv != heads:
        raise _refuse(where, "num_key_value_heads", kv,
                      f"fnlm's attention has one key/value head per query head (num_attention_heads={heads})")
    head_dim = _hf_size(hf, "head_dim", hidden // heads, where)
    if head_dim != hidden // heads:
        raise _refuse(where, "head_dim", head_dim,
                      f"fnlm's head size is hidden_size / num_attention_heads = {hidden // heads}")


def _config_from_hf(hf: Any, where: str) -> tuple[TransformerConfig, bool]:
    """(fnlm config, tied head) from a Llama `config.json`; ValueError naming the field for a value of
    the wrong type or range, or for what fnlm cannot represent. Absent keys take
    `transformers.LlamaConfig`'s defaults. Nothing is allocated from these sizes before
    `_check_hf_tensors` has compared them with the weights on disk."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") != "llama":
        raise _refuse(where, "model_type", hf.get("model_type"), "only Llama checkpoints ('llama') are read")
    sizes = {key: _hf_size(hf, key, default, where) for key, default in _HF_SIZES}
    _hf_heads(hf, sizes, where)
    checks = [
        ("hidden_act", hf.get("hidden_act", "silu"), "silu", "fnlm's SwiGLU gates with SiLU"),
        ("rms_norm_eps", hf.get("rms_norm_eps", 1e-6), RMS_NORM_EPS, f"fnlm's RMSNorm eps is fixed at {RMS_NORM_EPS}"),
        ("attention_bias", hf.get("attention_bias", False), False, "fnlm's projections have no biases"),
        ("mlp_bias", hf.get("mlp_bias", False), False, "fnlm's projections have no biases"),
    ]
    for key, value, wanted, why in checks:
        if type(value) is not type(wanted) or value != wanted:
            raise _refuse(where, key, value, why)
    tied = hf.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise _refuse(where, "tie_word_embeddings", tied, "must be true or false")
    theta = _hf_rope_theta(hf, where)
    try:
        config = TransformerConfig(
            vocab_size=sizes["vocab_size"], context_length=sizes["max_position_embeddings"], d_model=sizes["hidden_size"],
            num_layers=sizes["num_hidden_layers"], num_heads=sizes["num_attention_heads"],
            d_ff=sizes["intermediate_size"], rope_theta=theta,
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config, tied


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the files of a model folder may resolve to: the folder itself and, for a snapshot of the
    Hugging Face hub cache (`models--org--name/snapshots/<rev>`, whose files link to `../../blobs/`),
    that repository's `blobs` folder."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append((real.parent.parent / "blobs").resolve())
    return roots


def _inside(folder: Path, name: Any, where: str) -> Path:
    """`folder / name` for a file name that stays inside the folder: ValueError for an absolute path,
    a `..` part, or a symbolic link that resolves outside it (see `_allowed_roots`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: file name {name!r} is not a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ValueError(f"{where}: file name {name!r} points outside the model folder {os.fspath(folder)!r}")
    full = folder / name
    real = full.resolve()
    if not any(real == root or real.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ValueError(f"{where}: {name!r} resolves to {os.fspath(real)!r}, outside the model folder {os.fspath(folder)!r}")
    return full


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)}: not a valid JSON {what} ({e})") from None


def _hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names (each checked to stay
    inside the folder), or `model.safetensors`."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = os.fspath(index)
        doc = _read_json(_inside(path, index.name, where), "index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{where}: no 'weight_map' object of tensor name -> shard file, got {weight_map!r:.80}")
        bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"{where}: weight_map values must be file names, got {bad!r:.80}")
        files = [_inside(path, name, where) for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [_inside(path, "model.safetensors", os.fspath(path))]
    else:
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read); "
            f"the directory has {present[:12]}"
        )
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{path}: shard {file.name} named by model.safetensors.index.json is missing")
    return files


def _hf_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Tensor name -> (file, shape, safetensors dtype), read from the files' headers only."""
    headers: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt") as f:
                for name in f.keys():
                    if name in headers:
                        raise ValueError(f"{os.fspath(file)}: tensor {name!r} is also in {os.fspath(headers[name][0])}")
                    sl = f.get_slice(name)
                    headers[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise ValueError(f"{os.fspath(file)}: not a readable safetensors file ({e})") from None
    return headers


def _check_hf_tensors(headers: dict[str, tuple[Path, tuple[int, ...], str]], config: TransformerConfig,
                      tied: bool, where: str) -> dict[str, str]:
    """Compare the tensors on disk with the config before any is read: the layers present, names,
    dtypes, shapes. Returns fnlm name -> Hugging Face name of each tensor to read."""
    names = [k for k in headers if not k.endswith("rotary_emb.inv_freq")]
    biases = sorted(k for k in names if k.endswith(".bias"))
    if biases:
        raise ValueError(f"{where}: bias tensors {biases[:4]} present; fnlm's layers have no biases")
    layers = sorted({int(m.group(1)) for m in map(_LAYER_NAME.match, names) if m})
    if layers != list(range(len(layers))) or len(layers) != config.num_layers:
        shown = f"{len(layers)} layers (indices {layers[:4]}{' ...' if len(layers) > 4 else ''})"
        raise ValueError(f"{where}: config.json has num_hidden_layers={config.num_layers}, but the weights hold {shown}")
    wanted = {name: _hf_name("token_embeddings.weight" if tied and name == "lm_head.weight" else name)
              for name in _expected_shapes(config)}
    shapes = _expected_shapes(config)
    for name, hf_name in wanted.items():
        if hf_name not in headers:
            raise ValueError(f"{where}: tensor {hf_name!r} is missing")
        file, shape, dtype = headers[hf_name]
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{os.fspath(file)}: tensor {hf_name!r} has dtype {dtype}; fnlm reads floating "
                             f"weights only ({', '.join(_FLOAT_DTYPES)}), not quantized ones")
        if shape != shapes[name]:
            raise ValueError(f"{os.fspath(file)}: tensor {hf_name!r} has shape {shape}, but config.json means "
                             f"{shapes[name]} (vocab_size={config.vocab_size}, hidden_size={config.d_model}, "
                             f"intermediate_size={config.d_ff})")
    extra = sorted(set(names) - set(wanted.values()) - {"lm_head.weight"})
    if extra:
        raise ValueError(f"{where}: tensors fnlm's Llama has no place for: {extra[:8]}")
    return wanted


def _params_from_hf(headers: dict, wanted: dict[str, str], tied: bool, config: TransformerConfig) -> Tree:
    """Read the checked tensors, shard by shard, into fnlm's layout."""
    state: dict[str, torch.Tensor] = {}
    needed = set(wanted.values())
    for file in sorted({headers[hf_name][0] for hf_name in needed}):
        state.update({k: v for k, v in load_file(file).items() if k in needed})
    flat: dict[str, torch.Tensor] = {}
    for name, hf_name in wanted.items():
        t = state[hf_name]
        if name.split(".", 2)[-1] in _ROPE_ROWS:
            t = _half_split_to_interleaved(t, config.num_heads)
        flat[name] = t.clone() if tied and name == "lm_head.weight" else t
    return tree_unflatten(flat)


def import_hf(path: str | os.PathLike) -> tuple[Tree, TransformerConfig]:
    """Read a Hugging Face Llama directory into fnlm params: one `export_hf` wrote, or any
    `LlamaForCausalLM` checkpoint fnlm's architecture represents.

    `import_hf(export_hf(params, config, d)) == (params, config)` exactly (bit for bit).

    **Arguments:**

    - `path`: a directory with `config.json` and either `model.safetensors` or sharded
      safetensors files listed in `model.safetensors.index.json`.

    **Returns:** `(params, config)`; the tensors keep their stored dtype, and a tied head becomes
    its own copy of the embedding (`lm_head.weight`). ValueError, naming the file and the key, for
    what fnlm cannot represent: `num_key_value_heads` below `num_attention_heads`, `attention_bias` /
    `mlp_bias` or bias tensors, `rope_scaling`, a `hidden_act` other than `silu`, an
    `rms_norm_eps` other than 1e-5, a `head_dim` other than `hidden_size / num_attention_heads`,
    non-floating (quantized) weights; and for a malformed folder: a size that is not a positive int,
    sizes or a layer count that differ from the tensors on disk (checked from the safetensors
    headers before any tensor is read), a shard name that leads outside the folder (an absolute
    path, `..`, or a link resolving elsewhere; the hub cache's `snapshots/<rev>` -> `blobs/` links
    are allowed). FileNotFoundError when the directory or its files are missing.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    where = os.fspath(path / "config.json")
    config, tied = _config_from_hf(_read_json(_inside(path, "config.json", where), "config"), where)
    headers = _hf_headers(_hf_weight_files(path))
    wanted = _check_hf_tensors(headers, config, tied, os.fspath(path))
    return _params_from_hf(headers, wanted, tied, config), config


# --- llama2.c --------------------------------------------------------------------------------


_LLAMA2C_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def _llama2c_size(h: dict[str, int]) -> int:
    """The byte size of a legacy .bin with header `h` (grouped-query shapes included)."""
    dim, hidden, layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    kv_dim = dim * h["n_kv_heads"] // h["n_heads"]
    floats = vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden) + dim
    floats += h["seq_len"] * (dim // h["n_heads"] // 2) * 2 + (vocab * dim if h["vocab_size"] < 0 else 0)
    return 28 + 4 * floats


def _llama2c_config(header: dict[str, int], size: int, where: str) -> tuple[TransformerConfig, bool]:
    if header["dim"] == 0x616B3432:
        raise ValueError(f"{where}: a llama2.c version 1/2 file (magic 'ak42'); only the legacy (v0) export is read")
    for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "seq_len", "vocab_size"):
        if header[key] <= 0 and not (key == "vocab_size" and header[key] < 0):
            raise ValueError(f"{where}: header {key}={header[key]} is not positive; not a llama2.c legacy .bin")
    if size != _llama2c_size(header):
        raise ValueError(
            f"{where}: {size} bytes, but the header {header} means {_llama2c_size(header)} bytes; "
            "not a (complete) llama2.c legacy .bin"
        )
    if header["n_kv_heads"] != header["n_heads"]:
        raise ValueError(
            f"{where}: n_kv_heads={header['n_kv_heads']} < n_heads={header['n_heads']}: "
            "fnlm's attention has one key/value head per query head"
        )
    if header["dim"] % header["n_heads"] or (header["dim"] // header["n_heads"]) % 2:
        raise ValueError(f"{where}: dim={header['dim']} is not n_heads={header['n_heads']} heads of an even size")
    config = TransformerConfig(
        vocab_size=abs(header["vocab_size"]),
        context_length=header["seq_len"],
        d_model=header["dim"],
        num_layers=header["n_layers"],
        num_heads=header["n_heads"],
        d_ff=header["hidden_dim"],
        rope_theta=10000.0,
    )
    return config, header["vocab_size"] > 0


def _llama2c_layout(config: TransformerConfig, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """run.c's order of the weight arrays: (name, shape), a `layers.*` name for each per-layer stack."""
    v, d, f, n = config.vocab_size, config.d_model, config.d_ff, config.num_layers
    rope_table = (config.context_length, config.d_head // 2)
    layout = [
        ("token_embeddings.weight", (v, d)), ("ln1.weight", (n, d)),
        ("attn.q_proj.weight", (n, d, d)), ("attn.k_proj.weight", (n, d, d)), ("attn.v_proj.weight", (n, d, d)),
        ("attn.output_proj.weight", (n, d, d)), ("ln2.weight", (n, d)),
        ("ffn.w1.weight", (n, f, d)), ("ffn.w2.weight", (n, d, f)), ("ffn.w3.weight", (n, f, d)),
        ("ln_final.weight", (d,)), ("freq_cis_real", rope_table), ("freq_cis_imag", rope_table),
    ]
    return layout + ([] if shared else [("lm_head.weight", (v, d))])


def import_llama2c(path: str | os.PathLike) -> tuple[Tree, TransformerConfig]:
    """Read a llama2.c model in its legacy (version 0) `.bin` format.

    The file is a header of 7 int32 (`dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len`; a negative `vocab_size` means a separate classifier follows), then
    float32 arrays in run.c's order: token embedding, the attention RMSNorm gains of all layers,
    `wq`, `wk`, `wv`, `wo`, the FFN gains, `w1`, `w2`, `w3`, the final gain, two RoPE tables
    (unused), and the classifier if separate. Matrices are `(d_out, d_in)`, as in fnlm; llama2.c's
    RoPE rotates interleaved pairs like fnlm's (no reordering), uses θ = 10000 and RMSNorm eps
    1e-5; `w1`/`w3` are the gate/up and `w2` the down projection, fnlm's SwiGLU names.

    **Arguments:**

    - `path`: the `.bin` file.

    **Returns:** `(params, config)`, float32; a shared classifier becomes its own copy of the
    embedding. ValueError when the header or the file size does not fit the format, or
    `n_kv_heads < n_heads` (fnlm has no grouped-query attention).
    """
    path = Path(path)
    where = os.fspath(path)
    size = path.stat().st_size
    if size < 28:
        raise ValueError(f"{where}: {size} bytes, shorter than llama2.c's 28-byte header")
    with open(path, "rb") as f:
        header = dict(zip(_LLAMA2C_HEADER, struct.unpack("<7i", f.read(28))))
    config, shared = _llama2c_config(header, size, where)
    layout = _llama2c_layout(config, shared)
    assert size == 28 + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    data = np.memmap(path, dtype="<f4", mode="r", offset=28)
    arrays: dict[str, torch.Tensor] = {}
    start = 0
    for name, shape in layout:
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(data[start : start + count].reshape(shape).copy())
        start += count
    flat = {"token_embeddings.weight": arrays["token_embeddings.weight"]}
    for i in range(config.num_layers):
        flat |= {f"layers.{i}.{name}": arrays[name][i].clone() for name, _ in layout[1:10]}
    flat["ln_final.weight"] = arrays["ln_final.weight"]
    flat["lm_head.weight"] = arrays["token_embeddings.weight"].clone() if shared else arrays["lm_head.weight"]
    return tree_unflatten({name: flat[name] for name in _expected_shapes(config)}), config


# --- safetensors params --------------------------------------------------------------------------


def _tensors_for_saving(params: Tree) -> dict[str, torch.Tensor]:
    flat = tree_flatten(params)
    if not flat:
        raise ValueError("params is empty: there is nothing to save")
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int, int, str]] = []
    for name, leaf in flat.items():
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"params[{name!r}] is a {type(leaf).__name__}; save_params saves tensor leaves only")
        if leaf.layout != torch.strided:
            raise TypeError(f"params[{name!r}] has layout {leaf.layout}; save_params saves dense tensors only")
        if leaf.numel():
            lo = leaf.data_ptr()
            hi = lo + leaf.element_size() * (1 + sum((s - 1) * st for s, st in zip(leaf.shape, leaf.stride())))
            spans.append((leaf.untyped_storage().data_ptr(), lo, hi, name))
        out[name] = leaf.detach()
    spans.sort()
    for (store_a, _, hi_a, a), (store_b, lo_b, _, b) in zip(spans, spans[1:]):
        if store_a == store_b and lo_b < hi_a:
            raise ValueError(
                f"params[{a!r}] and params[{b!r}] share memory (tied or overlapping views); a safetensors "
                "file stores each tensor once: save a copy (.clone()) of one of them"
            )
    return {name: t.cpu().contiguous() for name, t in out.items()}


def save_params(params: Tree, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Write a params tree as a safetensors file, under its flat CS336 names
    (`layers.0.attn.q_proj.weight`, ...): readable by `safetensors.torch.load_file` anywhere.

    Tensors are stored on the CPU in their dtype; a non-contiguous tensor is stored as its
    contiguous copy (same values). The order of the names is kept, so `load_params` returns a
    tree that flattens in the same order.

    **Arguments:**

    - `params`: a tree of tensors (`fnlm.tree_flatten`'s containers).
    - `path`: the file to write.
    - `metadata`: `str -> str` to store in the header (e.g. `json.dumps(dataclasses.asdict(config))`);
      read it back with `load_params_metadata`.

    TypeError for a leaf that is not a dense tensor or metadata that is not `str -> str`;
    ValueError for an empty tree or two leaves that share memory (e.g. a tied head).
    """
    tensors = _tensors_for_saving(params)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must be a dict of str -> str, got {metadata!r:.200}")
    if _NAMES_KEY in metadata:
        raise ValueError(f"metadata key {_NAMES_KEY!r} is reserved by fnlm (the order of the names)")
    save_file(tensors, os.fspath(path), metadata={**metadata, _NAMES_KEY: json.dumps(list(tensors))})
    _umask_mode(path)


def load_params(path: str | os.PathLike, *, config: TransformerConfig | None = None) -> Tree:
    """Read a safetensors file into a params tree (`fnlm.tree_unflatten` of its names).

    **Arguments:**

    - `path`: a file `save_params` wrote, or any safetensors file with dotted names.
    - `config`: when given, the tree must hold every parameter of `config`'s model with its shape
      and a floating dtype (`fnlm.model.check_params`).

    **Returns:** the tree, on the CPU, names in the order they were saved (sorted for files from
    elsewhere). FileNotFoundError when the file is missing; ValueError naming the file for a file
    that is not safetensors, a garbled fnlm name list (the `__fnlm_names__` metadata key), names
    that do not form a tree, or tensors that do not fit `config`.
    """
    name = os.fspath(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no safetensors file at {name!r}")
    if config is not None and not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a fnlm.TransformerConfig or None, got {type(config).__name__}")
    try:
        metadata = _raw_metadata(name) or {}
        flat = load_file(name)
    except SafetensorError as e:
        raise ValueError(f"{name!r}: not a readable safetensors file ({e})") from None
    names = _stored_names(metadata.get(_NAMES_KEY), flat, name)
    try:
        tree = tree_unflatten({n: flat[n] for n in names})
    except ValueError as e:
        raise ValueError(f"{name!r}: the tensor names do not form a params tree ({e})") from None
    if config is not None:
        try:
            check_params(tree, config)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{name!r}: the tensors do not fit the config: {e}") from None
    return tree


def _stored_names(order: str | None, flat: dict[str, torch.Tensor], where: str) -> list[str]:
    """The saved order of the names (metadata `__fnlm_names__`, a JSON list), or sorted names."""
    if order is None:
        return sorted(flat)
    try:
        names = json.loads(order)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where!r}: metadata {_NAMES_KEY!r} is not valid JSON ({e.msg})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where!r}: metadata {_NAMES_KEY!r} must be a JSON list of distinct names, got {order!r:.80}")
    if sorted(names) != sorted(flat):
        missing, extra = sorted(set(flat) - set(names)), sorted(set(names) - set(flat))
        raise ValueError(f"{where!r}: metadata {_NAMES_KEY!r} does not match the tensors: unlisted {missing[:4]}, "
                         f"absent {extra[:4]}")
    return names


def _raw_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    with safe_open(os.fspath(path), framework="pt") as f:
        return f.metadata()


def load_params_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `metadata` that `save_params` stored with the tensors (`{}` if none)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no safetensors file at {os.fspath(path)!r}")
    return {k: v for k, v in (_raw_metadata(path) or {}).items() if k != _NAMES_KEY}
