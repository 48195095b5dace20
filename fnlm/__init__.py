"""fnlm: a functional, JAX-style language-model library on PyTorch.

Parameters are data (nested dicts of tensors); layers are pure functions.

The package face is lazy (PEP 562): `import fnlm` loads nothing heavy, and each name below is
imported from its module on first use, so `from fnlm.tokenizer import train_bpe` never loads
torch. The `if TYPE_CHECKING:` block is the one list of public names: type checkers and editors
read it as ordinary imports, and `__getattr__` reads the same block to know where each name lives.

Set ``FNLM_TYPECHECK=1`` before the first import to check every annotated shape at runtime.
"""

from __future__ import annotations

import ast as _ast
import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

TYPECHECK_ENV_VAR = "FNLM_TYPECHECK"
_typecheck_on = _os.environ.get(TYPECHECK_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")
if _typecheck_on:
    from jaxtyping import install_import_hook as _install_import_hook

    _install_import_hook("fnlm", "beartype.beartype")

if TYPE_CHECKING:
    from fnlm import accounting, compat, interop, nn, optim, tokenizer, train
    from fnlm.accounting import (
        adamw_memory,
        forward_flops,
        measure_matmul_peak,
        mfu,
        parameter_count,
        training_flops,
    )
    from fnlm.autodiff import per_example_grad_norms, per_example_grads, value_and_grad
    from fnlm.checkpoint import (
        capture_rng_state,
        check_params_match,
        load_checkpoint,
        restore_rng_state,
        save_checkpoint,
    )
    from fnlm.data import batch_generator, get_batch, load_tokens
    from fnlm.interop import export_hf, import_hf, import_llama2c, load_params, save_params
    from fnlm.loss import cross_entropy, perplexity
    from fnlm.model import (
        ATTENTIONS,
        BLOCKS,
        FFN_INITS,
        FFNS,
        NORMS,
        KVCache,
        TransformerConfig,
        block_from_config,
        check_params,
        check_token_ids,
        init_kv_cache,
        init_transformer_block,
        init_transformer_lm,
        param_names,
        post_norm_block,
        transformer_block,
        transformer_lm,
    )
    from fnlm.nn import (
        AttentionContext,
        LayerKV,
        RopeCache,
        attention_context,
        causal_mask,
        embedding,
        init_embedding,
        init_linear,
        init_multihead_self_attention,
        init_rmsnorm,
        init_silu_ffn,
        init_swiglu,
        kv_append,
        linear,
        merge_heads,
        multihead_self_attention,
        no_norm,
        no_position,
        nope_self_attention,
        rmsnorm,
        rope,
        rope_cache,
        rope_cos_sin,
        rope_position,
        rope_rotate,
        rope_rotate_tables,
        rope_tables,
        scaled_dot_product_attention,
        self_attention,
        silu,
        silu_ffn,
        softmax,
        split_heads,
        swiglu,
        swiglu_d_ff,
    )
    from fnlm.optim import (
        adamw_init,
        adamw_step,
        clip_grad_norm,
        clip_grad_norm_with_norm,
        cosine_schedule,
        default_decay_mask,
        global_norm,
        sgd_init,
        sgd_step,
    )
    from fnlm.sampling import generate, sample_next_token, top_p_mask
    from fnlm.tokenizer import ENDOFTEXT, Tokenizer, encode_file, train_bpe
    from fnlm.train import StepConfig, TrainConfig, TrainState, init_train_state, train_step
    from fnlm.tree import (
        tree_flatten,
        tree_leaves,
        tree_map,
        tree_map_with_path,
        tree_size,
        tree_stack,
        tree_unflatten,
        tree_unstack,
    )
    from fnlm.types import typecheck_enabled


def _lazy_exports() -> dict[str, tuple[str, str | None]]:
    """``{public name: (module, attribute or None for a submodule)}``, read from the
    ``if TYPE_CHECKING:`` block of this file."""
    with open(__file__, encoding="utf-8") as f:
        tree = _ast.parse(f.read())
    block = next(n for n in tree.body if isinstance(n, _ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    exports: dict[str, tuple[str, str | None]] = {}
    for node in block.body:
        if isinstance(node, _ast.ImportFrom) and node.module == __name__:
            for alias in node.names:
                exports[alias.asname or alias.name] = (f"{__name__}.{alias.name}", None)
        elif isinstance(node, _ast.ImportFrom):
            for alias in node.names:
                exports[alias.asname or alias.name] = (node.module, alias.name)
    return exports


_EXPORTS = _lazy_exports()
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'fnlm' has no attribute {name!r}") from None
    value = _importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
