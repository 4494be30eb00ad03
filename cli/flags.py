"""Command-line flags generated from a settings dataclass (advmoe.settings): one flag per field,
with the field's meaning, its default and its choices in the help. Values are checked by the
dataclass's own validation, so a wrong choice is one line that lists the valid ones, whether it
came from a flag, a preset or a config file."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from fractions import Fraction

from advmoe.settings import choices_of, help_of, number_text


def number(text: str) -> float:
    """A float flag that also takes fractions: 0.1, 8/255."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.1 or 8/255)") from None


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is a sequence) of `int`, `int | None`, `tuple[int, ...]`."""
    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (types.UnionType, typing.Union):
        return _base_type(args[0])
    if origin in (tuple, list):
        return _base_type(args[0])[0], True
    return annotation, False


def _format_default(value) -> str:
    if isinstance(value, float):
        return number_text(value)
    if isinstance(value, (tuple, list)):
        return " ".join(_format_default(v) for v in value) or "none"
    return str(value)


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: tuple[str, ...] = (),
                        names: Mapping[str, str] | None = None) -> None:
    """One `--field-name` flag per field of `cls` (`names` renames some: {"formats": "--format"});
    its value is None when the flag is not given, so presets and config files keep theirs
    (`given_flags` collects the ones given)."""
    instance, hints = cls(), typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = (names or {}).get(field.name) or "--" + field.name.replace("_", "-")
        default = getattr(instance, field.name)
        choices = choices_of(field)
        kind, sequence = _base_type(hints[field.name])
        text = help_of(field)
        if choices and any(choices.values()):
            text += ". " + "; ".join(f"{c}: {meaning}" if meaning else c for c, meaning in choices.items())
        elif choices and sequence:  # a single value's choices are in its metavar, a list's are not
            text += f"; any of: {', '.join(choices)}"
        if default is not None:
            text += f" (default: {_format_default(default)})"
        text = text.replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        kind = number if kind is float else kind
        nargs = "+" if sequence else None
        if sequence:  # argparse repeats a list's metavar: keep it short, the help lists the choices
            metavar = field.name.upper().removesuffix("S")
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else field.name.upper()
        parser.add_argument(flag, dest=field.name, type=kind, default=None, nargs=nargs, metavar=metavar, help=text)


def given_flags(args: argparse.Namespace, cls, skip: tuple[str, ...] = ()) -> dict:
    """{field: value} of the flags the user gave (tuples for sequence fields)."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


def default_of(function, parameter: str):
    """The default of a function's parameter: a flag's default read from the function it feeds."""
    return inspect.signature(function).parameters[parameter].default


__all__ = ["add_dataclass_flags", "default_of", "given_flags", "number"]
