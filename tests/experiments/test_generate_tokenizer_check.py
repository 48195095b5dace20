"""`experiments/generate.py` refuses a tokenizer other than the one its checkpoint was trained with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fnlm
from fnlm.tokenizer import ENDOFTEXT

REPO = Path(__file__).resolve().parents[2]
TEXT = "Once upon a time there was a little cat. The cat liked to play.<|endoftext|>" * 30


def _tokenizer(folder: Path, vocab_size: int) -> fnlm.Tokenizer:
    folder.mkdir(parents=True)
    (folder / "text.txt").write_text(TEXT)
    vocab, merges = fnlm.train_bpe(folder / "text.txt", vocab_size, [ENDOFTEXT], progress=False)
    tok = fnlm.Tokenizer(vocab, merges, [ENDOFTEXT])
    tok.save(folder / "vocab.json", folder / "merges.txt")
    return tok


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "generate.py"), *args, "--max-new-tokens", "5",
                           "--seed", "0"], env=dict(os.environ, FNLM_TYPECHECK="0", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)


def test_generate_refuses_another_runs_tokenizer(tmp_path):
    run = tmp_path / "run"
    own = _tokenizer(run / "tokenizer", 280)
    other = _tokenizer(tmp_path / "other" / "tokenizer", 270)
    config = fnlm.TransformerConfig(vocab_size=280, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    params = fnlm.init_transformer_lm(config, seed=0)
    fnlm.save_checkpoint(run / "checkpoints" / "latest.pt", params=params, opt_state={}, step=1, config=config,
                         tokenizer_fingerprint=own.fingerprint())
    ok = _generate("--checkpoint", str(run), "--prompt", "Once upon")
    assert ok.returncode == 0 and ok.stdout.startswith("Once upon"), ok.stderr
    bad = _generate("--checkpoint", str(run), "--tokenizer", str(tmp_path / "other" / "tokenizer"))
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr
    assert own.fingerprint()[:12] in lines[0] and other.fingerprint()[:12] in lines[0]
    assert str(tmp_path / "other" / "tokenizer") in lines[0] and "--tokenizer" in lines[0]


def test_generate_names_a_missing_checkpoint_or_tokenizer_in_one_line(tmp_path):
    gone = _generate("--checkpoint", str(tmp_path / "nothing-here"))
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert gone.stderr.strip().splitlines() == [f"generate.py: error: no checkpoint at {tmp_path / 'nothing-here'}"
                                                " (give a run folder or a .pt file)"]
    config = fnlm.TransformerConfig(vocab_size=280, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    fnlm.save_checkpoint(tmp_path / "lonely.pt", params=fnlm.init_transformer_lm(config), opt_state={}, step=1,
                         config=config)
    alone = _generate("--checkpoint", str(tmp_path / "lonely.pt"))
    assert alone.returncode == 2 and "no tokenizer folder found" in alone.stderr and "Traceback" not in alone.stderr
