"""`fnlm.train.train` with sharded state (`TrainConfig.shard`): two gloo processes with the optimizer
state sharded (ZeRO-1) and with the params sharded (FSDP-style) end where one process does over the
same global batches, write one ordinary checkpoint, and resume from it exactly."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fnlm
from fnlm import train as trainer
from fnlm.train import TrainConfig
from fnlm.train import parallel as distributed
from fnlm.train.sharding import make_sharded_parallel
from tests.distributed import free_port, patterned_tokens, rank_env

CFG = fnlm.TransformerConfig(vocab_size=48, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)
TC = TrainConfig(batch_size=8, steps=4, eval_interval=2, eval_batches=2, checkpoint_interval=2, keep_checkpoints=0,
                 log_interval=1, progress=False, plot=False, device="cpu", data_shards=2,
                 step=fnlm.StepConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1))
MODES = ("optimizer", "params")


def _tokens(n=3000, seed=0):
    return patterned_tokens(CFG.vocab_size, n, seed)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(rank_env(rank, world, port))
    root = Path(root)
    with distributed.process_group(device="cpu", startup_timeout=60) as par:
        for mode in MODES:
            sharded = make_sharded_parallel(par, mode)
            tc = replace(TC, shard=mode)
            res = trainer.train(CFG, tc, _tokens(), _tokens(seed=1), root / mode, parallel=sharded)
            if par.is_main:
                ck = root / f"{mode}-resume" / "checkpoints"
                ck.mkdir(parents=True)
                shutil.copyfile(root / mode / "checkpoints" / "step_0000002.pt", ck / "latest.pt")
            par.barrier()
            resumed = trainer.train(CFG, tc, _tokens(), _tokens(seed=1), root / f"{mode}-resume", parallel=sharded,
                                    resume=True)
            if par.is_main:
                torch.save({"result": res, "resumed": resumed}, root / f"{mode}.pt")
        # plain data parallelism with gradient accumulation: each rank's 4 sequences as 2 micro-batches of 2
        trainer.train(CFG, TC.with_step(grad_accum_steps=2), _tokens(), _tokens(seed=1), root / "accum", parallel=par)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


def _params(folder: Path):
    return fnlm.tree_flatten(fnlm.load_checkpoint(folder / "checkpoints" / "latest.pt")["params"])


@pytest.mark.parametrize("mode", MODES)
def test_two_sharded_ranks_equal_one_process_and_resume_exactly(two_ranks, tmp_path, mode):
    single = trainer.train(CFG, TC, _tokens(), _tokens(seed=1), tmp_path / "single")
    ref, got = _params(tmp_path / "single"), _params(two_ranks / mode)
    assert set(ref) == set(got) and all(type(t) is torch.Tensor for t in got.values())  # whole tensors saved
    worst = max(float(((got[k] - ref[k]).abs() / ref[k].abs().clamp_min(1e-3)).max()) for k in ref)
    assert worst < 1e-5, worst
    out = torch.load(two_ranks / f"{mode}.pt", weights_only=False)
    assert out["result"]["step"] == 4 and out["result"]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    resumed = _params(two_ranks / f"{mode}-resume")
    assert all(torch.equal(resumed[k], got[k]) for k in got), "resume from the sharded run's checkpoint is not exact"
    ck = fnlm.load_checkpoint(two_ranks / mode / "checkpoints" / "latest.pt")
    assert ck["train_config"]["shard"] == mode and ck["world_size"] == 2
    # the gathered state continues in one process (another process count, the same data shards)
    shutil.copytree(two_ranks / mode, tmp_path / "continued")
    one = trainer.train(CFG, replace(TC, shard=None), _tokens(), _tokens(seed=1), tmp_path / "continued", resume=True)
    assert one["resumed_from"] == 4 and one["step"] == 4


def test_gradient_accumulation_data_parallel_equals_one_process_whole_batches(two_ranks, tmp_path):
    trainer.train(CFG, TC, _tokens(), _tokens(seed=1), tmp_path / "single")
    ref, got = _params(tmp_path / "single"), _params(two_ranks / "accum")
    worst = max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)  # of each leaf's scale
    assert worst < 1e-6, worst


def test_shard_without_a_sharded_group_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a sharded process group"):
        trainer.train(CFG, replace(TC, shard="optimizer"), _tokens(), _tokens(seed=1), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
