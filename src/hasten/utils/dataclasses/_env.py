"""The one place configuration objects read the environment, and the parsers that convert their values.

A field declared with :func:`env_field` keeps ``None`` as its dataclass default (the
signature Accelerate documents) and ``None`` means "not passed". :func:`resolve_fields`,
called from ``__post_init__``, then gives every such field its final value, once: the
argument when one was passed, else the environment variable ``accelerate launch`` sets
for it, else the field's fallback, each converted by the field's parser. A parser takes
the raw value and the name to blame (``"zero_stage"`` or ``"environment variable
ACCELERATE_DEEPSPEED_ZERO_STAGE"``), so a bad value is reported where it came from.

:func:`declared_defaults` gives the value each field takes with no argument and no
environment, which is what ``KwargsHandler.to_kwargs()`` compares against.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

from hasten.utils.environment import str_to_bool
from hasten.utils.errors import ConfigurationError

Parser = Callable[[Any, str], Any]

_ENV = "hasten_env"
_FALLBACK = "hasten_fallback"
_PARSE = "hasten_parse"


def env_field(env: str | None, fallback: Any = None, parse: Parser | None = None, default: Any = None) -> Any:
    """A dataclass field read from ``env`` when not passed, else ``fallback``; both go through ``parse``.

    Args:
        env: the environment variable ``accelerate launch`` sets for this field (``None``: none).
        fallback: the value (before parsing) when neither the argument nor the variable is given.
        parse: converts and checks the value; called as ``parse(value, name)``.
        default: the dataclass default that means "not passed" (``None`` unless Accelerate declares another).
    """
    return dataclasses.field(default=default, metadata={_ENV: env, _FALLBACK: fallback, _PARSE: parse})


def _raw_from_env(env: str | None) -> str | None:
    if env is None:
        return None
    raw = os.environ.get(env)
    return raw if raw is not None and raw.strip() else None


def _parse(field: dataclasses.Field[Any], value: Any, name: str) -> Any:
    parse: Parser | None = field.metadata[_PARSE]
    return value if parse is None or value is None else parse(value, name)


_EnvField = tuple[str, Any, "str | None", Any, "Parser | None"]
_ENV_FIELDS: dict[type, tuple[_EnvField, ...]] = {}


def _env_fields(cls: type) -> tuple[_EnvField, ...]:
    """(name, default, variable, fallback, parser) of each :func:`env_field` of ``cls``, read once per
    class."""
    if cls not in _ENV_FIELDS:
        _ENV_FIELDS[cls] = tuple(
            (f.name, f.default, f.metadata[_ENV], f.metadata[_FALLBACK], f.metadata[_PARSE])
            for f in dataclasses.fields(cls)
            if _ENV in f.metadata
        )
    return _ENV_FIELDS[cls]


def resolve_fields(obj: Any) -> None:
    """Give each :func:`env_field` of ``obj`` its final value: argument, else environment, else fallback."""
    environ = os.environ
    for name, default, env, fallback, parse in _env_fields(type(obj)):
        value = getattr(obj, name)
        where = name
        if value is default:
            raw = environ.get(env) if env is not None else None
            if raw is not None and raw.strip():
                value, where = raw, f"environment variable {env}"
            else:
                value = fallback
        if parse is not None and value is not None:
            value = parse(value, where)
        setattr(obj, name, value)


def parse_field(obj: Any, name: str, value: Any, where: str) -> Any:
    """``value`` checked and converted by the parser of ``obj``'s :func:`env_field` ``name``, the same check
    an argument or the environment gets; a bad value is blamed on ``where`` (e.g. a config file's key).
    """
    parse = next(parse for field, _, _, _, parse in _env_fields(type(obj)) if field == name)
    return value if parse is None or value is None else parse(value, where)


def is_set_in_env(obj: Any, name: str) -> bool:
    """Whether the environment variable of ``obj``'s field ``name`` is set (and not empty)."""
    field = next(f for f in dataclasses.fields(obj) if f.name == name)
    return _raw_from_env(field.metadata.get(_ENV)) is not None


def read_env(env: str) -> str | None:
    """The value of ``env``, or ``None`` when it is unset or empty (for values that are not fields)."""
    return _raw_from_env(env)


def declared_defaults(cls: type) -> dict[str, Any]:
    """Each field's value with no argument and no environment (env fields: their parsed fallback)."""
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if _ENV in field.metadata:
            defaults[field.name] = _parse(field, field.metadata[_FALLBACK], field.name)
        elif field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


# --- parsers -----------------------------------------------------------------------------------


def to_bool(value: Any, name: str) -> bool:
    """A ``bool``, or a yes/no string as :func:`~hasten.utils.environment.str_to_bool` reads it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return str_to_bool(value, to_bool=True)
        except ValueError:
            pass
    raise ConfigurationError(f"{name}={value!r} is not a boolean; pass True or False (or 'true' / 'false').")


def to_int(value: Any, name: str, minimum: int | None = None) -> int:
    """An ``int`` (or its decimal string), at least ``minimum`` when given."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    if number is None:
        raise ConfigurationError(f"{name}={value!r} is not an integer; pass a whole number.")
    if minimum is not None and number < minimum:
        raise ConfigurationError(f"{name}={value!r} must be at least {minimum}.")
    return number


def positive_int(value: Any, name: str) -> int:
    """An ``int`` of at least 1."""
    return to_int(value, name, minimum=1)


def non_negative_int(value: Any, name: str) -> int:
    """An ``int`` of at least 0."""
    return to_int(value, name, minimum=0)


def to_float(value: Any, name: str) -> float:
    """A ``float`` (an ``int`` or a numeric string is converted)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigurationError(f"{name}={value!r} is not a number; pass a float such as 1.0.")


def or_auto(parse: Parser) -> Parser:
    """``parse``, except that the string ``"auto"`` (filled in later from the training set-up) is kept."""

    def parse_or_auto(value: Any, name: str) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return parse(value, name)

    return parse_or_auto


def one_of(choices: Iterable[str]) -> Parser:
    """A string among ``choices`` (compared case-insensitively, returned as spelled in ``choices``)."""
    allowed = list(choices)

    def parse_choice(value: Any, name: str) -> str:
        if isinstance(value, str):
            for choice in allowed:
                if choice.lower() == value.strip().lower():
                    return choice
        raise ConfigurationError(f"{name}={value!r} is not valid; expected one of {allowed}.")

    return parse_choice


def comma_list(value: Any, name: str) -> list[str]:
    """A list of names, from a list or a comma-separated string (as the launcher writes it)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigurationError(f"{name}={value!r} must be a list of names or a comma-separated string of them.")
