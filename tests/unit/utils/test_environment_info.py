"""What the environment says about the machine: CPU ranks, device type, NVIDIA GPUs, the kernel."""

from __future__ import annotations

import logging
import os
import platform
import stat
from pathlib import Path

import pytest

from hasten.utils.environment import (
    CPUInformation,
    check_cuda_fp8_capability,
    check_cuda_p2p_ib_support,
    check_os_kernel,
    get_cpu_distributed_information,
    get_current_device_type,
    get_driver_version,
    get_gpu_info,
    patch_environment,
)


def test_cpu_information_without_a_launcher() -> None:
    assert get_cpu_distributed_information() == CPUInformation(0, 1, 0, 1)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
            CPUInformation(3, 4, 1, 2),
        ),
        (  # Open MPI's names
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            CPUInformation(2, 4, 0, 2),
        ),
        (
            {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
            CPUInformation(1, 2, 1, 2),
        ),
    ],
)
def test_cpu_information_from_launchers(variables: dict[str, str], expected: CPUInformation) -> None:
    with patch_environment(**variables):
        assert get_cpu_distributed_information() == expected


def test_cpu_information_rejects_an_inconsistent_launch() -> None:
    with (
        patch_environment(RANK="4", WORLD_SIZE="4"),
        pytest.raises(ValueError, match=r"RANK=4 is not a valid rank"),
    ):
        get_cpu_distributed_information()


def test_current_device_type_on_a_cpu_host() -> None:
    assert get_current_device_type() == ("cpu", "MULTI_CPU")


def test_gpu_queries_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
    with pytest.raises(FileNotFoundError, match="nvidia-smi was not found on PATH"):
        get_gpu_info()
    with pytest.raises(FileNotFoundError, match="nvidia-smi was not found on PATH"):
        get_driver_version()
    assert check_cuda_p2p_ib_support() is True
    check_cuda_fp8_capability.cache_clear()
    assert check_cuda_fp8_capability() is False
    check_cuda_fp8_capability.cache_clear()


def _fake_nvidia_smi(folder: Path, names: list[str], driver: str, capability: str) -> None:
    """An executable `nvidia-smi` answering the queries hasten makes, as the real one formats them."""
    gpus = "".join(f"{len(names)}, {name}\\n" for name in names)
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --query-gpu=count,name) printf "{gpus}" ;;\n'
        f'  --query-gpu=driver_version) printf "{driver}\\n{driver}\\n" ;;\n'
        f'  --query-gpu=compute_capability) printf "{capability}\\n" ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    ("names", "driver", "supported"),
    [
        (["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"], "535.54.03", False),
        (["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"], "550.54.14", True),
        (["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"], "535.54.03", True),
        (["NVIDIA GeForce RTX 4090"], "535.54.03", True),  # one GPU: nothing to transfer between
    ],
)
def test_gpu_queries_read_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, names: list[str], driver: str, supported: bool
) -> None:
    _fake_nvidia_smi(tmp_path, names, driver, "8.9")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert get_gpu_info() == (names, len(names))
    assert get_driver_version() == driver
    assert check_cuda_p2p_ib_support() is supported
    check_cuda_fp8_capability.cache_clear()
    assert check_cuda_fp8_capability() is True
    check_cuda_fp8_capability.cache_clear()


def test_check_os_kernel_is_quiet_on_this_kernel(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hasten.utils.environment"):
        check_os_kernel()
    assert ("below the recommended minimum" in caplog.text) == (
        platform.system() == "Linux" and tuple(int(p) for p in platform.release().split(".")[:2]) < (5, 5)
    )


def test_check_os_kernel_warns_on_an_old_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The running kernel cannot be changed by a test; what `platform.uname()` reports can.
    old = platform.uname()._replace(system="Linux", release="4.15.0-213-generic")
    monkeypatch.setattr(platform, "uname", lambda: old)
    with caplog.at_level(logging.WARNING, logger="hasten.utils.environment"):
        check_os_kernel()
    assert "Detected kernel version 4.15.0, which is below the recommended minimum of 5.5.0" in caplog.text
