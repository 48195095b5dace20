"""The command line of `train_tinystories.py`: flags generated from the config dataclasses (so no
list of options is kept by hand), the parser, and `resolve_settings` (preset, then flags, then
every check that can be made before a stage runs).

`add_dataclass_flags(parser, Config)` adds one ``--field-name`` per field (type from the
annotation: ``int``, ``float``, ``str``, ``bool`` as ``--x/--no-x``, optional variants, and
``Literal[...]`` as choices; ``bool | None`` is also ``--x/--no-x``, with "not given" meaning
``None``), all defaulting to "not given", each described by its line in the class docstring
(``- `field`: text``, see `field_docs`). `dataclass_overrides(args, Config)` returns the given ones
as ``{field: value}``, to apply over a preset with `dataclasses.replace`.

Errors: a malformed command line (unknown flag, a value of the wrong type) is argparse's usage
error (the usage line, the message, exit code 2); a setting that cannot work (a vocabulary too
small for byte-level BPE, a context longer than the data, `--steps 0`, an empty text file, a
device this torch lacks, ...) raises `ConfigError`, which the script reports as one line with exit
code 2, before any stage runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import fnlm
import fnlm.precision
import fnlm.train
from fnlm.train import TrainConfig

from .download import TINYSTORIES_FILES, TINYSTORIES_URL
from .presets import PRESETS, PipelineConfig

__all__ = [
    "add_dataclass_flags", "dataclass_overrides", "field_docs", "flag_name", "ConfigError", "Settings", "build_parser",
    "resolve_settings", "check_settings", "flags_in", "FIELD_FLAGS", "STAGES", "MIN_VOCAB_SIZE", "MAX_VOCAB_SIZE",
]

PROG = "train_tinystories.py"
STAGES = ("data", "tokenizer", "encode", "train", "evaluate", "sample")
MIN_VOCAB_SIZE = 256 + 1
MAX_VOCAB_SIZE = 1 << 16


class ConfigError(ValueError):
    """A setting or a run folder the script cannot work with; the message says what to change.

    `train_tinystories.py` prints it as one line (no traceback) and exits with code 2.
    """


def flag_name(field: str) -> str:
    """``"d_model"`` -> ``"--d-model"``."""
    return "--" + field.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not torch.Tensor]
        if len(args) == 1:
            return args[0], True
    return tp, False


class _NoneGiven:
    def __repr__(self) -> str:
        return "none"


_NONE = _NoneGiven()


def _none_or(convert):
    def parse(text: str):
        return _NONE if text.strip().lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


_BULLET = re.compile(r"^- `(\w+)`: (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """The description of each field in `cls`'s docstring, from its ``- `field`: text`` lines.

    A bullet may continue on more indented lines; they are joined with spaces.

    **Arguments:**

    - `cls`: a class whose docstring lists its fields one per bullet.

    **Returns:** ``{field: text}`` for each field that has a bullet.

    ```python
    @dataclass
    class C:
        '''- `width`: columns of the grid.'''
        width: int = 4

    field_docs(C) == {"width": "columns of the grid."}
    ```
    """
    docs: dict[str, str] = {}
    current = None
    for raw in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _BULLET.match(raw)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and raw.startswith("  ") and raw.strip():
            docs[current] += " " + raw.strip()
        else:
            current = None
    return docs


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", text, maxsplit=1)[0]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value)


def _fields(cls: type) -> list[tuple[str, Any]]:
    """`(name, default)` of each field of a dataclass or NamedTuple `cls` (default `None` when none)."""
    if dataclasses.is_dataclass(cls):
        return [(f.name, f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls) if f.init]
    return [(name, cls._field_defaults.get(name)) for name in cls._fields]


CHOICES = {"optimizer": fnlm.train.OPTIMIZERS, "precision": fnlm.precision.PRECISIONS,
           "shard": tuple(m for m in fnlm.train.SHARDING if m is not None)}
"""Fields whose flag offers a fixed list of values."""


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: set[str] = frozenset(),
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Add a flag per field of dataclass (or NamedTuple) `cls` (except `skip`); return the field
    names added.

    **Arguments:**

    - `parser`: an argparse parser or argument group.
    - `cls`: a dataclass or NamedTuple type; its field annotations pick the flag types (a pair of
      floats takes two values: ``--betas 0.9 0.95``; the fields of `CHOICES` offer their values), its
      docstring's ``- `field`: text`` lines the help text (`field_docs`).
    - `skip`: field names not to expose.
    - `defaults`: the values that apply when a flag is not given (e.g. a preset's), shown in the
      help; fields not in it show the dataclass default. `None` values are not shown.

    **Returns:** the names of the fields that got a flag. Every flag defaults to ``None``
    ("not given"); an optional field also accepts the value ``none``.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    added = []
    for name, default in _fields(cls):
        if name in skip:
            continue
        tp, optional = _unwrap_optional(hints[name])
        if defaults is not None and name in defaults:
            default = defaults[name]
        help_text = _first_sentence(docs.get(name, "")).replace("`None`", "none").replace("`", "")
        if default is not None:
            shown = " ".join(map(_show, default)) if isinstance(default, tuple) else _show(default)
            help_text = f"{help_text} (default: {shown})".strip()
        kwargs: dict[str, Any] = {"default": None, "dest": f"{cls.__name__}.{name}",
                                  "help": help_text.replace("%", "%%")}
        if name in CHOICES:
            kwargs.update(type=_none_or(str) if optional else str,
                          choices=list(CHOICES[name]) + ([_NONE] if optional else []))
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple and set(typing.get_args(tp)) == {float}:
            kwargs.update(type=float, nargs=len(typing.get_args(tp)), metavar="X")
        elif typing.get_origin(tp) is Literal:
            choices = list(typing.get_args(tp))
            kwargs.update(type=_none_or(type(choices[0])) if optional else type(choices[0]),
                          choices=choices + ([_NONE] if optional else []))
        elif tp in (int, float, str):
            kwargs["type"] = _none_or(tp) if optional else tp
            kwargs["metavar"] = {int: "N", float: "X", str: "TEXT"}[tp]
        else:
            continue
        parser.add_argument(flag_name(name), **kwargs)
        added.append(name)
    return added


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` whose flags were given on the command line, as ``{field: value}``."""
    out = {}
    prefix = f"{cls.__name__}."
    for key, value in vars(args).items():
        if key.startswith(prefix) and value is not None:
            out[key[len(prefix):]] = None if value is _NONE else tuple(value) if isinstance(value, list) else value
    return out


@dataclass(frozen=True)
class Settings:
    """Everything one invocation decided: configs, data source, run folder, stages.

    `resume` continues `OUT/checkpoints/latest.pt`; `overwrite` allows deleting an earlier run's
    checkpoints and train from step 0; `force` reruns the selected stages even when cached; `notes`
    are adjustments made to the settings and choices made for the user (printed at the start of
    the run); `export_hf` is a folder to write the trained model and its tokenizer to in Hugging
    Face's format (`fnlm.export_hf`); `threads` is torch's CPU thread count (`None`: torch's choice).
    """

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
    overwrite: bool = False
    notes: tuple[str, ...] = ()
    export_hf: Path | None = None
    threads: int | None = None


class _Parser(argparse.ArgumentParser):
    """argparse with a short usage line and a "did you mean" for misspelt flags."""

    def error(self, message: str) -> typing.NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [s for a in self._actions for s in a.option_strings]
            for word in unknown.group(1).split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}; --help lists the flags\n")


USAGE = ("%(prog)s [--preset NAME] [--data [DIR] | --train-file FILE --valid-file FILE] [--out DIR] "
         "[--stage STAGES] [--resume | --overwrite] [--FLAG VALUE ...]")

PRESET_HELP = ("starting values for every flag below: demo (the embedded story corpus, about 2½ minutes on 2 CPU "
               "cores; the default), smoke (tiny, for tests), cpu (17M model, 41M tokens), h100 (17M model, 328M "
               "tokens); with --data or --train-file the default is h100 on CUDA and cpu elsewhere")


def _default_preset(preset: str | None, real: bool) -> str:
    if preset is not None:
        return preset
    return ("h100" if torch.cuda.is_available() else "cpu") if real else "demo"


def build_parser(preset: str | None = None, *, real: bool = False) -> argparse.ArgumentParser:
    """The command-line parser: fixed flags plus one flag per config field.

    **Arguments:**

    - `preset`: the preset whose values the help shows as defaults (default: the one a command
      line without `--preset` gets).
    - `real`: the command line names real data (`--data` or `--train-file`), which picks the
      default preset.

    **Returns:** the parser; its config flags all default to "not given".
    """
    preset = _default_preset(preset, real)
    base = PRESETS[preset]
    p = _Parser(prog=PROG, usage=USAGE, allow_abbrev=False,
                description="Train a Transformer LM on TinyStories (or the embedded story corpus), end to end: "
                            f"{' -> '.join(STAGES)}. Defaults below are those of the {preset} preset "
                            "(`--preset NAME --help` shows another's).")
    p.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME", help=PRESET_HELP)
    p.add_argument("--data", nargs="?", const="data/tinystories", default=None, metavar="DIR",
                   help="train on TinyStoriesV2-GPT4-{train,valid}.txt in DIR (default DIR data/tinystories), "
                        "downloaded there when missing; without it, the embedded story corpus")
    p.add_argument("--no-download", action="store_true", help="with --data: stop instead of downloading missing files")
    p.add_argument("--train-file", metavar="FILE", help="any training text file (documents separated by <|endoftext|>)")
    p.add_argument("--valid-file", metavar="FILE", help="the matching validation text file")
    p.add_argument("--out", metavar="DIR", help=f"run folder (default: runs/{preset})")
    p.add_argument("--stage", default="all", metavar="STAGES",
                   help=f"comma-separated stages to run, from {', '.join(STAGES)} (default: all)")
    p.add_argument("--resume", action="store_true", help="continue training from OUT/checkpoints/latest.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints and metrics of an earlier run in OUT and train from step 0, even when "
                        "that run finished (without it, such a folder is refused)")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even when cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads for every stage (default: torch's choice, one per core); on a machine other "
                        "work keeps busy, fewer threads (even 1) can be several times faster")
    p.add_argument("--export-hf", metavar="DIR", type=Path,
                   help="after training, write the model and tokenizer to DIR as a Hugging Face Llama folder "
                        "(loads with transformers' AutoModelForCausalLM / AutoTokenizer)")
    groups = (("model (fnlm.TransformerConfig)", fnlm.TransformerConfig, set(), base["model"]),
              ("training (fnlm.train.TrainConfig)", TrainConfig, {"progress"}, base["train"]),
              ("optimizer step (TrainConfig.step, a fnlm.StepConfig)", fnlm.StepConfig, set(), base.get("step", {})),
              ("pipeline (PipelineConfig)", PipelineConfig, set(), base.get("pipeline", {})))
    seen: dict[str, str] = {}
    for title, cls, skip, defaults in groups:
        g = p.add_argument_group(title)
        for name in add_dataclass_flags(g, cls, skip=skip, defaults=defaults):
            if name in seen:
                raise AssertionError(f"field {name!r} is in both {seen[name]} and {cls.__name__}")
            seen[name] = cls.__name__
    return p


def _preparse(argv: Sequence[str]) -> tuple[str | None, bool]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    pre.add_argument("--data", nargs="?", const="data/tinystories")
    pre.add_argument("--train-file")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else None
    return preset, bool(known.data or known.train_file)


FIELD_FLAGS = {name: flag_name(name) for cls in (fnlm.TransformerConfig, TrainConfig, fnlm.StepConfig, PipelineConfig)
               for name, _ in _fields(cls) if name != "step"}


def flags_in(message: str) -> str:
    """`message` with config field names (``d_model``, ``TransformerConfig.d_model``,
    ``step.lr``) as flags."""
    message = re.sub(r"\b(?:TransformerConfig|TrainConfig|PipelineConfig|StepConfig)\.", "", message)
    message = re.sub(r"\bstep\.(?=\w)", "", message)
    return re.sub(r"(?<![\w-])(" + "|".join(sorted(FIELD_FLAGS, key=len, reverse=True)) + r")(?!\w)",
                  lambda m: FIELD_FLAGS[m.group(1)], message)


def resolve_settings(argv: Sequence[str] | None = None) -> Settings:
    """Parse `argv`, apply the preset then the flags given, and check the result.

    **Arguments:**

    - `argv`: the command line without the program name (default `sys.argv[1:]`).

    **Returns:** the `Settings`. A malformed command line exits through argparse (usage line and
    message, code 2); settings that cannot work raise `ConfigError` (see `check_settings`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    preset_given, real = _preparse(argv)
    parser = build_parser(preset_given, real=real)
    args = parser.parse_args(argv)
    if (args.train_file is None) != (args.valid_file is None):
        parser.error("--train-file and --valid-file go together")
    if args.train_file and args.data:
        parser.error("use either --data or --train-file/--valid-file")
    if args.resume and args.overwrite:
        parser.error("--resume continues the checkpoints in the run folder and --overwrite deletes them; give one")
    preset = _default_preset(args.preset, real)
    stages = STAGES if args.stage == "all" else tuple(s.strip() for s in args.stage.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stage {args.stage}: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    base = PRESETS[preset]
    model_kw = {**base["model"], **dataclass_overrides(args, fnlm.TransformerConfig)}
    train_over = dataclass_overrides(args, TrainConfig)
    if "steps" in train_over and "max_tokens" not in train_over:
        train_over["max_tokens"] = None
    if train_over.get("steps") == 0:
        raise ConfigError(f"--steps 0: a run needs at least one optimizer step; give --steps N with N >= 1 (the "
                          f"{preset} preset runs {base['train']['steps']})")
    step_over = dataclass_overrides(args, fnlm.StepConfig)
    train_kw = {**base["train"], **train_over, "progress": not args.quiet}
    step_kw = {**base.get("step", {}), **step_over}
    pipe_kw = {**base.get("pipeline", {}), **dataclass_overrides(args, PipelineConfig)}
    step_kw, notes = _clamp_warmup(train_kw, step_kw, model_kw.get("context_length"), "warmup_steps" in step_over)
    model, tc, pc = _build_configs(model_kw, {**train_kw, "step": step_kw}, pipe_kw)
    if args.preset is None and real:
        why = "a CUDA device is available" if preset == "h100" else "this machine has no CUDA device"
        notes += (f"the {preset} preset was chosen because {'--data' if args.data else '--train-file'} is given and "
                  f"{why}; --preset NAME picks another",)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give a number of threads >= 1 (or leave it out for torch's "
                          "choice)")
    out = Path(args.out) if args.out else Path("runs") / preset
    s = Settings(preset, model, tc, pc, out, args.data, not args.no_download, args.train_file, args.valid_file,
                 stages, args.resume, args.force, not args.quiet, args.overwrite, notes, args.export_hf, args.threads)
    check_settings(s)
    return s


def _build_configs(model_kw: dict[str, Any], train_kw: dict[str, Any], pipe_kw: dict[str, Any]) -> list[Any]:
    """The three configs; `ConfigError` naming the flags for any value a config refuses, or that is
    not a finite number."""
    configs = []
    for what, cls, kw in (("model", fnlm.TransformerConfig, model_kw), ("training", TrainConfig, train_kw),
                          ("pipeline", PipelineConfig, pipe_kw)):
        flat = {**kw, **kw.get("step", {})} if what == "training" else kw
        infinite = [f"{k}={v}" for k, v in flat.items()
                    if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,)))]
        if infinite:
            raise ConfigError(f"invalid {what} settings: {flags_in(', '.join(infinite))} (every number must be finite)")
        try:
            configs.append(cls(**kw))
        except (TypeError, ValueError) as e:
            message = re.sub(r"^invalid \w+ values: ", "", str(e))
            raise ConfigError(f"invalid {what} settings: {flags_in(message)}") from None
    return configs


def _clamp_warmup(train_kw: dict[str, Any], step_kw: dict[str, Any], context_length: Any,
                  given: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`step_kw` with a warm-up longer than the cosine shortened to it, and the note that says so
    (values a config would refuse are left for it to report)."""
    try:
        batch, steps, budget = train_kw["batch_size"], train_kw.get("steps", 5000), train_kw.get("max_tokens")
        total = steps if budget is None else max(1, budget // (batch * context_length))
        cosine, warmup = step_kw.get("cosine_steps"), step_kw.get("warmup_steps", 100)
        end = cosine if cosine is not None else total
        if not warmup > end >= 0:
            return step_kw, ()
    except (TypeError, ZeroDivisionError, KeyError):
        return step_kw, ()
    where = "--cosine-steps" if cosine is not None else "the run's steps"
    origin = "--warmup-steps" if given else "the preset's warm-up"
    note = (f"{origin} ({warmup}) is longer than {where} ({end}); warming up over {end} steps instead "
            f"(give --warmup-steps to choose)")
    return {**step_kw, "warmup_steps": end}, (note,)


EXPORTABLE = {"norm": "rmsnorm", "norm_position": "pre", "position": "rope", "ffn": "swiglu"}
"""The model fields a Hugging Face Llama folder can hold, and the one value each must have."""


def check_settings(s: Settings) -> None:
    """Every check of `s` that needs no stage to have run; raises `ConfigError` naming the flag.

    Checks: the vocabulary fits byte-level BPE with `<|endoftext|>` and the uint16 token files;
    the text files exist, are regular files, are not empty and hold more bytes than the context
    length (a text of N bytes has at most N tokens); `--out` is (or can be) a writable folder;
    `--final-eval-tokens` holds a whole window; the device exists in this torch build; one
    layer's attention scores of a batch fit in the device's memory.

    **Arguments:**

    - `s`: resolved settings.
    """
    vocab = s.model.vocab_size
    if vocab < MIN_VOCAB_SIZE:
        raise ConfigError(f"--vocab-size {vocab} is too small: a byte-level BPE vocabulary holds the 256 bytes and "
                          f"the special token <|endoftext|>, so it needs --vocab-size {MIN_VOCAB_SIZE} or more")
    if vocab > MAX_VOCAB_SIZE:
        raise ConfigError(f"--vocab-size {vocab} is too large: token files store uint16 ids, so at most "
                          f"{MAX_VOCAB_SIZE:,}")
    _check_texts(s)
    _check_out(s.out)
    pc = s.pipeline
    if pc.final_eval_tokens is not None and pc.final_eval_tokens < s.model.context_length:
        raise ConfigError(f"--final-eval-tokens {pc.final_eval_tokens}: the evaluate stage scores whole windows of "
                          f"--context-length {s.model.context_length} tokens; give at least {s.model.context_length}, "
                          "or none for the whole validation set")
    device = _check_device(s.train.device)
    _check_memory(s, device)
    if s.export_hf is not None:
        changed = [f"--{k.replace('_', '-')} {getattr(s.model, k)}" for k, v in EXPORTABLE.items() if getattr(s.model, k) != v]
        if changed:
            raise ConfigError(f"--export-hf: a Llama folder holds only the baseline architecture, and this run trains "
                              f"{', '.join(changed)}; drop --export-hf or those flags")


def _texts(s: Settings) -> list[tuple[str, Path | None, int | None]]:
    """`(what, path, size)` of each text the data stage will use: size known (or None), path when a file."""
    if s.train_file:
        return [("--train-file", Path(s.train_file), None), ("--valid-file", Path(s.valid_file), None)]
    if s.data:
        folder = Path(s.data)
        missing = [n for n in TINYSTORIES_FILES if not (folder / n).is_file()]
        if missing and not s.download:
            urls = " ".join(TINYSTORIES_URL.format(name=n) for n in missing)
            raise ConfigError(f"--data {s.data}: {', '.join(missing)} not found and --no-download is set; "
                              f"fetch with: wget -P {s.data} {urls}")
        return [(f"--data {s.data}", folder / n, None) for n in TINYSTORIES_FILES if n not in missing]
    pc = s.pipeline
    return [("--corpus-train-bytes", None, pc.corpus_train_bytes),
            ("--corpus-valid-bytes", None, pc.corpus_valid_bytes)]


def _check_texts(s: Settings) -> None:
    need = s.model.context_length + 1
    for what, path, size in _texts(s):
        if path is not None:
            if not path.exists():
                raise ConfigError(f"{what} {path}: no such file")
            if not path.is_file():
                raise ConfigError(f"{what} {path} is not a regular file (a folder, device or pipe); give a text file "
                                  "with documents separated by <|endoftext|>")
            size = path.stat().st_size
            if size == 0:
                raise ConfigError(f"{what} {path} is empty; give a text file with documents separated by <|endoftext|>")
            label = f"{what} {path}" if not what.startswith("--data") else str(path)
        else:
            label = f"{what} {size}"
        if size < need:
            raise ConfigError(
                f"{label}: {size:,} bytes hold at most {size:,} tokens, fewer than --context-length "
                f"{s.model.context_length} + 1; lower --context-length or use more text")


def _check_out(out: Path) -> None:
    """`--out` must be a folder, or a path where one can be made by this user."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; give a folder (it is made when missing)")
    existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, so no folder can be made there; give another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable by this user; give another --out")


def _check_device(name: str) -> torch.device:
    if name == "auto":
        return fnlm.train.resolve_device("auto")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(f"--device {name}: CUDA is not available (torch {torch.__version__}, {build}, sees no "
                              "GPU); use --device cpu (or auto), or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: the script trains on cpu, cuda or mps")
    return device


def _device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def _check_memory(s: Settings, device: torch.device) -> None:
    memory = _device_memory(device)
    if memory is None:
        return
    m, tc = s.model, s.train
    bf16 = fnlm.train.precision_of(tc, device) != "fp32"
    need = tc.batch_size * m.num_heads * m.context_length ** 2 * (2 if bf16 else 4)
    if need > memory:
        raise ConfigError(
            f"--context-length {m.context_length} with --batch-size {tc.batch_size} and --num-heads {m.num_heads}: one "
            f"layer's attention scores alone take {need / 2**30:,.0f} GiB, more than the {memory / 2**30:,.0f} GiB "
            f"of {device.type} memory; lower --context-length or --batch-size")
