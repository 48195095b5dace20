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
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from fnlm.train.parallel import Parallel
from fnlm.train.step import StepConfig

__all__ = ["TrainConfig", "Run", "HARMLESS_FIELDS", "RunLock", "RunFolderLocked"]

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
        _check_types(self)
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
        if self.cosine_steps is not None and self.cosine_steps < self.warmup_steps:
            bad["cosine_steps (must be >= warmup_steps)"] = (self.cosine_steps, self.warmup_steps)
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

    def check_schedule(self, total_steps: int) -> None:
        """`ValueError` unless the learning-rate schedule works for a run of `total_steps` steps: the
        warm-up must end by the step where the cosine does (`cosine_steps`, or the run's end)."""
        end = self.cosine_steps if self.cosine_steps is not None else total_steps
        if self.warmup_steps > end:
            where = f"cosine_steps ({end})" if self.cosine_steps is not None else f"the run's {end} steps"
            raise ValueError(f"invalid TrainConfig values: warmup_steps {self.warmup_steps} is longer than {where}; "
                             "lower warmup_steps (or set cosine_steps)")

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


_INTS = ("batch_size", "steps", "warmup_steps", "eval_interval", "eval_batches", "checkpoint_interval",
         "keep_checkpoints", "log_interval", "seed")
_OPTIONAL_INTS = ("data_shards", "max_tokens", "cosine_steps")
_FLOATS = ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip")


def _check_types(tc: TrainConfig) -> None:
    """`TypeError` for a field of the wrong type, `ValueError` for a number that is NaN or infinite."""
    for name in _INTS + _OPTIONAL_INTS:
        value = getattr(tc, name)
        if value is None and name in _OPTIONAL_INTS:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"TrainConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    for name in _FLOATS:
        value = getattr(tc, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"TrainConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
    bad = [f"{name}={getattr(tc, name)}" for name in _FLOATS if not math.isfinite(getattr(tc, name))]
    if bad:
        raise ValueError(f"invalid TrainConfig values: {', '.join(bad)} (every number must be finite)")


@dataclass(eq=False)
class Run:
    """What `train` and its hooks share during one call.

    Read by hooks: the configs, `out` (the run folder), `device`, `parallel` (`is_main` is rank 0),
    `total` steps, `tokens_per_step`, `context_length`, `loss_fn`, `valid_tokens`, `n_params`,
    `resumed_from`, `hooks`, `checkpoint_data` (plain data stored in every checkpoint), `bf16`,
    `final` (this step is the run's last), `nonfinite_at` (the first step whose loss or gradient
    norm was not finite, or `None`), `checkpoint` (the last checkpoint written).
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
