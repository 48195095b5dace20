"""The training loop: `TrainConfig` and `train`, a short loop over `fnlm.train_step` with hooks.

```python
from fnlm.train import StepConfig, TrainConfig, train
summary = train(config, TrainConfig(steps=2000, step=StepConfig(lr=1e-3)), train_ids, valid_ids, "runs/mine")
```

`train` owns the device, the precision (`TrainConfig.precision`: bf16 autocast on CUDA by default),
TF32 on CUDA, `torch.compile`, rematerialization, sharding and resuming; the step is
`fnlm.train_step` with the optimizer `TrainConfig.step` names (or the one passed), and everything
around it (the `metrics.jsonl` log, evaluation, checkpoints, the progress bar, plots, Weights &
Biases) is a hook (`fnlm.train.hooks`). The maths can be swapped: `model_fn(params, token_ids, config) -> logits` and `init_fn(config, *, seed, device)`.

**Exact resumption.** The global batch of step `t` is cut into `data_shards` equal shards (default:
one per process); shard `s` is drawn by `get_batch` from a CPU generator seeded with a hash of
`(seed, s, t)`, and rank `r` of `W` draws shards `r*S/W .. (r+1)*S/W - 1`. So one process with
`data_shards=S` sees exactly the union of the batches of an `S`-process run; the evaluation batches
come from a generator seeded with `(seed, "eval")`, and the learning rate is a function of `t`. A
checkpoint holds the params, the optimizer state, `t`, the configs, the RNG states and the hooks'
state. So step `t` does not depend on whether the run was resumed, and a run killed at any moment
and resumed from `checkpoints/latest.pt` ends with the same params, bit for bit on CPU (with the
machine's default threads), as one that never stopped. Checkpoints are written atomically, and
`latest.pt` is a pointer to the newest one (`fnlm.checkpoint.write_latest`), replaced by a rename.

**Never losing work.** While `train` runs, it holds the run folder's `RunLock`: a second run on the
same folder is refused (`RunFolderLocked`, naming the first). A fresh run (`resume=False`, or
nothing to resume) refuses a folder that holds an earlier run's checkpoints or `metrics.jsonl`
(`FileExistsError`) unless `overwrite=True`, before anything in it is touched. Params that are not
finite are never saved: the run stops at the first step whose loss or gradient norm is NaN or inf
(at the next step where a measuring or saving hook runs, on an accelerator), keeps the last good
checkpoints, and reports the step (`nonfinite_at`). Ctrl-C finishes the current step, saves a
checkpoint and raises `TrainingInterrupted` (a `KeyboardInterrupt` carrying the step and the
file); a second Ctrl-C stops at once (the checkpoint is then that of the last completed step,
still exact).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fnlm import accounting
from fnlm.checkpoint import callable_spec, config_to_data, load_checkpoint, restore_rng_state
from fnlm.data import batch_generator, get_batch
from fnlm.optim import GradientTransformation
from fnlm.precision import lm_loss_fn_with, resolve_precision
from fnlm.train.hooks import PHASES, Callback, Hook, MetricsFile, default_hooks, perplexity_of, read_metrics
from fnlm.train.parallel import Parallel
from fnlm.train.run import HARMLESS_FIELDS, Run, RunLock, TrainConfig
from fnlm.train.step import TrainState, build_optimizer, init_train_state, lr_schedule, train_step
from fnlm.tree import _map_keeping_types, tree_flatten, tree_size

__all__ = ["TrainConfig", "Run", "train", "resolve_device", "draw_batch", "resume_mismatches", "TrainingInterrupted",
           "HARMLESS_FIELDS", "after_step", "refuse_earlier_run"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train`: `step` is the last completed step and `checkpoint` the file saved at it
    (`None` when nothing could be saved, e.g. on a rank other than 0). A `KeyboardInterrupt`, so
    code that catches that still does."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted after step {step}" + (f"; saved {checkpoint}" if checkpoint else ""))
        self.step, self.checkpoint = step, checkpoint


def resolve_device(name: str = "auto") -> torch.device:
    """`"auto"` picks cuda, then mps, then cpu; any other name is passed to `torch.device`."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def draw_batch(
    tokens: Any, train_config: TrainConfig, context_length: int, step: int, device: torch.device,
    *, rank: int = 0, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the global batch of `step`: its data shards, concatenated.

    **Arguments:**

    - `tokens`: 1-D token ids.
    - `train_config`: gives `seed`, `batch_size` (global) and `data_shards`.
    - `context_length`, `step`, `device`: window length, optimizer step, where the batch goes.
    - `rank`, `world_size`: this process and the number of processes.

    **Returns:** `(x, y)`, int64 `(batch_size / world_size, context_length)` tensors.
    """
    shards, per_shard = train_config.shards(world_size)
    mine = range(rank * shards // world_size, (rank + 1) * shards // world_size)
    parts = [get_batch(tokens, per_shard, context_length, device,
                            generator=batch_generator(train_config.seed, s, step)) for s in mine]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def resume_mismatches(ck: dict[str, Any], model_config: Any, train_config: TrainConfig | dict[str, Any], *,
                      world_size: int = 1, data_shards: int | None = None) -> dict[str, tuple[Any, Any]]:
    """What keeps `train(..., resume=True)` from continuing checkpoint `ck` with these settings.

    **Arguments:**

    - `ck`: a checkpoint written by `train` (as `fnlm.load_checkpoint` returns it).
    - `model_config`, `train_config`: the settings of the run that would continue it (the train
      config as a `TrainConfig` or its `asdict`); they must match the stored ones except for
      `HARMLESS_FIELDS` (logging, evaluation, device).
    - `world_size`, `data_shards`: processes and data shards that would continue it (default
      shards: the train config's for `world_size`).

    **Returns:** `{name: (stored, now)}` for each setting that differs (`model.d_model`,
    `train.step.lr`, `world_size, data_shards`); empty when the run can be resumed.
    """
    tc = train_config if isinstance(train_config, TrainConfig) else TrainConfig.from_dict(train_config)
    if data_shards is None:
        data_shards, _ = tc.shards(world_size)
    train_cfg = tc.flat()
    want_model, _ = config_to_data(model_config)
    problems = {}
    for k in sorted(set(want_model) | set(ck["config"])):
        if want_model.get(k) != ck["config"].get(k):
            problems[f"model.{k}"] = (ck["config"].get(k), want_model.get(k))
    stored_train = ck.get("train_config") or {}
    with contextlib.suppress(TypeError, ValueError):
        stored_train = TrainConfig.from_dict(stored_train).flat()
    for k in sorted(set(train_cfg) | set(stored_train)):
        if k not in HARMLESS_FIELDS and k != "data_shards" and train_cfg.get(k) != stored_train.get(k):
            problems[f"train.{k}"] = (stored_train.get(k), train_cfg.get(k))
    stored_shards = ck.get("data_shards", ck.get("world_size", 1))
    if stored_shards != data_shards:
        problems["world_size, data_shards"] = ((ck.get("world_size", 1), stored_shards), (world_size, data_shards))
    return problems


def _check_resume(
    ck: dict[str, Any], model_config: Any, train_cfg: dict[str, Any], world_size: int, data_shards: int, where: Path
) -> None:
    problems = resume_mismatches(ck, model_config, train_cfg, world_size=world_size, data_shards=data_shards)
    if "train.step.optimizer" in problems:
        stored, now = problems["train.step.optimizer"]
        raise ValueError(f"cannot resume from {where}: it was trained with the {stored} optimizer, whose state does "
                         f"not fit {now}; resume with optimizer {stored}, or start a new run")
    if problems:
        stored_shards = problems.get("world_size, data_shards", ((None, None),))[0][1]
        hint = ""
        if "world_size, data_shards" in problems:
            hint = (f"; the checkpoint was made by {ck.get('world_size', 1)} process(es) drawing {stored_shards} data "
                    f"shard(s) per step: resume with the same number of processes, or pass --data-shards "
                    f"{stored_shards} with a process count that divides it")
        raise ValueError(f"cannot resume from {where}: settings differ (checkpoint, now): {problems}{hint}")


def precision_of(tc: TrainConfig, device: torch.device) -> str:
    """The precision a run on `device` computes in: `tc.precision` with `"auto"` resolved
    (`fnlm.precision.resolve_precision`: `"autocast"` on CUDA, `"fp32"` elsewhere)."""
    return resolve_precision(tc.precision, device.type)


def run_model_fn(model_fn: Callable, tc: TrainConfig, parallel: Parallel = Parallel()) -> Callable:
    """The model function a run trains: `model_fn` with its blocks recomputed in the backward when
    `tc.remat` (its `remat=True` argument), and, when sharding the params, gathering them
    (`Sharding.model_fn`)."""
    fn = model_fn
    if tc.remat:
        if "remat" not in inspect.signature(model_fn).parameters:
            raise ValueError(f"TrainConfig.remat needs a model function with a remat argument (as "
                             f"fnlm.transformer_lm has); {callable_spec(model_fn)} has none: wrap its blocks in "
                             "fnlm.remat instead")
        fn = functools.partial(model_fn, remat=True)
    if parallel.sharding is not None:
        fn = parallel.sharding.model_fn(fn)
    return fn


def _setup(model_config: Any, tc: TrainConfig, valid_tokens: Any, out_dir: Any, model_fn: Callable,
           parallel: Parallel, extra: dict[str, Any] | None, peak_flops: float | None = None) -> Run:
    device = resolve_device(parallel.device or tc.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if tc.shard is not None and parallel.sharding is None:
        raise ValueError(f"TrainConfig.shard={tc.shard!r} needs a sharded process group: launch with torchrun and "
                         "pass parallel=make_sharded_parallel(process_group(), shard)")
    precision = precision_of(tc, device)
    bf16 = precision in ("bf16", "autocast")
    loss_fn = lm_loss_fn_with(run_model_fn(model_fn, tc, parallel), model_config, precision, device_type=device.type)
    if tc.compile if tc.compile is not None else device.type == "cuda":
        loss_fn = torch.compile(loss_fn)
    context_length = model_config.context_length
    data_shards, _ = tc.shards(parallel.world_size)
    per_rank, accum = tc.batch_size // parallel.world_size, tc.step.grad_accum_steps
    if per_rank % accum:
        raise ValueError(f"invalid TrainConfig values: step.grad_accum_steps {accum} must divide each process's "
                         f"{per_rank} sequences (batch_size {tc.batch_size} over {parallel.world_size} processes)")
    tc.check_schedule(tc.total_steps(context_length))
    data = {"train_config": tc.to_dict(), "world_size": parallel.world_size,
            "global_batch_size": tc.batch_size, "data_shards": data_shards,
            "tokens_per_step": tc.batch_size * context_length, "model_fn": callable_spec(model_fn), **(extra or {})}
    run = Run(model_config, tc, Path(out_dir), device, parallel, tc.total_steps(context_length),
              tc.batch_size * context_length, context_length, loss_fn, valid_tokens, bf16, data)
    run.flops_per_token = _flops_per_token(model_config)
    if run.flops_per_token:
        dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
        run.peak_flops = peak_flops or accounting.measure_matmul_peak(device, dtype, min_seconds=0.2)
    return run


def _flops_per_token(model_config: Any) -> float | None:
    """Training FLOPs per token for MFU, or None for a config the accounting does not describe."""
    try:
        return accounting.training_flops_per_token(model_config, swiglu=getattr(model_config, "ffn", "swiglu") == "swiglu")
    except (TypeError, AttributeError):
        return None


def _structure(tree: Any) -> list[tuple[str, tuple[int, ...] | None]]:
    """`(name, shape)` of every leaf of `tree` (shape `None` for a non-tensor): what a checkpoint's
    optimizer state must have for an optimizer to continue it."""
    return [(name, tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None)
            for name, leaf in tree_flatten(tree).items()]


def _check_opt_state(ck: dict[str, Any], optimizer: GradientTransformation, where: Path) -> None:
    """`ValueError` in one line when the checkpoint's optimizer state is not what `optimizer` keeps."""
    meta = _map_keeping_types(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, ck["params"])
    want, have = _structure(optimizer.init(meta)), _structure(ck["opt_state"])
    if want != have:
        diff = next((f"{w[0]} {w[1]} vs {h[0]} {h[1]}" for w, h in zip(want, have) if w != h),
                    f"{len(want)} leaves vs {len(have)}")
        raise ValueError(f"cannot resume from {where}: its optimizer state does not fit this optimizer ({diff}, "
                         f"first difference: this optimizer's vs the checkpoint's); resume with the optimizer the "
                         "run was trained with")


def _initial_state(run: Run, init_fn: Callable, resume: bool, optimizer: GradientTransformation
                   ) -> tuple[TrainState, dict[str, Any]]:
    """A fresh state, or the one in `checkpoints/latest.pt` (with the hooks' saved state) when resuming."""
    latest = run.out / "checkpoints" / "latest.pt"
    if not (resume and latest.exists()):
        params = init_fn(run.model_config, seed=run.train_config.seed, device=run.device)
        return init_train_state(params, optimizer), {}
    ck = load_checkpoint(latest, map_location=run.device)
    _check_resume(ck, run.model_config, run.checkpoint_data["train_config"], run.parallel.world_size,
                  run.checkpoint_data["data_shards"], latest)
    _check_opt_state(ck, optimizer, latest)
    rank_rng = ck.get("rank_rng") or []
    rng = rank_rng[run.parallel.rank] if len(rank_rng) == run.parallel.world_size else ck.get("rng")
    if rng is not None:
        restore_rng_state(rng)
    run.elapsed_before, run.resumed_from = float(ck.get("wall_time", 0.0)), ck["step"]
    return TrainState(ck["params"], ck["opt_state"], ck["step"]), ck.get("hooks") or {}


def refuse_earlier_run(out: Path) -> None:
    """`FileExistsError` when the run folder `out` holds an earlier run: checkpoints
    (`checkpoints/step_*.pt`, `checkpoints/latest.pt`) or a `metrics.jsonl` with records. Called
    before anything in the folder is touched; `overwrite=True` skips it."""
    folder = out / "checkpoints"
    earlier = sorted(folder.glob("step_*.pt")) + [p for p in [folder / "latest.pt"] if p.exists()]
    if earlier:
        raise FileExistsError(
            f"{folder} holds checkpoints of an earlier run ({', '.join(p.name for p in earlier[-3:])}); "
            "resume it, or overwrite it explicitly, or train in another folder")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        records = [r for r in read_metrics(metrics) if isinstance(r, dict)]
        last = max((r.get("step", 0) for r in records), default=None)
        upto = f", up to step {last}" if last is not None else ""
        raise FileExistsError(
            f"{metrics} holds the log of an earlier run ({len(records)} records{upto}) and there is no checkpoint to "
            "resume it from; overwrite it explicitly, or train in another folder")


def _announce(run: Run, state: TrainState) -> None:
    if run.is_main:
        print(f"fnlm: training {run.n_params / 1e6:.2f}M parameters on {run.device} for {run.total} steps "
              f"({run.total * run.tokens_per_step / 1e6:.1f}M tokens, {run.tokens_per_step} tokens/step)"
              + (f", resuming at step {state.step}" if run.resumed_from is not None else ""), file=sys.stderr, flush=True)


def _summary(run: Run, state: TrainState) -> dict[str, Any]:
    tok_s = run.steps_run * run.tokens_per_step / run.loop_seconds if run.loop_seconds > 0 else 0.0
    summary = {"step": state.step, "tokens": state.step * run.tokens_per_step, "train_loss": run.last["train_loss"],
               "val_loss": run.last["val_loss"], "val_perplexity": perplexity_of(run.last["val_loss"]),
               "wall_time": run.wall(), "tokens_per_sec": tok_s, "params": run.n_params,
               "diverged": run.stopping, "stop_reason": run.stop_reason, "resumed_from": run.resumed_from,
               "device": str(run.device), "nonfinite_at": run.nonfinite_at,
               "checkpoint": str(run.checkpoint) if run.checkpoint is not None else None}
    if run.flops_per_token and run.peak_flops:
        summary["mfu"] = tok_s / run.parallel.world_size * run.flops_per_token / run.peak_flops
    return summary


def train(
    model_config: Any,
    train_config: TrainConfig,
    train_tokens: Any,
    valid_tokens: Any,
    out_dir: str | Path,
    *,
    model_fn: Callable | None = None,
    init_fn: Callable | None = None,
    resume: bool = False,
    overwrite: bool = False,
    parallel: Parallel = Parallel(),
    hooks: Sequence[Hook] | Callable[[Run], Sequence[Hook]] | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    extra_checkpoint_data: dict[str, Any] | None = None,
    optimizer: GradientTransformation | None = None,
) -> dict[str, Any]:
    """Train a language model with `train_step` (by default CS336's AdamW on a cosine schedule, with
    clipping) and the hooks.

    **Arguments:**

    - `model_config`: the model's config (a frozen dataclass with `context_length`), passed to
      `model_fn` and `init_fn` and stored in checkpoints.
    - `train_config`: a `TrainConfig`.
    - `train_tokens`, `valid_tokens`: 1-D token ids (e.g. `fnlm.load_tokens(...)` memmaps).
    - `out_dir`: the run folder (`metrics.jsonl`, `loss.png`, `checkpoints/`).
    - `model_fn`: `(params, token_ids (batch seq), config) -> logits`; default `fnlm.transformer_lm`.
    - `init_fn`: `(config, *, seed, device) -> params`; default `fnlm.init_transformer_lm`.
    - `resume`: continue from `out_dir/checkpoints/latest.pt` when it exists (its configs must
      match, except for logging/evaluation/device settings).
    - `overwrite`: when not resuming, delete the checkpoints and the metrics log of an earlier run
      in `out_dir`; when `False` (the default) such a folder is refused with a `FileExistsError`
      before any file in it is touched, so no checkpoint (or metrics log) is ever lost by accident.
    - `parallel`: data-parallel hooks (see `Parallel`).
    - `hooks`: the hooks, or a function of the `Run` that returns them (default `default_hooks`,
      e.g. `hooks=lambda run: [*default_hooks(run), DivergenceGuard(vocab)]`).
    - `callbacks`: functions called with every metrics record as it is written (before that
      step's checkpoint).
    - `extra_checkpoint_data`: more plain data stored in each checkpoint.
    - `optimizer`: any gradient transformation (`fnlm.optim`) to step with instead of the one
      `train_config.step` names (`build_optimizer`); the step still clips by
      `train_config.step.grad_clip` and accumulates `grad_accum_steps` micro-batches. Its state is
      checkpointed; resuming needs an optimizer whose state has the same structure (checked).

    **Returns:** the final metrics: `step`, `tokens`, `train_loss` (last logged), `val_loss`,
    `val_perplexity`, `wall_time` (seconds, summed over resumed segments), `tokens_per_sec` (the
    average of this call: its steps' tokens over its loop's wall-clock) and `mfu` (when the model's
    FLOPs are known), `params` (count), `diverged` (the run stopped early) and its `stop_reason`,
    `nonfinite_at` (the first step whose loss or gradient norm was not finite, else `None`),
    `checkpoint` (the last checkpoint written by this call, or `None`), `resumed_from`.
    On Ctrl-C, raises `TrainingInterrupted` after saving a checkpoint (see the module docstring).
    A folder another run holds raises `fnlm.train.RunFolderLocked`; a folder holding an earlier
    run, `FileExistsError` (see `overwrite`).
    """
    from fnlm.model import init_transformer_lm, transformer_lm

    run = _setup(model_config, train_config, valid_tokens, out_dir, model_fn or transformer_lm, parallel,
                 extra_checkpoint_data)
    run.overwrite = overwrite
    inner = _choose_optimizer(run, optimizer)
    with RunLock(run.out) if parallel.is_main else contextlib.nullcontext():
        state, hook_states = _initial_state(run, init_fn or init_transformer_lm, resume, inner)
        if run.resumed_from is None and not overwrite and parallel.is_main:
            refuse_earlier_run(run.out)
        state = state._replace(params=parallel.broadcast(state.params), opt_state=parallel.broadcast(state.opt_state))
        run.optimizer = inner
        if parallel.sharding is not None:
            run.optimizer = parallel.sharding.optimizer(inner)
            state = parallel.sharding.shard_state(state, run.optimizer.init)
        run.n_params = tree_size(state.params)
        _start_hooks(run, state, default_hooks if hooks is None else hooks, callbacks, hook_states)
        _announce(run, state)
        state = _loop(run, state, train_tokens)
        for hook in run.hooks:
            hook.end(run, state)
    return _summary(run, state)


def _choose_optimizer(run: Run, optimizer: GradientTransformation | None) -> GradientTransformation:
    """The transformation the run steps with before any sharding: `optimizer`, or the one its
    `StepConfig` names; notes which in `run` and its checkpoints."""
    run.step_config = run.train_config.step_config(run.total)
    run.custom_optimizer = optimizer is not None
    if optimizer is None:
        return build_optimizer(run.step_config)
    run.checkpoint_data["optimizer"] = "custom"
    return optimizer


def _start_hooks(run: Run, state: TrainState, chosen: Sequence[Hook] | Callable[[Run], Sequence[Hook]],
                 callbacks: Sequence[Callable[[dict[str, Any]], None]], hook_states: dict[str, Any]) -> None:
    """Make `run.hooks` (the callbacks right after the metrics file), restore their saved state and start them."""
    run.hooks = check_hooks(list(chosen(run) if callable(chosen) else chosen))
    writes = [i for i, h in enumerate(run.hooks) if isinstance(h, MetricsFile)]
    at = writes[0] + 1 if writes else len(run.hooks)
    run.hooks[at:at] = [Callback(fn) for fn in callbacks]
    for hook in run.hooks:
        if hook.name in hook_states:
            hook.load_state_dict(hook_states[hook.name])
        hook.start(run, state)


def check_hooks(hooks: list[Any]) -> list[Any]:
    """`hooks`, after checking that each has a positive int `every` and a `phase` from `PHASES`."""
    for hook in hooks:
        every, phase = getattr(hook, "every", 1), getattr(hook, "phase", "write")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"hook {type(hook).__name__}: every must be a positive int, got {every!r}")
        if phase not in PHASES:
            raise ValueError(f"hook {type(hook).__name__}: phase must be one of {PHASES}, got {phase!r}")
    return hooks


def _due(hook: Any, step: int) -> bool:
    return step % getattr(hook, "every", 1) == 0


def _call_phase(run: Run, state: TrainState, metrics: dict[str, Any], phase: str, called: set[int]) -> None:
    """Call the hooks of `phase` that are due (all of them once the step is final), each once."""
    while True:
        todo = [h for h in run.hooks if getattr(h, "phase", "write") == phase and id(h) not in called
                and (run.final or _due(h, state.step))]
        if not todo:
            return
        for hook in todo:
            called.add(id(hook))
            hook.step(run, state, metrics)
            run.final = run.final or run.stopping


def after_step(run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
    """Everything the loop does after a step, for one run: the finiteness watch, every hook's
    `observe`, then the due hooks' `step` in phase order (every hook at the final step); a stop
    asked by a hook makes the step final and goes back to the first phase for the hooks not yet
    called. See the protocol in `fnlm.train.hooks`. `train` and `train_vectorized` (per model)
    call it."""
    run.record = {}
    sync = (run.device.type == "cpu" or state.step >= run.total
            or any(getattr(h, "phase", "write") in ("measure", "save") and _due(h, state.step) for h in run.hooks))
    run.watch_finite(state.step, metrics, sync=sync)
    for hook in run.hooks:
        observe = getattr(hook, "observe", None)
        if observe is not None:
            observe(run, state, metrics)
    run.final = state.step >= run.total or run.stopping
    called: set[int] = set()
    i = 0
    while i < len(PHASES):
        was_final = run.final
        _call_phase(run, state, metrics, PHASES[i], called)
        i = 0 if run.final and not was_final else i + 1


def stop_message(run: Run, state: TrainState) -> str:
    """The line that says why a run stopped early, and what was kept."""
    text = f"stopping at step {state.step}: {run.stop_reason}"
    if run.nonfinite_at is not None:
        kept = f"the last good checkpoint is {run.checkpoint}" if run.checkpoint else "no checkpoint was written"
        text += f"; params that are not finite are never saved: {kept}"
    return text


@contextlib.contextmanager
def _stop_at_step_end(run: Run) -> Any:
    """While training in one process, a first Ctrl-C asks the loop to stop after the current step
    (so the checkpoint and the hooks' state are those of a completed step); a second one stops at
    once. Left alone under data parallelism, off the main thread, or when SIGINT has another handler."""
    asked = {"stop": False}
    if (run.parallel.world_size > 1 or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield asked
        return

    def handler(signum: int, frame: Any) -> None:
        if asked["stop"]:
            raise KeyboardInterrupt
        asked["stop"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it to the handler that was there.

    The loop's step donates the state (updates it in place), so an interrupt in the middle of it
    would leave a half-updated state for the Ctrl-C checkpoint; deferred, the step completes and
    the interrupt arrives between steps. Off the main thread, or under a handler not set from
    Python, it does nothing.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for _ in received[:1]:
            signal.raise_signal(signal.SIGINT)


def _loop(run: Run, state: TrainState, train_tokens: Any) -> TrainState:
    """Step until the end or a stop. Each step donates the old state to `train_step` (updated in
    place: one copy of the parameters and moments in memory); nothing keeps the old state, and
    hooks save checkpoints synchronously before the next step."""
    config, optimizer = run.step_config, run.optimizer
    schedule = None if run.custom_optimizer else lr_schedule(config)
    plain = run.parallel.sharding.plain_metrics if run.parallel.sharding is not None else None
    tc, parallel = run.train_config, run.parallel
    started, first = time.perf_counter(), state.step
    with _stop_at_step_end(run) as asked:
        try:
            while state.step < run.total and not run.stopping:
                if asked["stop"]:
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                x, y = draw_batch(train_tokens, tc, run.context_length, state.step, run.device, rank=parallel.rank,
                                  world_size=parallel.world_size)
                with _interrupts_deferred():
                    step = state.step
                    state, metrics = train_step(state, x, y, loss_fn=run.loss_fn, config=config, optimizer=optimizer,
                                                sync_grads=parallel.sync_grads, donate=True)
                if schedule is not None:
                    metrics["lr"] = schedule(step)
                if plain is not None:
                    metrics = plain(metrics)
                run._step_end = time.perf_counter()
                run.step_seconds = run._step_end - t0
                after_step(run, state, metrics)
                run.steps_run, run.loop_seconds = state.step - first, time.perf_counter() - started
            if asked["stop"]:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            for hook in run.hooks:
                hook.interrupted(run, state)
            raise TrainingInterrupted(state.step, run.saved_on_interrupt) from None
    if run.stopping and run.is_main:
        print(f"fnlm: {stop_message(run, state)}", file=sys.stderr)
    return state
