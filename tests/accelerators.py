"""Simulated accelerators, for tests of behaviour that only runs when one is present (this machine has none).

Only what torch reports changes (availability, count, device properties); the code under test runs as it
would on a machine with the devices.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def simulate_gpus(monkeypatch: pytest.MonkeyPatch, count: int, bus: int | None = 0x3B) -> None:
    """Make torch report ``count`` CUDA devices whose PCI address is 0000:<bus>:00.0 (no bus: unknown)."""
    properties = SimpleNamespace(pci_domain_id=0, pci_bus_id=bus, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
