"""The ``hasten`` command (also ``python -m hasten``): env, config, launch, estimate-memory, test, to-fsdp2,
merge-weights, tpu-config.

Each subcommand's module is imported only when that subcommand runs, so ``hasten --help``
stays fast. Errors in the user's settings print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def command_parser(
    subparsers: Any, name: str, description: str, summary: str, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """The parser of the command ``name``: a subcommand of ``subparsers`` (the ``hasten`` command's) that
    runs ``run``, or, when ``subparsers`` is ``None``, a parser of its own (``hasten NAME``)."""
    if subparsers is None:
        return argparse.ArgumentParser(f"hasten {name}", description=description)
    parser: argparse.ArgumentParser = subparsers.add_parser(name, description=description, help=summary)
    parser.set_defaults(func=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hasten", description="Run PyTorch on one process or many.")
    commands = parser.add_subparsers(
        dest="command",
        metavar="{env,config,launch,estimate-memory,test,to-fsdp2,merge-weights,tpu-config}",
        required=True,
    )
    commands.add_parser("env", help="print versions, hardware and config, for bug reports")
    config = commands.add_parser("config", help="write or update the launch config file")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    default = config_commands.add_parser(
        "default", help="write a config for this machine with default settings"
    )
    default.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16", "fp8"])
    default.add_argument("--config_file", help="where to write (default: the default config file)")
    update = config_commands.add_parser("update", help="bring an older config file to the current keys")
    update.add_argument("--config_file", help="the file to update (default: the default config file)")
    from hasten.commands.launch import launch_command_parser

    launch_command_parser(commands)
    from hasten.commands.estimate import estimate_command_parser

    estimate_command_parser(commands)
    from hasten.commands.merge import merge_command_parser
    from hasten.commands.test import test_command_parser
    from hasten.commands.to_fsdp2 import to_fsdp2_command_parser
    from hasten.commands.tpu import tpu_command_parser

    for add in (test_command_parser, to_fsdp2_command_parser, merge_command_parser, tpu_command_parser):
        add(commands)  # each sets `func`, the function that runs it
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "env":
            from hasten.commands.env import env_command

            return env_command()
        if args.command == "config":
            from hasten.commands.config import config_command

            return config_command(args)
        return int(args.func(args))  # the other commands' parsers set `func`
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as error:
        print(f"hasten {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
