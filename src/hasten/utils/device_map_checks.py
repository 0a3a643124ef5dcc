"""Checks of a device map against the model and the machine, before anything is placed.

Each raises (or warns) with the key, the device and the fix: a map that leaves weights
without a device, keys that overlap (``"a"`` and ``"a.weight"``), devices this machine
lacks, tied weights split across devices.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from hasten.utils.device import accelerator_count, accelerator_type
from hasten.utils.typing import Device

logger = logging.getLogger(__name__)


def _prefixes(name: str) -> list[str]:
    """``""``, ``"a"``, ``"a.b"`` for ``"a.b.c"``: the names of the modules that contain it."""
    parts = name.split(".")
    return ["", *(".".join(parts[:end]) for end in range(1, len(parts)))]


def check_device_map(model: nn.Module, device_map: dict[str, Device]) -> None:
    """Raise if ``device_map`` leaves a parameter or buffer of ``model`` without a device; warn about
    keys that name no submodule.

    Raises:
        ValueError: a weight has no device, or two keys overlap (see :func:`check_device_map_keys`).
    """
    check_device_map_keys(device_map)
    modules = {name for name, _ in model.named_modules()}
    tensors = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    unknown = [key for key in device_map if key and key not in modules and key not in tensors]
    if unknown:
        warnings.warn(
            f"The following device_map keys do not match any submodules in the model: {unknown}. They name "
            f"no submodule, parameter or buffer of {type(model).__name__} and are ignored.",
            UserWarning,
            stacklevel=2,
        )
    if "" in device_map:
        return
    uncovered = [
        name
        for name in model.state_dict()
        if name not in device_map and not any(prefix in device_map for prefix in _prefixes(name)[1:])
    ]
    if uncovered:
        raise ValueError(
            "The device_map provided does not give any device for the following parameters: "
            f"{uncovered}. Add an entry for each of these {len(uncovered)} weight(s) (or for a module "
            "containing it)."
        )


def check_device_map_keys(device_map: Mapping[str, Device]) -> None:
    """Raise if a key of ``device_map`` lies inside another (``"a"`` and ``"a.weight"``): the tensors
    under both would get two devices. The root ``""`` may be given beside other keys (its device is
    the default for everything they do not name)."""
    keys = set(device_map)
    for key in device_map:
        inside = next((prefix for prefix in reversed(_prefixes(key)[1:]) if prefix in keys), None)
        if inside is not None:
            raise ValueError(
                f"device_map has the keys {inside!r} ({device_map[inside]!r}) and {key!r} "
                f"({device_map[key]!r}), and {key!r} lies inside {inside!r}, so its tensors would get two "
                f"devices. Give each tensor one entry: either the module {inside!r}, or all of its parts."
            )


def check_devices_present(device_map: Mapping[str, Device]) -> None:
    """Raise if ``device_map`` names a device this machine lacks (``"cuda:0"`` or ``0`` without CUDA).

    ``"cpu"``, ``"disk"`` and ``"meta"`` are always present; integers index the accelerator present.
    """
    kind = accelerator_type()
    count = accelerator_count(kind)
    present = ["cpu", "disk", "meta", *([kind] if kind != "cpu" else []), *range(count)]
    for key, device in device_map.items():
        if device in ("cpu", "disk", "meta"):
            continue
        if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
            raise TypeError(
                f"device_map[{key!r}]={device!r}: a device is an accelerator index, 'cpu', 'disk' or a name "
                "such as 'cuda:0'"
            )
        try:
            parsed = (
                torch.device(_as_index(device, kind)) if isinstance(device, int) else torch.device(device)
            )
        except RuntimeError:
            raise ValueError(
                f"device_map[{key!r}]={device!r} is not a device: use an accelerator index, 'cpu', 'disk' or "
                "a name such as 'cuda:0'"
            ) from None
        if parsed.type in ("cpu", "meta"):
            continue
        index = parsed.index or 0
        if parsed.type != kind or (parsed.type != "mps" and index >= count):
            have = f"{count} {kind} device(s)" if kind != "cpu" else "no accelerator"
            raise ValueError(
                f"device_map[{key!r}]={device!r}, but this machine has {have} (devices it can use: "
                f"{present}). Plan the map for this machine, e.g. infer_auto_device_map(model) or "
                "device_map={'': 'cpu'}."
            )


def _as_index(device: int, kind: str) -> str:
    return f"{'cuda' if kind == 'cpu' else kind}:{device}"


def check_tied_parameters_on_same_device(tied_params: list[list[str]], device_map: dict[str, Device]) -> None:
    """Warn about tied parameter groups whose members ``device_map`` puts on different devices."""
    for group in tied_params:
        devices = {name: _device_of(name, device_map) for name in group}
        if len({str(device) for device in devices.values()}) > 1:
            logger.warning(
                "Tied parameters are on different devices: %s. Put them on one device in your device_map, "
                "or use "
                "device_map='auto'.",
                devices,
            )


def _device_of(name: str, device_map: dict[str, Device]) -> Device:
    for prefix in [name, *reversed(_prefixes(name))]:
        if prefix in device_map:
            return device_map[prefix]
    raise ValueError(f"The device_map gives no device for {name!r} nor for any module containing it")
