"""The optimizer ablation: `optimizer_configs` changes only the optimizer's settings, and
`run_ablations.py --optimizers` trains one run per optimizer and refuses wrong names and rates in
one line, as a user types them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ablations import OPTIMIZER_ABLATION, optimizer_configs, parse_optimizers
from hypothesis import given
from hypothesis import strategies as st

import fnlm
from fnlm.train import OPTIMIZERS, TrainConfig, build_optimizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "run_ablations.py"
BASE = TrainConfig(batch_size=8, steps=40, seed=3, step=dict(lr=2e-3, min_lr=5e-4, warmup_steps=7, weight_decay=0.05,
                                                              grad_clip=0.5, betas=(0.8, 0.9), optimizer="adamw_cs336"))


def test_each_config_changes_only_the_optimizer_settings():
    configs = optimizer_configs(BASE)
    assert list(configs) == ["adamw", "lion", "muon", "sgd"]
    changed = {"optimizer", "lr", "min_lr", "momentum"}
    for name, tc in configs.items():
        choice = OPTIMIZER_ABLATION[name]
        assert dataclasses.replace(tc, step=BASE.step) == BASE
        assert {f: getattr(BASE.step, f) for f in BASE.step._fields if f not in changed} == \
               {f: getattr(tc.step, f) for f in tc.step._fields if f not in changed}
        assert (tc.step.optimizer, tc.step.lr, tc.step.momentum) == (name, choice.lr, choice.momentum)
        assert tc.step.min_lr == pytest.approx(choice.min_lr_ratio * choice.lr)
        assert name in OPTIMIZERS and 0 < tc.step.min_lr < tc.step.lr
        build_optimizer(tc.step)  # the library builds every optimizer the ablation names
    assert (configs["sgd"].step.momentum, configs["muon"].step.momentum) == (0.9, 0.95)


def test_a_subset_and_rate_overrides():
    configs = optimizer_configs(BASE, {"sgd": 0.2, "adamw": None})
    assert list(configs) == ["sgd", "adamw"]
    assert (configs["sgd"].step.lr, configs["sgd"].step.min_lr) == (0.2, pytest.approx(0.02))
    assert configs["adamw"].step.lr == OPTIMIZER_ABLATION["adamw"].lr
    assert list(optimizer_configs(BASE, ["lion"])) == ["lion"]


@pytest.mark.parametrize(("chosen", "message"), [
    (["adam"], "unknown name(s) ['adam']"),
    ({"lion": math.nan}, "expected a finite number above 0, got nan"),
    ({"lion": math.inf}, "expected a finite number above 0, got inf"),
    ({"muon": 0.0}, "expected a finite number above 0, got 0.0"),
    ({"sgd": -1e-3}, "expected a finite number above 0, got -0.001"),
])
def test_wrong_names_and_rates_are_refused(chosen, message):
    with pytest.raises(ValueError) as e:
        optimizer_configs(BASE, chosen)
    assert message in str(e.value)


_rates = st.one_of(st.none(), st.floats(min_value=1e-8, max_value=10.0))


@given(st.permutations(list(OPTIMIZER_ABLATION)).flatmap(
    lambda names: st.integers(1, len(names)).flatmap(
        lambda k: st.tuples(st.just(names[:k]), st.lists(_rates, min_size=k, max_size=k)))))
def test_parse_optimizers_reads_back_what_a_user_writes(case):
    """Any subset, in any order, each with or without `:lr`, parses to the names in that order and
    the rates written (repr round-trips floats)."""
    names, rates = case
    text = ",".join(n if r is None else f"{n}:{r!r}" for n, r in zip(names, rates))
    assert parse_optimizers(text) == dict(zip(names, rates))


def test_parse_optimizers_defaults_and_refusals():
    assert parse_optimizers("") == parse_optimizers(None) == dict.fromkeys(OPTIMIZER_ABLATION)
    assert parse_optimizers(" lion : 3e-4 , sgd ") == {"lion": 3e-4, "sgd": None}
    for text, message in [("adamw,adamw", "named twice"), ("lion:", "must be a number"), (",", "no optimizer named"),
                          ("lion:1e999", "finite number above 0")]:
        with pytest.raises(ValueError) as e:
            parse_optimizers(text)
        assert message in str(e.value)


def _script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FNLM_TYPECHECK", None)
    return subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _stored_optimizer(run_dir: Path) -> str:
    ck = fnlm.load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    return TrainConfig.from_dict(ck["train_config"]).step.optimizer


_TINY = ["--quiet", "--threads", "1", "--steps", "2", "--eval-batches", "1", "--eval-interval", "2", "--log-interval", "1",
         "--keep-checkpoints"]


@pytest.mark.slow
def test_optimizers_flag_trains_one_run_per_optimizer(tmp_path):
    out = tmp_path / "opt"
    proc = _script(["--out", str(out), "--optimizers", "adamw,sgd:0.05", *_TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "optimizer_sweep.md").read_text()
    rows = [ln.split("|") for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith(("| optimizer", "| ---"))]
    assert [(r[1].strip(), float(r[2])) for r in rows] == [("adamw", OPTIMIZER_ABLATION["adamw"].lr), ("sgd", 0.05)]
    assert all(r[-2].strip() == "no" for r in rows)
    assert "![Optimizers](optimizer_sweep.png)" in table and "## Optimizers" in proc.stdout
    png = out / "optimizer_sweep.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())["optimizer_sweep"]
    assert [(r["label"], r["optimizer"], r["lr"], r["momentum"], r["steps"]) for r in summary] == \
           [("adamw", "adamw", OPTIMIZER_ABLATION["adamw"].lr, None, 2), ("sgd", "sgd", 0.05, 0.9, 2)]
    assert all(math.isfinite(r["val_loss"]) for r in summary)
    for name in ("adamw", "sgd"):
        assert _stored_optimizer(out / "runs" / name) == name
        assert (out / "runs" / name / "metrics.jsonl").read_text().count('"val_loss"') == 1
    assert not (out / "ablations.md").exists() and not (out / "lr_sweep.md").exists()


@pytest.mark.slow
def test_optimizer_flag_with_lrs_sweeps_that_optimizer(tmp_path):
    """The pipeline's `--optimizer lion` passes through to the learning-rate sweep: every run is Lion."""
    out = tmp_path / "lion"
    proc = _script(["--out", str(out), "--optimizer", "lion", "--lrs", "1e-4,1e-3", *_TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "summary.json").read_text())["lr_sweep"]
    assert [(r["label"], r["optimizer"], r["lr"]) for r in rows] == [("lr0.0001", "lion", 1e-4), ("lr0.001", "lion", 1e-3)]
    assert {_stored_optimizer(out / "runs" / r["label"]) for r in rows} == {"lion"}
    assert "lion lr" in (out / "lr_sweep.md").read_text()


@pytest.mark.parametrize(("value", "message"), [
    ("adam", "--optimizers 'adam': unknown optimizer 'adam'; choose from adamw, lion, muon, sgd"),
    ("lion:nan", "--optimizers 'lion:nan': 'lion:nan': the learning rate must be a finite number above 0, got 'nan'"),
    ("sgd:-0.1", "the learning rate must be a finite number above 0, got '-0.1'"),
    ("muon:fast", "the learning rate after ':' must be a number, got 'fast'"),
    ("adamw,adamw", "'adamw' is named twice"),
])
def test_wrong_optimizers_are_refused_before_any_stage(tmp_path, value, message):
    out = tmp_path / "opt"
    proc = _script(["--out", str(out), "--optimizers", value], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_ablations.py: error: ") and message in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(("argv", "own", "passed"), [
    (["--optimizer", "lion", "--lrs", "1e-3"], {"lrs": [1e-3], "optimizers": None}, ["--optimizer", "lion"]),
    (["--lr", "2e-3", "--seed", "3"], {"lrs": None, "seeds": None}, ["--lr", "2e-3", "--seed", "3"]),
    (["--optimizers", "--seed", "1"], {"optimizers": "", "seeds": None}, ["--seed", "1"]),
])
def test_pipeline_flags_are_not_read_as_this_scripts_longer_flags(argv, own, passed):
    """`--optimizer`, `--lr` and `--seed` are the pipeline's (one run's) flags; argparse's prefix
    matching used to read them as `--optimizers`, `--lrs` and `--seeds` (a sweep)."""
    import run_ablations

    args, passthrough = run_ablations.build_parser().parse_known_args(argv)
    assert {k: getattr(args, k) for k in own} == own
    assert passthrough == passed
