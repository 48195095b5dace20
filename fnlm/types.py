"""Shape-annotation aliases and the runtime type-check switch.

Every public function annotates its tensors with jaxtyping, using one vocabulary of axis names:
``batch seq d_model heads d_head d_ff vocab``. Checking is done by beartype through jaxtyping's
import hook over the ``fnlm`` package. It is installed when ``fnlm`` is first imported with the
environment variable ``FNLM_TYPECHECK=1`` (the test suite sets it); with the variable unset no
function is wrapped, so checks cost nothing. Do not turn checks on for a ``torch.compile``d run:
jaxtyping's wrappers cause recompiles.
"""

from __future__ import annotations

import os
import sys

from jaxtyping import Bool, Float, Int, Num, Shaped  # noqa: F401  (re-exported)
import torch
from torch import Tensor  # noqa: F401  (re-exported)

ENV_VAR = "FNLM_TYPECHECK"

__all__ = [
    "Bool", "Float", "Int", "Num", "Shaped", "Tensor", "ENV_VAR", "typecheck_requested", "typecheck_enabled",
    "tracing",
]


def typecheck_requested() -> bool:
    """True when ``FNLM_TYPECHECK`` asks for runtime shape checks."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no", "off")


def typecheck_enabled() -> bool:
    """True when fnlm's functions were wrapped with jaxtyping + beartype at import."""
    return bool(getattr(sys.modules.get("fnlm"), "_typecheck_on", False))


def tracing() -> bool:
    """True inside `torch.compile` or a `torch.func` transform (`vmap`, `grad`, ...).

    Checks that read tensor values (`.item()`, a host sync) step aside there: `vmap` cannot run
    them and `compile` would break its graph. Plain eager calls keep every check. torch has no
    public query for an active `torch.func` transform, so this one function asks the private
    one; the layers call `tracing()` and never torch's private API themselves.
    """
    if torch.compiler.is_compiling():
        return True
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False
