"""Names a module offers at Accelerate's path while hasten keeps them with their concept elsewhere.

Accelerate's ``accelerate.utils.modeling`` and ``accelerate.utils.operations`` hold functions that
hasten keeps in other modules (device maps, loading, batches, ...), some of which import the module
offering them. The names are therefore resolved on first access (PEP 562), not at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_reexports(
    module_name: str, namespace: dict[str, Any], homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` that offer, in ``module_name``, the names of
    ``homes`` (home module -> space-separated names), each imported from its home when first read and
    kept in ``namespace`` afterwards."""
    home_of = {name: home for home, names in homes.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        home = home_of.get(name)
        if home is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home_of})

    return __getattr__, __dir__
