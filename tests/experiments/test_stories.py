"""The embedded story corpus: deterministic, split, varied, well-formed; the plots as data."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fnlm.tokenizer import ENDOFTEXT
from tinystories import stories

_PRONOUNS = {
    "she": re.compile(r"\b(she|her|hers|herself)\b", re.IGNORECASE),
    "he": re.compile(r"\b(he|him|his|himself)\b", re.IGNORECASE),
}
_OTHER = {"she": "he", "he": "she"}
_PLOTS = {plot.name: plot for plot in stories.PLOTS}


def _take(seed: int, stream: str, n: int) -> list[str]:
    return list(itertools.islice(stories.iter_stories(seed, stream), n))


def _walk(steps):
    """Every step of `steps`, descending into branches."""
    for step in steps:
        yield step
        if isinstance(step, stories.Branch):
            yield from _walk(step.then)
            yield from _walk(step.otherwise)


def _columns(pick: stories.Pick) -> dict[str, list[str]]:
    """The values a :class:`stories.Pick` can put into each of its keys."""
    if isinstance(pick.keys, str):
        return {pick.keys: list(pick.options)}
    return {key: [option[i] for option in pick.options] for i, key in enumerate(pick.keys)}


def _picked(plot: stories.Plot) -> dict[str, list[str]]:
    out = {}
    for step in _walk(plot.steps):
        if isinstance(step, stories.Pick):
            out.update(_columns(step))
    return out


def _templates(plot: stories.Plot) -> set[str]:
    """The templates a plot can tell: its steps' alternatives, what its `Tell` steps tell, its morals."""
    out, picked = set(plot.morals), _picked(plot)
    for step in _walk([*plot.opening, *plot.steps]):
        if isinstance(step, tuple):
            out.update(step)
        elif isinstance(step, stories.Tell):
            out.update(picked[step.key])
    return out


def _strings(plot: stories.Plot) -> list[str]:
    """Every string in a plot's data: its templates and every value a `Pick` can set."""
    return sorted(_templates(plot) | {v for values in _picked(plot).values() for v in values})


def _expansions(template: str) -> list[str]:
    """Every way to fill a template's ``[a|b]`` choices and ``<feeling>`` words (placeholders left)."""
    parts = re.split(r"(\[[^\[\]]*\]|<\w+>)", template)
    options = [p[1:-1].split("|") if p.startswith("[") else stories._FEEL[p[1:-1]] if p.startswith("<") else [p]
               for p in parts]
    return ["".join(combo) for combo in itertools.product(*options)]


def _told(seed: int, plot: stories.Plot) -> tuple[dict[str, str], str]:
    _, ctx, text = stories._tell(random.Random(seed), (plot,))
    return ctx, text


def test_same_seed_same_stories_and_prefix_stable():
    a = _take(7, "train", 50)
    b = _take(7, "train", 80)
    assert a == b[:50]


def test_seeds_and_streams_differ():
    train = _take(0, "train", 200)
    assert train != _take(1, "train", 200)
    valid = _take(0, "valid", 200)
    assert len(set(train) & set(valid)) <= 2


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63))
def test_train_and_valid_streams_are_disjoint(seed):
    train, valid = _take(seed, "train", 60), _take(seed, "valid", 60)
    assert not set(train) & set(valid)
    assert len(set(train)) == len(train)


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


def _assert_well_formed(story: str) -> None:
    assert not set(story) & set("{}[]<>|"), story
    assert story[0].isupper()
    assert story.rstrip()[-1] in '.!"'
    assert story.count('"') % 2 == 0
    assert 2 <= len(story.split("\n\n")) <= 3
    assert ENDOFTEXT not in story
    for sentence in re.split(r"(?<=[.!?])\s+", story):
        assert sentence[0].isupper() or sentence[0] == '"', sentence


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 30))
def test_story_is_well_formed(seed, index):
    _assert_well_formed(_take(seed, "train", index + 1)[-1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**63), plot=st.sampled_from(stories.PLOTS))
def test_each_plot_tells_well_formed_stories(seed, plot):
    _assert_well_formed(_told(seed, plot)[1])


def test_plots_are_distinct_and_every_plot_is_reachable():
    assert len(stories.PLOTS) == 14
    assert len({p.name for p in stories.PLOTS}) == len(stories.PLOTS)
    rng = random.Random("fnlm-stories/train/0")
    told = [stories._tell(rng) for _ in range(1400)]
    assert [text for _, _, text in told] == _take(0, "train", 1400)
    counts = {p.name: 0 for p in stories.PLOTS}
    for plot, _, _ in told:
        counts[plot.name] += 1
    assert min(counts.values()) > 60, counts


def test_every_template_is_reachable(monkeypatch):
    """3000 stories of the demo stream tell every template of every plot, both sides of every branch."""
    filled: set[str] = set()
    fill = stories._Teller.fill

    def recording_fill(self, template):
        filled.add(template)
        return fill(self, template)

    monkeypatch.setattr(stories._Teller, "fill", recording_fill)
    _take(0, "train", 3000)
    templates = set().union(*map(_templates, stories.PLOTS)) | {e for e in stories._ENDINGS if e}
    assert len(templates) > 300
    assert not templates - filled
    assert filled <= templates


@functools.cache
def _contexts(plot_name: str) -> list[dict[str, str]]:
    plot = _PLOTS[plot_name]
    return [_told(seed, plot)[0] for seed in range(12)]


@pytest.mark.parametrize("plot", stories.PLOTS, ids=lambda p: p.name)
def test_every_template_fills_completely(plot):
    """Each choice of each template, filled with real story contexts, leaves no placeholder behind."""
    for template in _strings(plot):
        assert template.count("[") == template.count("]") and template.count("{") == template.count("}"), template
        for text in _expansions(template):
            for ctx in _contexts(plot.name):
                filled = text.format(**ctx)
                assert not set(filled) & set("{}[]<>|"), (template, filled)


@pytest.mark.parametrize("plot", stories.PLOTS, ids=lambda p: p.name)
def test_no_template_hard_codes_a_pronoun(plot):
    for template in _strings(plot) + list(stories._HOBBIES):
        bare = re.sub(r"\{\w+\}", "X", template)
        for pattern in _PRONOUNS.values():
            assert not pattern.search(bare), (plot.name, template)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**63))
def test_pronouns_agree_with_the_characters(seed):
    plot, ctx, text = stories._tell(random.Random(seed))
    for prefix, he in (("name", ctx["he"]), ("friend", ctx["friend_he"])):
        kind = ctx[prefix + "_kind"]
        if kind.endswith("girl"):
            assert he == "she"
        if kind.endswith("boy"):
            assert he == "he"
        assert (ctx[prefix + "_him"], ctx[prefix + "_his"]) == {"she": ("her", "her"), "he": ("him", "his")}[he]
    assert (ctx["name_he"], ctx["name_him"], ctx["name_his"]) == (ctx["he"], ctx["him"], ctx["his"])
    assert ctx["parent_he"] == ("she" if ctx["parent"] in ("mom", "grandma") else "he")
    genders = {ctx["he"], ctx["friend_he"], ctx["parent_he"]}
    if len(genders) == 1:
        (gender,) = genders
        assert not _PRONOUNS[_OTHER[gender]].search(text), (plot.name, text)


def _pattern(template: str) -> str:
    """A regular expression for every text `template` can fill to."""
    out = ""
    for part in re.split(r"(\[[^\[\]]*\]|<\w+>|\{\w+\})", template):
        if part.startswith("["):
            out += "(?:" + "|".join(_pattern(a) for a in part[1:-1].split("|")) + ")"
        elif part.startswith("<"):
            out += "(?:" + "|".join(map(re.escape, stories._FEEL[part[1:-1]])) + ")"
        elif part.startswith("{"):
            out += r'[^"\n]+?'
        else:
            out += re.escape(part)
    return out


def _steps_pattern(steps, told: dict[str, list[str]]) -> list[str]:
    out = []
    for step in steps:
        if isinstance(step, tuple):
            out.append("(?:" + "|".join(map(_pattern, step)) + ")")
        elif isinstance(step, stories.Branch):
            then, otherwise = _steps_pattern(step.then, told), _steps_pattern(step.otherwise, told)
            out.append("(?:" + _SEP.join(then) + "|" + _SEP.join(otherwise) + ")")
        elif isinstance(step, stories.Tell):
            out.append("(?:" + "|".join(map(_pattern, told[step.key])) + ")")
    return out


_SEP = r"(?: |\n\n)"


def _plot_regex(plot: stories.Plot) -> re.Pattern:
    return _plot_regex_by_name(plot.name)


@functools.cache
def _plot_regex_by_name(name: str) -> re.Pattern:
    plot = _PLOTS[name]
    body = _SEP.join(_steps_pattern([*plot.opening, *plot.steps], _picked(plot)))
    moral = "(?:" + "|".join(map(_pattern, plot.morals)) + ")"
    ending = "(?: (?:" + "|".join(_pattern(e) for e in stories._ENDINGS if e) + "))?"
    return re.compile(body + r"\n\n" + moral + ending, re.IGNORECASE)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**63), plot=st.sampled_from(stories.PLOTS))
def test_a_story_tells_its_plot_steps_in_order(seed, plot):
    """The text is one sentence per step, in the plot's order, split into paragraphs, then a moral."""
    _, text = _told(seed, plot)
    assert _plot_regex(plot).fullmatch(text), (plot.name, text)
    other = stories.PLOTS[(stories.PLOTS.index(plot) + 1) % len(stories.PLOTS)]
    assert not _plot_regex(other).fullmatch(text)


@pytest.mark.parametrize("plot", [p for p in stories.PLOTS if any(isinstance(s, stories.NeedObject) for s in p.steps)],
                         ids=lambda p: p.name)
def test_a_plot_that_needs_an_object_gets_one(plot):
    """A story's object keeps its place when it has the tag the plot needs; otherwise the plot draws one."""
    (need,) = [s for s in plot.steps if isinstance(s, stories.NeedObject)]
    replaced = 0
    for seed in range(200):
        ctx, _ = _told(seed, plot)
        _, first = stories._context(random.Random(seed))
        if need.tag in first.tags:
            assert ctx["obj"] == first.name and ctx["oadj"] in first.adjs
        else:
            assert ctx["obj"] in need.names and ctx["oadj"] in need.adjs
            replaced += 1
    assert 0 < replaced < 200


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63), stream=st.sampled_from(["train", "valid"]))
def test_deterministic_per_seed(seed, stream):
    assert _take(seed, stream, 5) == _take(seed, stream, 5)
    rng = random.Random(seed)
    first = [stories.generate_story(rng) for _ in range(3)]
    rng = random.Random(seed)
    assert [stories.generate_story(rng) for _ in range(3)] == first


@pytest.mark.slow
def test_corpus_is_the_same_in_every_process(tmp_path):
    """No set or hash order leaks into the corpus: fresh processes with other hash seeds write the same bytes."""
    code = ("import hashlib, sys; from tinystories import stories; "
            "t, v = stories.write_corpus(sys.argv[1], 30_000, 5_000, seed=11); "
            "print(hashlib.sha256(t.read_bytes() + v.read_bytes()).hexdigest())")
    root = Path(__file__).resolve().parents[2]
    digests, path = set(), os.pathsep.join([str(root), str(root / "experiments")])
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=path)
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / hashseed)], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    t, v = stories.write_corpus(tmp_path / "here", 30_000, 5_000, seed=11)
    assert digests == {hashlib.sha256(t.read_bytes() + v.read_bytes()).hexdigest()}


def test_write_corpus_sizes_split_and_determinism(tmp_path):
    train, valid = stories.write_corpus(tmp_path / "a", 20_000, 5_000, seed=3)
    again, _ = stories.write_corpus(tmp_path / "b", 20_000, 5_000, seed=3)
    assert train.read_bytes() == again.read_bytes()
    assert 20_000 <= train.stat().st_size < 25_000
    assert 5_000 <= valid.stat().st_size < 10_000
    text = train.read_text(encoding="utf-8")
    docs = text.split(ENDOFTEXT + "\n")
    assert docs[-1] == "" and all(d.endswith("\n") for d in docs[:-1])
    assert [d.rstrip("\n") for d in docs[:-1]] == _take(3, "train", len(docs) - 1)
    assert not (set(docs[:-1]) & set(valid.read_text(encoding="utf-8").split(ENDOFTEXT + "\n")[:-1]))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_write_corpus_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="train_bytes=0"):
        stories.write_corpus(tmp_path, 0, 10)
