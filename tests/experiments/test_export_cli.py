"""`train_tinystories.py --export-hf DIR` through the real script: the trained model lands in DIR as a
Hugging Face Llama folder that transformers loads to fnlm's logits, with the run's tokenizer; an
ablation that Llama cannot hold, or a folder without a trained model, is refused up front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fnlm

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "train_tinystories.py"
SMALL = ["--preset", "smoke", "--quiet", "--steps", "4", "--eval-interval", "4", "--checkpoint-interval", "4",
         "--corpus-train-bytes", "60000", "--corpus-valid-bytes", "20000", "--vocab-size", "400", "--num-samples", "1",
         "--sample-tokens", "4"]


def _script(args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FNLM_TYPECHECK="0")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_export_hf_after_training_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    proc = _script([*SMALL, "--out", "run", "--export-hf", "run/hf"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = tmp_path / "run" / "hf"
    assert "export: run/hf" in proc.stderr
    ck = fnlm.load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    config = fnlm.TransformerConfig(**ck["config"])
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    ours = fnlm.Tokenizer.from_files(tmp_path / "run" / "tokenizer")
    text = "Once upon a time, Lily saw a big dog.<|endoftext|>"
    ids = hf_tok(text).input_ids
    assert ids == ours.encode(text)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, fnlm.transformer_lm(ck["params"], torch.tensor(ids), config), rtol=1e-4, atol=1e-4)


def test_export_hf_refuses_what_llama_cannot_hold_before_any_stage(tmp_path):
    proc = _script([*SMALL, "--out", "run", "--norm-position", "post", "--export-hf", "hf"], tmp_path)
    assert proc.returncode == 2 and "--norm-position post" in proc.stderr and "Traceback" not in proc.stderr
    proc = _script([*SMALL, "--out", "run", "--stage", "data", "--export-hf", "hf"], tmp_path)
    assert proc.returncode == 2 and "export-hf" in proc.stderr and "add tokenizer to --stage" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf").exists()
