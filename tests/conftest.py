"""Test-suite setup: runtime shape checks on for every fnlm function, and the shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("FNLM_TYPECHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fnlm  # noqa: E402,F401  (imported here so the type-check hook wraps every submodule)

torch.set_num_threads(1)  # the tests' tensors are tiny, and pytest-xdist runs one worker per core

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    """``../shared/fixtures``; tests that need it skip when ``../shared`` is absent."""
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not present beside this checkout")
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
