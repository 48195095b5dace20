"""The package as a whole: `import fnlm` is light, the lazy face resolves every public name, no name
shadows a module, and no function in `fnlm/` is longer than 80 lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fnlm

PACKAGE = Path(fnlm.__file__).resolve().parent
HEAVY = ("torch", "numpy", "tqdm", "matplotlib", "http.client", "urllib.request", "wandb", "transformers",
         "safetensors", "einx")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_fnlm_loads_nothing_heavy():
    loaded = _modules_after("import fnlm")
    assert not [m for m in HEAVY if m in loaded], sorted(m for m in HEAVY if m in loaded)


def test_first_use_of_a_name_loads_only_what_it_needs():
    torch_alone = _modules_after("import torch")
    loaded = _modules_after("import fnlm; fnlm.TransformerConfig; fnlm.train_step; fnlm.train.train") - torch_alone
    extra = [m for m in ("tqdm", "matplotlib", "http.client", "urllib.request", "wandb", "safetensors") if m in loaded]
    assert not extra, f"beyond what `import torch` itself loads: {extra}"


def test_every_public_name_resolves_and_dir_lists_it():
    for name in fnlm.__all__:
        assert getattr(fnlm, name) is not None, name
    assert set(fnlm.__all__) <= set(dir(fnlm))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        fnlm.not_a_name  # noqa: B018


def test_no_public_function_shadows_a_module():
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    clashes = [n for n in fnlm.__all__ if n in modules and not isinstance(getattr(fnlm, n), type(fnlm))]
    assert not clashes, clashes
    for sub in ("train", "nn", "tokenizer"):
        package = getattr(fnlm, sub)
        own = {p.stem for p in Path(package.__file__).parent.glob("*.py")}
        bad = [n for n in getattr(package, "__all__", []) if n in own and not isinstance(getattr(package, n), type(fnlm))]
        assert not bad, (sub, bad)


def _long_functions(limit: int) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_the_library_is_longer_than_80_lines():
    assert not _long_functions(80), _long_functions(80)
