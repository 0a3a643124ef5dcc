"""`hasten tpu-config`: the gcloud command composed from flags and the config file, printed with --debug,
run (here through a stand-in `gcloud` on PATH, since the real one needs Google Cloud) with its exit status."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from hasten.commands.tpu import gcloud_command, tpu_command_launcher, tpu_command_parser
from tests.commands.run import hasten


def _args(*argv: str) -> argparse.Namespace:
    return tpu_command_parser().parse_args(list(argv))


def test_flags_compose_the_gcloud_command(tmp_path: Path) -> None:
    args = _args(
        "--tpu_name", "pod", "--tpu_zone", "us-central2-b", "--command", "echo", "hi", "--command", "ls"
    )
    assert gcloud_command(args) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone",
        "us-central2-b",
        "--command",
        "cd /usr/share; echo hi; ls",
        "--worker",
        "all",
    ]
    commands = tmp_path / "setup.sh"
    commands.write_text("pip list\n\npython train.py\n")
    args = _args(
        "--tpu_name",
        "pod",
        "--tpu_zone",
        "z",
        "--command_file",
        str(commands),
        "--use_alpha",
        "--install_hasten",
        "--hasten_version",
        "0.3.1",
    )
    command = gcloud_command(args)
    assert command[:2] == ["gcloud", "alpha"]
    assert command[-3] == "cd /usr/share; pip install hasten==0.3.1; pip list; python train.py"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tpu_name", "p", "--tpu_zone", "z"], "no command to run: pass --command"),
        (["--command", "ls"], "--tpu_name and --tpu_zone missing"),
        (
            [
                "--tpu_name",
                "p",
                "--tpu_zone",
                "z",
                "--command",
                "ls",
                "--install_accelerate",
                "--accelerate_version",
                "dev",
            ],
            "--hasten_version='dev' is neither 'latest' nor a version number",
        ),
    ],
)
def test_what_cannot_be_composed_is_an_error(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gcloud_command(_args(*argv))


def test_missing_gcloud_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="gcloud is not installed or not on PATH"):
        tpu_command_launcher(_args("--tpu_name", "p", "--tpu_zone", "z", "--command", "ls"))


def test_config_file_fills_in_and_gcloud_runs(tmp_path: Path) -> None:
    config = tmp_path / "tpu.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "distributed_type": "XLA",
                "tpu_name": "pod",
                "tpu_zone": "europe-west4-a",
                "commands": ["echo ready"],
            }
        )
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called"}\nexit 3\n')
    (bin_dir / "gcloud").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"

    def tpu_config(*argv: str) -> subprocess.CompletedProcess[str]:
        return hasten(tmp_path, "tpu-config", "--config_file", str(config), *argv, PATH=path)

    shown = tpu_config("--debug")
    expected = (
        "gcloud compute tpus tpu-vm ssh pod --zone europe-west4-a --command 'cd /usr/share; echo ready' "
        "--worker all"
    )
    assert shown.returncode == 0 and shown.stdout.strip() == f"Running {expected}"
    assert not (tmp_path / "called").exists()  # --debug runs nothing
    ran = tpu_config()
    assert ran.returncode == 3  # gcloud's own exit status
    assert (tmp_path / "called").read_text().strip() == " ".join(shlex.split(expected)[1:])
