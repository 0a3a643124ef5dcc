"""Memory budgets: how many bytes each device may give a model, as given, detected or balanced.

``get_max_memory`` checks and orders a budget (or measures free memory); ``get_balanced_memory``
spreads a model evenly over the accelerators. ``infer_auto_device_map`` plans against either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from hasten.utils.device import accelerator_count, accelerator_type
from hasten.utils.modeling import DtypeLike, compute_module_sizes, convert_file_size_to_int, walk_modules

logger = logging.getLogger(__name__)

DeviceKey = int | str
MemoryBudget = dict[DeviceKey, int | str]

NAMED_DEVICES = ("mps", "cpu", "disk")
"""Budget keys besides accelerator indices, in the order devices are filled."""


def _parse_budget(key: object, value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"max_memory[{key!r}]={value!r}: give bytes as an int or a string such as '10GiB' or '500MB'"
        )
    try:
        return convert_file_size_to_int(value)
    except ValueError as error:
        raise ValueError(f"max_memory[{key!r}]: {error}") from None


def _check_key(key: object) -> None:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return
    if key in NAMED_DEVICES:
        return
    raise ValueError(
        f"max_memory has the key {key!r}, which is not a device hasten can plan for: use accelerator "
        f"indices (0, 1, ...) and {list(NAMED_DEVICES)}; write 0 rather than 'cuda:0'"
    )


def _detect_budget() -> dict[DeviceKey, int]:
    import psutil  # here, not at module level: `import hasten` does not pay for it

    budget: dict[DeviceKey, int] = {}
    kind = accelerator_type()
    if kind == "mps":
        budget["mps"] = psutil.virtual_memory().available
        return budget
    if kind != "cpu":
        backend = getattr(torch, kind)
        for index in range(accelerator_count(kind)):
            try:
                budget[index] = int(backend.mem_get_info(index)[0])
            except Exception as error:
                logger.info(
                    "Device %s:%d cannot report its free memory (%s); it gets no budget.", kind, index, error
                )
    budget["cpu"] = psutil.virtual_memory().available
    return budget


def get_max_memory(max_memory: MemoryBudget | None = None) -> dict[DeviceKey, int]:
    """The memory budget per device, in bytes, in the order devices are filled.

    With ``None``, the free memory of each accelerator and the available RAM. Otherwise
    ``max_memory`` (keys: accelerator indices, ``"mps"``, ``"cpu"``, ``"disk"``; values: bytes or
    strings like ``"10GiB"``) is checked, converted and reordered; it is not modified. Indices of
    devices this machine lacks are accepted, so maps for other machines can be planned here, with
    a warning naming them.
    """
    if max_memory is None:
        return _detect_budget()
    if not isinstance(max_memory, dict):
        raise TypeError(f"max_memory={max_memory!r} must be a dict such as {{0: '10GiB', 'cpu': '30GiB'}}")
    for key in max_memory:
        _check_key(key)
    parsed: dict[DeviceKey, int] = {key: _parse_budget(key, value) for key, value in max_memory.items()}
    indices = sorted(key for key in parsed if isinstance(key, int))
    present = accelerator_count()
    missing = [index for index in indices if index >= present]
    if missing:
        kind = accelerator_type()
        have = f"{present} {kind} device(s)" if present else "no accelerator"
        logger.warning(
            "max_memory gives a budget to device(s) %s, which this machine does not have (it has %s): a map "
            "planned with it puts modules there, and dispatching that map here will fail. Drop those keys to "
            "plan for this machine; keep them only to plan for another one.",
            missing,
            have,
        )
    order: list[DeviceKey] = [*indices, *(name for name in NAMED_DEVICES if name in parsed)]
    return {key: parsed[key] for key in order}


def no_split_list(no_split_module_classes: str | Iterable[str] | None) -> list[str]:
    """``no_split_module_classes`` as a list (one class name may be given as a string)."""
    if no_split_module_classes is None:
        return []
    if isinstance(no_split_module_classes, str):
        return [no_split_module_classes]
    return list(no_split_module_classes)


def _leaf_names(names: Iterable[str]) -> list[str]:
    names = [name for name in names if name]
    parents = {name.rpartition(".")[0] for name in names if "." in name}
    return [name for name in names if name not in parents]


def get_balanced_memory(
    model: nn.Module,
    max_memory: MemoryBudget | None = None,
    no_split_module_classes: list[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: dict[str, DtypeLike] | None = None,
    low_zero: bool = False,
) -> dict[DeviceKey, int]:
    """A budget that spreads ``model`` evenly over the accelerators instead of filling the first ones.

    Every accelerator but the last gets the model's size divided by their number, plus a margin
    of 1.25 x the larger of the biggest no-split block and the mean final-module size; the last
    keeps its full budget. With ``low_zero``, accelerator 0 gets only what does not fit on the
    others (room for ``generate`` and the like). A single accelerator keeps 90% of its memory
    when the budget was detected rather than given.
    """
    detected = max_memory is None
    budget = get_max_memory(max_memory)
    gpus = sorted(key for key, value in budget.items() if isinstance(key, int) and value > 0)
    if not gpus:
        return budget
    if len(gpus) == 1:
        low_zero = False
        if detected:
            budget[gpus[0]] = int(budget[gpus[0]] * 0.9)
            logger.info("Using 90%% of device %s's memory for the model and keeping 10%% free.", gpus[0])
    no_split = no_split_list(no_split_module_classes)
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    total = sizes.get("", 0)
    per_gpu = int(total // (len(gpus) - 1 if low_zero else len(gpus)))
    block: float = 0
    if no_split:
        first_of_class: dict[str, float] = {}
        for name, module in walk_modules(model):
            kind = type(module).__name__
            if name and kind in no_split and kind not in first_of_class and name in sizes:
                first_of_class[kind] = sizes[name]
        block = max(first_of_class.values(), default=0)
    tensors = set(_leaf_names(sizes))
    modules_only = [name for name in sizes if name not in tensors]
    finals = _leaf_names(modules_only)
    mean_final = int(sum(sizes[name] for name in finals) / max(len(finals), 1))
    per_gpu += int(1.25 * max(block, mean_final))
    first = gpus[0]
    for index in gpus[:-1]:
        if not (low_zero and index == first):
            budget[index] = int(min(per_gpu, budget[index]))
    if low_zero:
        rest = sum(budget[index] for index in gpus[1:])
        budget[first] = int(min(max(0, total - rest), budget[first]))
    return budget


def convert_bytes(size: float) -> str:
    """``size`` bytes in the largest unit that keeps it at or above 1 (powers of 1024), e.g. ``"1.5 GB"``."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024.0:
            return f"{round(size, 2)} {unit}"
        size /= 1024.0
    return f"{round(size, 2)} PB"


def get_module_leaves(module_sizes: Mapping[str, object]) -> list[str]:
    """The names in ``module_sizes`` (as ``compute_module_sizes`` returns them) that have no child entry."""
    return _leaf_names(module_sizes)
