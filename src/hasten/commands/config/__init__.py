"""``hasten config default`` and ``hasten config update``."""

from __future__ import annotations

import argparse

from hasten.utils.config_file import default_config_file, update_config_file, write_basic_config


def config_command(args: argparse.Namespace) -> int:
    if args.config_command == "default":
        written = write_basic_config(mixed_precision=args.mixed_precision, save_location=args.config_file)
        if written is False:
            target = args.config_file or default_config_file()
            print(f"A config file already exists at {target}; left unchanged.")
            return 1
        print(f"hasten config written to {written}")
        return 0
    path = update_config_file(args.config_file)
    print(f"Updated the config file at {path}")
    return 0
