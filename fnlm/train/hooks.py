"""What the training loop does besides stepping, as hooks: logging, evaluation, checkpoints, the
progress bar, plots, Weights & Biases, a divergence guard.

**The hook protocol.** A hook is an object (subclass `Hook`) with two attributes and a few methods,
all optional:

- `every` (int, default 1): the loop calls `step` at the steps that are multiples of it, and at the
  run's **final step** whatever its cadence. A hook does not check the step number itself.
- `phase` (default `"write"`): when in a step the hook's `step` runs, one of `PHASES`:
  `"measure"` (add to `run.record`: `LogWindow`, `Evaluator`), `"check"` (read the record, may call
  `run.stop`: `DivergenceGuard`), `"write"` (read the complete record: `MetricsFile`, `Callback`,
  `ProgressBar`, `LossPlot`, `Wandb`), `"save"` (`Checkpointer`, after everything else). Within a
  phase, hooks run in list order; across phases, the order of the list does not matter.
- `start(run, state)`: once, before the first step (after a resume, with the restored state).
- `observe(run, state, metrics)`: after every step, before any `step` call, with `train_step`'s
  metrics (0-d tensors: accumulate on the device, no host sync), e.g. `LogWindow`'s sums.
- `step(run, state, metrics)`: at the hook's cadence; add to `run.record` (the step's line in
  `metrics.jsonl`) or call `run.stop(reason)`. `run.final` is true at the final step.
- `interrupted(run, state)`: on Ctrl-C (after the current step's hooks, see `fnlm.train.loop`),
  before `TrainingInterrupted` propagates.
- `end(run, state)`: once, after the last step.
- `state_dict()` / `load_state_dict(d)`: state to keep in checkpoints under the hook's `name`.

**The final step.** The run ends after the step where it reaches its length, or a hook calls
`run.stop`, or the loop finds the loss or the gradient norm not finite (`Run.watch_finite`). At that
step every hook's `step` is called exactly once, in phase order: when a hook asks to stop, the step
becomes final and the loop goes back to the first phase for the hooks not yet called, so a stop
asked in the check phase still gets the evaluation and the partial log window into the record
before it is written and checkpointed. (A stop asked in the write or save phase also ends the run;
the measure hooks then called fill a record that was already written.) Params that are not finite
are never evaluated or saved (`run.nonfinite_at`).

`default_hooks(run)` is the loop's list. `ProgressBar`, `LossPlot` and `Wandb` import tqdm,
matplotlib and wandb only when they start (`pip install fnlm[progress]`, `fnlm[plots]`,
`fnlm[wandb]`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fnlm.checkpoint import (
    NonFiniteParams, capture_rng_state, remove_stale_temporaries, save_checkpoint, write_latest,
)
from fnlm.train.evaluation import evaluate
from fnlm.train.run import Run
from fnlm.train.step import TrainState

__all__ = [
    "Hook", "LogWindow", "Evaluator", "DivergenceGuard", "MetricsFile", "Callback", "Checkpointer",
    "ProgressBar", "LossPlot", "Wandb", "default_hooks", "read_metrics", "perplexity_of", "PHASES", "machine_load",
]


def perplexity_of(loss: float) -> float:
    """`exp(loss)`, or inf for a non-finite or huge loss."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")


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


PHASES = ("measure", "check", "write", "save")
"""The phases of a step's hooks, in the order the loop runs them."""


class Hook:
    """A hook that does nothing; subclass it and override what you need (see the module docstring)."""

    name = "hook"
    every = 1
    phase = "write"

    def start(self, run: Run, state: TrainState) -> None:
        pass

    def observe(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def interrupted(self, run: Run, state: TrainState) -> None:
        pass

    def end(self, run: Run, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _positive(every: Any, who: str) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{who}: every must be a positive int, got {every!r}")
    return every


def machine_load() -> tuple[float, int] | None:
    """`(1-minute load average, CPU count)` of this machine, or `None` where it cannot be read."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        try:
            import psutil

            load = psutil.getloadavg()[0]
        except Exception:
            return None
    return float(load), os.cpu_count() or 1


class _Slowdown:
    """Warns once when a CPU run's throughput falls below a third of its best early window while
    other processes load the machine (a busy 2-core machine makes torch's default threads slow)."""

    def __init__(self) -> None:
        self.windows, self.best, self.warned = 0, 0.0, False

    def feed(self, tokens_per_sec: float, threads: int) -> str | None:
        self.windows += 1
        if self.windows <= 1 or self.warned:
            return None
        if self.windows <= 4:
            self.best = max(self.best, tokens_per_sec)
            return None
        if not tokens_per_sec < self.best / 3:
            return None
        load = machine_load()
        if load is None or load[0] < threads + 0.5:
            return None
        self.warned = True
        return (f"fnlm: training slowed to {tokens_per_sec:,.0f} tokens/s from {self.best:,.0f} in its first log "
                f"windows, and the machine is busy (load average {load[0]:.1f} on {load[1]} CPUs; this run uses "
                f"{threads} threads): another process is competing for the cores, and fewer threads may be faster "
                "(--threads 1, or torch.set_num_threads(1))")


class LogWindow(Hook):
    """Means of the loss and gradient norm over each `every` steps, tokens/s and MFU.

    The sums stay on the device between log steps (no host sync per step); they are kept in
    checkpoints, so a resumed run logs exactly what an uninterrupted one would. A non-finite mean
    loss stops the run. On the CPU it warns once when the throughput collapses while another
    process loads the machine.
    """

    name = "log_window"
    phase = "measure"

    def __init__(self, every: int):
        self.every = _positive(every, "LogWindow")
        self.sums: dict[str, Any] = {}
        self.slowdown = _Slowdown()

    def start(self, run: Run, state: TrainState) -> None:
        acc = torch.float32 if run.device.type == "mps" else torch.float64
        saved = self.sums
        self.loss_sum = saved.get("loss_sum", torch.zeros(())).to(run.device, acc)
        self.norm_sum = saved.get("norm_sum", torch.zeros(())).to(run.device, acc)
        self.steps = int(saved.get("steps", 0))
        self.seconds, self.timed = 0.0, 0
        self.flops_per_token, self.peak = run.flops_per_token, run.peak_flops

    def observe(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        self.loss_sum += metrics["loss"]
        self.norm_sum += metrics["grad_norm"]
        self.steps += 1
        self.timed += 1
        self.seconds += run.step_seconds

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        if not self.steps:
            return
        loss = float(run.parallel.all_reduce_mean(self.loss_sum)) / self.steps
        self.seconds += run.since_step()
        tok_s = self.timed * run.tokens_per_step / max(self.seconds, 1e-9)
        lr = {"lr": float(metrics["lr"])} if "lr" in metrics else {}
        run.record.update(train_loss=loss, **lr, grad_norm=float(self.norm_sum) / self.steps, tokens_per_sec=tok_s)
        if self.peak:
            run.record["mfu"] = tok_s / run.parallel.world_size * self.flops_per_token / self.peak
        run.last.update(train_loss=loss, tokens_per_sec=tok_s, **lr)
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.steps, self.seconds, self.timed = 0, 0.0, 0
        if not math.isfinite(loss):
            run.stop("loss is not finite")
        warning = self.slowdown.feed(tok_s, torch.get_num_threads()) if run.device.type == "cpu" else None
        if warning and run.is_main:
            print(warning, file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "norm_sum": self.norm_sum.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state)


class Evaluator(Hook):
    """The validation loss every `every` steps and at the final step (never of non-finite params)."""

    name = "evaluator"
    phase = "measure"

    def __init__(self, every: int, batches: int):
        self.every, self.batches = _positive(every, "Evaluator"), batches

    def evaluate(self, run: Run, state: TrainState) -> float:
        tc = run.train_config
        return evaluate(run.loss_fn, state.params, run.valid_tokens, batch_size=tc.batch_size,
                        context_length=run.context_length, batches=self.batches, seed=tc.seed, device=run.device,
                        parallel=run.parallel)

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        if run.nonfinite_at is not None:
            return
        val = self.evaluate(run, state)
        run.record.update(val_loss=val, val_perplexity=perplexity_of(val))
        run.last["val_loss"] = val

    def end(self, run: Run, state: TrainState) -> None:
        if not math.isfinite(run.last["val_loss"]) and not run.stopping:
            run.last["val_loss"] = self.evaluate(run, state)


class DivergenceGuard(Hook):
    """Stops a run whose logged loss explodes: above `log(vocab_size) + margin` (worse than a uniform
    guess), or above `factor` times the lowest training loss so far. (A non-finite loss or gradient
    norm always stops a run; see `fnlm.train.Run.watch_finite`.)"""

    name = "divergence_guard"
    phase = "check"

    def __init__(self, vocab_size: int, *, factor: float = 2.0, margin: float = 1.0):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 < factor < math.inf:
            raise ValueError(f"DivergenceGuard: factor must be a finite number above 1, got {factor!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
            raise ValueError(f"DivergenceGuard: margin must be a finite number >= 0, got {margin!r}")
        self.ceiling = math.log(vocab_size) + margin
        self.factor, self.margin = factor, margin
        self.best = math.inf

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        for key in ("train_loss", "val_loss"):
            loss = run.record.get(key)
            if loss is None:
                continue
            what = key.removesuffix("_loss")
            if not math.isfinite(loss):
                run.stop(f"{what} loss is {loss}")
            elif loss > self.ceiling:
                run.stop(f"{what} loss {loss:.3f} > log(vocab)+{self.margin:g} = {self.ceiling:.3f}")
            elif loss > self.factor * self.best:
                run.stop(f"{what} loss {loss:.3f} > {self.factor:g} x best {self.best:.3f}")
        if "train_loss" in run.record:
            self.best = min(self.best, run.record["train_loss"])


class MetricsFile(Hook):
    """`metrics.jsonl` in the run folder: one JSON line per step that has a record (rank 0 only).

    On a fresh start the file is emptied (the loop refuses a folder holding an earlier run's log
    unless told to overwrite it); on a resume the records after the checkpoint's step are dropped,
    so the file reads as if the run had never stopped. `run.records` keeps them in memory.
    """

    name = "metrics_file"

    def start(self, run: Run, state: TrainState) -> None:
        self.path = run.out / "metrics.jsonl"
        old = read_metrics(self.path) if run.resumed_from is not None else []
        run.records[:] = [r for r in old if r.get("step", 0) <= state.step]
        if run.is_main:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in run.records), encoding="utf-8")
            os.replace(tmp, self.path)

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        if not run.record:
            return
        record = {"step": state.step, "tokens": state.step * run.tokens_per_step, "time": round(run.wall(), 3),
                  **run.record}
        if run.final and run.stop_reason is not None:
            record["stop_reason"] = run.stop_reason
        run.records.append(record)
        if run.is_main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class Callback(Hook):
    """Calls `fn(record)` with every record `MetricsFile` wrote (on rank 0)."""

    name = "callback"

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.fn = fn

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        if run.record and run.is_main:
            self.fn(run.records[-1])


class Checkpointer(Hook):
    """`checkpoints/step_*.pt` every `every` steps, at the final step and on Ctrl-C, never from params
    that are not finite; `checkpoints/latest.pt` is a pointer to the newest (`fnlm.checkpoint.write_latest`);
    the newest `keep` step files are kept (`0`: all). Every rank takes part (RNG states are
    gathered); rank 0 writes. At the start it deletes the temporary files of writes a killed
    process left behind (`fnlm.checkpoint.remove_stale_temporaries`)."""

    name = "checkpointer"
    phase = "save"

    def __init__(self, every: int, keep: int):
        self.every, self.keep = _positive(every, "Checkpointer"), keep

    def start(self, run: Run, state: TrainState) -> None:
        self.dir = run.out / "checkpoints"
        if not run.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.dir)
        if run.resumed_from is None and run.overwrite:
            for old in sorted(self.dir.glob("step_*.pt")) + [self.dir / "latest.pt"]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        self.save(run, state)

    def interrupted(self, run: Run, state: TrainState) -> None:
        path = self.save(run, state, collective=False)
        run.saved_on_interrupt = path

    def save(self, run: Run, state: TrainState, collective: bool = True) -> Path | None:
        if not run.check_finite():
            return None
        sharding = run.parallel.sharding
        if sharding is not None:
            if not collective:
                return None
            state = sharding.gather_state(state)
        together = collective and run.parallel.world_size > 1
        rank_rng = run.parallel.all_gather_object(capture_rng_state()) if together else None
        hook_states = {h.name: h.state_dict() for h in run.hooks if h.state_dict() is not None}
        if together and "log_window" in hook_states:
            window = dict(hook_states["log_window"])
            window["loss_sum"] = run.parallel.all_reduce_mean(window["loss_sum"].to(run.device)).cpu()
            hook_states["log_window"] = window
        path = None
        if run.is_main:
            path = self.dir / f"step_{state.step:07d}.pt"
            try:
                digest = save_checkpoint(path, params=state.params, opt_state=state.opt_state, step=state.step,
                                         config=run.model_config, rank_rng=rank_rng, wall_time=run.wall(),
                                         hooks=hook_states, **run.checkpoint_data)
            except NonFiniteParams as err:
                run.mark_nonfinite(state.step, f"the params are not finite at step {state.step} ({err.names[0]})")
                return None
            self._point_latest(path, state.step, digest)
            run.checkpoint = path
        if collective:
            run.parallel.barrier()
        return path

    def _point_latest(self, path: Path, step: int, digest: str) -> None:
        write_latest(self.dir / "latest.pt", path, step=step, sha256=digest)
        if self.keep:
            for old in sorted(self.dir.glob("step_*.pt"))[: -self.keep]:
                if old != path:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()


class ProgressBar(Hook):
    """A tqdm bar over the steps with the latest loss, validation loss, lr and tokens/s (rank 0)."""

    name = "progress_bar"

    def start(self, run: Run, state: TrainState) -> None:
        from fnlm._progress import progress_bar

        self.bar = progress_bar(total=run.total, initial=state.step, desc="train", unit="step",
                                disable=not run.is_main, dynamic_ncols=True)

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        self.bar.update(1)
        if run.record:
            last = run.last
            shown = {"loss": f"{last['train_loss']:.3f}"}
            if "val_loss" in run.record:
                shown["val"] = f"{last['val_loss']:.3f}"
            if last["lr"] == last["lr"]:
                shown["lr"] = f"{last['lr']:.2e}"
            shown["tok_s"] = f"{last['tokens_per_sec']:,.0f}"
            self.bar.set_postfix(shown, refresh=False)

    def interrupted(self, run: Run, state: TrainState) -> None:
        self.bar.close()

    def end(self, run: Run, state: TrainState) -> None:
        self.bar.close()


class LossPlot(Hook):
    """`loss.png` in the run folder, redrawn at every evaluation (rank 0; needs matplotlib)."""

    name = "loss_plot"

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        if run.is_main and "val_loss" in run.record:
            from fnlm.train.plots import plot_runs

            plot_runs({"run": run.records}, run.out / "loss.png",
                      title=f"{run.n_params / 1e6:.2f}M params, {run.tokens_per_step} tokens/step")


class Wandb(Hook):
    """Logs every record to Weights & Biases under `project` (rank 0; needs `pip install fnlm[wandb]`).
    The run id is kept in the run folder, so a resumed run continues the same W&B run."""

    name = "wandb"

    def __init__(self, project: str):
        self.project = project
        self.run = None

    def start(self, run: Run, state: TrainState) -> None:
        if not run.is_main:
            return
        try:
            import wandb
        except ImportError:
            print("fnlm: wandb_project is set but wandb is not installed (pip install 'fnlm[wandb]'); "
                  "not logging to Weights & Biases", file=sys.stderr)
            return
        id_file = run.out / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        model = dataclasses.asdict(run.model_config) if dataclasses.is_dataclass(run.model_config) else {}
        config = {"model": model, "train": run.train_config.to_dict()}
        self.run = wandb.init(project=self.project, id=run_id, resume="allow", dir=str(run.out), config=config)

    def step(self, run: Run, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.run is not None and run.record:
            self.run.log(dict(run.record), step=state.step)


def default_hooks(run: Run) -> list[Hook]:
    """The loop's hooks for `run.train_config`: log window, evaluation, metrics file, checkpoints,
    and (when asked for) the progress bar, the loss plot and Weights & Biases."""
    tc = run.train_config
    hooks: list[Hook] = [LogWindow(tc.log_interval), Evaluator(tc.eval_interval, tc.eval_batches), MetricsFile(),
                         Checkpointer(tc.checkpoint_interval, tc.keep_checkpoints)]
    if tc.progress:
        hooks.append(ProgressBar())
    if tc.plot:
        hooks.append(LossPlot())
    if tc.wandb_project:
        hooks.append(Wandb(tc.wandb_project))
    return hooks
