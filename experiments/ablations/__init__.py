"""The ablations, each defined once, in one registry.

```python
from ablations import ABLATIONS
ab = ABLATIONS["nope"]
config = ab.config_for(base_config)
params = ab.init_fn(config, seed=0)
logits = ab.model_fn(params, token_ids, config)
fnlm.train.train(config, train_config, train_ids, valid_ids, "runs/nope", model_fn=ab.model_fn, init_fn=ab.init_fn)
```

`assignment` holds the baseline and the assignment's four (each a config change that selects one
of the library's parts); `qk_norm` is the "write your own" example (its own block and init).
`optimizers` is the optimizer ablation (`OPTIMIZER_ABLATION`: AdamW, Lion, Muon and SGD at their
tuned rates; `optimizer_configs(train_config)` gives one `TrainConfig` per optimizer).
`experiments/run_ablations.py` trains and compares them.
"""

from .assignment import BASELINE, NO_RMSNORM, NOPE, POST_NORM, SILU_FFN, silu_d_ff
from .optimizers import OPTIMIZER_ABLATION, OptimizerChoice, optimizer_configs, parse_optimizers
from .qk_norm import QK_NORM, init_qk_norm_block, qk_norm_attention
from .variant import Ablation, with_fields

ABLATIONS: dict[str, Ablation] = {a.name: a for a in (BASELINE, NO_RMSNORM, POST_NORM, NOPE, SILU_FFN, QK_NORM)}

__all__ = [
    "ABLATIONS",
    "BASELINE",
    "NOPE",
    "NO_RMSNORM",
    "OPTIMIZER_ABLATION",
    "POST_NORM",
    "QK_NORM",
    "SILU_FFN",
    "Ablation",
    "OptimizerChoice",
    "init_qk_norm_block",
    "optimizer_configs",
    "parse_optimizers",
    "qk_norm_attention",
    "silu_d_ff",
    "with_fields",
]
