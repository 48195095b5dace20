"""The docs site (docs/, mkdocs.yml) does what it says.

- Every page's Python blocks run as written: one fresh process per page, blocks in order in one
  namespace (after a small smoke run has made the `runs/demo` that some pages read). A block right
  after `<!-- not run: why -->` is skipped.
- Every `python ...` / `torchrun ...` command line names a real script and flags it accepts.
- Every public name (the `__all__` of `fnlm`, `fnlm.nn`, `fnlm.train`, `fnlm.tokenizer`,
  `fnlm.interop`, `fnlm.compat`) is documented on an API reference page, so a name added later
  must be documented; every `::: target` there resolves.
- Every relative link and heading anchor resolves; `mkdocs build --strict` passes.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.doc_snippets import (
    DOCS,
    REPO,
    blocks,
    broken_links,
    check_command_line,
    command_lines,
    env,
    pages,
    run_python_blocks,
)

NAMESPACES = ("fnlm", "fnlm.nn", "fnlm.train", "fnlm.tokenizer", "fnlm.interop", "fnlm.compat", "fnlm.optim",
              "fnlm.precision", "fnlm.train.sharding")
DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.M)
PAGES_WITH_CODE = [p for p in pages() if any(b.not_run is None for b in blocks(p, "python"))]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A `runs/demo` made by the main job at the smoke preset's size (the pages that read one)."""
    root = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "train_tinystories.py"), "--preset", "smoke",
                           "--out", "runs/demo", "--steps", "6", "--eval-interval", "6", "--checkpoint-interval", "6",
                           "--quiet", "--num-samples", "1", "--sample-tokens", "4"],
                          cwd=root, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "demo"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_of_each_page_run(page, tmp_path, request):
    if "runs/demo" in "".join(b.code for b in blocks(page, "python") if b.not_run is None):
        shutil.copytree(request.getfixturevalue("demo_run"), tmp_path / "runs" / "demo")
    proc = run_python_blocks(page, tmp_path)
    assert proc.returncode == 0, f"{page.relative_to(REPO)}:\n{proc.stderr[-4000:]}"


def test_the_pages_that_must_run_code_have_some():
    names = {str(p.relative_to(DOCS)) for p in PAGES_WITH_CODE}
    for page in ("getting-started.md", "concepts/params-trees.md", "concepts/transforms.md", "guides/training.md",
                 "guides/ablations.md", "guides/sweeps.md", "guides/optimizers.md", "guides/tokenizer.md",
                 "guides/formats.md"):
        assert page in names, page


def test_blocks_not_run_say_why():
    skipped = [(p, b) for p in [REPO / "README.md", *pages()] for b in blocks(p, "python") if b.not_run is not None]
    for page, block in skipped:
        assert len(block.not_run.split()) >= 3, f"{page.relative_to(REPO)}:{block.line}: say why it is not run"


def test_command_lines_name_real_scripts_and_flags():
    scripts = set()
    for page in pages():
        for words in command_lines(page):
            scripts.add(check_command_line(words))
    assert {"experiments/train_tinystories.py", "experiments/run_ablations.py", "experiments/generate.py",
            "benchmarks/device_check.py", "benchmarks/train_step.py", "benchmarks/sweep.py"} <= scripts, scripts


def _resolve(target: str):
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def _documented() -> dict[str, set[tuple[str, int]]]:
    """`{page: {(short name, id(object))}}` for every `::: target` of the API reference."""
    out = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        targets = DIRECTIVE.findall(page.read_text(encoding="utf-8"))
        out[page.name] = {(t.rsplit(".", 1)[-1], id(_resolve(t))) for t in targets}
    return out


def test_every_public_name_is_in_the_api_reference():
    documented = set().union(*_documented().values())
    missing = []
    for ns in NAMESPACES:
        module = importlib.import_module(ns)
        for name in module.__all__:
            if (name, id(getattr(module, name))) not in documented:
                missing.append(f"{ns}.{name}")
    assert not missing, f"public names with no `::: path` on a docs/api page: {missing}"


def test_each_name_is_documented_once():
    seen: dict[tuple[str, int], str] = {}
    for page, entries in _documented().items():
        for entry in entries:
            assert entry not in seen, f"{entry[0]} is documented on both {seen[entry]} and {page}"
            seen[entry] = page


def test_links_and_anchors_resolve():
    bad = [f"{p.relative_to(REPO)}: {b}" for p in pages() + [REPO / "benchmarks" / "README.md"] for b in broken_links(p)]
    assert not bad, bad


def test_every_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for page in pages():
        assert str(page.relative_to(DOCS)) in nav, f"{page.relative_to(DOCS)} is not in mkdocs.yml's nav"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (pip install -e '.[docs]')")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env={**env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "model" / "index.html").is_file()


def test_every_benchmark_prints_the_machine_threads_and_load():
    """benchmarks/README.md says every script prints the machine, its threads and the load average
    at its start and end: each script calls the harness's `print_machine` and `print_done`, and
    each is in the README's table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import harness

    shared = {"harness.py", "reference.py", "tokenizer_refs.py"}
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name not in shared)
    table = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    for script in scripts:
        text = script.read_text(encoding="utf-8")
        assert "print_machine(" in text and "print_done(" in text, f"{script.name} does not print the machine"
        assert f"`{script.name}`" in table, f"{script.name} is missing from benchmarks/README.md"
    line = harness.machine_line(threads="one thread")
    assert line.startswith("machine: CPU ") and "one thread" in line and "load average" in line
    import torch

    assert f"{torch.get_num_threads()} threads" in harness.machine_line()
