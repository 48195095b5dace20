"""Mixed precision as a policy (JMP's and Equinox's design): the parameters and the optimizer state
stay in float32, the model computes in bfloat16, and the loss comes back in float32.

```python
policy = fnlm.precision.Policy(compute_dtype=torch.bfloat16)     # or get_policy("bf16")
loss_fn = fnlm.precision.with_policy(my_loss_fn, policy)         # casts params to bf16 inside
loss, grads = fnlm.value_and_grad(loss_fn)(params, x, y)          # loss float32, grads float32
```

`with_policy` casts the params tree (and any floating arguments) to the compute dtype *inside* the
loss, so autograd differentiates through the cast: the gradients arrive in the params' own dtype
(float32), and the optimizer and its state never see bfloat16. The casts are pure (`Tensor.to`), so
the policy composes with `torch.func` transforms, `vmap` and `torch.compile`. The layers keep their
own numerics in any compute dtype: RMSNorm, softmax and the cross-entropy compute in float32 and
cast back (see their docstrings), so with a bfloat16 policy the residual stream, projections and
attention run in bfloat16 while the reductions that need range and precision do not.

This is not `torch.autocast`, which keeps the residual stream in float32 and casts each matmul's
inputs; `lm_loss_fn_with` offers both (`"bf16"` and `"autocast"`) behind one `precision` name for a
training script. float16 compute needs loss scaling, which fnlm does not do: `get_policy` refuses it.

Memory: the policy halves the activations but adds a bfloat16 copy of the params (and their
bfloat16 gradients before the cast back) for the step. At the 17M model's batch 4 x 128 these
nearly cancel (`benchmarks/precision.py`, CPU: a step's peak above the params and AdamW state
231.5 MiB against 242.8 MiB in float32); the saving grows with batch x context. Speed on CPU needs
bfloat16 instructions (AVX512-BF16, AMX): without them a bfloat16 step is several times slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from fnlm.loss import cross_entropy
from fnlm.tree import Tree, _map_keeping_types, tree_flatten
from fnlm.types import Tensor

__all__ = ["Policy", "get_policy", "with_policy", "lm_loss_fn_with", "resolve_precision", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16", "autocast")
"""The `precision` names `lm_loss_fn_with` takes (and a `--precision` flag can offer)."""

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64,
}


def _cast_tree(tree: Any, dtype: torch.dtype) -> Any:
    """`tree` (dicts, lists, tuples, NamedTuples) with each floating tensor leaf of another dtype
    cast to `dtype`; every other leaf is kept as is."""

    def cast(leaf: Any) -> Any:
        return leaf.to(dtype) if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dtype != dtype else leaf

    return _map_keeping_types(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters are stored in, computed in, and returned in.

    **Fields:**

    - `param_dtype`: the dtype of the stored parameters and of their gradients (and so of the
      optimizer state); `with_policy` checks that the params it gets have it.
    - `compute_dtype`: the dtype the parameters (and floating inputs) are cast to for the forward
      pass; the backward runs in it too.
    - `output_dtype`: the dtype of what the wrapped function returns (the loss).

    `Policy()` is full float32: every cast is the identity and the results are bitwise those of
    the function without a policy. `Policy(compute_dtype=torch.bfloat16)` is the usual mixed policy.
    """

    param_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32
    output_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, name)
            if not isinstance(value, torch.dtype) or not value.is_floating_point:
                raise TypeError(f"Policy.{name} must be a floating torch.dtype, got {value!r}")

    def cast_to_compute(self, tree: Tree) -> Tree:
        """`tree` with its floating tensors cast to `compute_dtype` (integer tensors and other
        leaves unchanged)."""
        return _cast_tree(tree, self.compute_dtype)

    def cast_to_param(self, tree: Tree) -> Tree:
        """`tree` with its floating tensors cast to `param_dtype` (e.g. freshly initialised params)."""
        return _cast_tree(tree, self.param_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """`tree` with its floating tensors cast to `output_dtype`."""
        return _cast_tree(tree, self.output_dtype)


def get_policy(name: str) -> Policy:
    """A `Policy` from a name: `"fp32"` (all float32), `"bf16"` (float32 params and output,
    bfloat16 compute), or JMP's form `"params=float32,compute=bfloat16,output=float32"` (keys
    `params`/`p`, `compute`/`c`, `output`/`o`; a missing key keeps float32). float16 compute is
    refused (it needs loss scaling, which fnlm does not do)."""
    if not isinstance(name, str):
        raise TypeError(f"get_policy needs a str, got {type(name).__name__}")
    short = {"fp32": Policy(), "float32": Policy(), "bf16": Policy(compute_dtype=torch.bfloat16),
             "bfloat16": Policy(compute_dtype=torch.bfloat16)}
    if name.strip().lower() in short:
        return short[name.strip().lower()]
    keys = {"params": "param_dtype", "p": "param_dtype", "compute": "compute_dtype", "c": "compute_dtype",
            "output": "output_dtype", "o": "output_dtype"}
    fields: dict[str, torch.dtype] = {}
    for part in filter(None, (p.strip() for p in name.split(","))):
        key, _, value = part.partition("=")
        if key.strip() not in keys or value.strip().lower() not in _DTYPE_NAMES:
            raise ValueError(f"get_policy: cannot read {part!r} in {name!r}; expected 'fp32', 'bf16' or "
                             f"'params=float32,compute=bfloat16,output=float32'")
        fields[keys[key.strip()]] = _DTYPE_NAMES[value.strip().lower()]
    if not fields:
        raise ValueError(f"get_policy: empty policy name {name!r}")
    if torch.float16 in fields.values():
        raise ValueError(f"get_policy: float16 in {name!r} needs loss scaling, which fnlm does not do; use bfloat16")
    return Policy(**fields)


def _check_param_dtypes(params: Tree, dtype: torch.dtype) -> None:
    for path, leaf in tree_flatten(params).items():
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dtype != dtype:
            raise TypeError(f"with_policy: parameter {path!r} is {leaf.dtype}, but the policy's "
                            f"param_dtype is {dtype}; cast the params with policy.cast_to_param")


def with_policy(fn: Callable[..., Any], policy: Policy) -> Callable[..., Any]:
    """`fn(params, *args, **kwargs)` run under `policy`: `params` and the floating arguments cast to
    `policy.compute_dtype`, the result (e.g. the loss, or `(loss, aux)`) cast to
    `policy.output_dtype`.

    Gradients taken of the returned function (`fnlm.value_and_grad`, `torch.func.grad`) are with
    respect to the params as given, so they have `policy.param_dtype`. With `Policy()` nothing is
    cast and the results are bitwise those of `fn`. The params' dtype is checked against
    `policy.param_dtype` (a dtype check only: no data is read).

    **Arguments:**

    - `fn`: `fn(params, *args, **kwargs) -> tensor or tree of tensors`.
    - `policy`: a `Policy`.

    **Returns:** a function with `fn`'s signature.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"with_policy needs a Policy, got {type(policy).__name__}")

    def policed(params: Tree, *args: Any, **kwargs: Any) -> Any:
        _check_param_dtypes(params, policy.param_dtype)
        args, kwargs = policy.cast_to_compute((args, kwargs))
        return policy.cast_to_output(fn(policy.cast_to_compute(params), *args, **kwargs))

    return policed


def resolve_precision(name: str, device_type: str) -> str:
    """The precision name `name` means on a `device_type` device: `"auto"` is `"autocast"` on CUDA
    and `"fp32"` elsewhere; the other `PRECISIONS` are themselves. `ValueError` for another name."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or a Policy, got {name!r}")
    if name == "auto":
        return "autocast" if device_type == "cuda" else "fp32"
    return name


def lm_loss_fn_with(
    model_fn: Callable[..., Tensor], model_config: Any, precision: str | Policy = "auto", *, device_type: str = "cpu"
) -> Callable[[Tree, Tensor, Tensor], Tensor]:
    """The language-model loss `cross_entropy(model_fn(params, x, model_config), y)` at a precision:
    what a training loop needs from a `precision` setting.

    **Arguments:**

    - `model_fn`: `model_fn(params, token_ids, config) -> logits`.
    - `model_config`: passed to `model_fn`.
    - `precision`: `"fp32"` (nothing cast), `"bf16"` (`with_policy` and `get_policy("bf16")`:
      params cast to bfloat16 in the loss), `"autocast"` (`torch.autocast(device_type,
      bfloat16)` around the forward), `"auto"` (`"autocast"` on CUDA, `"fp32"` elsewhere), or a
      `Policy`. The loss is float32 in every case.
    - `device_type`: `"cpu"`, `"cuda"`, ...: where the params live (for `"auto"` and `"autocast"`).

    **Returns:** `loss_fn(params, x, y) -> 0-d float32 loss`.
    """
    if isinstance(precision, str):
        precision = resolve_precision(precision, device_type)
    autocast = precision == "autocast"

    def loss(params: Tree, x: Tensor, y: Tensor) -> Tensor:
        context = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            logits = model_fn(params, x, model_config)
        return cross_entropy(logits, y)

    if isinstance(precision, Policy):
        return with_policy(loss, precision)
    return with_policy(loss, get_policy("bf16")) if precision == "bf16" else loss
