"""The one pure training step: `train_step(state, x, y, *, loss_fn, config) -> (state, metrics)`.

```python
state = fnlm.init_train_state(params)                         # params, AdamW state, step 0
config = fnlm.StepConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, cosine_steps=100)
for _ in range(100):
    x, y = fnlm.get_batch(tokens, 8, 64, "cpu", generator=gen)
    state, metrics = fnlm.train_step(state, x, y, loss_fn=loss_fn, config=config)
print(float(metrics["loss"]), state.step)
```

A step is the loss and gradients through `value_and_grad` (over `grad_accum_steps` micro-batches
of the batch), an optional gradient average across processes (`sync_grads`), global-norm clipping,
and one update by the optimizer, a gradient transformation (`fnlm.optim`): the one `config` names
(by default CS336's AdamW, `fnlm.optim.adamw_cs336`, on the cosine schedule), or any other passed
as `optimizer=`. The training loop (`fnlm.train.train`), the benchmarks, the ablation runner, the
data-parallel path and vectorized sweeps all call this function, so there is one definition of
what a step is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fnlm.autodiff import value_and_grad
from fnlm.optim import (
    GradientTransformation,
    adamw,
    adamw_cs336,
    add_decayed_weights,
    chain,
    clip_grad_norm_with_norm,
    global_norm,
    optimizer_step,
    sgd,
    warmup_cosine_schedule,
)
from fnlm.optim.schedules import Schedule
from fnlm.tree import Tree, _map_keeping_types, tree_flatten, tree_leaves, tree_unflatten
from fnlm.types import Tensor, tracing

__all__ = ["TrainState", "StepConfig", "OPTIMIZERS", "init_train_state", "learning_rate", "lr_schedule",
           "build_optimizer", "train_step"]


class TrainState(NamedTuple):
    """Everything a step changes: the params tree, the optimizer state (mirroring the params) and
    `step`, the number of optimizer steps taken so far (an int).

    A `NamedTuple`, hence a pytree: `torch.func` transforms and `torch.utils._pytree` see its
    tensors. Replace a field with `state._replace(params=...)`.
    """

    params: Tree
    opt_state: Tree
    step: int


class StepConfig(NamedTuple):
    """The settings of one step: the optimizer and its schedule, clipping, accumulation.

    **Fields:**

    - `lr`: peak learning rate of the cosine schedule (a float, or a 0-d tensor per model in a
      vectorized sweep).
    - `min_lr`: final learning rate of the cosine schedule (a float or, in a sweep, a tensor).
    - `warmup_steps`: steps of linear warm-up to `lr`.
    - `cosine_steps`: the step where the cosine reaches `min_lr`; None: the end of the run (the
      training loop fills it in; a bare `train_step` keeps `lr` after the warm-up).
    - `betas`: the moment decays `(b1, b2)` of AdamW, Lion and Muon's AdamW part.
    - `eps`: AdamW's denominator epsilon.
    - `weight_decay`: decoupled weight decay (a float, or a 0-d tensor per model in a sweep).
    - `grad_clip`: global gradient-norm limit; `0` turns clipping off.
    - `optimizer`: `adamw_cs336` (CS336's Algorithm 2, the default), `adamw` (optax's and
      `torch.optim.AdamW`'s form), `sgd`, `lion` or `muon` (see `build_optimizer`).
    - `momentum`: SGD's and Muon's momentum; None: the optimizer's default (SGD 0.9, Muon 0.95).
    - `grad_accum_steps`: micro-batches each batch is split into; their gradients are averaged
      (the same step to float tolerance, with a K-th of the activation memory).
    """

    lr: float | Tensor = 1e-3
    min_lr: float | Tensor = 1e-4
    warmup_steps: int = 100
    cosine_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float | Tensor = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw_cs336"
    momentum: float | None = None
    grad_accum_steps: int = 1


OPTIMIZERS = ("adamw_cs336", "adamw", "sgd", "lion", "muon")
"""The optimizers `StepConfig.optimizer` names."""


def lr_schedule(config: StepConfig) -> Schedule:
    """The learning-rate schedule of `config`: linear warm-up to `lr`, cosine to `min_lr` at
    `cosine_steps` (`fnlm.optim.warmup_cosine_schedule`), as a function of the step."""
    return warmup_cosine_schedule(config.lr, config.min_lr, config.warmup_steps, config.cosine_steps)


def learning_rate(step: int | Tensor, config: StepConfig) -> float | Tensor:
    """The rate of `config`'s schedule at `step` (`cosine_schedule`); for a 0-d tensor `step`, the
    same formula in tensor ops (float64), so a compiled step has no branch on the step's value."""
    return lr_schedule(config)(step)


def build_optimizer(config: StepConfig) -> GradientTransformation:
    """The gradient transformation `config.optimizer` names, on `config`'s schedule (clipping is the
    step's, not the optimizer's: see `train_step`).

    - `adamw_cs336`: `fnlm.optim.adamw_cs336(schedule, *betas, eps, weight_decay)`;
    - `adamw`: `fnlm.optim.adamw(schedule, *betas, eps, weight_decay=weight_decay)`;
    - `sgd`: `chain(add_decayed_weights(weight_decay), sgd(schedule, momentum))` (L2 decay, as
      `torch.optim.SGD`), momentum 0.9 unless given;
    - `lion`: `fnlm.optim.lion(schedule, *betas, weight_decay=weight_decay)`;
    - `muon`: `fnlm.optim.muon(schedule, beta=momentum, weight_decay=weight_decay, adam_b1=b1,
      adam_b2=b2, adam_eps=eps)`: Muon for the 2-D hidden matrices, AdamW (same schedule and decay)
      for the embeddings, the LM head and gains; momentum 0.95 unless given.

    **Arguments:**

    - `config`: a `StepConfig`.

    **Returns:**

    A `GradientTransformation`.
    """
    schedule = lr_schedule(config)
    b1, b2 = config.betas
    wd = config.weight_decay
    name = config.optimizer
    if name == "adamw_cs336":
        return adamw_cs336(schedule, b1, b2, config.eps, wd)
    if name == "adamw":
        return adamw(schedule, b1, b2, config.eps, weight_decay=wd)
    if name == "sgd":
        momentum = 0.9 if config.momentum is None else config.momentum
        return chain(add_decayed_weights(wd), sgd(schedule, momentum or None))
    if name == "lion":
        from fnlm.optim import lion

        return lion(schedule, b1, b2, weight_decay=wd)
    if name == "muon":
        from fnlm.optim import muon

        momentum = 0.95 if config.momentum is None else config.momentum
        return muon(schedule, beta=momentum, weight_decay=wd, adam_b1=b1, adam_b2=b2, adam_eps=config.eps)
    raise ValueError(f"StepConfig.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _counts_as_tensors(tree: Any, device: torch.device) -> Any:
    return _map_keeping_types(
        lambda x: torch.tensor(x, dtype=torch.int64, device=device) if type(x) is int else x, tree)


def init_train_state(
    params: Tree, optimizer: GradientTransformation | StepConfig | None = None, *, step_tensor: bool = False
) -> TrainState:
    """A fresh `TrainState`: `params`, the optimizer's initial state, `step = 0`.

    **Arguments:**

    - `params`: the params tree.
    - `optimizer`: a gradient transformation, or a `StepConfig` naming one (`build_optimizer`);
      default: CS336's AdamW, whose state is `adamw_init(params)` (zero moments, `step` 0).
    - `step_tensor`: make the step counters (`state.step` and every integer count in the optimizer
      state) 0-d int64 tensors on the params' device: a `torch.compile`d `train_step` then
      compiles once, with the learning-rate schedule computed in tensor ops inside the graph (with
      a Python int it guards on the value and recompiles as it changes).

    **Returns:**

    A `TrainState`.
    """
    if isinstance(optimizer, StepConfig) or optimizer is None:
        optimizer = build_optimizer(optimizer or StepConfig())
    opt_state = optimizer.init(params)
    if not step_tensor:
        return TrainState(params, opt_state, 0)
    device = next(iter(tree_flatten(params).values())).device
    return TrainState(params, _counts_as_tensors(opt_state, device), torch.zeros((), dtype=torch.int64, device=device))


def _identity(tree: Tree) -> Tree:
    return tree


def _clip_own_grads(grads: Tree, max_norm: float) -> tuple[Tree, Tensor]:
    """`clip_grad_norm_with_norm` for the gradients this step made itself: nothing else holds them,
    so they are donated and scaled in place (the pure function allocates a new tree as large as the
    gradients; `benchmarks/train_step.py` times both), except under `torch.compile` and
    `torch.func` transforms, which get the pure function. `max_norm` 0 leaves them unclipped."""
    if max_norm <= 0:
        return grads, global_norm(grads)
    return clip_grad_norm_with_norm(grads, max_norm, donate=not tracing())


def _add_into(total: list[Tensor], more: list[Tensor]) -> list[Tensor]:
    if tracing():
        return [a + b for a, b in zip(total, more)]
    torch._foreach_add_(total, more)
    return total


def _accumulated_grads(loss_fn: Callable, params: Tree, x: Tensor, y: Tensor, k: int,
                       backend: str) -> tuple[Tensor, Tree]:
    """The mean loss and gradients over `k` equal micro-batches of `(x, y)` (split on the first
    axis): the whole batch's, to float rounding, holding one micro-batch's activations at a time."""
    grad_fn = value_and_grad(loss_fn, backend=backend)
    if k == 1:
        return grad_fn(params, x, y)
    if k < 1 or x.shape[0] % k or y.shape[0] != x.shape[0]:
        raise ValueError(f"grad_accum_steps={k} must be >= 1 and divide the batch: x has {x.shape[0]} rows, "
                         f"y has {y.shape[0]}")
    loss, grads = grad_fn(params, x[: x.shape[0] // k], y[: y.shape[0] // k])
    names = list(tree_flatten(grads))
    total = tree_leaves(grads)
    for xi, yi in zip(x.chunk(k)[1:], y.chunk(k)[1:]):
        more_loss, more = grad_fn(params, xi, yi)
        total = _add_into(total, tree_leaves(more))
        loss = loss + more_loss
    with torch.no_grad():
        total = [g / k for g in total] if tracing() else torch._foreach_div_(total, float(k)) or total
    return loss / k, tree_unflatten(dict(zip(names, total)))


def train_step(
    state: TrainState,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tree, Tensor, Tensor], Tensor],
    config: StepConfig | None = None,
    optimizer: GradientTransformation | None = None,
    sync_grads: Callable[[Tree], Tree] = _identity,
    donate: bool = False,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step; pure: `state` is not modified, a new one is returned (unless `donate`).

    **Arguments:**

    - `state`: the `TrainState` before the step (its `step` an int, or a 0-d tensor from
      `init_train_state(..., step_tensor=True)` for a compiled step); its `opt_state` is the
      optimizer's (`init_train_state(params, optimizer)`).
    - `x`, `y`: a batch of inputs and targets, e.g. int64 `(batch, seq)` from `get_batch`.
    - `loss_fn`: `(params, x, y) -> scalar loss`.
    - `config`: a `StepConfig`: the gradient clipping and accumulation of the step, and the
      optimizer when `optimizer` is not given. Default: `StepConfig()` without `optimizer`; with
      `optimizer` and no `config`, the step does not clip (put `fnlm.optim.clip_by_global_norm` in
      the chain) and does not accumulate.
    - `optimizer`: any gradient transformation (`fnlm.optim`); default: `build_optimizer(config)`.
    - `sync_grads`: applied to the gradient tree before clipping (data-parallel runs average it over
      processes here); the identity by default.
    - `donate`: JAX's donation. `True` lets the step update the tensors of `state` in place and
      return them in the new state, so a step holds one copy of the parameters and optimizer state
      instead of two. The old `state` must not be used afterwards. The results are the same as
      without donation. (The step's own gradients are always clipped in place outside
      `torch.compile` and `torch.func`.)

    **Returns:** `(new_state, metrics)` with `metrics = {"loss", "grad_norm"}` (and `"lr"` when
    the optimizer comes from `config`): the loss and the gradient norm before clipping as 0-d
    tensors (no host sync), and the learning rate of this step.

    Compiles whole: `torch.compile(functools.partial(train_step, loss_fn=..., config=...),
    fullgraph=True)` is one graph with no break (gradients through `torch.func` there, since
    `torch.autograd.grad` breaks a graph); start it from `init_train_state(params, step_tensor=True)`.
    """
    if config is None:
        config = StepConfig() if optimizer is None else StepConfig(grad_clip=0.0)
    metrics: dict[str, Any] = {}
    if optimizer is None:
        optimizer = build_optimizer(config)
        metrics["lr"] = learning_rate(state.step, config)
    backend = "func" if torch.compiler.is_compiling() else "autograd"
    loss, grads = _accumulated_grads(loss_fn, state.params, x, y, config.grad_accum_steps, backend)
    grads, norm = _clip_own_grads(sync_grads(grads), config.grad_clip)
    extra = {} if config.grad_clip > 0 else {"grad_norm": norm}
    params, opt_state = optimizer_step(optimizer, state.params, state.opt_state, grads, donate=donate,
                                       donate_grads=not tracing(), **extra)
    metrics.update(loss=loss.detach(), grad_norm=norm.detach())
    return TrainState(params, opt_state, state.step + 1), metrics
