"""Wrong things users type, through the real script in a subprocess: each is refused before any
stage runs, in one line that says what to change, with exit code 2 and nothing written; usage
errors print the usage line and the message; `--help` shows the chosen preset's defaults."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinystories import cli, download, stages

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "train_tinystories.py"


def _script(args, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, FNLM_TYPECHECK="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("train_tinystories.py: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


CASES = {
    "vocab too small": (["--vocab-size", "100"], ["--vocab-size 257 or more"]),
    "context longer than the embedded corpus": (["--preset", "smoke", "--context-length", "50000"],
                                                ["--corpus-valid-bytes", "--context-length 50000"]),
    "context of 100000 under the demo preset": (["--context-length", "100000"],
                                                ["--context-length 100000", "GiB", "lower --context-length"]),
    "zero steps": (["--steps", "0"], ["--steps 0", "at least one optimizer step"]),
    "negative batch": (["--batch-size", "-1"], ["--batch-size"]),
    "cuda without cuda": (["--device", "cuda"], ["--device cuda: CUDA is not available", "--device cpu"]),
    "resume on an empty folder": (["--resume"], ["nothing to resume", "without --resume"]),
    "a later stage on a new folder": (["--stage", "sample"], ["needs the tokenizer stage's output", "--stage"]),
    "missing data and no download": (["--data", "nodata", "--no-download"], ["wget -P nodata", "TinyStoriesV2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_configuration_errors_are_one_line_before_any_stage(tmp_path, case):
    args, needles = CASES[case]
    proc = _script(["--out", "run", *args], tmp_path, CUDA_VISIBLE_DEVICES="")
    _refused(proc, *needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "nodata").exists()


def test_empty_and_missing_text_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "story.txt").write_text("Once upon a time there was a cat.<|endoftext|>" * 20)
    _refused(_script(["--train-file", "story.txt", "--valid-file", "empty.txt", "--out", "r"], tmp_path),
             "--valid-file empty.txt is empty")
    _refused(_script(["--train-file", "nope.txt", "--valid-file", "story.txt", "--out", "r"], tmp_path),
             "--train-file nope.txt: no such file")
    assert not (tmp_path / "r").exists()


def test_stage_data_on_a_new_folder_then_a_stage_whose_input_is_missing(tmp_path):
    done = _script(["--preset", "smoke", "--quiet", "--stage", "data", "--out", "r"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "data: embedded corpus" in done.stderr and (tmp_path / "r" / "data").is_dir()
    assert not (tmp_path / "r" / "tokenizer").exists()
    _refused(_script(["--preset", "smoke", "--quiet", "--stage", "encode", "--out", "r"], tmp_path),
             "the encode stage needs the tokenizer stage's output", "add tokenizer to --stage")


def test_usage_errors_print_the_usage_line_and_the_message(tmp_path):
    proc = _script(["--stepz", "5"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: train_tinystories.py")
    assert "unrecognized arguments: --stepz 5" in lines[1] and "did you mean --steps?" in lines[1]
    proc = _script(["--steps", "many"], tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 2 and "invalid int value" in proc.stderr


def test_help_shows_the_chosen_presets_defaults(tmp_path):
    demo = _script(["--help"], tmp_path)
    smoke = _script(["--preset", "smoke", "--help"], tmp_path)
    for proc in (demo, smoke):
        assert proc.returncode == 0 and "(default: None)" not in proc.stdout
        assert "optimizer steps" in proc.stdout and "--overwrite" in proc.stdout
    assert "defaults below are those of the demo preset" in " ".join(demo.stdout.split()).lower()
    steps = {name: " ".join(p.stdout.split("--steps N", 1)[1].split("--max-tokens")[0].split())
             for name, p in (("demo", demo), ("smoke", smoke))}
    assert "(default: 400)" in steps["demo"] and "(default: 60)" in steps["smoke"]


def test_help_defaults_and_descriptions_per_preset():
    for name, preset in cli.PRESETS.items():
        parser = cli.build_parser(name)
        actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
        assert f"(default: {cli._show(preset['train']['steps'])})" in actions["--steps"].help
        assert f"(default: {cli._show(preset['model']['d_model'])})" in actions["--d-model"].help
    assert cli.build_parser(real=True).description.count("cpu preset") + \
        cli.build_parser(real=True).description.count("h100 preset") == 1


def test_field_docs_reads_one_bullet_per_field():
    class Doc:
        """Intro.

        - `width`: columns of the grid;
          wraps here.
        - `rate`: a rate.

        Not a field.
        """

    assert cli.field_docs(Doc) == {"width": "columns of the grid; wraps here.", "rate": "a rate."}
    assert cli.flags_in("TransformerConfig.d_model=100 is not divisible by num_heads=3") == \
        "--d-model=100 is not divisible by --num-heads=3"
    assert cli.flags_in("tokens/train.bin holds 5") == "tokens/train.bin holds 5"


def test_offline_data_stops_and_says_how_to_get_it(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    offline = functools.partial(download.resolve_corpus, base_url=f"http://127.0.0.1:{port}/" + "{name}",
                                connect_timeout=1.0)
    monkeypatch.setattr(stages, "resolve_corpus", offline)
    s = cli.resolve_settings(["--data", str(tmp_path / "ts"), "--out", str(tmp_path / "run"), "--quiet"])
    assert s.preset in ("cpu", "h100")
    with pytest.raises(cli.ConfigError, match=r"could not be downloaded.*wget -P .*TinyStoriesV2-GPT4-train\.txt"):
        stages.stage_data(s, stages.Manifest(s.out))
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "stages.json").exists()
