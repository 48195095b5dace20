"""The command line of `train_tinystories.py`: flags generated from the config dataclasses (so no
list of options is kept by hand), the parser, and `resolve_settings` (preset, then flags).

`add_dataclass_flags(parser, Config)` adds one ``--field-name`` per field (type from the
annotation: ``int``, ``float``, ``str``, ``bool`` as ``--x/--no-x``, optional variants, and
``Literal[...]`` as choices; ``bool | None`` is also ``--x/--no-x``, with "not given" meaning
``None``), all defaulting to "not given". `dataclass_overrides(args, Config)`
returns the given ones as ``{field: value}``, to apply over a preset with `dataclasses.replace`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import fnlm
from fnlm.train import TrainConfig

from .presets import PRESETS, PipelineConfig

__all__ = ["add_dataclass_flags", "dataclass_overrides", "flag_name", "Settings", "build_parser", "resolve_settings", "STAGES"]


def flag_name(field: str) -> str:
    """``"d_model"`` -> ``"--d-model"``."""
    return "--" + field.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


STAGES = ("data", "tokenizer", "encode", "train", "evaluate", "sample")


class _NoneGiven:
    def __repr__(self) -> str:
        return "none"


_NONE = _NoneGiven()


def _none_or(convert):
    def parse(text: str):
        return _NONE if text.strip().lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, skip: set[str] = frozenset()) -> list[str]:
    """Add a flag per field of dataclass `cls` (except `skip`); return the field names added.

    **Arguments:**

    - `parser`: an argparse parser or argument group.
    - `cls`: a dataclass type; its field annotations pick the flag types.
    - `skip`: field names not to expose.

    **Returns:** the names of the fields that got a flag. Every flag defaults to ``None``
    ("not given"); an optional field also accepts the value ``none``.
    """
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"default: {default!r}"
        kwargs: dict[str, Any] = {"default": None, "dest": f"{cls.__name__}.{f.name}", "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            choices = list(typing.get_args(tp))
            kwargs.update(type=_none_or(type(choices[0])) if optional else type(choices[0]),
                          choices=choices + ([_NONE] if optional else []))
        elif tp in (int, float, str):
            kwargs["type"] = _none_or(tp) if optional else tp
        else:
            continue
        parser.add_argument(flag_name(f.name), **kwargs)
        added.append(f.name)
    return added


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` whose flags were given on the command line, as ``{field: value}``."""
    out = {}
    prefix = f"{cls.__name__}."
    for key, value in vars(args).items():
        if key.startswith(prefix) and value is not None:
            out[key[len(prefix):]] = None if value is _NONE else value
    return out


@dataclass(frozen=True)
class Settings:
    """Everything one invocation decided: configs, data source, run folder, stages."""

    preset: str
    model: Any
    train: TrainConfig
    pipeline: PipelineConfig
    out: Path
    data: str | None
    download: bool
    train_file: str | None
    valid_file: str | None
    stages: tuple[str, ...]
    resume: bool
    force: bool
    progress: bool



def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: fixed flags plus one flag per config field."""
    p = argparse.ArgumentParser(
        prog="train_tinystories.py",
        description="Train a Transformer LM on TinyStories (or the embedded story corpus), end to end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting values: demo (embedded corpus, the default), "
                   "smoke (tiny, for tests), cpu (17M model, 40M tokens), h100 (17M model, 328M tokens); "
                   "real data without a preset gets h100 on CUDA and cpu elsewhere")
    p.add_argument("--data", nargs="?", const="data/tinystories", default=None, metavar="DIR",
                   help="folder with TinyStoriesV2-GPT4-{train,valid}.txt (downloaded there when missing; "
                        "default folder data/tinystories)")
    p.add_argument("--no-download", action="store_true", help="with --data: do not try to download missing files")
    p.add_argument("--train-file", help="any training text file (documents separated by <|endoftext|>)")
    p.add_argument("--valid-file", help="the matching validation text file")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--stage", default="all", help=f"comma-separated stages to run, from {', '.join(STAGES)} (default all)")
    p.add_argument("--resume", action="store_true", help="continue training from OUT/checkpoints/latest.pt")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even when cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    groups = (("model (fnlm.TransformerConfig)", fnlm.TransformerConfig, set()),
              ("training (fnlm.train.TrainConfig)", TrainConfig, {"progress"}),
              ("pipeline", PipelineConfig, set()))
    seen: dict[str, str] = {}
    for title, cls, skip in groups:
        g = p.add_argument_group(title)
        for name in add_dataclass_flags(g, cls, skip=skip):
            if name in seen:
                raise AssertionError(f"field {name!r} is in both {seen[name]} and {cls.__name__}")
            seen[name] = cls.__name__
    return p



def resolve_settings(argv: Sequence[str] | None = None) -> Settings:
    """Parse `argv` and apply the preset, then the flags given, to the three configs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.train_file is None) != (args.valid_file is None):
        parser.error("--train-file and --valid-file go together")
    if args.train_file and args.data:
        parser.error("use either --data or --train-file/--valid-file")
    real = bool(args.data or args.train_file)
    preset = args.preset
    if preset is None:
        preset = ("h100" if torch.cuda.is_available() else "cpu") if real else "demo"
    stages = STAGES if args.stage == "all" else tuple(s.strip() for s in args.stage.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    base = PRESETS[preset]
    model_kw = {**base["model"], **dataclass_overrides(args, fnlm.TransformerConfig)}
    train_over = dataclass_overrides(args, TrainConfig)
    if "steps" in train_over and "max_tokens" not in train_over:
        train_over["max_tokens"] = None
    train_kw = {**base["train"], **train_over, "progress": not args.quiet}
    pipe_kw = {**base.get("pipeline", {}), **dataclass_overrides(args, PipelineConfig)}
    try:
        model = fnlm.TransformerConfig(**model_kw)
        tc = TrainConfig(**train_kw)
        pc = PipelineConfig(**pipe_kw)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    out = Path(args.out) if args.out else Path("runs") / preset
    return Settings(preset, model, tc, pc, out, args.data, not args.no_download, args.train_file, args.valid_file,
                    stages, args.resume, args.force, not args.quiet)

