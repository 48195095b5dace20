"""Train a Transformer LM on TinyStories, or on fnlm's embedded story corpus, end to end.

    python experiments/train_tinystories.py                  # demo: embedded corpus, ~10 min on 2 CPU cores
    python experiments/train_tinystories.py --data           # TinyStoriesV2 in data/tinystories (downloaded if missing)
    python experiments/train_tinystories.py --data DIR --preset h100 --out runs/h100
    python experiments/train_tinystories.py --train-file owt_train.txt --valid-file owt_valid.txt --vocab-size 32000
    python experiments/train_tinystories.py --out runs/demo --resume          # continue after an interruption
    python experiments/train_tinystories.py --stage sample --temperature 0.7  # rerun one stage
    torchrun --nproc_per_node=2 experiments/train_tinystories.py --preset smoke  # data-parallel (fnlm.distributed)

Stages (data, tokenizer, encode, train, evaluate, sample) are cached in the run folder; every
model, optimizer and pipeline setting is a flag (see --help). The work is in `fnlm.pipeline`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from fnlm import distributed  # noqa: E402
from fnlm.pipeline import main, resolve_settings  # noqa: E402


@record
def _entry() -> None:
    distributed.run(main, device=lambda: resolve_settings().train.device)


if __name__ == "__main__":
    _entry()
