"""Command-line flags generated from config dataclasses, so no list of options is kept by hand.

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
from typing import Any, Literal

__all__ = ["add_dataclass_flags", "dataclass_overrides", "flag_name"]


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
