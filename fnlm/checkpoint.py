"""Checkpoints: atomic, code-free (`weights_only=True`) and checked on load.

A checkpoint file is a `torch.save` of plain data only: tensors, ints, floats, strings, bytes,
bools, `None`, dtypes/devices, and dicts/lists/tuples of those. It holds the params tree, the
optimizer state, the step, the config (a dataclass is stored as `dataclasses.asdict` plus its class
name), the torch/CUDA/numpy/python RNG states, any extras, and a SHA-256 digest of all of that
which is verified on load, so a truncated or altered file is reported instead of silently used.

Safety: `save_checkpoint` refuses params that hold NaN or inf (`NonFiniteParams`) unless told
otherwise, writes through a temporary file named after its process (`.NAME.PID.RANDOM.tmp`, so a
later writer can tell an orphan from a live write; `remove_stale_temporaries`) created with the
process's umask, and renames it into place. A **latest pointer** (`write_latest`) is a small text
file naming the newest checkpoint beside it; `load_checkpoint` follows it (`resolve_checkpoint`),
so `load_checkpoint("run/checkpoints/latest.pt")` works whether `latest.pt` is a pointer or a
checkpoint, and copying a checkpoint over the pointer cannot damage another file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import io
import os
import random
import json
import re
import secrets
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import torch

from fnlm.tree import Tree, tree_flatten

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "check_params_match",
    "config_to_data",
    "intact_alternatives",
    "NonFiniteParams",
    "check_finite",
    "write_latest",
    "resolve_checkpoint",
    "remove_stale_temporaries",
    "callable_spec",
    "model_fn_of",
]

FORMAT = "fnlm-checkpoint"
VERSION = 1
RESERVED = ("params", "opt_state", "step", "config", "config_class", "rng")

PathOrFile = str | os.PathLike | io.IOBase | BinaryIO | IO[bytes]
_SCALARS = (int, float, str, bytes, bool, type(None), torch.dtype, torch.device)


def config_to_data(config: Any) -> tuple[dict[str, Any], str | None]:
    """Plain-data form of a config: `(dataclasses.asdict(config), "module.ClassName")`.

    A dict (or any mapping) is returned as a dict with class name `None`.

    **Arguments:**

    - `config`: a dataclass instance or a mapping.

    **Returns:**

    `(data, class_name)`.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        cls = type(config)
        return dataclasses.asdict(config), f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(config, Mapping):
        return dict(config), None
    raise TypeError(f"config must be a dataclass instance or a dict, got {type(config).__name__}")


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor) or isinstance(obj, _SCALARS):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where}: dict key {key!r} is not a str or int")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}.{i}")
        return
    raise TypeError(
        f"checkpoint {where}: {type(obj).__name__} is not plain data "
        "(tensors, numbers, str, bytes, None, and dict/list/tuple of them)"
    )


def _digest(obj: Any) -> str:
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}".encode())
            for value in x:
                feed(value)
        elif isinstance(x, float):
            h.update(b"F" + struct.pack("<d", x))
        elif isinstance(x, bytes):
            h.update(b"B%d:" % len(x) + x)
        else:
            text = f"{type(x).__name__}:{x!r}"
            h.update(f"S{len(text)}:{text}".encode())

    feed(obj)
    return h.hexdigest()


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and `random`, as plain data.

    **Returns:**

    `{"torch": uint8 tensor, "cuda": [uint8 tensor, ...], "numpy": {...}, "python": [...]}`.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": [version, list(internal), gauss_next],
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Set the global torch/CUDA/numpy/`random` RNGs from :func:`capture_rng_state`'s result.

    CUDA states are restored only when CUDA is available with at least as many devices.

    **Arguments:**

    - `rng`: the `"rng"` entry of a loaded checkpoint.
    """
    torch.set_rng_state(rng["torch"].to("cpu", torch.uint8))
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in cuda])
    state = rng["numpy"]
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _describe(target: Any) -> str:
    if isinstance(target, (str, os.PathLike)):
        return repr(os.fspath(target))
    return f"<{type(target).__name__} {getattr(target, 'name', '')}>".replace(" >", ">")


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (assumed so where that cannot be asked safely)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.[0-9a-f]{8}|[a-z0-9_]{8})\.tmp$")


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in `folder`.

    A write goes to `.NAME.PID.RANDOM.tmp` and is renamed to `NAME` when complete; a process
    killed in between (SIGKILL, power loss) leaves the temporary behind. Those of a process that
    no longer runs on this machine are deleted, as are those of older fnlm versions (named
    `.NAME.RANDOM.tmp`, without the writer). Call it while holding the folder's run lock
    (`fnlm.train.RunLock`): a writer on another machine cannot be seen.

    **Arguments:**

    - `folder`: the folder to clean (a missing folder has nothing to clean).

    **Returns:** the files deleted.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m is None or (m["pid"] is not None and (int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])))):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _atomic_write(path: Path, write: Any) -> None:
    """`write(file)` into a temporary file beside `path` (created with the umask's permissions),
    fsynced and renamed over `path`; on any failure the temporary is removed and `path` untouched."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


class NonFiniteParams(ValueError):
    """`save_checkpoint` refused params holding NaN or inf; `names` are the flat names of those leaves."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def check_finite(params: Tree) -> list[str]:
    """The flat names of the floating-point tensors of `params` that hold NaN or inf.

    **Arguments:**

    - `params`: a params tree (or any tree of tensors).

    **Returns:** the names, in flat order; empty when every value is finite.
    """
    bad: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
                bad.append(name or "params")
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{name}.{i}" if name else str(i))

    walk(params, "")
    return bad


LATEST = "fnlm-latest"


def write_latest(latest: str | os.PathLike, target: str | os.PathLike, *, step: int, sha256: str | None = None) -> None:
    """Atomically make `latest` a pointer to the checkpoint `target` in the same folder.

    The pointer is one line of JSON (`{"format": "fnlm-latest", "file": "step_0000060.pt", ...}`),
    read by `load_checkpoint` and `resolve_checkpoint`. It is a file of its own, so copying a
    checkpoint over it (`cp step_0000040.pt latest.pt`) replaces the pointer and damages nothing.

    **Arguments:**

    - `latest`: the pointer's path, e.g. `run/checkpoints/latest.pt`.
    - `target`: the checkpoint file it names; it must lie in the same folder.
    - `step`: the checkpoint's step; `sha256`: its digest (`save_checkpoint`'s result), so that
      the pointer's contents change whenever the checkpoint does.
    """
    latest, target = Path(latest), Path(target)
    if target.parent.resolve() != latest.parent.resolve():
        raise ValueError(f"write_latest: target {target} must be in the folder of {latest}")
    line = json.dumps({"format": LATEST, "version": 1, "file": target.name, "step": step, "sha256": sha256}) + "\n"
    _atomic_write(latest, lambda f: f.write(line.encode()))


def _pointer(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > 4096:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == LATEST else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` stands for: the file a latest pointer (`write_latest`) names, or
    `path` itself when it is not a pointer.

    **Arguments:**

    - `path`: a checkpoint file or a latest pointer.

    **Returns:** the checkpoint's path (which may not exist). A pointer that names anything but a
    file in its own folder raises a `ValueError`.
    """
    p = Path(path)
    pointer = _pointer(p) if p.is_file() else None
    if pointer is None:
        return p
    name = pointer.get("file")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{p} is a latest pointer naming {name!r}, which is not a file beside it")
    return p.parent / name


def save_checkpoint(
    path: PathOrFile,
    *,
    params: Tree,
    opt_state: Any,
    step: int,
    config: Any,
    rng: bool = True,
    allow_non_finite: bool = False,
    **extra: Any,
) -> str:
    """Write a training checkpoint atomically.

    For a path, the data goes to a temporary file in the same folder (`.NAME.PID.RANDOM.tmp`,
    with the permissions the umask gives), is fsynced, then renamed over `path` (and the folder
    fsynced): a crash mid-save leaves the previous checkpoint intact. A writable binary file
    object is written directly (no atomicity). Params holding NaN or inf are refused with
    `NonFiniteParams` (a `ValueError` naming the leaves) before anything is written.

    **Arguments:**

    - `path`: destination file path, or a binary file object.
    - `params`: the params tree.
    - `opt_state`: the optimizer state (e.g. from :func:`fnlm.adamw_step`), plain data.
    - `step`: the number of completed training steps.
    - `config`: a dataclass instance (stored as `asdict` plus its class name) or a dict.
    - `rng`: also store the global torch/CUDA/numpy/python RNG states (:func:`capture_rng_state`).
    - `allow_non_finite`: write params holding NaN or inf anyway (e.g. to inspect a diverged run).
    - `**extra`: more plain data to store, e.g. `generator=gen.get_state()`, `best_val_loss=...`.
      The names `params, opt_state, step, config, config_class, rng` are reserved.

    **Returns:** the checkpoint's SHA-256 digest (hex), the one `load_checkpoint` verifies.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not allow_non_finite:
        bad = check_finite(params)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NonFiniteParams(f"checkpoint {_describe(path)} not written: the params hold NaN or inf ({shown}); "
                                  "pass allow_non_finite=True to save them anyway", bad)
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} clash with reserved checkpoint keys {list(RESERVED)}")
    config_data, config_class = config_to_data(config)
    body = {
        "params": params,
        "opt_state": opt_state,
        "step": step,
        "config": config_data,
        "config_class": config_class,
        "rng": capture_rng_state() if rng else None,
        "extra": dict(extra),
    }
    _check_plain(body, "")
    digest = _digest(body)
    payload = {"format": FORMAT, "version": VERSION, "body": body, "sha256": digest}
    if isinstance(path, (str, os.PathLike)):
        _atomic_write(Path(path), lambda f: torch.save(payload, f))
    else:
        torch.save(payload, path)
    return digest


def _unpickling_refusal(err: Exception) -> str | None:
    """Why torch's `weights_only` unpickler refused a file, without torch's advice to load it unsafely."""
    text = str(err)
    if "weights_only" not in text and "Weights only load failed" not in text and "GLOBAL" not in text:
        return None
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    what = f"the Python object {found.group(1)}" if found else "objects that only code could rebuild"
    return (f"it refers to {what}, and an fnlm checkpoint holds plain data only, so it was not written by "
            "fnlm.save_checkpoint or has been altered; it was not loaded and none of its code ran")


_DEVICE_TROUBLE = re.compile(r"CUDA|cuda|MPS|mps|device|not compiled with")


def _first_sentence(err: BaseException) -> str:
    return re.split(r"(?<=\.)\s", str(err).strip(), maxsplit=1)[0].rstrip(".") or type(err).__name__


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _onto_device(body: dict[str, Any], map_location: str | torch.device, where: str) -> dict[str, Any]:
    """The verified body with its tensors moved to `map_location`; a `ValueError` saying the file is
    intact when the device is what fails."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"map_location {map_location!r} is not a device ({_first_sentence(err)})") from None
    if device.type == "cpu":
        return body
    try:
        return _map_tensors(body, lambda t: t.to(device))
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"checkpoint {where} is intact, but cannot be loaded onto {device}: {_first_sentence(err)}; "
                         "load it onto a device this machine has (map_location='cpu', or --device cpu)") from None


def _read(path: PathOrFile, where: str, map_location: Any) -> dict[str, Any]:
    """The verified body of a checkpoint; `ValueError` saying what is wrong with it.

    A device name as `map_location` loads onto the CPU first and moves the tensors after the digest
    is verified, so a device that is missing is told apart from a damaged file."""
    by_name = isinstance(map_location, (str, torch.device))
    try:
        payload = torch.load(path, map_location="cpu" if by_name else map_location, weights_only=True)
    except Exception as err:
        refusal = _unpickling_refusal(err)
        if refusal:
            raise ValueError(f"checkpoint {where} was refused: {refusal}") from None
        if isinstance(err, (RuntimeError, AssertionError)) and _DEVICE_TROUBLE.search(str(err)) and not by_name:
            raise ValueError(f"checkpoint {where} cannot be loaded with map_location={map_location!r}: "
                             f"{_first_sentence(err)}; pass map_location='cpu'") from None
        raise ValueError(f"checkpoint {where} is unreadable (truncated or not a torch file: {_first_sentence(err)})"
                         ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "body" not in payload:
        raise ValueError(f"{where} is not an fnlm checkpoint (no {FORMAT!r} header)")
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint {where} has format version {payload.get('version')!r}, expected {VERSION}")
    body = payload["body"]
    if _digest(body) != payload.get("sha256"):
        raise ValueError(f"checkpoint {where} is corrupt: its contents do not match the stored SHA-256 digest")
    return _onto_device(body, map_location, where) if by_name else body


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def intact_alternatives(path: str | os.PathLike, *, limit: int = 5) -> list[tuple[Path, int]]:
    """The other `step_*.pt` checkpoints beside `path` that load and verify, newest first.

    The file `path` is, or names (a latest pointer), does not count, nor do hard links to it.

    **Arguments:**

    - `path`: a checkpoint file or latest pointer (it need not exist or be readable).
    - `limit`: how many of the newest candidates to verify.

    **Returns:** `[(file, step), ...]`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    try:
        target = resolve_checkpoint(path)
    except ValueError:
        target = path
    found = []
    for candidate in sorted(path.parent.glob("step_*.pt"), reverse=True)[:limit]:
        if candidate.name == target.name or any(_same_file(candidate, p) for p in {path, target}):
            continue
        try:
            body = _read(candidate, repr(str(candidate)), "cpu")
        except (OSError, ValueError):
            continue
        found.append((candidate, int(body["step"])))
    return found


def _with_alternatives(message: str, path: PathOrFile) -> str:
    if not isinstance(path, (str, os.PathLike)):
        return message
    others = intact_alternatives(path)
    if not others:
        return message
    names = ", ".join(f"{p.name} (step {step})" for p, step in others)
    p = Path(path)
    if p.name == "latest.pt":
        use = (f"to resume from one, replace latest.pt by it (in {p.parent}: rm latest.pt && cp {others[0][0].name} "
               "latest.pt)")
    else:
        use = "use one of them instead"
    return f"{message}; intact checkpoints beside it: {names}: {use}"


def load_checkpoint(
    path: PathOrFile,
    *,
    map_location: str | torch.device | None = "cpu",
    expected_params: Tree | None = None,
    expected_config: Any = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying it.

    Loading uses `torch.load(weights_only=True)`, so the file cannot run code (a file that would
    need code is refused; fnlm never suggests loading it unsafely). A latest pointer
    (`write_latest`, the loop's `checkpoints/latest.pt`) is followed to the file it names. Errors
    name the file: `FileNotFoundError` when missing; `ValueError` when it is truncated, not a
    checkpoint, fails its digest, cannot be put on `map_location` (said as such: the file is
    intact), or does not match `expected_params` / `expected_config`. When the file is missing or
    bad, the message names the intact `step_*.pt` checkpoints beside it (`intact_alternatives`).

    **Arguments:**

    - `path`: the checkpoint path (or a latest pointer), or a readable binary file object.
    - `map_location`: where tensors are put (default CPU): a device, or as for `torch.load`.
    - `expected_params`: a params tree (or tree of shapes) the stored params must match in flat
      names and shapes (see :func:`check_params_match`).
    - `expected_config`: a config (dataclass or dict) the stored config must equal.

    **Returns:**

    A dict with keys `params`, `opt_state`, `step`, `config` (a dict), `config_class`, `rng`
    (pass to :func:`restore_rng_state`, or `None`), and each extra saved under its own name.
    """
    where = _describe(path)
    source = path
    if isinstance(path, (str, os.PathLike)):
        source = resolve_checkpoint(path)
        if source != Path(path):
            where = f"{where} (a pointer to {source.name})"
        if not source.is_file():
            raise FileNotFoundError(_with_alternatives(f"checkpoint {where} does not exist", path))
    try:
        body = _read(source, where, map_location)
    except ValueError as err:
        intact = "is intact, but" in str(err) or "cannot be loaded with map_location" in str(err)
        raise ValueError(str(err) if intact else _with_alternatives(str(err), path)) from None
    if expected_params is not None:
        check_params_match(body["params"], expected_params, where=f"checkpoint {where}")
    if expected_config is not None:
        want, _ = config_to_data(expected_config)
        if want != body["config"]:
            diff = sorted(k for k in set(want) | set(body["config"]) if want.get(k) != body["config"].get(k))
            details = {k: (body["config"].get(k), want.get(k)) for k in diff}
            raise ValueError(f"checkpoint {where} config differs (stored, expected): {details}")
    out = {key: body[key] for key in RESERVED}
    out.update(body["extra"])
    return out


def check_params_match(params: Tree, expected: Tree, *, where: str = "params") -> None:
    """Raise a `ValueError` unless `params` has exactly the flat names and shapes of `expected`.

    Dtypes and devices are not compared. To check against shapes only, pass a tree of meta
    tensors, e.g. `fnlm.tree_map(lambda t: torch.empty(t.shape, device="meta"), params)`.

    **Arguments:**

    - `params`: a params tree (e.g. loaded from a checkpoint).
    - `expected`: a params tree with the wanted names and shapes.
    - `where`: a label for the error message.
    """
    got = tree_flatten(params)
    want = tree_flatten(expected)
    missing = sorted(want.keys() - got.keys())
    unexpected = sorted(got.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: parameter names differ: missing {missing}, unexpected {unexpected}")

    def shape(x: Any) -> Any:
        return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__

    wrong = {name: (shape(got[name]), shape(leaf)) for name, leaf in want.items() if shape(got[name]) != shape(leaf)}
    if wrong:
        raise ValueError(f"{where}: parameter shapes differ (stored, expected): {wrong}")


def callable_spec(fn: Any) -> Any:
    """Plain data naming `fn` so that :func:`model_fn_of` can rebuild it: `"module:qualname"` for a
    function or class, and for a `functools.partial` a dict `{"partial": spec, "args": [...],
    "keywords": {...}}` whose callable arguments are specs too (other arguments must be plain
    numbers, strings or `None`). Anything else (a lambda, a closure, a callable object) is recorded
    as `{"unimportable": repr}`, so that a loader can refuse it instead of guessing.

    **Arguments:**

    - `fn`: the function, e.g. a training run's `model_fn`.

    **Returns:** the spec (a string or a dict of plain data).
    """
    if isinstance(fn, functools.partial):
        def arg(value: Any) -> Any:
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            return {"callable": callable_spec(value)}

        return {"partial": callable_spec(fn.func), "args": [arg(a) for a in fn.args],
                "keywords": {k: arg(v) for k, v in fn.keywords.items()}}
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname and module != "__main__":
        return f"{module}:{qualname}"
    return {"unimportable": repr(fn)[:200]}


def _spec_text(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and "partial" in spec:
        return f"functools.partial({_spec_text(spec['partial'])}, ...)"
    if isinstance(spec, dict) and "unimportable" in spec:
        return spec["unimportable"]
    return repr(spec)[:200]


def _import_spec(spec: Any, import_modules: bool) -> Any:
    """The callable a spec names; `ValueError` saying why it cannot be had."""
    if isinstance(spec, dict) and "partial" in spec:
        def arg(value: Any) -> Any:
            return _import_spec(value["callable"], import_modules) if isinstance(value, dict) else value

        return functools.partial(_import_spec(spec["partial"], import_modules), *map(arg, spec.get("args", [])),
                                 **{k: arg(v) for k, v in spec.get("keywords", {}).items()})
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError("it is not a module-level function (a lambda, closure or object), so no code can name it")
    module_name, qualname = spec.split(":", 1)
    top = module_name.split(".")[0]
    if top in getattr(sys, "stdlib_module_names", ()) or top == "builtins":
        raise ValueError(f"{module_name} is part of Python, not a model")
    module = sys.modules.get(module_name)
    if module is None:
        if not import_modules:
            raise ValueError(f"its module {module_name} is not imported; import it first (or pass import_modules=True)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"its module cannot be imported ({err})") from None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"{module_name} has no {qualname}")
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def model_fn_of(ck: Mapping[str, Any], *, import_modules: bool = False) -> Callable:
    """The model function a checkpoint was trained with, rebuilt from its record.

    `fnlm.train.train` records its `model_fn` in every checkpoint (`callable_spec`, e.g.
    `"fnlm.model:transformer_lm"`). A checkpoint without that record (older ones, or written by
    hand) gets `fnlm.transformer_lm`. A checkpoint names code, so only functions of modules this
    process has already imported (the standard library excepted) are taken, unless
    `import_modules=True` lets it import the module named.

    **Arguments:**

    - `ck`: a loaded checkpoint (`load_checkpoint`'s result).
    - `import_modules`: import the module the record names when it is not imported yet.

    **Returns:** `model_fn(params, token_ids, config) -> logits`; for a model trained with
    `functools.partial(fnlm.transformer_lm, block=...)` a partial again (its `.keywords` hold the
    block, e.g. for `fnlm.generate(..., block=...)`). A record that cannot be rebuilt raises a
    `ValueError` in one line naming the function and why.
    """
    spec = ck.get("model_fn")
    if spec is None:
        from fnlm.model import transformer_lm

        return transformer_lm
    try:
        return _import_spec(spec, import_modules)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint was trained with model function {_spec_text(spec)}, which cannot be rebuilt "
                         f"here: {err}; load it with the code that trained it") from None
