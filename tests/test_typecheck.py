"""The type-check switch, and torch.compile over the LM with checks off.

The suite itself runs with FNLM_TYPECHECK=1; these tests start a fresh interpreter without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jaxtyping
import pytest
import torch

import fnlm

REPO = Path(__file__).resolve().parents[1]


def run_without_checks(code: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_checks_are_on_in_the_suite():
    assert fnlm.typecheck_enabled()
    with pytest.raises(jaxtyping.TypeCheckError):
        fnlm.silu(torch.tensor([1, 2]))  # an int tensor is not Float


def test_checks_off_by_default_and_torch_compile_fullgraph_works():
    out = run_without_checks(
        """
        import torch, fnlm
        torch.set_num_threads(1)
        assert not fnlm.typecheck_enabled()
        try:
            fnlm.no_norm(None, torch.tensor([1, 2]))  # an int tensor where Float is annotated
        except TypeError:
            raise SystemExit("checks should be off")
        c = fnlm.TransformerConfig(61, 16, 32, 2, 4, 64)
        p = fnlm.init_transformer_lm(c)
        ids = torch.randint(0, 61, (2, 16))
        f = torch.compile(fnlm.transformer_lm, fullgraph=True, backend="eager")
        torch.testing.assert_close(f(p, ids, c), fnlm.transformer_lm(p, ids, c))
        p = fnlm.tree_map(lambda t: t.requires_grad_(True), p)
        out = f(p, ids, c)
        torch.testing.assert_close(out, fnlm.transformer_lm(p, ids, c))
        grads = torch.autograd.grad(out.square().mean(), fnlm.tree_leaves(p))
        assert all(g is not None for g in grads)
        print("compiled ok")
        """
    )
    assert "compiled ok" in out
