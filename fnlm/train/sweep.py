"""Vectorized sweeps: K models of one architecture trained at once, `torch.func.vmap` over `train_step`.

```python
from fnlm.train import TrainConfig
from fnlm.train.sweep import train_vectorized

configs = [TrainConfig(steps=150).with_step(lr=lr, min_lr=lr / 10) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
summaries = train_vectorized(model_config, configs, train_ids, valid_ids, [f"runs/lr{c.lr:g}" for c in configs])
```

The parameters and optimizer states of the K models are stacked along a leading *model* axis
(`fnlm.tree_stack`) and one vmapped `train_step` updates all of them; the per-model
hyper-parameters (peak and final learning rate, weight decay) ride along as tensors with one
entry per model, and each model is initialised from its own seed. Each model trains as its own
`fnlm.train.train` call would (the same batches, schedule, evaluation windows, `metrics.jsonl`
records, checkpoints and hooks), up to float rounding: models whose configs share a seed share
every batch (a learning-rate sweep), and a model with another seed gets its own batch stream (a
seed sweep). A model that a hook stops (`DivergenceGuard`, a non-finite loss) leaves the stack
at that step with its state frozen, and the others go on.

- `init_stacked(init_fn, config, seeds)`: K fresh `TrainState`s, stacked;
- `stack_step_configs(configs)`: one `StepConfig` with per-model tensor hyper-parameters;
- `vectorized_step(state, x, y, loss_fn=..., config=...)`: one vmapped `train_step`;
- `train_vectorized(...)`: the loop, with the library's hooks, evaluation and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fnlm.optim import GradientTransformation
from fnlm.precision import lm_loss_fn_with
from fnlm.train.evaluation import evaluate
from fnlm.train.hooks import Checkpointer, Evaluator, Hook, ProgressBar, default_hooks
from fnlm.train.loop import _setup, _summary, precision_of, run_model_fn, after_step, check_hooks, draw_batch, refuse_earlier_run, stop_message
from fnlm.train.parallel import Parallel
from fnlm.train.run import Run, RunLock, TrainConfig
from fnlm.train.step import StepConfig, TrainState, init_train_state, train_step
from fnlm.tree import Tree, _map_keeping_types, tree_size, tree_stack, tree_unstack
from fnlm.types import Tensor

__all__ = ["SWEPT_FIELDS", "init_stacked", "stack_step_configs", "vectorized_step", "train_vectorized"]

SWEPT_FIELDS = ("step.lr", "step.min_lr", "step.weight_decay", "seed")
"""The `TrainConfig` fields that may differ between the models of one vectorized run (`step.lr` is
`TrainConfig.step.lr`)."""

_HYPER = ("lr", "min_lr", "weight_decay")
_DISPLAY_FIELDS = {"progress", "plot", "wandb_project"}


def _map_tensors(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """`fn` on every tensor leaf; containers keep their type (dict, list, tuple, NamedTuple)."""
    return _map_keeping_types(lambda t: fn(t) if isinstance(t, Tensor) else t, tree)


def _in_dims(tree: Any) -> Any:
    """vmap's `in_dims` for a stacked tree: 0 for tensors, None for other leaves (a step count)."""
    return _map_keeping_types(lambda t: 0 if isinstance(t, Tensor) else None, tree)


def _take(tree: Any, index: Sequence[int]) -> Any:
    """The models `index` of a stacked tree (new tensors)."""
    idx = None

    def take(t: Tensor) -> Tensor:
        nonlocal idx
        if idx is None or idx.device != t.device:
            idx = torch.tensor(list(index), device=t.device)
        return t.index_select(0, idx)

    return _map_tensors(take, tree)


def _num_models(state: TrainState) -> int:
    sizes = {t.shape[0] if t.ndim else None for t in _leaves(state.params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"state.params must be stacked (a leading model axis on every leaf), got sizes {sizes}")
    return sizes.pop()


def _leaves(tree: Any) -> list[Tensor]:
    out: list[Tensor] = []
    _map_tensors(out.append, tree)
    return out


def init_stacked(
    init_fn: Callable[..., Tree], model_config: Any, seeds: Sequence[int], *, device: torch.device | str | None = None,
    optimizer: GradientTransformation | StepConfig | None = None,
) -> TrainState:
    """K fresh training states, one per seed, stacked along a leading model axis.

    **Arguments:**

    - `init_fn`: `(config, *, seed, device) -> params`, e.g. `fnlm.init_transformer_lm`.
    - `model_config`: the config every model shares.
    - `seeds`: one initialisation seed per model.
    - `device`: where the params go.
    - `optimizer`: the transformation (or a `StepConfig` naming one) whose state to initialise, as
      for `init_train_state` (default: CS336's AdamW).

    **Returns:** a `TrainState` whose params and optimizer state have a leading axis of size
    `len(seeds)`, with `step = 0`.
    """
    if len(seeds) < 1:
        raise ValueError("init_stacked needs at least one seed, got none")
    return tree_stack([init_train_state(init_fn(model_config, seed=s, device=device), optimizer) for s in seeds])


def stack_step_configs(configs: Sequence[StepConfig]) -> StepConfig:
    """One `StepConfig` for a vectorized step: `lr`, `min_lr` and `weight_decay` become tensors with
    one entry per model (float64); every other field must be the same in all configs.

    **Arguments:**

    - `configs`: one `StepConfig` per model.

    **Returns:** a `StepConfig` for :func:`vectorized_step`.
    """
    if not configs:
        raise ValueError("stack_step_configs needs at least one StepConfig, got none")
    first = configs[0]
    for name in StepConfig._fields:
        values = [getattr(c, name) for c in configs]
        if name not in _HYPER and any(v != values[0] for v in values):
            raise ValueError(f"StepConfig.{name} must be the same for every model of a vectorized step, got {values}")
    hyper = {name: torch.tensor([float(getattr(c, name)) for c in configs], dtype=torch.float64) for name in _HYPER}
    return first._replace(**hyper)


def _per_model(value: float | Tensor, k: int, name: str, like: Tensor) -> Tensor:
    dtype = torch.float32 if like.device.type == "mps" else torch.float64
    if isinstance(value, Tensor):
        if value.ndim == 0:
            value = value.expand(k)
        if value.shape != (k,):
            raise ValueError(f"config.{name} must be a float or a tensor of shape ({k},) (one per model), "
                             f"got shape {tuple(value.shape)}")
        return value.to(like.device, dtype)
    return torch.full((k,), float(value), dtype=dtype, device=like.device)


def vectorized_step(
    state: TrainState,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tree, Tensor, Tensor], Tensor],
    config: StepConfig,
    per_model_batches: bool = False,
    chunk_size: int | None = None,
) -> tuple[TrainState, dict[str, Tensor]]:
    """`train_step` on K stacked models at once (`torch.func.vmap` over the model axis); pure.

    **Arguments:**

    - `state`: a stacked `TrainState` (from :func:`init_stacked` or `fnlm.tree_stack`): every
      tensor of `params` and `opt_state` has a leading model axis of size K; `step` is shared.
    - `x`, `y`: one batch `(batch, seq)` for all models, or with `per_model_batches` one per model
      `(K, batch, seq)`.
    - `loss_fn`: `(params, x, y) -> scalar loss` for one model.
    - `config`: a `StepConfig`; `lr`, `min_lr` and `weight_decay` may be tensors of shape `(K,)`
      (per model, as :func:`stack_step_configs` makes them) or shared floats.
    - `per_model_batches`: `x` and `y` have a leading model axis.
    - `chunk_size`: vmap over at most this many models at a time (`None`: all at once), which
      bounds the memory of the largest activations (the logits: models x batch x seq x vocab);
      the results are bitwise the same.

    **Returns:** `(new_state, metrics)`: the stacked new state, and `loss`, `grad_norm`, `lr` as
    tensors of shape `(K,)`.
    """
    k = _num_models(state)
    like = _leaves(state.params)[0]
    if per_model_batches and (x.shape[:1] != (k,) or y.shape[:1] != (k,)):
        raise ValueError(f"with per_model_batches, x and y need a leading model axis of size {k}, "
                         f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
    hyper = {name: _per_model(getattr(config, name), k, name, like) for name in _HYPER}
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size is not None and chunk_size < k:
        return _chunked(state, x, y, loss_fn, config._replace(**hyper), per_model_batches, chunk_size, k)

    def one(s: TrainState, xb: Tensor, yb: Tensor, h: dict[str, Tensor]) -> tuple[TrainState, dict[str, Any]]:
        return train_step(s, xb, yb, loss_fn=loss_fn, config=config._replace(**h))

    dims = _in_dims(state)
    data = 0 if per_model_batches else None
    return torch.func.vmap(one, in_dims=(dims, data, data, 0), out_dims=(dims, 0))(state, x, y, hyper)


def _chunked(state: TrainState, x: Tensor, y: Tensor, loss_fn: Callable, config: StepConfig,
             per_model_batches: bool, chunk_size: int, k: int) -> tuple[TrainState, dict[str, Tensor]]:
    """`vectorized_step` on consecutive chunks of the models (views), the results concatenated."""
    parts = []
    for i in range(0, k, chunk_size):
        rows = functools.partial(_rows, start=i, length=min(chunk_size, k - i))
        data = (rows(x), rows(y)) if per_model_batches else (x, y)
        part_config = config._replace(**{name: rows(getattr(config, name)) for name in _HYPER})
        parts.append(vectorized_step(_map_tensors(rows, state), *data, loss_fn=loss_fn, config=part_config,
                                     per_model_batches=per_model_batches))
    return _concat([p[0] for p in parts]), {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}


def _rows(t: Tensor, *, start: int, length: int) -> Tensor:
    return t.narrow(0, start, length)


def _concat(trees: list[Any]) -> Any:
    """Stacked trees of the same structure joined along the model axis."""
    return _map_keeping_types(lambda *ts: torch.cat(ts) if isinstance(ts[0], Tensor) else ts[0], *trees)


class _Evaluations:
    """Validation losses of the models in the stack at the current step, computed for all of them
    at once (`vmap` of the loss; one `evaluate` per seed, whose windows it fixes) on first request."""

    def __init__(self, loss_fn: Callable, seeds: list[int], chunk_size: int | None):
        self.loss_fn, self.seeds = loss_fn, seeds
        self.vloss = torch.func.vmap(loss_fn, in_dims=(0, None, None), chunk_size=chunk_size)
        self.state: TrainState | None = None
        self.alive: list[int] = []
        self.values: dict[int, float] = {}

    def begin(self, state: TrainState | None, alive: list[int]) -> None:
        self.state, self.alive, self.values = state, list(alive), {}

    def value(self, k: int, run: Run, state: TrainState, batches: int, together: bool) -> float:
        if k not in self.values:
            tc = run.train_config
            common = dict(batch_size=tc.batch_size, context_length=run.context_length, batches=batches,
                          device=run.device)
            if together and k in self.alive and self.state is not None:
                for seed in sorted({self.seeds[j] for j in self.alive}):
                    rows = [i for i, j in enumerate(self.alive) if self.seeds[j] == seed]
                    params = self.state.params if len(rows) == len(self.alive) else _take(self.state.params, rows)
                    losses = evaluate(self.vloss, params, run.valid_tokens, seed=seed, **common)
                    self.values.update({self.alive[i]: v for i, v in zip(rows, losses)})
            else:
                self.values[k] = evaluate(self.loss_fn, state.params, run.valid_tokens, seed=tc.seed, **common)
        return self.values[k]


class SweepEvaluator(Evaluator):
    """`Evaluator` for one model of a vectorized run: the same schedule, with the losses of all
    models computed together."""

    def __init__(self, interval: int, batches: int, shared: _Evaluations, index: int):
        super().__init__(interval, batches)
        self.shared, self.index = shared, index

    def together(self, run: Run, step: int) -> bool:
        """A scheduled evaluation (every model's at once), not one for a run that stops early."""
        return step % self.every == 0 or step == run.total

    def evaluate(self, run: Run, state: TrainState) -> float:
        return self.shared.value(self.index, run, state, self.batches, self.together(run, state.step))


class _CopyingCheckpointer(Checkpointer):
    """`Checkpointer` for one model of a vectorized run: saves copies of the model's tensors (its
    state is a view into the stack; `torch.save` of a view would write every model)."""

    def save(self, run: Run, state: TrainState, collective: bool = True) -> Path | None:
        return super().save(run, _map_tensors(lambda t: t.clone(), state), collective)


def _model_hooks(run: Run, chosen: Callable[[Run], Sequence[Hook]], shared: _Evaluations, k: int) -> list[Hook]:
    """The model's hooks as `train` would make them, with the evaluator and checkpointer swapped for
    their vectorized forms and no per-model progress bar (the sweep has one)."""
    hooks: list[Hook] = []
    for hook in chosen(run):
        if isinstance(hook, ProgressBar):
            continue
        if type(hook) is Evaluator:
            hook = SweepEvaluator(hook.every, hook.batches, shared, k)
        elif type(hook) is Checkpointer:
            hook = _CopyingCheckpointer(hook.every, hook.keep)
        hooks.append(hook)
    return check_hooks(hooks)


def _check_configs(train_configs: Sequence[TrainConfig], out_dirs: Sequence[Any]) -> None:
    if not train_configs:
        raise ValueError("train_vectorized needs at least one TrainConfig, got none")
    if len(out_dirs) != len(train_configs):
        raise ValueError(f"train_vectorized needs one out_dir per TrainConfig: {len(train_configs)} configs, "
                         f"{len(out_dirs)} out_dirs")
    if len({Path(d).resolve() for d in out_dirs}) != len(out_dirs):
        raise ValueError(f"train_vectorized needs a different out_dir for every model, got {list(map(str, out_dirs))}")
    first = train_configs[0].flat()
    for i, tc in enumerate(train_configs[1:], 1):
        for name, value in tc.flat().items():
            if name not in SWEPT_FIELDS and name not in _DISPLAY_FIELDS and value != first[name]:
                raise ValueError(f"train_configs[{i}].{name} = {value!r} differs from train_configs[0].{name} = "
                                 f"{first[name]!r}; only {', '.join(SWEPT_FIELDS)} may differ between the models "
                                 "of a vectorized run")
    if any(tc.compile for tc in train_configs):
        raise ValueError("train_vectorized does not compile the loss (vmap runs it): set TrainConfig.compile to "
                         "None or False")


def _batches(tokens: Any, configs: list[TrainConfig], context_length: int, step: int,
             device: torch.device) -> tuple[Tensor, Tensor, bool]:
    """The batch of `step` for each model (each config's own data stream); one shared batch when
    all models have the same seed."""
    drawn = {}
    for tc in configs:
        if tc.seed not in drawn:
            drawn[tc.seed] = draw_batch(tokens, tc, context_length, step, device)
    if len(drawn) == 1:
        x, y = next(iter(drawn.values()))
        return x, y, False
    return (torch.stack([drawn[tc.seed][0] for tc in configs]), torch.stack([drawn[tc.seed][1] for tc in configs]),
            True)


def _hyper(configs: list[TrainConfig], total: int) -> StepConfig:
    return stack_step_configs([tc.step_config(total) for tc in configs])


def _start(runs: list[Run], state: TrainState, hooks: Callable[[Run], Sequence[Hook]], shared: _Evaluations) -> None:
    views = tree_unstack(state)
    for k, run in enumerate(runs):
        run.n_params = tree_size(views[k].params)
        run.hooks = _model_hooks(run, hooks, shared, k)
        for hook in run.hooks:
            hook.start(run, views[k])
    first = runs[0]
    print(f"fnlm: training {len(runs)} models of {first.n_params / 1e6:.2f}M parameters at once (vmap) on "
          f"{first.device} for {first.total} steps ({first.tokens_per_step} tokens/step each)", file=sys.stderr,
          flush=True)


def _step_hooks(runs: list[Run], alive: list[int], state: TrainState, metrics: dict[str, Tensor],
                since: dict[int, float]) -> list[TrainState]:
    """Each model's hooks for this step. A model's `step_seconds` is the time since its hooks last
    started (one whole iteration: the vectorized step and every model's hooks), so its tokens/s is
    its share of the run's throughput."""
    views = tree_unstack(state)
    for j, k in enumerate(alive):
        run = runs[k]
        run._step_end = time.perf_counter()
        run.step_seconds, run.record, since[k] = run._step_end - since[k], {}, run._step_end
        mine = {name: value[j] for name, value in metrics.items()}
        after_step(run, views[j], mine)
    return views


@dataclasses.dataclass
class _Stack:
    """The models still training: their stacked state, indices, per-model hyper-parameters, and
    the final (frozen) states of the models that have left."""

    state: TrainState
    alive: list[int]
    config: StepConfig
    finals: dict[int, TrainState] = dataclasses.field(default_factory=dict)

    def drop(self, rows: list[int], views: list[TrainState]) -> None:
        for j in rows:
            self.finals[self.alive[j]] = _map_tensors(lambda t: t.clone(), views[j])
        keep = [j for j in range(len(self.alive)) if j not in rows]
        self.alive = [self.alive[j] for j in keep]
        if self.alive:
            self.state = _take(self.state, keep)
            self.config = self.config._replace(**{n: getattr(self.config, n)[keep] for n in _HYPER})


def _evaluate_first(runs: list[Run], alive: list[int], state: TrainState) -> None:
    """Scheduled evaluations of all models before any model's hooks, so that every model's step time
    includes them alike."""
    for k in alive:
        for hook in runs[k].hooks:
            if isinstance(hook, SweepEvaluator) and hook.together(runs[k], state.step):
                hook.shared.value(k, runs[k], state, hook.batches, True)
                return


def _steps(runs: list[Run], stack: _Stack, train_tokens: Any, shared: _Evaluations, bar: Any,
           chunk_size: int | None) -> None:
    total, context_length, device = runs[0].total, runs[0].context_length, runs[0].device
    started = time.perf_counter()
    since = dict.fromkeys(stack.alive, started)
    while stack.state.step < total and stack.alive:
        x, y, per_model = _batches(train_tokens, [runs[k].train_config for k in stack.alive], context_length,
                                   stack.state.step, device)
        stack.state, metrics = vectorized_step(stack.state, x, y, loss_fn=runs[0].loss_fn, config=stack.config,
                                               per_model_batches=per_model, chunk_size=chunk_size)
        shared.begin(stack.state, stack.alive)
        _evaluate_first(runs, stack.alive, stack.state)
        views = _step_hooks(runs, stack.alive, stack.state, metrics, since)
        for k in stack.alive:
            runs[k].steps_run, runs[k].loop_seconds = stack.state.step, time.perf_counter() - started
        bar.update(1)
        stopped = [j for j, k in enumerate(stack.alive) if runs[k].stopping]
        for j in stopped:
            run = runs[stack.alive[j]]
            print(f"fnlm: model {stack.alive[j]} ({run.out}) {stop_message(run, views[j])}; "
                  f"{len(stack.alive) - len(stopped)} model(s) go on", file=sys.stderr)
        if stopped:
            stack.drop(stopped, views)
        if stack.alive and any(runs[k].record for k in stack.alive):
            best = min(runs[k].last["train_loss"] for k in stack.alive)
            bar.set_postfix({"models": f"{len(stack.alive)}/{len(runs)}", "best loss": f"{best:.3f}"}, refresh=False)


def _vectorized_loop(runs: list[Run], state: TrainState, train_tokens: Any, shared: _Evaluations,
                     bar: Any, chunk_size: int | None) -> list[TrainState]:
    """Step the stack until every model has finished or stopped; a model that stops leaves the
    stack with its state frozen. Returns each model's final state."""
    stack = _Stack(state, list(range(len(runs))), _hyper([r.train_config for r in runs], runs[0].total))
    try:
        _steps(runs, stack, train_tokens, shared, bar, chunk_size)
    except KeyboardInterrupt:
        bar.close()
        for k, view in zip(stack.alive, tree_unstack(stack.state) if stack.alive else []):
            for hook in runs[k].hooks:
                hook.interrupted(runs[k], view)
        raise
    shared.begin(None, [])
    if stack.alive:
        stack.finals.update(zip(stack.alive, tree_unstack(stack.state)))
    return [stack.finals[k] for k in range(len(runs))]


def train_vectorized(
    model_config: Any,
    train_configs: Sequence[TrainConfig],
    train_tokens: Any,
    valid_tokens: Any,
    out_dirs: Sequence[str | Path],
    *,
    model_fn: Callable | None = None,
    init_fn: Callable | None = None,
    overwrite: bool = False,
    hooks: Callable[[Run], Sequence[Hook]] | None = None,
    extra_checkpoint_data: dict[str, Any] | None = None,
    chunk_size: int | None = None,
) -> list[dict[str, Any]]:
    """Train one model per `TrainConfig`, all at once: `fnlm.train.train` for K models in one
    vectorized loop.

    Model `k` trains as `train(model_config, train_configs[k], ..., out_dirs[k])` would (up to float
    rounding): its seed's initialisation and batches, its learning-rate schedule and weight decay,
    and the same `metrics.jsonl`, checkpoints and hooks in its own folder. Its records' `time` is
    the wall-clock of the whole vectorized run, and its `tokens_per_sec` counts its own tokens
    (the run as a whole processes K times as many). A model stopped by a hook leaves the stack at
    that step (its params frozen), and the others go on. No resuming, compiling or data
    parallelism; one progress bar for the sweep.

    **Arguments:**

    - `model_config`: the config all models share.
    - `train_configs`: one per model; they may differ only in `step.lr`, `step.min_lr`,
      `step.weight_decay` and `seed` (and the display fields `progress`, `plot`, `wandb_project`);
      any optimizer `step.optimizer` names trains all of them.
    - `train_tokens`, `valid_tokens`: 1-D token ids.
    - `out_dirs`: one run folder per model.
    - `model_fn`, `init_fn`: as for `train` (defaults `fnlm.transformer_lm`, `fnlm.init_transformer_lm`).
    - `overwrite`: delete the checkpoints and metrics logs of earlier runs in the folders (else such
      folders are refused with a `FileExistsError` before any is touched, as by `train`). Each folder
      is locked (`RunLock`) while the sweep writes it.
    - `hooks`: a function of a model's `Run` returning its hooks, as for `train` (default
      `default_hooks`; e.g. `lambda run: [*default_hooks(run), DivergenceGuard(vocab)]`). Its
      `Evaluator` and `Checkpointer` are replaced by vectorized equivalents, its `ProgressBar`
      dropped.
    - `extra_checkpoint_data`: more plain data stored in each checkpoint.
    - `chunk_size`: vmap over at most this many models at a time (see :func:`vectorized_step`);
      `None`: all at once.

    **Returns:** one summary per model, with the keys of `train`'s summary.
    """
    from fnlm._progress import progress_bar
    from fnlm.model import init_transformer_lm, transformer_lm

    _check_configs(train_configs, out_dirs)
    runs: list[Run] = []
    model_fn = model_fn or transformer_lm
    for tc, out in zip(train_configs, out_dirs):
        run = _setup(model_config, tc, valid_tokens, out, model_fn, Parallel(), extra_checkpoint_data,
                     peak_flops=runs[0].peak_flops if runs else None)
        run.loss_fn = lm_loss_fn_with(run_model_fn(model_fn, tc), model_config, precision_of(tc, run.device),
                                      device_type=run.device.type)
        run.overwrite = overwrite
        runs.append(run)
    with contextlib.ExitStack() as locks:
        for run in runs:
            locks.enter_context(RunLock(run.out))
        if not overwrite:
            for run in runs:
                refuse_earlier_run(run.out)
        state = init_stacked(init_fn or init_transformer_lm, model_config, [tc.seed for tc in train_configs],
                             device=runs[0].device, optimizer=train_configs[0].step_config(runs[0].total))
        shared = _Evaluations(runs[0].loss_fn, [tc.seed for tc in train_configs], chunk_size)
        _start(runs, state, hooks or default_hooks, shared)
        bar = progress_bar(total=runs[0].total, desc=f"{len(runs)} models", unit="step", dynamic_ncols=True,
                           disable=not any(tc.progress for tc in train_configs))
        finals = _vectorized_loop(runs, state, train_tokens, shared, bar, chunk_size)
        bar.close()
        for run, final in zip(runs, finals):
            for hook in run.hooks:
                hook.end(run, final)
    return [_summary(run, final) for run, final in zip(runs, finals)]
