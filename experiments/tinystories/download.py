"""Getting a text corpus: a folder of TinyStories files, a resumable download, or the embedded stories.

:func:`resolve_corpus` is the one entry point the training script uses. It returns a
:class:`Corpus` (train and validation text files plus where they came from): the files in a
data folder when they are there; otherwise, when asked, the public TinyStoriesV2 files fetched
with :func:`download` (progress bar, resumed over HTTP ``Range`` from a ``.part`` file, a short
connect timeout); and when that fails, one clear line on stderr and the embedded corpus of
`tinystories.stories`.
"""

from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import stories

__all__ = [
    "TINYSTORIES_FILES",
    "TINYSTORIES_URL",
    "Corpus",
    "DownloadError",
    "download",
    "resolve_corpus",
]

TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{name}"
TINYSTORIES_FILES = ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")


class DownloadError(RuntimeError):
    """A download failed (unreachable host, HTTP error, or a short body)."""


@dataclass(frozen=True)
class Corpus:
    """A pair of text files and where they came from (``"tinystories"``, ``"files"``, ``"embedded"``)."""

    train: Path
    valid: Path
    source: str


def _open(url: str, headers: dict[str, str], connect_timeout: float, read_timeout: float, max_redirects: int = 8):
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise DownloadError(f"unsupported URL scheme in {url!r}")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=connect_timeout)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.connect()
            conn.sock.settimeout(read_timeout)
            conn.request("GET", path, headers={"User-Agent": "fnlm", **headers})
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise DownloadError(f"cannot reach {parts.hostname}: {e}") from e
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location")
            resp.read()
            conn.close()
            if not location:
                raise DownloadError(f"redirect without a Location from {url}")
            url = urllib.parse.urljoin(url, location)
            continue
        return conn, resp
    raise DownloadError(f"too many redirects for {url}")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial download.

    Bytes go to ``dest + ".part"``; when it already holds some, the request asks for the rest
    with an HTTP ``Range`` header (a server that answers with the whole file restarts it). The
    finished file is renamed to ``dest``, so ``dest`` exists only when complete. An existing
    ``dest`` is returned untouched.

    **Arguments:**

    - `url`: an ``http://`` or ``https://`` URL (redirects are followed).
    - `dest`: the file to create.
    - `connect_timeout`: seconds to wait for the connection; `read_timeout`: for each read.
    - `progress`: show a tqdm bar.

    **Returns:** ``Path(dest)``. Raises :class:`DownloadError` on any failure; the ``.part``
    file is kept so a later call resumes.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    conn, resp = _open(url, headers, connect_timeout, read_timeout)
    try:
        if resp.status == 416 and have:
            total = _total_from_content_range(resp.getheader("Content-Range"))
            resp.read()
            if total is not None and total == have:
                os.replace(part, dest)
                return dest
            raise DownloadError(f"server refused range {have}- for {url} (HTTP 416)")
        if resp.status == 206:
            total = _total_from_content_range(resp.getheader("Content-Range"))
            start = _start_from_content_range(resp.getheader("Content-Range"))
            if start != have:
                raise DownloadError(f"server resumed at byte {start}, expected {have}, for {url}")
            mode = "ab"
        elif resp.status == 200:
            length = resp.getheader("Content-Length")
            total = int(length) if length is not None else None
            have, mode = 0, "wb"
        else:
            raise DownloadError(f"HTTP {resp.status} {resp.reason} for {url}")
        with open(part, mode) as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=dest.name, disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    block = resp.read(chunk_bytes)
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"connection lost after {have} bytes of {url}: {e}") from e
                if not block:
                    break
                f.write(block)
                have += len(block)
                bar.update(len(block))
        if total is not None and have != total:
            raise DownloadError(f"short download of {url}: {have} of {total} bytes")
    finally:
        conn.close()
    os.replace(part, dest)
    return dest


def _total_from_content_range(value: str | None) -> int | None:
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _start_from_content_range(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def resolve_corpus(
    data_dir: str | os.PathLike | None,
    fallback_dir: str | os.PathLike,
    *,
    embedded_train_bytes: int,
    embedded_valid_bytes: int,
    seed: int = 0,
    download_missing: bool = True,
    base_url: str = TINYSTORIES_URL,
    connect_timeout: float = 5.0,
    progress: bool = True,
    fallback: bool = True,
) -> Corpus:
    """Find or fetch TinyStoriesV2, or fall back to the embedded corpus.

    **Arguments:**

    - `data_dir`: folder that holds (or will hold) ``TinyStoriesV2-GPT4-{train,valid}.txt``;
      ``None`` goes straight to the embedded corpus.
    - `fallback_dir`: where the embedded corpus is written.
    - `embedded_train_bytes`, `embedded_valid_bytes`, `seed`: its size and seed.
    - `download_missing`: fetch missing files from ``base_url.format(name=...)``.
    - `connect_timeout`: seconds before a connection attempt is given up.
    - `fallback`: when TinyStories is not available, use the embedded corpus (saying so in one
      line on stderr); when `False`, raise the :class:`DownloadError` instead (the training script
      does that: a preset sized for TinyStories is no use on the small embedded corpus).

    **Returns:** a :class:`Corpus`.
    """
    if data_dir is not None:
        data_dir = Path(data_dir)
        paths = [data_dir / name for name in TINYSTORIES_FILES]
        missing = [p for p in paths if not p.exists()]
        try:
            if missing and not download_missing:
                raise DownloadError(f"{', '.join(str(p) for p in missing)} not found and downloading is off")
            for p in missing:
                download(base_url.format(name=p.name), p, connect_timeout=connect_timeout, progress=progress)
            return Corpus(paths[0], paths[1], "tinystories")
        except DownloadError as e:
            if not fallback:
                raise
            print(f"fnlm: TinyStories is not available ({e}); using the embedded story corpus instead.", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    train, valid = stories.write_corpus(fallback_dir, embedded_train_bytes, embedded_valid_bytes, seed=seed)
    if progress:
        print(
            f"fnlm: wrote the embedded story corpus ({train.stat().st_size / 1e6:.1f} MB train, "
            f"{valid.stat().st_size / 1e6:.2f} MB valid) in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    return Corpus(train, valid, "embedded")
