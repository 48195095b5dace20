"""Train a Transformer LM on TinyStories, or on fnlm's embedded story corpus, end to end.

    python experiments/train_tinystories.py                  # demo: embedded corpus, ~6 min on 2 CPU cores
    python experiments/train_tinystories.py --data           # TinyStoriesV2 in data/tinystories (downloaded if missing)
    python experiments/train_tinystories.py --data DIR --preset h100 --out runs/h100
    python experiments/train_tinystories.py --train-file owt_train.txt --valid-file owt_valid.txt --vocab-size 32000
    python experiments/train_tinystories.py --out runs/demo --resume          # continue after an interruption
    python experiments/train_tinystories.py --stage sample --temperature 0.7  # rerun one stage
    torchrun --nproc_per_node=2 experiments/train_tinystories.py --preset smoke  # data-parallel (fnlm.train.parallel)

Stages (data, tokenizer, encode, train, evaluate, sample) are cached in the run folder; every
model, optimizer and pipeline setting is a flag (see --help). The work is in `tinystories.stages`.
"""

from __future__ import annotations

from tinystories.cli import resolve_settings
from tinystories.stages import main
from torch.distributed.elastic.multiprocessing.errors import record

from fnlm.train import parallel


@record
def _entry() -> None:
    parallel.run(main, device=lambda: resolve_settings().train.device)


if __name__ == "__main__":
    _entry()
