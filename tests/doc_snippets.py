"""What the documentation tests share: the fenced blocks of a markdown file, running a page's
Python blocks in one fresh process, and checking its command lines against the real scripts.

A block right after a `<!-- not run: why -->` line is not run (it needs a download or a GPU); the
comment is visible in the source so a reader knows why. Blocks run in the page's order in one
namespace, compiled under the page's own path and line numbers, so a failure's traceback points at
the line of the markdown file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: [^>]*-->")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


@dataclass(frozen=True)
class Block:
    """A fenced block: its language, its code, the line of the markdown file its code starts on,
    and why it is not run (`None` when it runs)."""

    lang: str
    code: str
    line: int
    not_run: str | None


def blocks(path: Path, lang: str | None = None) -> list[Block]:
    """The fenced blocks of a markdown file (of language `lang`, or all), in order."""
    text = path.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        if lang is None or m.group("lang") == lang:
            found.append(Block(m.group("lang"), m.group("code"), line, m.group("why")))
    return found


def pages() -> list[Path]:
    """Every markdown page of the docs site (the benchmarks' README is included into one)."""
    return sorted(DOCS.rglob("*.md"))


def env() -> dict[str, str]:
    """The environment a user has: fnlm and `experiments/` importable, shape checks off."""
    out = {k: v for k, v in os.environ.items() if k not in ("FNLM_TYPECHECK", "OMP_NUM_THREADS")}
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "experiments")])
    return out


RUNNER = """
import json, sys

def _run_blocks(spec):
    page, blocks = json.load(open(spec, encoding="utf-8"))
    main = sys.modules["__main__"].__dict__     # the blocks' globals are __main__'s, as in a script
    for line, code in blocks:
        exec(compile("\\n" * (line - 1) + code, page, "exec"), main)

_run_blocks(sys.argv[1])
"""


def run_python_blocks(path: Path, cwd: Path, *, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the page's runnable Python blocks, in order, in one fresh process in `cwd`."""
    runnable = [(b.line, b.code) for b in blocks(path, "python") if b.not_run is None]
    spec = cwd / f".{path.stem}.blocks.json"
    spec.write_text(json.dumps([str(path.relative_to(REPO)), runnable]), encoding="utf-8")
    return subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def command_lines(path: Path) -> list[list[str]]:
    """The `python ...` and `torchrun ...` command lines of the page's shell blocks (comments and
    line continuations removed), run or not."""
    lines = []
    for block in blocks(path, "bash"):
        for line in block.code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            words = shlex.split(line) if line else []
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words and words[0] in ("python", "torchrun"):
                lines.append(words)
    return lines


def _script_flags(script: Path) -> set[str]:
    text = script.read_text(encoding="utf-8")
    flags = set(re.findall(r"[\"'](--[a-z0-9][a-z0-9-]*)[\"']", text))
    if "add_model_args" in text:
        harness = (REPO / "benchmarks" / "harness.py").read_text(encoding="utf-8")
        sizes = re.search(r"MODEL_17M = dict\((.*?)\)", harness).group(1)
        flags |= {"--" + name.replace("_", "-") for name in re.findall(r"(\w+)=", sizes)}
    return flags | {"--help"}


def check_command_line(words: list[str]) -> str | None:
    """Check one command line against the script it names: the script exists, and its flags are
    accepted (the training and ablation scripts' real parsers; other scripts' flags must be defined
    in their source). Returns the script checked, or `None` for a line that names no script
    (`python -m pytest`)."""
    from run_ablations import build_parser as ablations_parser
    from tinystories.cli import build_parser

    script = next((w for w in words if w.endswith(".py")), None)
    if script is None:
        return None
    path = REPO / script
    assert path.is_file(), f"{' '.join(words)}: no script {script}"
    args = words[words.index(script) + 1:]
    if script == "experiments/train_tinystories.py":
        build_parser().parse_args(args)
    elif script == "experiments/run_ablations.py":
        _, rest = ablations_parser().parse_known_args(args)
        build_parser().parse_args(rest)
    else:
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in _script_flags(path)]
        assert not unknown, f"{' '.join(words)}: {script} defines no {unknown}"
    return script


def slug(heading: str) -> str:
    """The anchor Python-Markdown's `toc` extension gives a heading (its default `slugify`)."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file (code blocks left out)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(text)}


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file or heading anchor does not exist."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return bad
