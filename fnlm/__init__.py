"""fnlm: a functional, JAX-style language-model library on PyTorch.

Parameters are data (nested dicts of tensors); layers are pure functions.
Set ``FNLM_TYPECHECK=1`` before the first import to check every annotated shape at runtime.
"""

from fnlm.types import typecheck_requested as _typecheck_requested

if _typecheck_requested():
    from jaxtyping import install_import_hook as _install_import_hook

    import fnlm.types as _types

    _install_import_hook("fnlm", "beartype.beartype")
    _types._mark_enabled()

from fnlm.tree import (  # noqa: E402
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_map_with_path,
    tree_size,
    tree_unflatten,
)
from fnlm.types import typecheck_enabled  # noqa: E402

# --- core (nn, model) ---
from fnlm.nn import (  # noqa: E402
    RopeCache,
    causal_mask,
    embedding,
    init_embedding,
    init_linear,
    init_multihead_self_attention,
    init_rmsnorm,
    init_silu_ffn,
    init_swiglu,
    linear,
    merge_heads,
    multihead_self_attention,
    rmsnorm,
    rope,
    rope_cache,
    rope_cos_sin,
    rope_rotate,
    scaled_dot_product_attention,
    silu,
    silu_ffn,
    softmax,
    split_heads,
    swiglu,
    swiglu_d_ff,
)
from fnlm.model import (  # noqa: E402
    ATTENTIONS,
    BLOCKS,
    FFNS,
    NORMS,
    AttentionContext,
    KVCache,
    LayerKV,
    TransformerConfig,
    attention_context,
    block_from_config,
    init_kv_cache,
    init_transformer_block,
    init_transformer_lm,
    kv_append,
    no_norm,
    no_position,
    nope_self_attention,
    param_names,
    post_norm_block,
    rope_position,
    self_attention,
    transformer_block,
    transformer_lm,
)
from fnlm.generate import generate, sample_next_token, top_p_mask  # noqa: E402
from fnlm import compat  # noqa: E402  (nn.Module shims: fnlm.compat.Linear, ..., TransformerLM)

# --- training maths (loss, optim, schedule, data, checkpoint) ---
from fnlm.autodiff import value_and_grad  # noqa: E402
from fnlm.checkpoint import (  # noqa: E402
    capture_rng_state,
    check_params_match,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fnlm.data import get_batch, load_tokens  # noqa: E402
from fnlm.loss import cross_entropy, perplexity  # noqa: E402
from fnlm.optim import (  # noqa: E402
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

# --- tokenizer ---
from fnlm.tokenizer.tokenizer import Tokenizer  # noqa: E402
from fnlm.tokenizer.corpus import encode_file  # noqa: E402
from fnlm.tokenizer.train import train_bpe  # noqa: E402

# --- generation, accounting ---
from fnlm import accounting  # noqa: E402
from fnlm.accounting import (  # noqa: E402
    adamw_memory,
    forward_flops,
    measure_matmul_peak,
    mfu,
    parameter_count,
    training_flops,
)

# --- end to end (stories, datasets, trainer, pipeline) ---
from fnlm import datasets, stories, trainer  # noqa: E402
from fnlm.trainer import Parallel, TrainConfig, train  # noqa: E402

# --- distributed ---
from fnlm import distributed  # noqa: E402

__version__ = "0.1.0"
