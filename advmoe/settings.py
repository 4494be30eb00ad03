"""Settings dataclasses that describe themselves: each field carries one line of meaning and,
where it has them, its valid choices, so that the command line, config files and error messages
are generated from one place (as timm's train.py lists every flag with its help).

    @dataclass
    class TrainConfig:
        method: str = setting("advmoe", "training method", choices=METHODS)

`validate_choices(obj)` checks every field that declares choices; `describe(field)` gives the
help line. The command line (cli/flags.py) turns the fields into flags.
"""
from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot run; the message names the setting and what to change."""


Choices = Iterable[str] | Mapping[str, str] | Callable[[], Iterable[str]]


def setting(default: Any = None, help: str = "", choices: Choices | None = None, *, factory=None) -> Any:
    """A dataclass field with its meaning and, optionally, its valid values: a list, a mapping
    {value: meaning}, or a function returning the list (for registries filled at import)."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(field: dataclasses.Field) -> dict[str, str] | None:
    """{value: meaning} of a field's choices (meaning "" when the field lists values only)."""
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    if callable(choices):
        choices = choices()
    if isinstance(choices, Mapping):
        return dict(choices)
    return {str(c): "" for c in choices}


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def number_text(value: float) -> str:
    """A setting's number as people write it: a budget in 8-bit pixel levels as k/255 (8/255,
    not 0.03137), any other in up to four significant digits (0.1)."""
    levels = value * 255
    if round(value, 3) != value and abs(levels - round(levels)) < 1e-9:
        return f"{round(levels)}/255"
    return f"{value:.4g}"


def flag_name(name: str) -> str:
    """How a setting is named to people by default: its flag's name (gate-grad)."""
    return name.replace("_", "-")


def check_choice(name: str, value: Any, choices: Iterable[str], label: Callable[[str], str] = flag_name) -> None:
    """A one-line ConfigError naming the setting (as `label` writes it) and every valid value."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {label(name)} {value!r}; choose one of: {', '.join(choices)}")


def validate_choices(obj: Any, label: Callable[[str], str] = flag_name) -> None:
    """Check every field of the dataclass instance `obj` that declares choices; `label` names a
    field as its user sets it (a flag by default; the service: its environment variable)."""
    for field in dataclasses.fields(obj):
        choices = choices_of(field)
        value = getattr(obj, field.name)
        if choices is None or value is None:
            continue
        if isinstance(value, (tuple, list)):  # "unknown attack 'x'" for a field `attacks`
            for item in value:
                check_choice(field.name.removesuffix("s"), item, choices, label)
        else:
            check_choice(field.name, value, choices, label)


def parse_pairs(pairs: Iterable[str], flag: str, example: str = "width=0.5") -> dict[str, Any]:
    """KEY=VALUE pairs from the command line as {key: value}, each value read as TOML (3, 0.1, true,
    "name"); a dash in a key becomes an underscore. A malformed pair raises ConfigError naming `flag`."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise ConfigError(f"{flag} {pair!r}: write KEY=VALUE, e.g. {example}")
        try:
            settings[key] = tomllib.loads(f"value = {value.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{flag} {pair!r}: {value.strip()!r} is not a TOML value (quote a string: "
                              f'{key}="...")') from None
    return settings
