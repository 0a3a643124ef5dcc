"""install_xla: the command it builds, its refusals, and pip's failure reported (no network)."""

from __future__ import annotations

import sys

import pytest

from hasten.utils import torch_xla
from hasten.utils.environment import patch_environment
from hasten.utils.torch_xla import install_xla, xla_install_command


def test_the_command_matches_torch_major_minor() -> None:
    assert xla_install_command(torch_version="2.13.0+cpu") == [
        sys.executable,
        "-m",
        "pip",
        "install",
        "torch_xla[tpu]~=2.13.0",
    ]
    assert xla_install_command()[-1].startswith("torch_xla[tpu]~=2.")
    assert xla_install_command(upgrade=True)[3:] == ["install", "--upgrade", "torch", "torch_xla[tpu]"]


def test_pre_releases_and_other_platforms_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=r"torch 2.14.0.dev20260101 is a pre-release"):
        xla_install_command(torch_version="2.14.0.dev20260101")
    monkeypatch.setattr(torch_xla.platform, "system", lambda: "Darwin")
    with pytest.raises(RuntimeError, match=r"wheels for Linux on x86_64 and aarch64 only \(this is Darwin"):
        xla_install_command()


def test_pip_failures_are_reported_with_pips_output() -> None:
    with (
        patch_environment(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_DISABLE_PIP_VERSION_CHECK="1"),
        pytest.raises(RuntimeError, match=r"(?s)failed with exit code 1\. pip said:.*torch.xla"),
    ):
        install_xla()
