"""The optimizer ablation: AdamW, Lion, Muon and SGD, each at its own tuned peak learning rate.

```python
from ablations import OPTIMIZER_ABLATION, optimizer_configs
configs = optimizer_configs(base_train_config)                # {"adamw": TrainConfig, "lion": ..., ...}
configs = optimizer_configs(base_train_config, {"adamw": None, "lion": 3e-4})  # a subset; None: tuned rate
```

Each run changes only the step's `optimizer`, `lr`, `min_lr` (the same fraction of the peak for
all: `min_lr_ratio`) and `momentum`; warm-up, cosine length, betas, weight decay (0.1), gradient
clipping (1.0), data, seed and budget are the base config's. `experiments/run_ablations.py
--optimizers` trains them (`--optimizers adamw,lion:3e-4` for a subset, `name:lr` overriding the
tuned rate); `--optimizer lion --lrs 1e-4,3e-4,1e-3` sweeps the rate of one optimizer.

| name | `StepConfig` | peak lr | tried |
| --- | --- | ---: | --- |
| `adamw` | `optimizer="adamw"` (`torch.optim.AdamW`'s form) | 3e-2 | 3e-3, 1e-2, 3e-2, 1e-1 |
| `lion` | `optimizer="lion"` | 1e-2 | 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2 |
| `muon` | `optimizer="muon"`, momentum 0.95 | 1e-1 | 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1 |
| `sgd` | `optimizer="sgd"`, momentum 0.9 | 1 | 3e-2, 1e-1, 3e-1, 1, 2, 3 |

The rates were tuned on the `smoke` preset (model d_model 64, 2 layers, 2 heads, d_ff 192,
context 64; 60 steps × 16 × 64 = 61,440 tokens, 10 warm-up steps, cosine to 0.1 × the peak,
seed 0): one `--lrs` sweep per optimizer over the values in the last column
(`run_ablations.py --preset smoke --optimizer NAME --lrs ... --vectorize`), keeping the rate with
the lowest final validation loss. At that size and budget they favour high rates; re-tune for a
longer run or a larger model. Muon's one rate is also the rate of the AdamW that
`fnlm.optim.muon` applies to the embeddings, the LM head and the gains (`build_optimizer`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fnlm.train import TrainConfig

__all__ = ["OPTIMIZER_ABLATION", "OptimizerChoice", "optimizer_configs", "parse_optimizers"]


@dataclass(frozen=True)
class OptimizerChoice:
    """One optimizer of the ablation.

    **Fields:**

    - `name`: the `StepConfig.optimizer` value (also the run's row name).
    - `description`: one line for the table's legend.
    - `lr`: its tuned peak learning rate.
    - `min_lr_ratio`: the cosine's final rate as a fraction of the peak.
    - `momentum`: SGD's or Muon's momentum (`None` for the optimizers without one).
    """

    name: str
    description: str
    lr: float
    min_lr_ratio: float = 0.1
    momentum: float | None = None

    def train_config(self, base: TrainConfig, lr: float | None = None) -> TrainConfig:
        """`base` with this optimizer at `lr` (default: the tuned rate); nothing else changes.

        **Arguments:**

        - `base`: the run's settings.
        - `lr`: a peak rate overriding the tuned one (a finite number above 0), or `None`.

        **Returns:** a `TrainConfig` differing from `base` only in `step.optimizer`, `step.lr`,
        `step.min_lr` and `step.momentum`.
        """
        lr = self.lr if lr is None else lr
        _check_lr(self.name, lr)
        return base.with_step(optimizer=self.name, lr=lr, min_lr=lr * self.min_lr_ratio, momentum=self.momentum)


OPTIMIZER_ABLATION: dict[str, OptimizerChoice] = {o.name: o for o in (
    OptimizerChoice("adamw", "AdamW (decoupled weight decay, torch.optim.AdamW's form)", 3e-2),
    OptimizerChoice("lion", "Lion: the sign of an interpolated momentum, decoupled weight decay", 1e-2),
    OptimizerChoice("muon", "Muon (orthogonalised Nesterov momentum) on hidden matrices, AdamW on the rest",
                    1e-1, momentum=0.95),
    OptimizerChoice("sgd", "SGD with momentum 0.9 and L2 weight decay", 1.0, momentum=0.9),
)}
"""The optimizer ablation, by name."""


def _check_lr(name: str, lr: float) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate of {name!r}: expected a finite number above 0, got {lr!r}")


def optimizer_configs(base: TrainConfig, chosen: Mapping[str, float | None] | Iterable[str] | None = None
                      ) -> dict[str, TrainConfig]:
    """One `TrainConfig` per optimizer of the ablation, from a base config.

    **Arguments:**

    - `base`: the settings every run shares.
    - `chosen`: the optimizers, in order: names, or a mapping of name to a peak rate overriding the
      tuned one (`None`: the tuned rate); default all of `OPTIMIZER_ABLATION`.

    **Returns:** `{name: config}`, each config `base` with only `step.optimizer`, `step.lr`,
    `step.min_lr` and `step.momentum` changed (`OptimizerChoice.train_config`).

    **Raises:** `ValueError` naming an unknown optimizer or a rate that is not a finite number above 0.
    """
    if chosen is None:
        chosen = dict.fromkeys(OPTIMIZER_ABLATION)
    elif not isinstance(chosen, Mapping):
        chosen = dict.fromkeys(chosen)
    unknown = [n for n in chosen if n not in OPTIMIZER_ABLATION]
    if unknown:
        raise ValueError(f"optimizers: unknown name(s) {unknown}; choose from {list(OPTIMIZER_ABLATION)}")
    return {n: OPTIMIZER_ABLATION[n].train_config(base, lr) for n, lr in chosen.items()}


def parse_optimizers(text: str | None) -> dict[str, float | None]:
    """The optimizers a command line names: `""`/`None` for all, else `adamw,lion:3e-4` (a rate
    after a colon overrides the tuned one).

    **Arguments:**

    - `text`: the flag's value.

    **Returns:** `{name: lr or None}`, in the given order.

    **Raises:** `ValueError` for an unknown or repeated name, or a rate that is not a finite number
    above 0.
    """
    if not text:
        return dict.fromkeys(OPTIMIZER_ABLATION)
    chosen: dict[str, float | None] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, rate = (s.strip() for s in item.partition(":"))
        if name not in OPTIMIZER_ABLATION:
            raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_ABLATION)} "
                             "(optionally name:lr, e.g. lion:3e-4)")
        if name in chosen:
            raise ValueError(f"{name!r} is named twice")
        try:
            lr = float(rate) if sep else None
        except ValueError:
            raise ValueError(f"{item!r}: the learning rate after ':' must be a number, got {rate!r}") from None
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{item!r}: the learning rate must be a finite number above 0, got {rate!r}")
        chosen[name] = lr
    if not chosen:
        raise ValueError(f"no optimizer named in {text!r}; choose from {', '.join(OPTIMIZER_ABLATION)}")
    return chosen
