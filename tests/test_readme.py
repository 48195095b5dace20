"""README.md does what it says: its Python blocks run as written, in order, in one fresh process;
its command lines name real scripts and flags they accept; its links resolve; it stays short (a
newcomer reads it whole; the rest is in docs/). A block right after `<!-- not run: why -->` is
skipped (it needs a download or a GPU)."""

from __future__ import annotations

from tests.doc_snippets import REPO, blocks, broken_links, check_command_line, command_lines, run_python_blocks

README = REPO / "README.md"
MAX_LINES = 250


def test_python_blocks_run_as_written(tmp_path):
    runnable = [b for b in blocks(README, "python") if b.not_run is None]
    assert runnable, "README.md has no Python block to run"
    assert any("fnlm.train_step" in b.code for b in runnable)
    proc = run_python_blocks(README, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "layers.0.attn.k_proj.weight" in proc.stdout


def test_command_lines_name_real_scripts_and_flags():
    checked = [check_command_line(words) for words in command_lines(README)]
    scripts = {s for s in checked if s}
    assert {"experiments/train_tinystories.py", "experiments/generate.py"} <= scripts, scripts


def test_links_resolve_and_it_stays_short():
    assert broken_links(README) == []
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {MAX_LINES})"
