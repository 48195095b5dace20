"""`TrainConfig` (everything about a run that is not the model) and `Run` (what the loop and its
hooks share during one call of `fnlm.train.train`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from fnlm.train.parallel import Parallel
from fnlm.train.step import StepConfig

__all__ = ["TrainConfig", "Run", "HARMLESS_FIELDS"]

HARMLESS_FIELDS = {
    "eval_interval", "eval_batches", "checkpoint_interval", "keep_checkpoints", "log_interval",
    "device", "compile", "progress", "plot", "wandb_project",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the model.

    **Fields:**

    - `batch_size`: sequences per optimizer step, summed over all processes (the global batch);
      each of `W` data-parallel processes computes `batch_size / W` of them.
    - `data_shards`: the global batch is drawn as this many equal shards, each from its own
      random stream; `None` means one per process. Set it to replay a `W`-process run in fewer
      processes (or resume it with another process count dividing it).
    - `steps`: optimizer steps; when `max_tokens` is set, `steps` is derived from it instead.
    - `max_tokens`: token budget, `steps = max_tokens // (batch_size * context_length)`.
    - `lr`: peak learning rate of the cosine schedule.
    - `min_lr`: final learning rate of the cosine schedule.
    - `warmup_steps`: steps of linear warm-up to `lr`.
    - `cosine_steps`: the step where the cosine reaches `min_lr` (default: the run's steps).
    - `beta1`: AdamW's first-moment decay.
    - `beta2`: AdamW's second-moment decay.
    - `eps`: AdamW's denominator epsilon.
    - `weight_decay`: AdamW's decoupled weight decay.
    - `grad_clip`: global gradient-norm limit (`0` turns clipping off).
    - `eval_interval`: steps between validation-loss estimates (also at the end).
    - `eval_batches`: validation batches per estimate.
    - `checkpoint_interval`: steps between checkpoints (also at the end and on Ctrl-C).
    - `keep_checkpoints`: newest step files kept besides `latest.pt` (`0` keeps all).
    - `log_interval`: steps between `metrics.jsonl` records of the training loss.
    - `seed`: initialisation and data-order seed.
    - `device`: `"auto"` (cuda > mps > cpu) or a torch device string.
    - `compile`: `torch.compile` the loss; `None` means on for CUDA only.
    - `autocast`: `"auto"` (bf16 on CUDA, none elsewhere), `"bf16"` or `"none"`.
    - `progress`: show a tqdm progress bar.
    - `plot`: redraw `loss.png` at each evaluation.
    - `wandb_project`: log to Weights & Biases under this project (needs `wandb`).
    """

    batch_size: int = 32
    data_shards: int | None = None
    steps: int = 5000
    max_tokens: int | None = None
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    cosine_steps: int | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_batches: int = 20
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool | None = None
    autocast: str = "auto"
    progress: bool = True
    plot: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        positive = ("batch_size", "eval_interval", "eval_batches", "checkpoint_interval", "log_interval")
        bad = {k: getattr(self, k) for k in positive if getattr(self, k) < 1}
        if self.steps < 0:
            bad["steps"] = self.steps
        if self.data_shards is not None and (self.data_shards < 1 or self.batch_size % self.data_shards):
            bad["data_shards (must divide batch_size)"] = (self.data_shards, self.batch_size)
        if self.max_tokens is not None and self.max_tokens < 1:
            bad["max_tokens"] = self.max_tokens
        if not 0 <= self.min_lr <= self.lr:
            bad["min_lr, lr"] = (self.min_lr, self.lr)
        if self.warmup_steps < 0 or self.keep_checkpoints < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            bad["warmup_steps, keep_checkpoints, grad_clip, weight_decay"] = (
                self.warmup_steps, self.keep_checkpoints, self.grad_clip, self.weight_decay)
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.eps <= 0:
            bad["beta1, beta2, eps"] = (self.beta1, self.beta2, self.eps)
        if self.autocast not in ("auto", "bf16", "none"):
            bad["autocast"] = self.autocast
        if bad:
            raise ValueError(f"invalid TrainConfig values: {bad}")

    def total_steps(self, context_length: int) -> int:
        """The number of optimizer steps: `steps`, or the token budget divided by tokens per step."""
        if self.max_tokens is None:
            return self.steps
        return max(1, self.max_tokens // (self.batch_size * context_length))

    def step_config(self, total_steps: int) -> StepConfig:
        """The `StepConfig` of this run: the cosine ends at `cosine_steps`, or at `total_steps`."""
        return StepConfig(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                          cosine_steps=self.cosine_steps if self.cosine_steps is not None else total_steps,
                          betas=(self.beta1, self.beta2), eps=self.eps, weight_decay=self.weight_decay,
                          grad_clip=self.grad_clip)

    def shards(self, world_size: int = 1) -> tuple[int, int]:
        """`(data_shards, sequences per shard)` for `world_size` processes; `ValueError` if they do not divide."""
        shards = self.data_shards if self.data_shards is not None else world_size
        if self.batch_size % world_size or shards % world_size or self.batch_size % shards:
            raise ValueError(
                f"the global batch_size {self.batch_size} must split evenly over world_size {world_size} processes "
                f"and data_shards {shards} (batch_size % world_size = {self.batch_size % world_size}, "
                f"data_shards % world_size = {shards % world_size}); choose a batch size divisible by both")
        return shards, self.batch_size // shards


@dataclass(eq=False)
class Run:
    """What `train` and its hooks share during one call.

    Read by hooks: the configs, `out` (the run folder), `device`, `parallel` (`is_main` is rank 0),
    `total` steps, `tokens_per_step`, `context_length`, `loss_fn`, `valid_tokens`, `n_params`,
    `resumed_from`, `hooks`, `checkpoint_data` (plain data stored in every checkpoint), `bf16`.
    Written by hooks during a step: `record` (this step's `metrics.jsonl` fields), `last` (the
    latest train/validation loss, lr, tokens/s), `records` (every record so far), `stop(reason)`.
    """

    model_config: Any
    train_config: TrainConfig
    out: Path
    device: torch.device
    parallel: Parallel
    total: int
    tokens_per_step: int
    context_length: int
    loss_fn: Callable
    valid_tokens: Any
    bf16: bool
    checkpoint_data: dict[str, Any]
    n_params: int = 0
    flops_per_token: float | None = None
    peak_flops: float | None = None
    resumed_from: int | None = None
    elapsed_before: float = 0.0
    hooks: list[Any] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=lambda: {"train_loss": math.nan, "val_loss": math.nan,
                                                             "lr": math.nan, "tokens_per_sec": 0.0})
    stop_reason: str | None = None
    saved_on_interrupt: Path | None = None
    overwrite: bool = False
    step_seconds: float = 0.0
    _started: float = field(default_factory=time.perf_counter)
    _step_end: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def stop(self, reason: str) -> None:
        """End the run after this step's hooks (the first reason given is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def wall(self) -> float:
        """Seconds of training so far, summed over resumed segments."""
        return self.elapsed_before + time.perf_counter() - self._started

    def since_step(self) -> float:
        """Seconds since the last `train_step` returned (hooks' host syncs count toward tokens/s)."""
        return time.perf_counter() - self._step_end

