"""What the multi-process tests share: a free TCP port for the rendezvous, a rank's environment as
torchrun sets it, and token streams with a pattern a tiny model can learn."""

from __future__ import annotations

import socket

import numpy as np


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank `rank` of `world` on one machine (one thread per rank)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "FNLM_NUM_THREADS": "1"}


def patterned_tokens(vocab_size: int, n: int = 3000, seed: int = 0) -> np.ndarray:
    """`n` uint16 ids counting up by 7 modulo `vocab_size`, a fifth replaced by noise from `seed`."""
    rng = np.random.default_rng(seed)
    base = (np.arange(n) * 7) % vocab_size
    return np.where(rng.random(n) < 0.2, rng.integers(0, vocab_size, n), base).astype(np.uint16)
