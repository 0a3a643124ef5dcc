"""NUMA topology read from a sysfs tree (a fake tree in a temporary folder, and the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hasten.utils import numa
from hasten.utils.numa import cpus_of_accelerator, cpus_of_numa_node, numa_node_of_pci_device, parse_cpu_list
from tests.accelerators import simulate_gpus


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("") == set()


def _sysfs(tmp_path: Path, node: str, cpulist: str) -> Path:
    device = tmp_path / "bus/pci/devices/0000:3b:00.0"
    device.mkdir(parents=True)
    (device / "numa_node").write_text(node)
    (tmp_path / "devices/system/node/node1").mkdir(parents=True)
    (tmp_path / "devices/system/node/node1/cpulist").write_text(cpulist)
    return tmp_path


def test_reads_the_node_and_its_cpus(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, "1\n", "4-7\n")
    assert numa_node_of_pci_device("0000:3B:00.0", sysfs) == 1
    assert cpus_of_numa_node(1, sysfs) == {4, 5, 6, 7}


def test_unknown_node_and_missing_files_give_none(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, "-1\n", "")
    assert numa_node_of_pci_device("0000:3b:00.0", sysfs) is None
    assert numa_node_of_pci_device("0000:ff:00.0", sysfs) is None
    assert cpus_of_numa_node(1, sysfs) is None
    assert cpus_of_numa_node(9, sysfs) is None


def test_no_accelerator_means_no_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpus_of_accelerator(0, _sysfs(tmp_path, "1\n", "4-7\n")) is None


def test_an_accelerator_maps_to_the_cpus_of_its_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = _sysfs(tmp_path, "1\n", "4-7\n")
    simulate_gpus(monkeypatch, 2)
    assert cpus_of_accelerator(0, sysfs) == cpus_of_accelerator(1, sysfs) == {4, 5, 6, 7}
    assert cpus_of_accelerator(2, sysfs) is None  # no third device
    monkeypatch.setattr(numa, "SYSFS", sysfs)
    assert cpus_of_accelerator(0) == {4, 5, 6, 7}  # the module's sysfs by default
    simulate_gpus(monkeypatch, 2, bus=None)
    assert cpus_of_accelerator(0, sysfs) is None  # torch does not say where the device sits
