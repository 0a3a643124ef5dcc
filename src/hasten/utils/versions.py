"""Version comparisons against installed packages and torch."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from packaging.version import Version, parse

from hasten.utils.imports import package_version

STR_OPERATION_TO_FUNC: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    "<": operator.lt,
}


def _operation(operation: str) -> Callable[[Any, Any], bool]:
    try:
        return STR_OPERATION_TO_FUNC[operation]
    except KeyError:
        valid = ", ".join(repr(op) for op in STR_OPERATION_TO_FUNC)
        raise ValueError(
            f"operation={operation!r} is not a comparison operator; use one of {valid}."
        ) from None


def compare_versions(library_or_version: str | Version, operation: str, requirement_version: str) -> bool:
    """Compare an installed library's version (or a version) with ``requirement_version``.

    Args:
        library_or_version: an import name such as ``"torch"``, or a version string / ``Version``.
        operation: one of ``>``, ``>=``, ``==``, ``!=``, ``<=``, ``<``.
        requirement_version: the version to compare against.

    Raises:
        ValueError: the operation is unknown, or the library is not installed.
    """
    compare = _operation(operation)
    if isinstance(library_or_version, str):
        installed = package_version(library_or_version)
        if installed is not None and installed != "unknown":
            library_or_version = parse(installed)
        else:
            try:
                library_or_version = Version(library_or_version)
            except ValueError:
                raise ValueError(
                    f"{library_or_version!r} is neither an installed package nor a version string."
                ) from None
    return compare(library_or_version, parse(requirement_version))


def is_torch_version(operation: str, version: str) -> bool:
    """Compare the installed torch's release (local suffix such as ``+cpu`` ignored) with ``version``.

    >>> is_torch_version(">=", "2.0")
    True
    """
    import torch

    return _operation(operation)(parse(parse(torch.__version__).base_version), parse(version))
