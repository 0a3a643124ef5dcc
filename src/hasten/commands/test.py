"""``hasten test``: launch a short end-to-end script (:mod:`hasten.commands.selftest`) on the
configured set-up and say whether it works."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from hasten.commands.cli import command_parser


def test_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``test`` command's options (a subcommand of ``subparsers``, or a parser of its own)."""
    description = (
        "Check the configured set-up: launch a short script that forms the group, communicates and trains."
    )
    parser = command_parser(
        subparsers, "test", description, "check that the configured set-up works", test_command
    )
    parser.add_argument(
        "--config_file",
        default=None,
        help="the launch config to test (default: the default config file, else one process)",
    )
    return parser


def test_command(args: argparse.Namespace) -> int:
    """Run the check through ``hasten launch``; returns its exit status (0: the set-up works)."""
    script = Path(__file__).with_name("selftest.py")
    config = [f"--config_file={args.config_file}"] if args.config_file is not None else []
    result = subprocess.run([sys.executable, "-m", "hasten", "launch", *config, str(script)], check=False)
    if result.returncode != 0:
        print(
            f"hasten test: the check failed (exit status {result.returncode}); its output is above.",
            file=sys.stderr,
        )
    return result.returncode


test_command_parser.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
test_command.__test__ = False  # type: ignore[attr-defined]


def main() -> int:
    """Run the command from ``sys.argv`` (``python -m hasten.commands.test``)."""
    return test_command(test_command_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
