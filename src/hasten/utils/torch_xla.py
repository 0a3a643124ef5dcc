"""Installing the torch_xla build that matches the installed torch (for TPU hosts)."""

from __future__ import annotations

import platform
import subprocess
import sys

from packaging.version import InvalidVersion, Version

from hasten.utils.imports import package_version


def xla_install_command(upgrade: bool = False, torch_version: str | None = None) -> list[str]:
    """The pip command :func:`install_xla` runs: this interpreter's pip, a torch_xla of the same
    major.minor release as torch (``torch_xla[tpu]~=2.13.0`` for torch 2.13.x), or with ``upgrade``
    the newest torch and torch_xla together.

    Raises:
        RuntimeError: this platform has no torch_xla wheels, or torch is not a release build.
    """
    system, machine = platform.system(), platform.machine().lower()
    if system != "Linux" or machine not in ("x86_64", "amd64", "aarch64"):
        raise RuntimeError(
            "install_xla: torch_xla publishes wheels for Linux on x86_64 and aarch64 only (this is "
            f"{system} on "
            f"{platform.machine()}); run it on the TPU host"
        )
    if upgrade:
        return [sys.executable, "-m", "pip", "install", "--upgrade", "torch", "torch_xla[tpu]"]
    version_text = torch_version if torch_version is not None else package_version("torch")
    if version_text is None:
        raise RuntimeError("install_xla: torch is not installed; install torch first (or pass upgrade=True)")
    try:
        version = Version(version_text)
    except InvalidVersion:
        raise RuntimeError(f"install_xla: cannot read the torch version {version_text!r}") from None
    if version.is_prerelease or version.is_devrelease:
        raise RuntimeError(
            f"install_xla: torch {version_text} is a pre-release; torch_xla matches releases only. Install "
            "a torch "
            "release, or torch_xla's nightly yourself"
        )
    return [sys.executable, "-m", "pip", "install", f"torch_xla[tpu]~={version.major}.{version.minor}.0"]


def install_xla(upgrade: bool = False) -> None:
    """Install the torch_xla build that matches the installed torch, with this interpreter's pip.

    Args:
        upgrade: upgrade torch as well and install the newest torch_xla.

    Raises:
        RuntimeError: the platform or torch build has no matching torch_xla (see
            :func:`xla_install_command`), or pip failed (its output is included).
    """
    command = xla_install_command(upgrade=upgrade)
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        output = (finished.stdout + finished.stderr).strip().splitlines()
        raise RuntimeError(
            f"install_xla: `{' '.join(command)}` failed with exit code {finished.returncode}. pip said:\n"
            + "\n".join(output[-20:])
        )
