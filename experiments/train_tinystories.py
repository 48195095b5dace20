"""Train a Transformer LM on TinyStories, or on fnlm's embedded story corpus, end to end.

    python experiments/train_tinystories.py                  # demo: embedded corpus, about 2½ min on 2 CPU cores
    python experiments/train_tinystories.py --data           # TinyStoriesV2 in data/tinystories (downloaded if missing)
    python experiments/train_tinystories.py --data DIR --preset h100 --out runs/h100
    python experiments/train_tinystories.py --train-file owt_train.txt --valid-file owt_valid.txt --vocab-size 32000
    python experiments/train_tinystories.py --out runs/demo --resume          # continue after an interruption
    python experiments/train_tinystories.py --stage sample --temperature 0.7  # rerun one stage
    torchrun --nproc_per_node=2 experiments/train_tinystories.py --preset smoke  # data-parallel (fnlm.train.parallel)

Stages (data, tokenizer, encode, train, evaluate, sample) are cached in the run folder; every
model, optimizer and pipeline setting is a flag (see --help; `--preset NAME --help` shows that
preset's defaults). The demo took 2 min 32 s on 2 CPU cores (the README's measured figure).

A rerun never deletes checkpoints: a folder holding an earlier run is continued with --resume or
started over with --overwrite, else refused. Ctrl-C saves a checkpoint and prints the step and
file. Settings that cannot work are reported before any stage runs, in one line (exit code 2).
The work is in `tinystories.stages`.
"""

from __future__ import annotations

import sys

from tinystories.stages import script
from torch.distributed.elastic.multiprocessing.errors import record


@record
def _entry() -> None:
    sys.exit(script())


if __name__ == "__main__":
    _entry()
