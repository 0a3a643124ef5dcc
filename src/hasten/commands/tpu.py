"""``hasten tpu-config``: run set-up commands on every worker of a TPU pod through ``gcloud``.

Settings left out come from the launch config file (``tpu_name``, ``tpu_zone``, ``commands`` or
``command_file``). ``--debug`` prints the ``gcloud`` command instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from hasten.commands.cli import command_parser

DESCRIPTION = "Run commands on every worker of a TPU pod (before `hasten launch`), through gcloud."


def tpu_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``tpu-config`` command's options (a subcommand of ``subparsers``, or a parser of its own)."""
    parser = command_parser(
        subparsers, "tpu-config", DESCRIPTION, "run set-up commands on a TPU pod", tpu_command_launcher
    )
    config = parser.add_argument_group("config", "settings that the launch config file can hold")
    config.add_argument(
        "--config_file", default=None, help="the launch config file (default: the default one)"
    )
    config.add_argument("--tpu_name", default=None, help="the TPU to run on")
    config.add_argument("--tpu_zone", default=None, help="the TPU's zone")
    pod = parser.add_argument_group("pod", "what runs on the pod")
    pod.add_argument("--use_alpha", action="store_true", help="use `gcloud alpha`")
    pod.add_argument("--command_file", default=None, help="a file of commands to run, one per line")
    pod.add_argument("--command", action="append", nargs="+", help="a command to run (may be repeated)")
    pod.add_argument(
        "--install_hasten",
        "--install_accelerate",
        dest="install_accelerate",
        action="store_true",
        help="pip install hasten on the pod first",
    )
    pod.add_argument(
        "--hasten_version",
        "--accelerate_version",
        dest="accelerate_version",
        default="latest",
        help="the hasten version to install: 'latest' or a version number",
    )
    pod.add_argument("--debug", action="store_true", help="print the gcloud command instead of running it")
    return parser


def _from_config(args: argparse.Namespace) -> None:
    from hasten.commands.config.config_args import ClusterConfig, load_config_from_file
    from hasten.utils.config_file import default_config_file

    if args.config_file is None and not default_config_file().is_file():
        return
    config = load_config_from_file(args.config_file)
    if not isinstance(config, ClusterConfig):
        return
    if not args.command_file and not args.command:
        if config.commands:
            args.command = [list(config.commands)]
        elif config.command_file:
            args.command_file = config.command_file
    args.tpu_name = args.tpu_name or config.tpu_name
    args.tpu_zone = args.tpu_zone or config.tpu_zone


def _install(version: str) -> str:
    if version == "latest":
        return "pip install -U hasten"
    try:
        return f"pip install hasten=={Version(version)}"
    except InvalidVersion:
        raise ValueError(
            f"--hasten_version={version!r} is neither 'latest' nor a version number such as 0.1.0"
        ) from None


def gcloud_command(args: argparse.Namespace) -> list[str]:
    """The ``gcloud compute tpus tpu-vm ssh`` command for ``args`` (after the config file filled them in).

    Raises:
        ValueError: no command to run, no TPU name or zone, or a bad version.
    """
    if args.command_file:
        lines = Path(args.command_file).read_text().splitlines()
        commands = [line for line in lines if line.strip()]
    else:
        commands = [" ".join(part) if isinstance(part, list) else str(part) for part in args.command or []]
    if not commands:
        raise ValueError(
            "no command to run: pass --command (repeatable) or --command_file, or `commands` in the config"
        )
    missing = [
        flag for flag, value in (("--tpu_name", args.tpu_name), ("--tpu_zone", args.tpu_zone)) if not value
    ]
    if missing:
        raise ValueError(
            f"{' and '.join(missing)} missing: pass them or set tpu_name / tpu_zone in the config file"
        )
    steps = ["cd /usr/share"]
    if args.install_accelerate:
        steps.append(_install(args.accelerate_version))
    steps += commands
    command = [
        "gcloud",
        *(["alpha"] if args.use_alpha else []),
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        args.tpu_name,
    ]
    return [*command, "--zone", args.tpu_zone, "--command", "; ".join(steps), "--worker", "all"]


def tpu_command_launcher(args: argparse.Namespace) -> int:
    """Run (or with ``--debug`` print) the ``gcloud`` command; returns its exit status.

    Raises:
        ValueError: as :func:`gcloud_command`, or gcloud is not installed.
    """
    _from_config(args)
    command = gcloud_command(args)
    if args.debug:
        print(f"Running {shlex.join(command)}")
        return 0
    if shutil.which("gcloud") is None:
        raise ValueError(
            "gcloud is not installed or not on PATH; install the Google Cloud CLI, or use --debug"
        )
    result = subprocess.run(command, check=False)
    if result.returncode == 0:
        print("Successfully setup pod.")
    return result.returncode


def main() -> int:
    """Run the command from ``sys.argv`` (``python -m hasten.commands.tpu``)."""
    return tpu_command_launcher(tpu_command_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
