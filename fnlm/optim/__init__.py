"""Optimizers: gradient transformations (optax's design), the CS336 pure steps, schedules, clipping.

- **Gradient transformations** (`fnlm.optim.transform`, `fnlm.optim.alias`): a transformation is
  `init(params) -> state` and `update(updates, state, params) -> (updates, state)`; `chain`
  composes them, `apply_updates` adds the updates to the params, `optimizer_step` does both (with
  a fused kernel where the transformation has one). Names, arguments and semantics follow optax:
  `scale_by_adam`, `scale_by_lion`, `trace`, `add_decayed_weights`, `scale_by_learning_rate`,
  `clip_by_global_norm`, `identity`, `scale`, `set_to_zero`; aliases `adamw`, `sgd`, `lion`;
  `adamw_cs336` is CS336's Algorithm 2, `train_step`'s default.
- **Combinators** (`fnlm.optim.combine`, `fnlm.optim.accumulate`): `masked` (a transformation on
  some leaves), `multi_transform` / `partition` (one per group of leaves), `MultiSteps`
  (accumulate K calls' gradients), as optax's.
- **Muon** (`fnlm.optim.orthogonal`): `scale_by_muon` (`torch.optim.Muon`'s update of 2-D matrices) and
  `muon`, Muon for the hidden matrices with AdamW for the other leaves.
- **The CS336 interface** (`fnlm.optim.steps`): `adamw_init` / `adamw_step`, `sgd_init` /
  `sgd_step`: pure `(params, state, grads) -> (params, state)` steps (`donate=True` updates in place).
- **Schedules and clipping**: `cosine_schedule`, `warmup_cosine_schedule`; `global_norm`,
  `clip_grad_norm`, `clip_grad_norm_with_norm`.
"""

from fnlm.optim._common import DecayMask, Scalar, check_hyper, default_decay_mask
from fnlm.optim.accumulate import MultiSteps
from fnlm.optim.alias import adamw, adamw_cs336, lion, sgd
from fnlm.optim.clipping import CLIP_EPS, clip_grad_norm, clip_grad_norm_with_norm, global_norm
from fnlm.optim.combine import masked, multi_transform, partition
from fnlm.optim.orthogonal import NS_COEFFS, hidden_matrix_mask, muon, orthogonalize_via_newton_schulz, scale_by_muon
from fnlm.optim.schedules import Schedule, constant_schedule, cosine_schedule, warmup_cosine_schedule
from fnlm.optim.steps import adamw_init, adamw_step, sgd_init, sgd_step
from fnlm.optim.transform import (
    GradientTransformation,
    GradientTransformationExtraArgs,
    OptState,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    identity,
    optimizer_step,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    set_to_zero,
    trace,
)

__all__ = [
    "DecayMask", "check_hyper", "default_decay_mask", "CLIP_EPS", "clip_grad_norm", "clip_grad_norm_with_norm",
    "global_norm", "Schedule", "constant_schedule", "cosine_schedule", "warmup_cosine_schedule", "adamw_init",
    "adamw_step", "sgd_init", "sgd_step", "GradientTransformation", "GradientTransformationExtraArgs", "OptState",
    "add_decayed_weights", "apply_updates", "chain", "clip_by_global_norm", "identity", "optimizer_step", "scale",
    "scale_by_adam", "scale_by_learning_rate", "trace", "adamw", "adamw_cs336", "sgd", "Scalar", "MultiSteps",
    "lion", "masked", "multi_transform", "partition", "NS_COEFFS", "hidden_matrix_mask", "muon",
    "orthogonalize_via_newton_schulz", "scale_by_muon", "scale_by_lion", "set_to_zero",
]
