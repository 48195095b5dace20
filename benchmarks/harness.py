"""What every benchmark script shares: the machine's description, wall and CPU timers, peak memory.

Every script starts by printing `machine_line()` (`print_machine`: the CPU and its cores, Python,
torch's version and thread count, the GPU on CUDA, the load average) and ends with `print_done`
(the load average again), so a figure always comes with the machine, threads and load it was
taken under.

Scripts import it as a sibling (`from harness import machine_name`): Python puts the script's own
folder first on `sys.path`, so `python benchmarks/<script>.py` finds it from any directory. Torch
is imported only by the functions that need it, so tokenizer benchmarks can stay torch-free.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "machine_line", "print_machine", "print_done", "machine_name", "cpu_name", "cpu_seconds", "peak_rss_mib", "median_time", "ratio", "alternate", "load_average",
    "Timings", "tune_malloc", "add_model_args", "model_argv", "MODEL_17M", "PeakMemory", "child_result", "run_child",
]

MODEL_17M = dict(batch=4, context=128, vocab=10_000, d_model=512, layers=4, heads=16, d_ff=1344)
"""The 17M TinyStories model at batch 4 x context 128: the CPU benchmarks' default sizes."""


def add_model_args(parser: Any, **overrides: int) -> None:
    """Add `--batch --context --vocab --d-model --layers --heads --d-ff` to an argparse parser,
    defaulting to `MODEL_17M` with `overrides` (e.g. `d_model=128`)."""
    sizes = {**MODEL_17M, **overrides}
    for name, default in sizes.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def model_argv(args: Any) -> list[str]:
    """The inverse of `add_model_args`: the seven model-size flags with `args`' values, for a child
    process of the same script."""
    return [item for name in MODEL_17M for item in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


_CHILD = "CHILD_RESULT "


def child_result(result: dict[str, Any]) -> None:
    """Print a child process's `result` (JSON) on the line `run_child` reads back."""
    import json

    print(_CHILD + json.dumps(result), flush=True)


def run_child(cmd: list[str], what: str, *, env: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Run a measuring child process (a fresh interpreter, so its peak memory is its own) and return
    the dict it printed with `child_result`; `RuntimeError` with its output when it printed none.

    **Arguments:**

    - `cmd`: the command line (e.g. `[sys.executable, __file__, "--child", ...]`).
    - `what`: names the child in the error.
    - `env`: variables to set in the child's environment (`None` removes one); without it the
      parent's environment, less `FNLM_TYPECHECK` (the benchmarks time the unchecked layers).
    """
    import json
    import subprocess

    changes = {"FNLM_TYPECHECK": None} if env is None else env
    child_env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    res = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        if line.startswith(_CHILD):
            return json.loads(line[len(_CHILD):])
    raise RuntimeError(f"child {what} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or `platform.processor()`), with the logical core count."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({os.cpu_count()} logical cores)"


def machine_name(device: str = "cpu") -> str:
    """One line naming the CPU, the GPU when `device` is CUDA, torch's version and its thread count."""
    import torch

    parts = [f"CPU {cpu_name()}", f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    if device.startswith("cuda"):
        parts.insert(1, f"GPU {torch.cuda.get_device_name()}")
    return ", ".join(parts)


def usable_cores() -> int:
    """The logical cores this process may run on (its CPU affinity), else `os.cpu_count()`."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_line(device: str = "cpu", *, threads: str | None = None, torch: bool | None = None) -> str:
    """One line naming what a figure was measured on.

    **Arguments:**

    - `device`: the device benchmarked; a CUDA device adds the GPU's name.
    - `threads`: how the script uses the cores, when torch's intra-op thread count does not say
      it (e.g. `"one thread"`, `"4 pre-tokenization workers"`).
    - `torch`: describe torch (version, intra-op threads): `None` when it is already imported
      (a torch-free tokenizer benchmark stays torch-free), `True` imports it, `False` never.

    **Returns:** `"machine: CPU <model> (<n> logical cores), Python <v>, torch <v>, <t> threads;
    load average <1 min> <5 min> <15 min>"`.
    """
    parts = [f"CPU {cpu_name()}", f"Python {platform.python_version()}"]
    if torch or (torch is None and "torch" in sys.modules):
        import torch as _torch

        if device.startswith("cuda"):
            parts.insert(1, f"GPU {_torch.cuda.get_device_name()}")
        parts.append(f"torch {_torch.__version__}")
        parts.append(threads or f"{_torch.get_num_threads()} threads")
    else:
        parts.append(threads or f"{usable_cores()} usable cores (no torch loaded)")
    return f"machine: {', '.join(parts)}; {load_average()}"


def print_machine(device: str = "cpu", *, threads: str | None = None, torch: bool | None = None) -> float:
    """Print `machine_line(...)` (see there) and return `time.perf_counter()`, for `print_done`."""
    print(machine_line(device, threads=threads, torch=torch), flush=True)
    return time.perf_counter()


def print_done(started: float | None = None) -> None:
    """Print the closing line: the seconds since `started` (from `print_machine`) and the load
    average, so a reader sees whether other processes shared the cores during the run."""
    took = f" in {time.perf_counter() - started:.0f} s" if started is not None else ""
    print(f"done{took}; {load_average()}", flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn: Callable[[], Any], repeats: int, *, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ratio(a: float, b: float) -> str:
    """`a / b` formatted to three decimals, or "n/a" when `b` is zero."""
    return f"{a / b:.3f}" if b else "n/a"


class Timings(dict):
    """`{name: {"wall": [...], "cpu": [...]}}` seconds per call, from `alternate`."""

    def median(self, name: str, kind: str = "wall") -> float:
        return statistics.median(self[name][kind])

    def fastest(self, name: str, kind: str = "wall") -> float:
        return min(self[name][kind])

    def line(self, name: str, baseline: str) -> str:
        """`name/baseline` of the medians, with the fastest-call and process-CPU-time ratios."""
        return (f"{name}/{baseline}: {ratio(self.median(name), self.median(baseline))} "
                f"(fastest {ratio(self.fastest(name), self.fastest(baseline))}, "
                f"CPU time {ratio(self.median(name, 'cpu'), self.median(baseline, 'cpu'))})")


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1,
              sync: Callable[[], None] = lambda: None) -> Timings:
    """Call each function in turn, `repeats` rounds after `warmup` untimed ones, so that load from
    other processes falls on all alike, rotating which goes first each round (a fixed order
    measurably favours some positions); wall and process CPU seconds per call by name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    out = Timings({name: {"wall": [], "cpu": []} for name in fns})
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            fn = fns[name]
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            out[name]["wall"].append(time.perf_counter() - wall)
            out[name]["cpu"].append(time.process_time() - cpu)
    return out


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (other processes sharing the cores), or "n/a"."""
    with contextlib.suppress(OSError, AttributeError):
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    return "load average n/a"


def tune_malloc(threshold: int = 32 << 20, trim: int = (1 << 31) - 1) -> bool:
    """Ask glibc to serve blocks up to `threshold` bytes from its heap and to keep up to `trim`
    freed bytes instead of returning them to the OS (`mallopt`; the same as the environment
    variables `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`). Otherwise every fresh
    parameter-sized tensor page-faults on first touch: cloning the 17M model's 22.7M floats took
    20.5 ms against 4.4 ms for copying into existing buffers (2 threads); tuned, 4.8 ms. Code that
    allocates new trees every step (a pure optimizer) pays that most. Returns False off glibc.

    `mallopt` takes a C `int`, and ctypes masks a larger Python int to its low 32 bits (4 GiB
    became 0: trim at every free), so both values must stay below 2**31; they are checked."""
    if not 0 <= threshold < 1 << 31 or not 0 <= trim < 1 << 31:
        raise ValueError(f"mallopt takes a C int: threshold={threshold}, trim={trim} must be in [0, 2**31)")
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, trim))
    except (OSError, AttributeError):
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


class PeakMemory:
    """The peak memory a block of code adds above what was in use when it began, in bytes:
    `with PeakMemory(device) as peak: ...; peak.bytes`.

    On CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, less the memory
    allocated at the start. On CPU (Linux): the process's resident set, after handing freed heap
    memory back to the OS (glibc's `malloc_trim`) and resetting the kernel's high-water mark
    (writing 5 to `/proc/self/clear_refs`), so that memory touched earlier (imports, a compile,
    a warm-up step) does not count; the peak is the high-water mark `VmHWM` less the resident set
    at the start. `bytes` is None where neither is available."""

    def __init__(self, device: str = "cpu"):
        self.device, self.bytes, self._start = device, None, 0

    def __enter__(self) -> "PeakMemory":
        import gc

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        import ctypes
        import ctypes.util

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = _status_kib("VmRSS") * 1024
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._start
        elif self._start is not None:
            self.bytes = _status_kib("VmHWM") * 1024 - self._start
