"""A tqdm bar only when one is asked for, so that importing the tokenizer never loads tqdm."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, show: bool, **options) -> Iterator:
    """A tqdm bar over `total` (closed on exit) when `show`, else an object whose
    ``update`` does nothing."""
    if not show:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, **options)
    try:
        yield bar
    finally:
        bar.close()
