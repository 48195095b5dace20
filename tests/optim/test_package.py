"""`fnlm.optim`'s public names: the pinned ones exist, and none hides a submodule of the package."""

from __future__ import annotations

from pathlib import Path

import fnlm
from fnlm import optim

PINNED = ("chain", "scale_by_adam", "scale_by_lion", "trace", "add_decayed_weights", "scale_by_learning_rate",
          "clip_by_global_norm", "masked", "multi_transform", "apply_updates", "adamw", "sgd", "lion", "muon",
          "MultiSteps", "partition", "set_to_zero", "identity", "scale", "scale_by_muon", "optimizer_step",
          "adamw_cs336", "adamw_init", "adamw_step", "sgd_init", "sgd_step", "cosine_schedule")


def test_pinned_names_are_exported():
    missing = [n for n in PINNED if n not in optim.__all__ or getattr(optim, n, None) is None]
    assert not missing, missing
    assert all(getattr(optim, n) is not None for n in optim.__all__)


def test_no_public_name_shadows_a_submodule():
    """(`fnlm.optim.muon` the function would hide a module `fnlm/optim/muon.py`.)"""
    modules = {p.stem for p in Path(optim.__file__).parent.glob("*.py")}
    clashes = [n for n in optim.__all__ if n in modules]
    assert not clashes, clashes
    assert callable(fnlm.optim.muon)
