"""What the tokenizer benchmarks share: GPT-2's tokenizer in fnlm and in tiktoken, and the texts.

Scripts import it as a sibling (``from tokenizer_refs import gpt2_tokenizer``). Nothing here
imports torch.

- GPT-2's vocab and merges come from ``../shared/fixtures``; tiktoken reads the same files
  offline through ``../shared/tools/seed_tiktoken_gpt2.py`` (a temporary cache folder).
- "Unseen English" is the GCIDE dictionary from the Debian package ``dict-gcide``
  (``apt-get install -y dict-gcide``): ``/usr/share/dictd/gcide.dict.dz`` is dictzip, which
  Python's `gzip` reads; its first megabytes are plain ASCII dictionary entries.
- The hostile texts are single pre-tokens of 100k-300k characters (no spaces), which a
  quadratic BPE loop cannot finish.
"""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")

__all__ = ["ROOT", "FIXTURES", "GCIDE", "gpt2_tokenizer", "tiktoken_gpt2", "gcide_text", "hostile_texts"]


def gpt2_tokenizer():
    """fnlm's Tokenizer with GPT-2's files and ``<|endoftext|>`` as its special token."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fnlm.tokenizer import ENDOFTEXT, Tokenizer

    if not FIXTURES.is_dir():
        sys.exit(f"needs {FIXTURES} (GPT-2's vocab.json and merges.txt)")
    return Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", [ENDOFTEXT])


def seed_tiktoken() -> str:
    """Seed a tiktoken cache folder with GPT-2's files and point TIKTOKEN_CACHE_DIR at it."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    cache = tempfile.mkdtemp(prefix="tiktoken-gpt2-")
    tool = SHARED / "tools" / "seed_tiktoken_gpt2.py"
    subprocess.run([sys.executable, str(tool), cache], check=True, capture_output=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    return cache


def tiktoken_gpt2():
    """tiktoken's ``gpt2`` encoding, offline."""
    seed_tiktoken()
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def gcide_text(mb: float) -> str:
    """The first `mb` MB of the GCIDE dictionary as text."""
    if not GCIDE.is_file():
        sys.exit(f"{GCIDE} not found: install it with `apt-get install -y dict-gcide`, or pass --text FILE")
    with gzip.open(GCIDE, "rb") as f:
        data = f.read(int(mb * 1e6))
    return data.decode("utf-8", errors="ignore")


def hostile_texts(seed: int = 0) -> dict[str, str]:
    """Long single pre-tokens: random letters, digits and CJK characters, and two repeats."""
    rng = random.Random(seed)
    lower = "abcdefghijklmnopqrstuvwxyz"
    return {
        "100k letters": "".join(rng.choice(lower) for _ in range(100_000)),
        "300k letters": "".join(rng.choice(lower + lower.upper()) for _ in range(300_000)),
        "300k digits": "".join(rng.choice("0123456789") for _ in range(300_000)),
        "100k CJK": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(100_000)),
        '"ab" x 100k': "ab" * 100_000,
        '"a" x 100k': "a" * 100_000,
    }
