"""The embedded story corpus: deterministic, split, varied, well-formed."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinystories import stories


def _take(seed: int, stream: str, n: int) -> list[str]:
    return list(itertools.islice(stories.iter_stories(seed, stream), n))


def test_same_seed_same_stories_and_prefix_stable():
    a = _take(7, "train", 50)
    b = _take(7, "train", 80)
    assert a == b[:50]


def test_seeds_and_streams_differ():
    train = _take(0, "train", 200)
    assert train != _take(1, "train", 200)
    valid = _take(0, "valid", 200)
    assert len(set(train) & set(valid)) <= 2


def test_unknown_stream_is_rejected():
    with pytest.raises(ValueError, match="stream"):
        next(stories.iter_stories(0, "test"))


def test_corpus_is_varied():
    docs = _take(0, "train", 800)
    assert len(set(docs)) == len(docs)
    sentences = {s for d in docs for s in re.split(r'(?<=[.!?"])\s+', d)}
    words = {w.lower() for d in docs for w in re.findall(r"[A-Za-z']+", d)}
    openings = {d.split(".")[0] for d in docs}
    assert len(sentences) > 5000
    assert len(words) > 800
    assert len(openings) > 600
    assert sum('"' in d for d in docs) > 0.9 * len(docs)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 30))
def test_story_is_well_formed(seed, index):
    story = _take(seed, "train", index + 1)[-1]
    assert "{" not in story and "}" not in story and "[" not in story and "<" not in story
    assert story[0].isupper()
    assert story.rstrip()[-1] in '.!"'
    assert story.count('"') % 2 == 0
    assert 2 <= len(story.split("\n\n")) <= 3
    assert stories.EOT not in story
    for sentence in re.split(r"(?<=[.!?])\s+", story):
        assert sentence[0].isupper() or sentence[0] == '"', sentence


def test_write_corpus_sizes_split_and_determinism(tmp_path):
    train, valid = stories.write_corpus(tmp_path / "a", 20_000, 5_000, seed=3)
    again, _ = stories.write_corpus(tmp_path / "b", 20_000, 5_000, seed=3)
    assert train.read_bytes() == again.read_bytes()
    assert 20_000 <= train.stat().st_size < 25_000
    assert 5_000 <= valid.stat().st_size < 10_000
    text = train.read_text(encoding="utf-8")
    docs = text.split(stories.EOT + "\n")
    assert docs[-1] == "" and all(d.endswith("\n") for d in docs[:-1])
    assert [d.rstrip("\n") for d in docs[:-1]] == _take(3, "train", len(docs) - 1)
    assert not (set(docs[:-1]) & set(valid.read_text(encoding="utf-8").split(stories.EOT + "\n")[:-1]))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_write_corpus_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="train_bytes=0"):
        stories.write_corpus(tmp_path, 0, 10)
