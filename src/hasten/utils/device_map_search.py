"""Two steps of device-map planning as Accelerate exposes them, for callers that plan by hand.

``infer_auto_device_map`` (``utils/device_map.py``) runs the same steps on its own indexed frontier;
these functions take plain lists of ``(name, module)`` the way Accelerate's do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from hasten.utils.device_map import _find_fallback, _Ties
from hasten.utils.modeling import convert_file_size_to_int


def get_module_size_with_ties(
    tied_params: Sequence[str],
    module_size: float,
    module_sizes: Mapping[str, float],
    modules_to_treat: Sequence[tuple[str, Any]],
) -> tuple[float, list[str], list[Any]]:
    """The size of a module together with the modules holding the weights tied to it.

    Args:
        tied_params: names of the parameters tied to the module but outside it.
        module_size: the module's own size.
        module_sizes: sizes by name, as ``compute_module_sizes`` returns them.
        modules_to_treat: the ``(name, module)`` entries still to place; each tied parameter must lie
            inside one of them.

    Returns:
        The size with the tied modules added (their weights shared with the module counted once),
        the tied modules' names, and the tied modules.

    Raises:
        ValueError: a tied parameter lies in none of ``modules_to_treat``.
    """
    names: list[str] = []
    modules: list[Any] = []
    total = module_size
    for parameter in tied_params:
        holder = next(
            ((name, module) for name, module in modules_to_treat if parameter.startswith(name + ".")), None
        )
        if holder is None:
            raise ValueError(
                f"The tied parameter {parameter!r} lies in none of the modules to treat "
                f"{[name for name, _ in modules_to_treat][:20]}; pass the entries that still hold it."
            )
        names.append(holder[0])
        modules.append(holder[1])
        total += module_sizes[holder[0]] - module_sizes.get(parameter, 0)  # hasten counts a tie once
    return total, names, modules


def fallback_allocate(
    modules: list[tuple[str, nn.Module]],
    module_sizes: Mapping[str, float],
    size_limit: int | str,
    no_split_module_classes: list[str] | None = None,
    tied_parameters: list[list[str]] | None = None,
) -> tuple[str | None, nn.Module | None, list[tuple[str, nn.Module]]]:
    """The first module or tensor (searching ``modules`` in order, splitting what may be split) that fits
    in ``size_limit`` with its tied weights.

    Returns its name, itself, and ``modules`` with it taken out (its ancestors replaced by their
    parts); ``(None, None, modules)`` when nothing fits.

    Raises:
        ValueError: ``size_limit`` is not a size (an int, or a string such as ``"2GiB"``).
    """
    limit = convert_file_size_to_int(size_limit)
    found = _find_fallback(
        list(modules),
        dict(module_sizes),
        limit,
        list(no_split_module_classes or []),
        _Ties(tied_parameters or []),
    )
    if found is None:
        return None, None, modules
    (name, module), rest = found
    return name, module, rest
