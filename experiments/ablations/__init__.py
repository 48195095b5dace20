"""The assignment's ablations, each a plain LM function built by passing parts into `fnlm.transformer_lm`.

```python
from experiments.ablations import ABLATIONS
ab = ABLATIONS["nope"]
config = ab.config_for(base_config)
params = ab.init_fn(config, seed=0)
logits = ab.model_fn(params, token_ids, config)
fnlm.trainer.train(config, train_config, train_ids, valid_ids, "runs/nope", model_fn=ab.model_fn, init_fn=ab.init_fn)
```

One module per ablation: `no_rmsnorm`, `post_norm`, `nope`, `silu_ffn`; `qk_norm` is the
"write your own" example. `experiments/run_ablations.py` trains and compares them.
"""

from .nope import NOPE, nope_lm
from .no_rmsnorm import NO_RMSNORM, init_no_rmsnorm_lm, no_rmsnorm_lm
from .post_norm import POST_NORM, post_norm_lm
from .qk_norm import QK_NORM, init_qk_norm_block, init_qk_norm_lm, qk_norm_attention, qk_norm_lm
from .silu_ffn import SILU_FFN, init_silu_block, init_silu_ffn_lm, silu_d_ff, silu_ffn_lm
from .variant import BASELINE, Ablation, with_fields

ABLATIONS: dict[str, Ablation] = {a.name: a for a in (BASELINE, NO_RMSNORM, POST_NORM, NOPE, SILU_FFN, QK_NORM)}

__all__ = [
    "Ablation", "with_fields", "ABLATIONS", "BASELINE", "NO_RMSNORM", "POST_NORM", "NOPE", "SILU_FFN", "QK_NORM",
    "no_rmsnorm_lm", "init_no_rmsnorm_lm", "post_norm_lm", "nope_lm", "silu_ffn_lm", "init_silu_ffn_lm",
    "init_silu_block", "silu_d_ff", "qk_norm_lm", "init_qk_norm_lm", "init_qk_norm_block", "qk_norm_attention",
]
