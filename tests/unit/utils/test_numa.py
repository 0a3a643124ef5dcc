"""NUMA topology read from a sysfs tree (a fake tree in a temporary folder, and the real one)."""

from __future__ import annotations

from pathlib import Path

from hasten.utils.numa import cpus_of_accelerator, cpus_of_numa_node, numa_node_of_pci_device, parse_cpu_list


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


def test_no_accelerator_here_means_no_cpus() -> None:
    assert cpus_of_accelerator(0) is None
