"""`TrainConfig` (everything about a run that is not the model), `Run` (what the loop and its
hooks share during one call of `fnlm.train.train`) and `RunLock` (one writer per run folder)."""

from __future__ import annotations

import json
import math
import numbers
import os
import socket
import sys
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from fnlm.train.parallel import Parallel
from fnlm.precision import PRECISIONS
from fnlm.train.step import OPTIMIZERS, StepConfig

__all__ = ["TrainConfig", "Run", "HARMLESS_FIELDS", "SHARDING", "RunLock", "RunFolderLocked"]

HARMLESS_FIELDS = {
    "eval_interval", "eval_batches", "checkpoint_interval", "keep_checkpoints", "log_interval",
    "device", "compile", "progress", "plot", "wandb_project", "remat", "shard",
}

SHARDING = (None, "optimizer", "params")
"""The `TrainConfig.shard` values: none, ZeRO-1 optimizer state, FSDP-style parameters."""


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
    - `step`: the step's settings, a `fnlm.StepConfig`: the optimizer and its hyper-parameters,
      the learning-rate schedule, clipping, gradient accumulation. Its `cosine_steps=None` (the
      default here) ends the cosine at the run's last step. A dict of its fields is accepted.
    - `eval_interval`: steps between validation-loss estimates (also at the end).
    - `eval_batches`: validation batches per estimate.
    - `checkpoint_interval`: steps between checkpoints (also at the end and on Ctrl-C).
    - `keep_checkpoints`: newest step files kept besides `latest.pt` (`0` keeps all).
    - `log_interval`: steps between `metrics.jsonl` records of the training loss.
    - `seed`: initialisation and data-order seed.
    - `device`: `"auto"` (cuda > mps > cpu) or a torch device string.
    - `compile`: `torch.compile` the loss; `None` means on for CUDA only.
    - `precision`: `"auto"` (bf16 autocast on CUDA, fp32 elsewhere), `"fp32"`, `"bf16"` (params
      cast to bfloat16 inside the loss, `fnlm.precision`) or `"autocast"` (bf16 `torch.autocast`).
    - `remat`: recompute each block in the backward pass instead of keeping its activations.
    - `shard`: under `torchrun`, `"optimizer"` shards the optimizer state over the processes
      (ZeRO-1), `"params"` the parameters, gradients and state too (FSDP-style); `None`: neither.
    - `progress`: show a tqdm progress bar.
    - `plot`: redraw `loss.png` at each evaluation.
    - `wandb_project`: log to Weights & Biases under this project (needs `wandb`).
    """

    batch_size: int = 32
    data_shards: int | None = None
    steps: int = 5000
    max_tokens: int | None = None
    step: StepConfig | dict[str, Any] = StepConfig()
    eval_interval: int = 500
    eval_batches: int = 20
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool | None = None
    precision: str = "auto"
    remat: bool = False
    shard: str | None = None
    progress: bool = True
    plot: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        if isinstance(self.step, dict):
            object.__setattr__(self, "step", step_config_from(self.step))
        elif not isinstance(self.step, StepConfig):
            raise TypeError(f"TrainConfig.step must be a fnlm.StepConfig (or a dict of its fields), got "
                            f"{type(self.step).__name__}")
        _check_types(self)
        positive = ("batch_size", "eval_interval", "eval_batches", "checkpoint_interval", "log_interval")
        bad = {k: getattr(self, k) for k in positive if getattr(self, k) < 1}
        if self.steps < 0:
            bad["steps"] = self.steps
        if self.data_shards is not None and (self.data_shards < 1 or self.batch_size % self.data_shards):
            bad["data_shards (must divide batch_size)"] = (self.data_shards, self.batch_size)
        if self.max_tokens is not None and self.max_tokens < 1:
            bad["max_tokens"] = self.max_tokens
        if self.keep_checkpoints < 0:
            bad["keep_checkpoints"] = self.keep_checkpoints
        if self.precision not in PRECISIONS:
            bad[f"precision (one of {', '.join(PRECISIONS)})"] = self.precision
        if self.shard not in SHARDING:
            bad["shard (optimizer, params or None)"] = self.shard
        bad.update(step_config_problems(self.step))
        if self.step.grad_accum_steps > 1 and self.batch_size % self.step.grad_accum_steps:
            bad["step.grad_accum_steps (must divide batch_size)"] = (self.step.grad_accum_steps, self.batch_size)
        if bad:
            raise ValueError(f"invalid TrainConfig values: {bad}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config `to_dict` (or a checkpoint's `train_config`) describes. Checkpoints of earlier
        versions, with the step's fields at the top level (`lr`, `beta1`, ...) and `autocast`, are
        read too."""
        data = dict(data)
        step = dict(data.pop("step", None) or {})
        for name in StepConfig._fields:
            if name in data:
                step[name] = data.pop(name)
        if "beta1" in data or "beta2" in data:
            step["betas"] = (data.pop("beta1", 0.9), data.pop("beta2", 0.95))
        if "autocast" in data:
            data["precision"] = {"none": "fp32", "bf16": "autocast"}.get(data.pop("autocast"), "auto")
        return cls(**data, step=step)

    def with_step(self, **changes: Any) -> "TrainConfig":
        """This config with the step's fields `changes` replaced:
        `config.with_step(lr=3e-3, optimizer="lion")`."""
        return dataclasses.replace(self, step=self.step._replace(**changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, numbers, strings, tuples) that `from_dict` reads back: what checkpoints
        store (`torch.load(weights_only=True)` reads it)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["step"] = self.step._asdict()
        return data

    def flat(self) -> dict[str, Any]:
        """The fields as one level, the step's as `step.lr`, `step.betas`, ...: for comparing configs."""
        data = self.to_dict()
        return {**{k: v for k, v in data.items() if k != "step"},
                **{f"step.{k}": v for k, v in data["step"].items()}}

    def total_steps(self, context_length: int) -> int:
        """The number of optimizer steps: `steps`, or the token budget divided by tokens per step."""
        if self.max_tokens is None:
            return self.steps
        return max(1, self.max_tokens // (self.batch_size * context_length))

    def check_schedule(self, total_steps: int) -> None:
        """`ValueError` unless the learning-rate schedule works for a run of `total_steps` steps: the
        warm-up must end by the step where the cosine does (`cosine_steps`, or the run's end)."""
        warmup, cosine = self.step.warmup_steps, self.step.cosine_steps
        end = cosine if cosine is not None else total_steps
        if warmup > end:
            where = f"step.cosine_steps ({end})" if cosine is not None else f"the run's {end} steps"
            raise ValueError(f"invalid TrainConfig values: step.warmup_steps {warmup} is longer than {where}; "
                             "lower step.warmup_steps (or set step.cosine_steps)")

    def step_config(self, total_steps: int) -> StepConfig:
        """`step` with the cosine ending at `total_steps` when its `cosine_steps` is None."""
        if self.step.cosine_steps is not None:
            return self.step
        return self.step._replace(cosine_steps=total_steps)

    def shards(self, world_size: int = 1) -> tuple[int, int]:
        """`(data_shards, sequences per shard)` for `world_size` processes; `ValueError` if they do not divide."""
        shards = self.data_shards if self.data_shards is not None else world_size
        if self.batch_size % world_size or shards % world_size or self.batch_size % shards:
            raise ValueError(
                f"the global batch_size {self.batch_size} must split evenly over world_size {world_size} processes "
                f"and data_shards {shards} (batch_size % world_size = {self.batch_size % world_size}, "
                f"data_shards % world_size = {shards % world_size}); choose a batch size divisible by both")
        return shards, self.batch_size // shards


def step_config_from(data: dict[str, Any]) -> StepConfig:
    """A `StepConfig` from a dict of its fields (`betas` as a list or tuple); `TypeError` naming an
    unknown field."""
    unknown = sorted(set(data) - set(StepConfig._fields))
    if unknown:
        raise TypeError(f"StepConfig has no field(s) {', '.join(unknown)}; its fields: {', '.join(StepConfig._fields)}")
    data = dict(data)
    if "betas" in data and isinstance(data["betas"], list | tuple):
        data["betas"] = tuple(data["betas"])
    return StepConfig(**data)


def step_config_problems(c: StepConfig) -> dict[str, Any]:
    """`{"step.field": value}` for each value of `c` a run cannot use (as `TrainConfig` reports them);
    `TypeError` for a field of the wrong type. Per-model tensor values (a sweep) are not checked."""
    def number(name: str, value: Any, kind: type = numbers.Real) -> None:
        if isinstance(value, bool) or not isinstance(value, kind):
            want = "an int" if kind is numbers.Integral else "a number"
            raise TypeError(f"TrainConfig.step.{name} must be {want}, got {value!r} ({type(value).__name__})")

    bad: dict[str, Any] = {}
    for name in ("lr", "min_lr", "eps", "weight_decay", "grad_clip"):
        number(name, getattr(c, name))
    for name in ("warmup_steps", "grad_accum_steps"):
        number(name, getattr(c, name), numbers.Integral)
    if c.cosine_steps is not None:
        number("cosine_steps", c.cosine_steps, numbers.Integral)
    if c.momentum is not None:
        number("momentum", c.momentum)
    if not (isinstance(c.betas, tuple) and len(c.betas) == 2):
        raise TypeError(f"TrainConfig.step.betas must be a pair of numbers, got {c.betas!r}")
    for b in c.betas:
        number("betas", b)
    floats = {"lr": c.lr, "min_lr": c.min_lr, "eps": c.eps, "weight_decay": c.weight_decay,
              "grad_clip": c.grad_clip, "betas": c.betas, "momentum": c.momentum}
    nonfinite = [f"step.{k}={v}" for k, v in floats.items()
                 if v is not None and not all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,)))]
    if nonfinite:
        raise ValueError(f"invalid TrainConfig values: {', '.join(nonfinite)} (every number must be finite)")
    if not 0 <= c.min_lr <= c.lr:
        bad["step.min_lr, step.lr"] = (c.min_lr, c.lr)
    if c.warmup_steps < 0 or c.grad_clip < 0 or c.weight_decay < 0:
        bad["step.warmup_steps, step.grad_clip, step.weight_decay"] = (c.warmup_steps, c.grad_clip, c.weight_decay)
    if c.cosine_steps is not None and c.cosine_steps < c.warmup_steps:
        bad["step.cosine_steps (must be >= step.warmup_steps)"] = (c.cosine_steps, c.warmup_steps)
    if not all(0 <= b < 1 for b in c.betas) or c.eps <= 0:
        bad["step.betas, step.eps"] = (c.betas, c.eps)
    if c.optimizer not in OPTIMIZERS:
        bad[f"step.optimizer (one of {', '.join(OPTIMIZERS)})"] = c.optimizer
    if c.momentum is not None and not 0 <= c.momentum < 1:
        bad["step.momentum"] = c.momentum
    if c.grad_accum_steps < 1:
        bad["step.grad_accum_steps"] = c.grad_accum_steps
    return bad


_INTS = ("batch_size", "steps", "eval_interval", "eval_batches", "checkpoint_interval", "keep_checkpoints",
         "log_interval", "seed")
_OPTIONAL_INTS = ("data_shards", "max_tokens")


def _check_types(tc: TrainConfig) -> None:
    """`TypeError` for a field of the wrong type."""
    for name in _INTS + _OPTIONAL_INTS:
        value = getattr(tc, name)
        if value is None and name in _OPTIONAL_INTS:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"TrainConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if not isinstance(tc.remat, bool):
        raise TypeError(f"TrainConfig.remat must be a bool, got {tc.remat!r}")


@dataclass(eq=False)
class Run:
    """What `train` and its hooks share during one call.

    Read by hooks: the configs, `out` (the run folder), `device`, `parallel` (`is_main` is rank 0),
    `total` steps, `tokens_per_step`, `context_length`, `loss_fn`, `valid_tokens`, `n_params`,
    `resumed_from`, `hooks`, `checkpoint_data` (plain data stored in every checkpoint), `bf16`,
    `final` (this step is the run's last), `nonfinite_at` (the first step whose loss or gradient
    norm was not finite, or `None`), `checkpoint` (the last checkpoint written), `step_config` (the
    run's `StepConfig`, its cosine ending at the run's end), `optimizer` (the transformation the
    step uses), `custom_optimizer` (it was passed to `train` rather than named by the config).
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
    final: bool = False
    nonfinite_at: int | None = None
    checkpoint: Path | None = None
    steps_run: int = 0
    loop_seconds: float = 0.0
    step_config: StepConfig | None = None
    optimizer: Any = None
    custom_optimizer: bool = False
    _bad_step: torch.Tensor | None = None
    _last_metrics: tuple[int, dict[str, Any]] | None = None
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

    def watch_finite(self, step: int, metrics: dict[str, Any], *, sync: bool) -> None:
        """Note whether step `step`'s loss and gradient norm are finite, on their device (no host
        sync); with `sync`, look (`check_finite`). The loop calls it after every step, with `sync` on
        the CPU and, elsewhere, at the steps where a measuring or saving hook runs (they synchronise
        anyway), so a non-finite step is caught before anything is logged or saved from it."""
        if self.nonfinite_at is not None:
            return
        flags = []
        for key in ("loss", "grad_norm"):
            value = metrics.get(key)
            if isinstance(value, torch.Tensor):
                flags.append(~torch.isfinite(value.detach()).all())
            elif isinstance(value, float) and not math.isfinite(value):
                self.mark_nonfinite(step, f"the {key.replace('_', ' ')} is {value} at step {step}")
                return
        if flags:
            bad = flags[0] if len(flags) == 1 else flags[0] | flags[1]
            if self._bad_step is None or self._bad_step.device != bad.device:
                self._bad_step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._bad_step.masked_fill_((self._bad_step < 0) & bad, step)
            self._last_metrics = (step, metrics)
        if sync:
            self.check_finite()

    def check_finite(self) -> bool:
        """`False` (and the run stopping) once a step's loss or gradient norm has not been finite."""
        if self.nonfinite_at is None and self._bad_step is not None:
            first = int(self._bad_step)
            if first >= 0:
                step, metrics = self._last_metrics or (None, {})
                values = ""
                if step == first:
                    shown = [f"{k.replace('_', ' ')} {float(metrics[k]):g}" for k in ("loss", "grad_norm")
                             if isinstance(metrics.get(k), torch.Tensor)]
                    values = f" ({', '.join(shown)})"
                self.mark_nonfinite(first, f"the loss or gradient norm is not finite at step {first}{values}")
        return self.nonfinite_at is None

    def mark_nonfinite(self, step: int, reason: str) -> None:
        """The params are not finite since step `step`: stop, and save nothing from them."""
        if self.nonfinite_at is None:
            self.nonfinite_at = step
        self.stop(reason)

    def wall(self) -> float:
        """Seconds of training so far, summed over resumed segments."""
        return self.elapsed_before + time.perf_counter() - self._started

    def since_step(self) -> float:
        """Seconds since the last `train_step` returned (hooks' host syncs count toward tokens/s)."""
        return time.perf_counter() - self._step_end



try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunFolderLocked(RuntimeError):
    """Another run holds the folder's `RunLock`; `holder` is what it wrote about itself (pid, host,
    start time, command), `path` the lock file."""

    def __init__(self, folder: Path, path: Path, holder: dict[str, Any] | None, detail: str = ""):
        who = _describe_holder(holder) if holder else "a run that has not said who it is yet"
        super().__init__(f"{folder} is in use by another run ({who}){detail}; wait for it to finish or stop it, "
                         "or use another folder")
        self.folder, self.path, self.holder = folder, path, holder


def _describe_holder(info: dict[str, Any]) -> str:
    text = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    return text + (f": {info['command']}" if info.get("command") else "")


class RunLock:
    """An exclusive lock on a run folder: one run writes a folder at a time.

    ```python
    with RunLock("runs/mine"):
        ...   # write the folder; a second process gets RunFolderLocked naming this one
    ```

    The lock is `FOLDER/fnlm.lock`, held with `flock` (so the kernel lets go of it when the
    process ends, however it ends) and holding a line about its holder (pid, host, start time,
    command). A lock file left by a process that is gone is taken over, with a note on stderr.
    Re-entrant within a thread: the command line holds the lock and `fnlm.train.train` takes it
    again. Where `flock` is missing (Windows) the file itself is the lock, and one left behind by
    a crash must be deleted by hand (the refusal says so).

    **Arguments:**

    - `folder`: the run folder (created when missing).
    - `quiet`: do not print the note when taking over a stale lock (`taken_over` holds what the
      stale lock said, and `takeover_note()` the note).
    """

    FILE = "fnlm.lock"
    _held: dict[str, list[Any]] = {}
    _guard = threading.Lock()

    def __init__(self, folder: str | os.PathLike, *, quiet: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / self.FILE
        self.quiet = quiet
        self.taken_over: dict[str, Any] | None = None
        self._key: str | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock (again, when this thread holds it); `RunFolderLocked` when another run has it."""
        if self._key is not None:
            raise RuntimeError(f"this RunLock on {self.folder} is already acquired")
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        with RunLock._guard:
            entry = RunLock._held.get(key)
            if entry is not None:
                if entry[2] != threading.get_ident():
                    raise RunFolderLocked(self.folder, self.path, _info(), " in another thread of this process")
                entry[1] += 1
            else:
                RunLock._held[key] = [self._take(), 1, threading.get_ident()]
        self._key = key
        return self

    def release(self) -> None:
        """Let go of the lock; the last release of a thread deletes the lock file."""
        if self._key is None:
            return
        with RunLock._guard:
            entry = RunLock._held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del RunLock._held[self._key]
                self._drop(entry[0])
        self._key = None

    def _take(self) -> int:
        fd = self._flock() if fcntl is not None else self._create_exclusive()
        old = _read_info(fd)
        if old:
            self.taken_over = old
            if not self.quiet:
                print(f"fnlm: {self.takeover_note()}", file=sys.stderr, flush=True)
        line = (json.dumps(_info()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, line)
        return fd

    def _flock(self) -> int:
        """Open the lock file and flock it; retried when the file was replaced in between (a holder
        deletes it on release)."""
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_info(fd)
                os.close(fd)
                raise RunFolderLocked(self.folder, self.path, holder) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise RunFolderLocked(self.folder, self.path, None, " (its lock file keeps changing)")

    def _create_exclusive(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            with open(self.path, "rb") as f:
                holder = _parse_info(f.read(4096))
            raise RunFolderLocked(self.folder, self.path, holder,
                                  f" (if that run is gone, delete {self.path})") from None

    def _drop(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def takeover_note(self) -> str:
        """The note about the stale lock this acquisition took over (empty when it took none)."""
        if not self.taken_over:
            return ""
        return f"taking over the lock of {self.folder} from {_describe_holder(self.taken_over)}, whose process is gone"

    @classmethod
    def held(cls, folder: str | os.PathLike) -> bool:
        """Whether this process holds the lock on `folder`."""
        return os.path.realpath(folder) in cls._held


def _info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:200]}


def _parse_info(data: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(data.decode("utf-8", "replace") or "null")
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return _parse_info(os.read(fd, 4096))
    except OSError:
        return None
