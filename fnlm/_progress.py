"""Progress bars without a hard dependency: `progress_bar(...)` is a tqdm bar when tqdm is installed
(`pip install fnlm[progress]`) and a silent stand-in otherwise. tqdm is imported on the first bar
shown, never by `import fnlm` nor by the tokenizer (which needs neither torch nor tqdm)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress_bar"]


class _Silent:
    """Accepts tqdm's calls and shows nothing."""

    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any):
        self.iterable = iterable
        self.n = 0

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """`tqdm.auto.tqdm(iterable, **kwargs)`, or a silent stand-in when `disable=True` or tqdm is absent."""
    if not kwargs.get("disable"):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, **kwargs)
    return _Silent(iterable, **kwargs)
