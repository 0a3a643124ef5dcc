"""NUMA topology read from sysfs: which CPUs sit next to a given accelerator.

Reads only; every function returns ``None`` rather than raising when the
information is not there (a CPU-only host, a container without sysfs).
"""

from __future__ import annotations

from pathlib import Path

import torch

SYSFS = Path("/sys")


def parse_cpu_list(text: str) -> set[int]:
    """Read a Linux CPU list such as ``"0-3,8,10-11"``.

    >>> sorted(parse_cpu_list("0-2,5"))
    [0, 1, 2, 5]
    """
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        start, _, end = part.partition("-")
        cpus.update(range(int(start), int(end or start) + 1))
    return cpus


def numa_node_of_pci_device(bus_id: str, sysfs: Path = SYSFS) -> int | None:
    """The NUMA node of a PCI device such as ``"0000:3b:00.0"``, or ``None`` when unknown."""
    try:
        node = int((sysfs / "bus/pci/devices" / bus_id.lower() / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def cpus_of_numa_node(node: int, sysfs: Path = SYSFS) -> set[int] | None:
    """The CPUs of NUMA node ``node``, or ``None`` when sysfs does not say."""
    try:
        cpus = parse_cpu_list((sysfs / f"devices/system/node/node{node}/cpulist").read_text())
    except (OSError, ValueError):
        return None
    return cpus or None


def _pci_bus_id(local_process_index: int) -> str | None:
    if not torch.cuda.is_available() or local_process_index >= torch.cuda.device_count():
        return None
    props = torch.cuda.get_device_properties(local_process_index)
    domain, bus, device = (
        getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")
    )
    if domain is None or bus is None or device is None:
        return None
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def cpus_of_accelerator(local_process_index: int, sysfs: Path | None = None) -> set[int] | None:
    """The CPUs on the NUMA node of the local accelerator ``local_process_index``, if known (read from
    ``sysfs``, the module's ``SYSFS`` when ``None``)."""
    bus_id = _pci_bus_id(local_process_index)
    if bus_id is None:
        return None
    sysfs = SYSFS if sysfs is None else sysfs
    node = numa_node_of_pci_device(bus_id, sysfs)
    return None if node is None else cpus_of_numa_node(node, sysfs)
