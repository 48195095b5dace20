"""Checkpoints: atomic, code-free (`weights_only=True`) and checked on load.

A checkpoint file is a `torch.save` of plain data only: tensors, ints, floats, strings, bytes,
bools, `None`, dtypes/devices, and dicts/lists/tuples of those. It holds the params tree, the
optimizer state, the step, the config (a dataclass is stored as `dataclasses.asdict` plus its class
name), the torch/CUDA/numpy/python RNG states, any extras, and a SHA-256 digest of all of that
which is verified on load, so a truncated or altered file is reported instead of silently used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import re
import struct
import tempfile
from collections.abc import Mapping
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


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(
    path: PathOrFile,
    *,
    params: Tree,
    opt_state: Any,
    step: int,
    config: Any,
    rng: bool = True,
    **extra: Any,
) -> None:
    """Write a training checkpoint atomically.

    For a path, the data goes to a temporary file in the same folder, is fsynced, then renamed over
    `path` (and the folder fsynced): a crash mid-save leaves the previous checkpoint intact. A
    writable binary file object is written directly (no atomicity).

    **Arguments:**

    - `path`: destination file path, or a binary file object.
    - `params`: the params tree.
    - `opt_state`: the optimizer state (e.g. from :func:`fnlm.adamw_step`), plain data.
    - `step`: the number of completed training steps.
    - `config`: a dataclass instance (stored as `asdict` plus its class name) or a dict.
    - `rng`: also store the global torch/CUDA/numpy/python RNG states (:func:`capture_rng_state`).
    - `**extra`: more plain data to store, e.g. `generator=gen.get_state()`, `best_val_loss=...`.
      The names `params, opt_state, step, config, config_class, rng` are reserved.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
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
    payload = {"format": FORMAT, "version": VERSION, "body": body, "sha256": _digest(body)}
    if isinstance(path, (str, os.PathLike)):
        _atomic_save(payload, Path(path))
    else:
        torch.save(payload, path)


def _unpickling_refusal(err: Exception) -> str | None:
    """Why torch's `weights_only` unpickler refused a file, without torch's advice to load it unsafely."""
    text = str(err)
    if "weights_only" not in text and "Weights only load failed" not in text and "GLOBAL" not in text:
        return None
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    what = f"the Python object {found.group(1)}" if found else "objects that only code could rebuild"
    return (f"it refers to {what}, and an fnlm checkpoint holds plain data only, so it was not written by "
            "fnlm.save_checkpoint or has been altered; it was not loaded and none of its code ran")


def _read(path: PathOrFile, where: str, map_location: Any) -> dict[str, Any]:
    """The verified body of a checkpoint; `ValueError` saying what is wrong with it."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        refusal = _unpickling_refusal(err)
        if refusal:
            raise ValueError(f"checkpoint {where} was refused: {refusal}") from None
        detail = re.split(r"(?<=\.)\s", str(err).strip(), maxsplit=1)[0].rstrip(".") or type(err).__name__
        raise ValueError(f"checkpoint {where} is unreadable (truncated or not a torch file: {detail})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "body" not in payload:
        raise ValueError(f"{where} is not an fnlm checkpoint (no {FORMAT!r} header)")
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint {where} has format version {payload.get('version')!r}, expected {VERSION}")
    body = payload["body"]
    if _digest(body) != payload.get("sha256"):
        raise ValueError(f"checkpoint {where} is corrupt: its contents do not match the stored SHA-256 digest")
    return body


def intact_alternatives(path: str | os.PathLike, *, limit: int = 5) -> list[tuple[Path, int]]:
    """The other `step_*.pt` checkpoints beside `path` that load and verify, newest first.

    Hard links to the same file as `path` (the loop's `latest.pt` is one) do not count.

    **Arguments:**

    - `path`: a checkpoint file (it need not exist or be readable).
    - `limit`: how many of the newest candidates to verify.

    **Returns:** `[(file, step), ...]`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for candidate in sorted(path.parent.glob("step_*.pt"), reverse=True)[:limit]:
        try:
            if path.exists() and os.path.samefile(candidate, path):
                continue
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
    use = "copy one over latest.pt to resume from it" if Path(path).name == "latest.pt" else "use one of them instead"
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
    need code is refused; fnlm never suggests loading it unsafely). Errors name the file:
    `FileNotFoundError` when missing; `ValueError` when it is truncated, not a checkpoint, fails
    its digest, or does not match `expected_params` / `expected_config`. When the file is
    missing or bad, the message names the intact `step_*.pt` checkpoints beside it
    (`intact_alternatives`).

    **Arguments:**

    - `path`: the checkpoint path, or a readable binary file object.
    - `map_location`: where tensors are put (default CPU), as for `torch.load`.
    - `expected_params`: a params tree (or tree of shapes) the stored params must match in flat
      names and shapes (see :func:`check_params_match`).
    - `expected_config`: a config (dataclass or dict) the stored config must equal.

    **Returns:**

    A dict with keys `params`, `opt_state`, `step`, `config` (a dict), `config_class`, `rng`
    (pass to :func:`restore_rng_state`, or `None`), and each extra saved under its own name.
    """
    where = _describe(path)
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise FileNotFoundError(_with_alternatives(f"checkpoint {where} does not exist", path))
    try:
        body = _read(path, where, map_location)
    except ValueError as err:
        raise ValueError(_with_alternatives(str(err), path)) from None
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
