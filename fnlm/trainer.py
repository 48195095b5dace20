"""A reusable training loop: `TrainConfig` and `train`.

`train` owns everything around the maths of one step: the device, bf16 autocast and TF32 on
CUDA, `torch.compile`, the learning-rate schedule, evaluation, logging (`metrics.jsonl`, a tqdm
bar, PNG plots, optional Weights & Biases), checkpoints and exact resumption. The maths itself
comes from the library's pure functions and can be swapped:

- `model_fn(params, token_ids, config) -> logits` and `init_fn(config, *, seed, device) -> params`
  (default `fnlm.transformer_lm` / `fnlm.init_transformer_lm`): pass another block or a whole
  other model for an ablation.
- `parallel=Parallel(rank, world_size, sync_grads=..., all_reduce_mean=...)`: data-parallel runs
  (`fnlm.distributed`) average gradients in `sync_grads` (between backward and clipping); only
  rank 0 writes files. `batch_size` is the global batch; each rank draws its share.

**Exact resumption.** The global batch of step `t` is cut into `data_shards` equal shards (default:
one per process); shard `s` is drawn by `get_batch` from a CPU `torch.Generator` seeded with a
hash of `(seed, s, t)`, and rank `r` of `W` draws shards `r*S/W .. (r+1)*S/W - 1`. So one process
with `data_shards=S` sees exactly the union of the batches of an `S`-process run, and the evaluation batches from one
seeded with `(seed, "eval")`; the learning rate is a function of `t`. A checkpoint holds the
params, the optimizer state, `t`, the configs and the global RNG states. So the computation of
step `t` does not depend on whether the run was resumed, and a run killed at any moment and
resumed from `checkpoints/latest.pt` ends with the same params, bit for bit on CPU, as one
that never stopped. Checkpoints are written atomically (temporary file, fsync, rename), and
`latest.pt` is replaced by a rename, so it is always a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import fnlm
from fnlm.tree import Tree, tree_size

__all__ = [
    "TrainConfig",
    "Parallel",
    "train",
    "evaluate",
    "resolve_device",
    "read_metrics",
    "plot_runs",
    "batch_generator",
    "draw_batch",
]

_HARMLESS_FIELDS = {
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
    - `lr`, `min_lr`: peak and final learning rates of the cosine schedule.
    - `warmup_steps`: linear warm-up; `cosine_steps`: end of the cosine (default: `steps`).
    - `beta1`, `beta2`, `eps`, `weight_decay`: AdamW.
    - `grad_clip`: global gradient-norm limit (`0` turns clipping off).
    - `eval_interval` (steps; also at the end), `eval_batches`: validation loss estimate.
    - `checkpoint_interval` (steps; also at the end), `keep_checkpoints` (newest step files
      kept besides `latest.pt`; `0` keeps all).
    - `log_interval`: steps between `metrics.jsonl` records of the training loss.
    - `seed`: initialisation and data-order seed.
    - `device`: `"auto"` (cuda > mps > cpu) or a torch device string.
    - `compile`: `torch.compile` the loss; `None` means on for CUDA only.
    - `autocast`: `"auto"` (bf16 on CUDA, none elsewhere), `"bf16"` or `"none"`.
    - `progress`, `plot`: tqdm bar; PNG plots at each evaluation.
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

    def shards(self, world_size: int = 1) -> tuple[int, int]:
        """`(data_shards, sequences per shard)` for `world_size` processes; `ValueError` if they do not divide."""
        shards = self.data_shards if self.data_shards is not None else world_size
        if self.batch_size % world_size or shards % world_size or self.batch_size % shards:
            raise ValueError(
                f"the global batch_size {self.batch_size} must split evenly over world_size {world_size} processes "
                f"and data_shards {shards} (batch_size % world_size = {self.batch_size % world_size}, "
                f"data_shards % world_size = {shards % world_size}); choose a batch size divisible by both")
        return shards, self.batch_size // shards


def _identity(x):
    return x


def _gather_one(x):
    return [x]


@dataclass(frozen=True)
class Parallel:
    """How this process takes part in a data-parallel run (the default: alone).

    - `rank`, `world_size`: this process and the number of processes.
    - `sync_grads(grads) -> grads`: average a gradient tree over all ranks.
    - `all_reduce_mean(t) -> t`: average a tensor over all ranks (validation loss).
    - `barrier()`: wait for all ranks (after rank 0 writes a checkpoint).
    - `broadcast(tree) -> tree`: rank 0's tensors on every rank (params and optimizer state at start).
    - `all_gather_object(obj) -> list`: every rank's `obj`, by rank (RNG states for checkpoints).
    - `device`: this process's device (e.g. `cuda:LOCAL_RANK`); `None` uses `TrainConfig.device`.

    Only rank 0 (`is_main`) writes metrics, plots and checkpoints; every rank computes.
    """

    rank: int = 0
    world_size: int = 1
    sync_grads: Callable[[Tree], Tree] = _identity
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    barrier: Callable[[], None] = field(default=lambda: None)
    broadcast: Callable[[Tree], Tree] = _identity
    all_gather_object: Callable[[Any], list] = _gather_one
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto") -> torch.device:
    """`"auto"` picks cuda, then mps, then cpu; any other name is passed to `torch.device`."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mix(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 31)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def batch_generator(seed: int, shard: int, step: int) -> torch.Generator:
    """The CPU generator `get_batch` uses for data shard `shard` of `step`: a pure function of the three."""
    return torch.Generator().manual_seed(_mix(seed, shard, step))


def _eval_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, 0x45564C, 1 << 40))


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
    parts = [fnlm.get_batch(tokens, per_shard, context_length, device,
                            generator=batch_generator(train_config.seed, s, step)) for s in mine]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _flops_per_token(model_config: Any) -> float | None:
    """Training FLOPs per token for MFU, or None for a config the accounting does not describe."""
    try:
        return fnlm.accounting.training_flops_per_token(
            model_config, swiglu=getattr(model_config, "ffn", "swiglu") == "swiglu"
        )
    except TypeError:
        return None


def _loss_fn(model_fn: Callable, model_config: Any, autocast: torch.autocast | None) -> Callable:
    def loss(params: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = model_fn(params, x, model_config)
        return fnlm.cross_entropy(logits, y)

    return loss


@torch.no_grad()
def evaluate(
    loss_fn: Callable,
    params: Tree,
    tokens: Any,
    *,
    batch_size: int,
    context_length: int,
    batches: int,
    seed: int,
    device: torch.device,
    parallel: Parallel = Parallel(),
) -> float:
    """Mean loss over `batches` validation batches, the same batches at every call for a seed.

    **Arguments:**

    - `loss_fn`: `(params, x, y) -> scalar loss`.
    - `params`: the params tree.
    - `tokens`: 1-D token ids (memmap, array or tensor).
    - `batch_size`, `context_length`, `batches`: the size of the estimate.
    - `seed`: fixes which windows are drawn.
    - `parallel`: each rank scores its `batch_size / world_size` rows of every batch (so the windows
      do not depend on the number of processes).

    **Returns:** the mean loss as a float (identical on every rank).
    """
    gen = _eval_generator(seed)
    total = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    world, rank = parallel.world_size, parallel.rank
    if batch_size % world:
        raise ValueError(f"evaluation batch_size {batch_size} does not split over world_size {world} processes")
    rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    for _ in range(batches):
        x, y = fnlm.get_batch(tokens, batch_size, context_length, "cpu" if world > 1 else device, generator=gen)
        if world > 1:
            x, y = x[rows].to(device), y[rows].to(device)
        total += loss_fn(params, x, y).to(total.dtype)
    total = parallel.all_reduce_mean(total)
    return float(total) / batches


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, skipping a torn last line."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *, title: str = "") -> None:
    """Write a PNG: loss against steps (left) and against wall-clock minutes (right).

    **Arguments:**

    - `runs`: name -> metric records (as in `metrics.jsonl`); train loss is drawn thin, validation
      loss with markers, one colour per run.
    - `path`: the PNG to write (replaced atomically).
    - `title`: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [r for r in records if "train_loss" in r and math.isfinite(r["train_loss"])]
        val = [r for r in records if "val_loss" in r and math.isfinite(r["val_loss"])]
        label = f"{name} " if len(runs) > 1 else ""
        for ax, key, scale in ((axes[0], "step", 1.0), (axes[1], "time", 1 / 60)):
            if train:
                ax.plot([r[key] * scale for r in train], [r["train_loss"] for r in train], color=color, alpha=0.45, lw=1, label=f"{label}train")
            if val:
                ax.plot([r[key] * scale for r in val], [r["val_loss"] for r in val], color=color, marker="o", ms=3, lw=1.8, label=f"{label}validation")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall-clock time (minutes)")
    for ax in axes:
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class _Writer:
    """Rank 0's files: metrics.jsonl, plots, checkpoints. Every method is a no-op elsewhere."""

    def __init__(self, out_dir: Path, enabled: bool, keep: int, callbacks: Sequence[Callable[[dict], None]]):
        self.out = out_dir
        self.enabled = enabled
        self.keep = keep
        self.callbacks = list(callbacks)
        self.records: list[dict[str, Any]] = []
        self.ckpt_dir = out_dir / "checkpoints"
        self.metrics_path = out_dir / "metrics.jsonl"
        if enabled:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)

    def start(self, resume_step: int | None) -> None:
        if not self.enabled:
            return
        if resume_step is None:
            for old in [*self.ckpt_dir.glob("step_*.pt"), self.ckpt_dir / "latest.pt"]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        old = read_metrics(self.metrics_path) if resume_step is not None else []
        self.records = [r for r in old if r.get("step", 0) <= resume_step] if resume_step is not None else []
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for cb in self.callbacks:
            cb(record)

    def plot(self, title: str) -> None:
        if self.enabled:
            plot_runs({"run": self.records}, self.out / "loss.png", title=title)

    def checkpoint(self, step: int, **payload: Any) -> Path | None:
        if not self.enabled:
            return None
        path = self.ckpt_dir / f"step_{step:07d}.pt"
        fnlm.save_checkpoint(path, step=step, **payload)
        latest = self.ckpt_dir / "latest.pt"
        tmp = self.ckpt_dir / ".latest.pt.link"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, latest)
        if self.keep:
            steps = sorted(self.ckpt_dir.glob("step_*.pt"))
            for old in steps[: -self.keep]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        return path


def _wandb_callback(project: str, out_dir: Path, config: dict[str, Any]) -> Callable[[dict], None] | None:
    try:
        import wandb
    except ImportError:
        print("fnlm: wandb_project is set but wandb is not installed; not logging to Weights & Biases", file=sys.stderr)
        return None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    run = wandb.init(project=project, id=run_id, resume="allow", dir=str(out_dir), config=config)

    def log(record: dict[str, Any]) -> None:
        run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    return log


def train(
    model_config: Any,
    train_config: TrainConfig,
    train_tokens: Any,
    valid_tokens: Any,
    out_dir: str | os.PathLike,
    *,
    model_fn: Callable | None = None,
    init_fn: Callable | None = None,
    resume: bool = False,
    parallel: Parallel = Parallel(),
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    extra_checkpoint_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a language model with AdamW and a cosine schedule; evaluate, log and checkpoint.

    **Arguments:**

    - `model_config`: the model's config (a frozen dataclass with `context_length`), passed to
      `model_fn` and `init_fn` and stored in checkpoints.
    - `train_config`: a :class:`TrainConfig`.
    - `train_tokens`, `valid_tokens`: 1-D token ids (e.g. `fnlm.load_tokens(...)` memmaps).
    - `out_dir`: run folder for `metrics.jsonl`, `loss.png` and `checkpoints/`.
    - `model_fn`: `(params, token_ids (batch seq), config) -> logits (batch seq vocab)`;
      default `fnlm.transformer_lm`.
    - `init_fn`: `(config, *, seed, device) -> params`; default `fnlm.init_transformer_lm`.
    - `resume`: continue from `out_dir/checkpoints/latest.pt` when it exists (its configs must
      match, except for logging/evaluation/device settings).
    - `parallel`: data-parallel hooks (see :class:`Parallel`).
    - `callbacks`: called on rank 0 with every metrics record.
    - `extra_checkpoint_data`: more plain data stored in each checkpoint.

    **Returns:** a dict of final metrics: `step`, `tokens`, `train_loss` (last logged),
    `val_loss`, `val_perplexity`, `wall_time` (seconds, summed over resumed segments),
    `tokens_per_sec`, `params` (count), `diverged` (a non-finite loss stopped the run),
    `resumed_from` (step or `None`).
    """
    model_fn = model_fn or fnlm.transformer_lm
    init_fn = init_fn or fnlm.init_transformer_lm
    tc = train_config
    out = Path(out_dir)
    device = resolve_device(parallel.device or tc.device)
    context_length = model_config.context_length
    total = tc.total_steps(context_length)
    cosine_steps = tc.cosine_steps if tc.cosine_steps is not None else total
    tokens_per_step = tc.batch_size * context_length
    data_shards, _ = tc.shards(parallel.world_size)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = tc.autocast == "bf16" or (tc.autocast == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else None
    loss_fn = _loss_fn(model_fn, model_config, autocast)
    if tc.compile if tc.compile is not None else device.type == "cuda":
        loss_fn = torch.compile(loss_fn)
    value_and_grad = fnlm.value_and_grad(loss_fn)
    flops_per_token = _flops_per_token(model_config)
    peak_flops = (
        fnlm.accounting.measure_matmul_peak(
            device, torch.bfloat16 if use_bf16 and device.type == "cuda" else torch.float32, min_seconds=0.2
        )
        if flops_per_token
        else None
    )

    writer = _Writer(out, parallel.is_main, tc.keep_checkpoints, callbacks)
    train_cfg_data = dataclasses.asdict(tc)
    latest = out / "checkpoints" / "latest.pt"
    resumed_from = None
    elapsed_before = 0.0
    if resume and latest.exists():
        ck = fnlm.load_checkpoint(latest, map_location=device)
        _check_resume(ck, model_config, train_cfg_data, parallel.world_size, data_shards, latest)
        params, opt_state, step = ck["params"], ck["opt_state"], ck["step"]
        rank_rng = ck.get("rank_rng") or []
        rng = rank_rng[parallel.rank] if len(rank_rng) == parallel.world_size else ck.get("rng")
        if rng is not None:
            fnlm.restore_rng_state(rng)
        elapsed_before = float(ck.get("wall_time", 0.0))
        resumed_from = step
        window = ck.get("log_window") or {}
    else:
        params = init_fn(model_config, seed=tc.seed, device=device)
        opt_state = fnlm.adamw_init(params)
        step = 0
        window = {}
    params, opt_state = parallel.broadcast(params), parallel.broadcast(opt_state)
    writer.start(resumed_from)
    if tc.wandb_project and parallel.is_main:
        cb = _wandb_callback(tc.wandb_project, out, {"model": dataclasses.asdict(model_config), "train": train_cfg_data})
        if cb is not None:
            writer.callbacks.append(cb)

    n_params = tree_size(params)
    betas = (tc.beta1, tc.beta2)
    run_start = time.perf_counter()

    def wall() -> float:
        return elapsed_before + time.perf_counter() - run_start

    def lr_at(t: int) -> float:
        return fnlm.cosine_schedule(t, tc.lr, tc.min_lr, tc.warmup_steps, cosine_steps)

    def do_eval() -> float:
        return evaluate(loss_fn, params, valid_tokens, batch_size=tc.batch_size, context_length=context_length,
                        batches=tc.eval_batches, seed=tc.seed, device=device, parallel=parallel)

    def save(at: int, collective: bool = True) -> None:
        together = collective and parallel.world_size > 1
        rank_rng = parallel.all_gather_object(fnlm.capture_rng_state()) if together else None
        window_loss = parallel.all_reduce_mean(loss_sum) if together else loss_sum
        writer.checkpoint(
            at, params=params, opt_state=opt_state, config=model_config, train_config=train_cfg_data,
            world_size=parallel.world_size, global_batch_size=tc.batch_size, data_shards=data_shards,
            rank_rng=rank_rng, tokens_per_step=tokens_per_step, wall_time=wall(),
            log_window={"loss_sum": window_loss.cpu(), "norm_sum": norm_sum.cpu(), "steps": window_steps},
            **(extra_checkpoint_data or {}),
        )
        if collective:
            parallel.barrier()

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (tc.progress and parallel.is_main),
               dynamic_ncols=True)
    last = {"train_loss": float("nan"), "val_loss": float("nan")}
    diverged = False
    acc = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = window.get("loss_sum", torch.zeros(())).to(device, acc)
    norm_sum = window.get("norm_sum", torch.zeros(())).to(device, acc)
    window_steps, window_time, timed_steps = int(window.get("steps", 0)), 0.0, 0
    tok_s = 0.0
    if parallel.is_main:
        print(f"fnlm: training {n_params / 1e6:.2f}M parameters on {device} for {total} steps "
              f"({total * tokens_per_step / 1e6:.1f}M tokens, {tokens_per_step} tokens/step)"
              + (f", resuming at step {step}" if resumed_from is not None else ""), file=sys.stderr, flush=True)
    try:
        while step < total:
            t0 = time.perf_counter()
            lr = lr_at(step)
            x, y = draw_batch(train_tokens, tc, context_length, step, device, rank=parallel.rank,
                              world_size=parallel.world_size)
            loss, grads = value_and_grad(params, x, y)
            grads = parallel.sync_grads(grads)
            if tc.grad_clip > 0:
                grads, norm = fnlm.clip_grad_norm_with_norm(grads, tc.grad_clip)
            else:
                norm = fnlm.global_norm(grads)
            new_params, new_opt = fnlm.adamw_step(params, opt_state, grads, lr=lr, betas=betas, eps=tc.eps,
                                                  weight_decay=tc.weight_decay)
            params, opt_state, step = new_params, new_opt, step + 1
            loss_sum += loss.detach()
            norm_sum += norm.detach()
            window_steps += 1
            timed_steps += 1
            bar.update(1)
            record: dict[str, Any] = {}
            if step % tc.log_interval == 0 or step == total:
                mean_loss = float(parallel.all_reduce_mean(loss_sum)) / window_steps
                mean_norm = float(norm_sum) / window_steps
                window_time += time.perf_counter() - t0
                tok_s = timed_steps * tokens_per_step / max(window_time, 1e-9)
                record.update(train_loss=mean_loss, lr=lr, grad_norm=mean_norm, tokens_per_sec=tok_s)
                if peak_flops:
                    record["mfu"] = tok_s / parallel.world_size * flops_per_token / peak_flops
                last["train_loss"] = mean_loss
                loss_sum.zero_()
                norm_sum.zero_()
                window_steps, window_time, timed_steps = 0, 0.0, 0
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if not math.isfinite(mean_loss):
                    diverged = True
            else:
                window_time += time.perf_counter() - t0
            if step % tc.eval_interval == 0 or step == total or diverged:
                val = do_eval()
                last["val_loss"] = val
                record.update(val_loss=val, val_perplexity=_ppl(val))
                bar.set_postfix(loss=f"{last['train_loss']:.3f}", val=f"{val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if record:
                writer.log({"step": step, "tokens": step * tokens_per_step, "time": round(wall(), 3), **record})
            if "val_loss" in record and tc.plot:
                writer.plot(f"{n_params / 1e6:.2f}M params, {tokens_per_step} tokens/step")
            if step % tc.checkpoint_interval == 0 or step == total or diverged:
                save(step)
            if diverged:
                if parallel.is_main:
                    print(f"fnlm: loss is not finite at step {step}; stopping (diverged)", file=sys.stderr)
                break
    except KeyboardInterrupt:
        save(step, collective=False)
        raise
    finally:
        bar.close()
    if not math.isfinite(last["val_loss"]) and not diverged and step == (resumed_from or 0):
        last["val_loss"] = do_eval()
    elapsed = wall()
    return {
        "step": step,
        "tokens": step * tokens_per_step,
        "train_loss": last["train_loss"],
        "val_loss": last["val_loss"],
        "val_perplexity": _ppl(last["val_loss"]),
        "wall_time": elapsed,
        "tokens_per_sec": tok_s,
        "params": n_params,
        "diverged": diverged,
        "resumed_from": resumed_from,
        "device": str(device),
    }


def _ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")


def _check_resume(
    ck: dict[str, Any], model_config: Any, train_cfg: dict[str, Any], world_size: int, data_shards: int, where: Path
) -> None:
    want_model, _ = fnlm.checkpoint.config_to_data(model_config)
    problems = {}
    for k in sorted(set(want_model) | set(ck["config"])):
        if want_model.get(k) != ck["config"].get(k):
            problems[f"model.{k}"] = (ck["config"].get(k), want_model.get(k))
    stored_train = ck.get("train_config") or {}
    for k in sorted(set(train_cfg) | set(stored_train)):
        if k not in _HARMLESS_FIELDS and k != "data_shards" and train_cfg.get(k) != stored_train.get(k):
            problems[f"train.{k}"] = (stored_train.get(k), train_cfg.get(k))
    stored_shards = ck.get("data_shards", ck.get("world_size", 1))
    if stored_shards != data_shards:
        problems["world_size, data_shards"] = ((ck.get("world_size", 1), stored_shards), (world_size, data_shards))
    if problems:
        hint = ""
        if "world_size, data_shards" in problems:
            hint = (f"; the checkpoint was made by {ck.get('world_size', 1)} process(es) drawing {stored_shards} data "
                    f"shard(s) per step: resume with the same number of processes, or pass --data-shards "
                    f"{stored_shards} with a process count that divides it")
        raise ValueError(f"cannot resume from {where}: settings differ (checkpoint, now): {problems}{hint}")
