"""Names of objects and dotted attribute paths, as logs and configuration refer to them."""

from __future__ import annotations

import functools
from typing import Any


def get_pretty_name(obj: Any) -> str:
    """A readable name for ``obj``: its qualified name, or its class's when it has none, else ``str(obj)``."""
    if not hasattr(obj, "__qualname__") and not hasattr(obj, "__name__"):
        obj = getattr(obj, "__class__", obj)
    for attribute in ("__qualname__", "__name__"):
        name = getattr(obj, attribute, None)
        if isinstance(name, str):
            return name
    return str(obj)


def recursive_getattr(obj: Any, attr: str) -> Any:
    """``obj.a.b.c`` for ``attr="a.b.c"``.

    Raises:
        AttributeError: a step of the path is missing; the message names the path walked so far.
    """

    def step(found: tuple[Any, str], name: str) -> tuple[Any, str]:
        current, walked = found
        if not hasattr(current, name):
            raise AttributeError(
                f"{get_pretty_name(obj)}{walked} has no attribute {name!r} (looking up {attr!r})"
            )
        return getattr(current, name), f"{walked}.{name}"

    return functools.reduce(step, attr.split("."), (obj, ""))[0]
