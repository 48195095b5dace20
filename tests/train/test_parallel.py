"""Data-parallel training (fnlm.train.parallel) with 2 CPU processes on gloo.

The central check: 2 ranks × 4 sequences for k steps end with the same params (to float32
tolerance) as one process drawing the same two data shards (8 sequences) per step. The two runs
differ only in summation order (the loss mean over 8 rows vs the mean of two means over 4; gloo's
sum), so the params agree to ~1e-7 after a few AdamW steps; the assertion uses rtol 1e-5, atol 1e-6
(AdamW's update can amplify a 1-ulp gradient difference in a coordinate whose second moment is tiny).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import fnlm
from fnlm import train as trainer
from fnlm.train import Parallel, TrainConfig
from fnlm.train import parallel as distributed
from tests.distributed import free_port, patterned_tokens, rank_env

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-5, 1e-6
K = 4

CFG = fnlm.TransformerConfig(vocab_size=48, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)
TC = TrainConfig(batch_size=8, steps=K, eval_interval=2, eval_batches=3, checkpoint_interval=2, keep_checkpoints=0, log_interval=1, progress=False, plot=False, device="cpu", step=dict(lr=1e-2, min_lr=1e-3, warmup_steps=1))


def _tokens(n=3000, seed=0):
    return patterned_tokens(CFG.vocab_size, n, seed)


def _train(out, tc=TC, **kw):
    return trainer.train(CFG, tc, _tokens(), _tokens(seed=1), out, **kw)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(rank_env(rank, world, port))
    root = Path(root)
    with distributed.process_group(device="cpu", startup_timeout=60) as par:
        grads = {"a": torch.full((3, 2), float(rank + 1)),
                 "b": [torch.arange(5.0) * (rank + 1), torch.full((4,), float(rank), dtype=torch.float64)],
                 "c": torch.tensor(2.0 + rank), "n": 7}
        averaged = distributed.all_reduce_grads(grads, bucket_mb=16 / 2**20)
        started = fnlm.init_transformer_lm(CFG, seed=TC.seed)
        seen = {}

        def model_fn(params, x, config):
            seen["params"] = params
            return fnlm.transformer_lm(params, x, config)

        torch.manual_seed(100 + rank)
        res = _train(root / f"out{rank}", parallel=par, model_fn=model_fn)
        if par.is_main:
            ck = root / "resume" / "checkpoints"
            ck.mkdir(parents=True)
            shutil.copyfile(root / "out0" / "checkpoints" / "step_0000002.pt", ck / "latest.pt")
        par.barrier()
        torch.manual_seed(999)
        resumed = _train(root / "resume", resume=True, parallel=par)
        torch.save({"grads_in": grads, "averaged": averaged, "init": started, "result": res, "resumed": resumed,
                    "params": fnlm.tree_map(torch.clone, seen["params"]), "rng_after_resume": torch.get_rng_state(),
                    "resumed_params": fnlm.load_checkpoint(root / "resume" / "checkpoints" / "latest.pt")["params"]},
                   root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _max_rel(a, b):
    fa, fb = fnlm.tree_flatten(a), fnlm.tree_flatten(b)
    assert fa.keys() == fb.keys()
    return max(float(((fa[k] - fb[k]).abs() / (fb[k].abs() + 1e-3)).max()) for k in fa)


def _assert_close(a, b):
    fa, fb = fnlm.tree_flatten(a), fnlm.tree_flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def test_gradients_are_averaged_over_ranks_in_buckets(two_ranks):
    _, (r0, r1) = two_ranks
    for out in (r0["averaged"], r1["averaged"]):
        torch.testing.assert_close(out["a"], torch.full((3, 2), 1.5), rtol=0, atol=0)
        torch.testing.assert_close(out["b"][0], torch.arange(5.0) * 1.5, rtol=0, atol=0)
        torch.testing.assert_close(out["b"][1], torch.full((4,), 0.5, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(out["c"], torch.tensor(2.5), rtol=0, atol=0)
        assert out["n"] == 7
    assert float(r0["grads_in"]["a"][0, 0]) == 1.0, "the input tree was modified"


def test_two_ranks_equal_one_process_over_the_same_global_batch(two_ranks, tmp_path):
    _, (r0, r1) = two_ranks
    torch.testing.assert_close(r0["init"], r1["init"], rtol=0, atol=0)
    p0 = r0["params"]
    torch.testing.assert_close(p0, fnlm.load_checkpoint(two_ranks[0] / "out0" / "checkpoints" / "latest.pt")["params"],
                               rtol=0, atol=0)
    single = _train(tmp_path / "single", replace(TC, data_shards=2))
    ref = fnlm.load_checkpoint(tmp_path / "single" / "checkpoints" / "latest.pt")["params"]
    _assert_close(p0, ref)
    assert _max_rel(p0, r0["init"]) > 1e-3, "training did not move the params"
    for r in (r0, r1):
        assert r["result"]["step"] == K and r["result"]["tokens"] == K * 8 * CFG.context_length
        assert r["result"]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
        assert r["result"]["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert r0["result"]["val_loss"] == r1["result"]["val_loss"]


def test_ranks_hold_identical_params_and_only_rank0_writes(two_ranks):
    root, (r0, r1) = two_ranks
    assert not (root / "out1").exists() or not any((root / "out1").rglob("*"))
    ck = fnlm.load_checkpoint(root / "out0" / "checkpoints" / "latest.pt")
    assert ck["world_size"] == 2 and ck["global_batch_size"] == 8 and ck["data_shards"] == 2
    assert len(ck["rank_rng"]) == 2
    assert not torch.equal(ck["rank_rng"][0]["torch"], ck["rank_rng"][1]["torch"])
    assert {p.name for p in (root / "out0").iterdir()} >= {"metrics.jsonl", "checkpoints"}
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)


def test_resume_with_two_ranks_is_exact_and_restores_each_ranks_rng(two_ranks):
    root, (r0, r1) = two_ranks
    torch.testing.assert_close(r0["resumed_params"], r0["params"], rtol=0, atol=0)
    assert r0["resumed"]["resumed_from"] == 2 and r0["resumed"]["step"] == K
    step2 = fnlm.load_checkpoint(root / "out0" / "checkpoints" / "step_0000002.pt")
    for rank, r in enumerate((r0, r1)):
        assert torch.equal(r["rng_after_resume"], step2["rank_rng"][rank]["torch"])


def test_resume_with_another_world_size(two_ranks, tmp_path):
    root, (r0, _) = two_ranks
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    shutil.copyfile(root / "out0" / "checkpoints" / "step_0000002.pt", ck / "latest.pt")
    with pytest.raises(ValueError, match=r"--data-shards 2"):
        _train(tmp_path, resume=True)
    res = _train(tmp_path, replace(TC, data_shards=2), resume=True)
    assert res["resumed_from"] == 2
    _assert_close(fnlm.load_checkpoint(ck / "latest.pt")["params"], r0["params"])


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match=r"global batch_size 7 .* world_size 2"):
        TrainConfig(batch_size=7).shards(2)
    with pytest.raises(ValueError, match="data_shards"):
        TrainConfig(batch_size=8, data_shards=3)
    with pytest.raises(ValueError, match=r"global batch_size 6 .*data_shards 4"):
        TrainConfig(batch_size=6).shards(4)
    with pytest.raises(ValueError, match="global batch_size 9"):
        _train("/nonexistent/never-written", replace(TC, batch_size=9), parallel=Parallel(rank=1, world_size=2))


@settings(max_examples=30, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), mult=st.integers(1, 3), per=st.integers(1, 3), step=st.integers(0, 50))
def test_rank_batches_are_the_union_of_shards(world, mult, per, step):
    shards = world * mult
    tc = TrainConfig(batch_size=shards * per, data_shards=shards, seed=3)
    tokens = torch.arange(500)
    xs = [trainer.draw_batch(tokens, tc, 8, step, torch.device("cpu"), rank=r, world_size=world)[0] for r in range(world)]
    whole = trainer.draw_batch(tokens, tc, 8, step, torch.device("cpu"))[0]
    assert all(x.shape == (shards * per // world, 8) for x in xs)
    assert torch.equal(torch.cat(xs), whole)
    direct = torch.cat([fnlm.get_batch(tokens, per, 8, "cpu", generator=fnlm.data.batch_generator(3, s, step))[0]
                        for s in range(shards)])
    assert torch.equal(whole, direct)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 40), st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                      min_size=1, max_size=12), cap=st.integers(1, 200))
def test_buckets_partition_by_dtype_and_respect_the_cap(sizes, cap):
    ts = [torch.zeros(n, dtype=d) for n, d in sizes]
    buckets = distributed._buckets(ts, cap)
    assert sorted(i for b in buckets for i in b) == list(range(len(ts)))
    for b in buckets:
        assert len({ts[i].dtype for i in b}) == 1
        assert b == sorted(b)
        assert len(b) == 1 or sum(ts[i].numel() * ts[i].element_size() for i in b) <= cap


def test_device_for_rank_and_launch_detection(monkeypatch):
    assert distributed.device_for_rank("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.device_for_rank("auto", 1) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_distributed(device="cpu")


def _torchrun(args, tmp_path, timeout=120, env_extra=None):
    env = {**os.environ, "FNLM_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "FNLM_TYPECHECK": "0", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--log-dir", str(tmp_path / "logs"), "--redirects", "3", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    return proc, time.perf_counter() - t0


def _rank_logs(tmp_path, rank):
    return "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"attempt_0/{rank}/*.log"))


def test_torchrun_pipeline_two_ranks_rank0_outputs_only(tmp_path):
    out = tmp_path / "run"
    proc, _ = _torchrun([str(REPO / "experiments" / "train_tinystories.py"), "--preset", "smoke", "--out", str(out),
                         "--corpus-train-bytes", "40000", "--corpus-valid-bytes", "8000", "--vocab-size", "300",
                         "--steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--context-length", "32", "--eval-interval", "2",
                         "--num-samples", "1", "--sample-tokens", "8", "--no-plot"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + _rank_logs(tmp_path, 0)[-3000:] + _rank_logs(tmp_path, 1)[-3000:]
    assert _rank_logs(tmp_path, 1) == ""
    rank0 = _rank_logs(tmp_path, 0)
    assert "trained 4 steps" in rank0 and "128 tokens/step" in rank0
    ck = fnlm.load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ck["world_size"] == 2 and ck["global_batch_size"] == 4 and ck["step"] == 4
    records = fnlm.train.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4] and records[-1]["tokens"] == 4 * 4 * 32
    assert (out / "samples.txt").exists() and (out / "eval.json").exists()


FAILING = """
import os, sys
sys.path.insert(0, {repo!r})
from torch.distributed.elastic.multiprocessing.errors import record
from fnlm.train import parallel as distributed

@record
def entry():
    if os.environ["RANK"] == "1":
        raise RuntimeError("simulated start-up failure on rank 1")
    distributed.run(lambda parallel=None: None, device="cpu")

entry()
"""


def test_rank_failing_at_startup_stops_torchrun_with_its_rank(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING.format(repo=str(REPO)))
    proc, seconds = _torchrun([str(script)], tmp_path, timeout=90, env_extra={"FNLM_DIST_STARTUP_TIMEOUT": "60"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    summary = text[text.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 ", summary) and "simulated start-up failure on rank 1" in summary, text[-3000:]
    assert seconds < 60


def test_missing_rank_without_torchrun_times_out_with_a_message(tmp_path):
    env = {**os.environ, **rank_env(0, 2, free_port()), "FNLM_DIST_STARTUP_TIMEOUT": "3", "PYTHONPATH": str(REPO),
           "FNLM_TYPECHECK": "0"}
    code = "from fnlm.train import parallel; parallel.run(lambda parallel=None: None, device='cpu')"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "fnlm: rank 0 of 2" in proc.stderr and "within 3s" in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - t0 < 45
