"""Which accelerator this process computes on, decided without initialising CUDA."""

from __future__ import annotations

import torch

from hasten.utils.imports import is_cuda_available, is_mps_available, is_npu_available, is_xpu_available


def accelerator_type() -> str:
    """The device type of the accelerator present: ``"cuda"``, ``"xpu"``, ``"npu"``, ``"mps"`` or
    ``"cpu"``."""
    if is_cuda_available():
        return "cuda"
    if is_xpu_available():
        return "xpu"
    if is_npu_available():
        return "npu"
    if is_mps_available():
        return "mps"
    return "cpu"


def accelerator_count(device_type: str | None = None) -> int:
    """How many devices of ``device_type`` (the present accelerator by default) this process sees."""
    device_type = device_type or accelerator_type()
    if device_type == "cpu":
        return 0
    if device_type == "mps":
        return 1
    module = getattr(torch, device_type, None)
    return int(module.device_count()) if module is not None else 0


def is_device_available(device: torch.device) -> bool:
    """Whether this process can put tensors on ``device``: its accelerator is present and, for an indexed
    device, the index exists. Device types hasten does not probe (out-of-tree backends) count as present."""
    probes = {
        "cuda": is_cuda_available,
        "xpu": is_xpu_available,
        "npu": is_npu_available,
        "mps": is_mps_available,
    }
    probe = probes.get(device.type)
    if probe is None:
        return True
    if not probe():
        return False
    return device.index is None or device.type == "mps" or device.index < accelerator_count(device.type)


def device_for_local_process(local_process_index: int, cpu: bool = False) -> torch.device:
    """The device a process with this local index should use (``cpu`` forces the CPU)."""
    kind = "cpu" if cpu else accelerator_type()
    if kind in ("cpu", "mps"):
        return torch.device(kind)
    count = accelerator_count(kind)
    return torch.device(kind, local_process_index % count if count else 0)


def check_device_same(first_device: torch.device, second_device: torch.device) -> bool:
    """Whether two devices are the same one, counting an accelerator without index as index 0
    (``cuda`` and ``cuda:0`` are the same; torch's ``==`` says they differ)."""
    if first_device.type != second_device.type:
        return False

    def indexed(device: torch.device) -> torch.device:
        return torch.device(device.type, 0) if device.type != "cpu" and device.index is None else device

    return indexed(first_device) == indexed(second_device)
