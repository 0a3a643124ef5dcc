"""The one place configuration objects read the environment `hasten launch` / `accelerate launch` set.

A field left unset (``None``, as in Accelerate's signatures) takes its variable's value, converted
once to the field's type; an explicit argument always wins. A value that does not convert is an
error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from hasten.utils.environment import str_to_bool

T = TypeVar("T")


def _boolean(text: str) -> bool:
    return str_to_bool(text, to_bool=True)


PARSERS: dict[type, Callable[[str], Any]] = {bool: _boolean, int: int, float: float, str: str}


def resolve(value: T | None, variable: str, kind: type[T], default: T | None = None) -> T | None:
    """``value`` if given, else ``$variable`` converted to ``kind``, else ``default``."""
    if value is not None:
        return value
    text = os.environ.get(variable)
    if text is None or text.strip() == "":
        return default
    try:
        return PARSERS[kind](text.strip())
    except ValueError:
        raise ValueError(f"environment variable {variable}={text!r} must be a {kind.__name__}") from None
