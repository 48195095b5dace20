"""Training: the pure step, the loop, evaluation, hooks, plots and data parallelism.

- `step`: `TrainState`, `StepConfig`, `init_train_state`, `train_step` (the one training step),
  `build_optimizer` (the gradient transformation a `StepConfig` names), `lr_schedule`;
- `loop`: `train` (a short loop over `train_step`), `resolve_device`, `draw_batch`, `resume_mismatches`,
  `precision_of`, `TrainingInterrupted`;
- `run`: `TrainConfig` (its step settings nested as a `StepConfig`), `SHARDING`, `Run` (what the loop and its hooks share) and `RunLock` (one writer per
  run folder; `RunFolderLocked` when another run has it);
- `evaluation`: `evaluate`, `evaluate_windows`, `lm_loss_fn`;
- `hooks`: `Hook` and the loop's hooks (metrics file, evaluation, checkpoints, progress bar,
  loss plot, Weights & Biases, divergence guard), `read_metrics`;
- `plots`: `plot_runs`, `plot_sweep`, `plot_seeds` (matplotlib, imported when drawing);
- `parallel`: `Parallel` and the `torch.distributed` data-parallel path;
- `sweep`: `train_vectorized`, `vectorized_step`, `init_stacked`, `stack_step_configs` (K models
  trained at once with `torch.func.vmap`).

`fnlm.train` is this package; the loop is `fnlm.train.train` (no function shadows a module).
"""

from fnlm.train.evaluation import evaluate, evaluate_windows, lm_loss_fn
from fnlm.train.hooks import (
    Callback,
    Checkpointer,
    DivergenceGuard,
    Evaluator,
    PHASES,
    Hook,
    LogWindow,
    LossPlot,
    MetricsFile,
    ProgressBar,
    Wandb,
    default_hooks,
    read_metrics,
)
from fnlm.train.loop import TrainingInterrupted, draw_batch, precision_of, resolve_device, resume_mismatches, train
from fnlm.train.run import HARMLESS_FIELDS, SHARDING, Run, RunFolderLocked, RunLock, TrainConfig
from fnlm.train.parallel import Parallel
from fnlm.train.step import (
    OPTIMIZERS,
    StepConfig,
    TrainState,
    build_optimizer,
    init_train_state,
    lr_schedule,
    train_step,
)
from fnlm.train.sweep import init_stacked, stack_step_configs, train_vectorized, vectorized_step

__all__ = [
    "TrainState", "StepConfig", "init_train_state", "train_step", "build_optimizer", "lr_schedule", "OPTIMIZERS", "TrainConfig", "Run", "train", "resolve_device",
    "draw_batch", "evaluate", "evaluate_windows", "lm_loss_fn", "Hook", "LogWindow", "Evaluator", "DivergenceGuard",
    "MetricsFile", "Callback", "Checkpointer", "ProgressBar", "LossPlot", "Wandb", "default_hooks", "read_metrics",
    "Parallel", "HARMLESS_FIELDS", "TrainingInterrupted", "resume_mismatches", "train_vectorized", "vectorized_step",
    "init_stacked", "stack_step_configs", "RunLock", "RunFolderLocked", "PHASES", "SHARDING", "precision_of",
]
