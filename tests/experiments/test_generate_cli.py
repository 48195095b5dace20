"""`experiments/generate.py` as a user types it: every flag of its own is checked before anything
is loaded (one line on stderr, exit code 2), `--help` shows the defaults, `--prompt-ids` and
`--num-samples` do what they say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fnlm
from fnlm.tokenizer import ENDOFTEXT

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "generate.py"
TEXT = "Once upon a time there was a little cat. The cat liked to play.<|endoftext|>" * 30


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FNLM_TYPECHECK"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, flag, says",
    [
        (["--top-p", "0"], "--top-p", "in (0, 1]"), (["--top-p", "2"], "--top-p", "in (0, 1]"),
        (["--top-p", "nan"], "--top-p", "finite"), (["--top-p", "x"], "--top-p", "a number"),
        (["--temperature", "-1"], "--temperature", ">= 0"), (["--temperature", "nan"], "--temperature", "finite"),
        (["--temperature", "inf"], "--temperature", "finite"),
        (["--max-new-tokens", "-1"], "--max-new-tokens", ">= 0"), (["--max-new-tokens", "2.5"], "--max-new-tokens", "integer"),
        (["--num-samples", "-1"], "--num-samples", ">= 1"), (["--num-samples", "0"], "--num-samples", ">= 1"),
        (["--seed", "-1"], "--seed", ">= 0"), (["--seed", str(2**64)], "--seed", "below 2**63"),
        (["--prompt-ids", "1 x 3"], "--prompt-ids", "'x'"), (["--prompt-ids", ""], "--prompt-ids", "got none"),
        (["--prompt-ids", "-3"], "--prompt-ids", "'-3'"), (["--prompt-ids", "1 ٣"], "--prompt-ids", "'٣'"),
        (["--device", "gpu"], "--device", "'gpu'"),
        (["--prompt", "hi", "--prompt-ids", "1"], "--prompt-ids", "not allowed with argument --prompt"),
        (["--bogus", "1"], "unrecognized arguments", "--bogus"),
    ],
)
def test_each_bad_flag_is_one_line_and_exit_2_before_loading(tmp_path, args, flag, says):
    """The checkpoint does not exist: a message about the flag shows it was checked before any load."""
    proc = run("--checkpoint", str(tmp_path / "absent.pt"), *args, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate.py: error: "), proc.stderr
    assert flag in lines[0] and says in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, says",
    [(["--hf", "x", "--tokenizer", "t"], "--tokenizer goes with --checkpoint"),
     (["--hf", "x", "--llama2c-tokenizer", "t"], "--llama2c-tokenizer goes with --llama2c"),
     (["--prompt", "hi"], "one of the arguments --checkpoint --hf --llama2c is required")],
)
def test_flags_that_do_not_go_together_are_one_line(args, says):
    proc = run(*args, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_help_shows_the_defaults():
    proc = run("--help", timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for shown in ("(default: 256)", "(default: 0.8)", "(default: 0.95)", "(default: 1)", "(default: auto)",
                  "--num-samples N", "--prompt-ids IDS"):
        assert shown in text, shown
    assert "(default: None)" not in text


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    (run_dir / "tokenizer").mkdir(parents=True)
    (run_dir / "text.txt").write_text(TEXT)
    vocab, merges = fnlm.train_bpe(run_dir / "text.txt", 280, [ENDOFTEXT], progress=False)
    tok = fnlm.Tokenizer(vocab, merges, [ENDOFTEXT])
    tok.save(run_dir / "tokenizer")
    config = fnlm.TransformerConfig(vocab_size=280, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    params = fnlm.init_transformer_lm(config, seed=0)
    params["lm_head"]["weight"] = params["lm_head"]["weight"] * 30
    fnlm.save_checkpoint(run_dir / "checkpoints" / "latest.pt", params=params, opt_state={}, step=1, config=config,
                         tokenizer_fingerprint=tok.fingerprint())
    return run_dir, tok, params, config


def test_prompt_ids_start_the_checkpoint_model(run_folder):
    """Before: `--prompt-ids` was ignored with `--checkpoint` (the text 'Once upon a time' was used)."""
    run_dir, tok, params, config = run_folder
    start = tok.encode("The cat")
    new = fnlm.generate(params, config, start, max_new_tokens=6, temperature=0, eos_id=tok.special_ids[ENDOFTEXT])
    proc = run("--checkpoint", str(run_dir), "--prompt-ids", ",".join(map(str, start)), "--max-new-tokens", "6",
               "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tok.decode(start + new) + "\n" and proc.stdout.startswith("The cat")
    assert tok.decode(tok.encode("Once upon a time")) not in proc.stdout


def test_num_samples_draws_with_consecutive_seeds(run_folder):
    run_dir, tok, params, config = run_folder
    start = tok.encode("Once upon a time")
    eot = tok.special_ids[ENDOFTEXT]
    want = ["Once upon a time" + tok.decode(fnlm.generate(params, config, start, max_new_tokens=5, temperature=1.0,
                                                           eos_id=eot, seed=seed)) for seed in (7, 8, 9)]
    proc = run("--checkpoint", str(run_dir), "--num-samples", "3", "--seed", "7", "--max-new-tokens", "5",
               "--temperature", "1", "--top-p", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "\n\n".join(want) + "\n"
    assert len(set(want)) > 1


def test_prompt_ids_outside_the_vocab_are_one_line(run_folder):
    run_dir, *_ = run_folder
    proc = run("--checkpoint", str(run_dir), "--prompt-ids", "1 280", "--max-new-tokens", "2", "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["generate.py: error: prompt ids must lie in [0, 280) (vocab_size=280); got [280]"]
