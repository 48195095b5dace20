"""Flags generated from config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

import fnlm

from tinystories import cli

from fnlm.train import TrainConfig


@dataclass(frozen=True)
class Toy:
    width: int = 4
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    limit: int | None = None
    maybe: bool | None = None
    mode: Literal["a", "b"] = "a"


def _parse(argv):
    p = argparse.ArgumentParser()
    added = cli.add_dataclass_flags(p, Toy)
    return added, cli.dataclass_overrides(p.parse_args(argv), Toy)


def test_every_field_gets_a_flag_and_nothing_given_means_no_override():
    added, over = _parse([])
    assert added == [f.name for f in dataclasses.fields(Toy)]
    assert over == {}


def test_flags_parse_to_field_types():
    _, over = _parse(["--width", "7", "--rate", "1e-3", "--name", "y", "--flag", "--limit", "9", "--no-maybe", "--mode", "b"])
    assert over == {"width": 7, "rate": 1e-3, "name": "y", "flag": True, "limit": 9, "maybe": False, "mode": "b"}
    assert dataclasses.replace(Toy(), **over).limit == 9


def test_none_and_negated_bools():
    _, over = _parse(["--limit", "none", "--no-flag", "--maybe"])
    assert over == {"limit": None, "flag": False, "maybe": True}


def test_bad_values_are_rejected():
    with pytest.raises(SystemExit):
        _parse(["--width", "x"])
    with pytest.raises(SystemExit):
        _parse(["--mode", "c"])


def test_train_config_flags_cover_its_fields():
    p = argparse.ArgumentParser()
    added = cli.add_dataclass_flags(p, TrainConfig)
    assert set(added) == {f.name for f in dataclasses.fields(TrainConfig)} - {"step"}
    step_added = cli.add_dataclass_flags(p, fnlm.StepConfig)
    assert set(step_added) == set(fnlm.StepConfig._fields)  # the nested step config: every field a flag
    args = p.parse_args(["--lr", "0.01", "--no-compile", "--cosine-steps", "50", "--batch-size", "3",
                         "--betas", "0.8", "0.99", "--optimizer", "lion", "--precision", "bf16"])
    assert cli.dataclass_overrides(args, TrainConfig) == {"compile": False, "batch_size": 3, "precision": "bf16"}
    assert cli.dataclass_overrides(args, fnlm.StepConfig) == {"lr": 0.01, "cosine_steps": 50, "betas": (0.8, 0.99),
                                                              "optimizer": "lion"}
    with pytest.raises(SystemExit):
        p.parse_args(["--optimizer", "adam"])
    assert cli.flag_name("warmup_steps") == "--warmup-steps"
