"""``hasten merge-weights``: one weights file from a sharded (DCP) FSDP checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from hasten.commands.cli import command_parser

DESCRIPTION = (
    "Merge the weights of a sharded FSDP checkpoint (saved with SHARDED_STATE_DICT) into one file, "
    "OUTPUT_PATH/model.safetensors (or pytorch_model.bin). Needs the whole model in RAM."
)


def merge_command(args: argparse.Namespace) -> int:
    """Merge ``args.checkpoint_directory`` into ``args.output_path``."""
    from hasten.utils.fsdp_checkpoint import merge_fsdp_weights

    target = merge_fsdp_weights(
        args.checkpoint_directory, args.output_path, not args.unsafe_serialization, args.remove_checkpoint_dir
    )
    print(f"Merged weights written to {target}")
    return 0


def merge_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``merge-weights`` command's options (a subcommand of ``subparsers``, or a parser of its own)."""
    parser = command_parser(
        subparsers,
        "merge-weights",
        DESCRIPTION,
        "merge a sharded FSDP checkpoint into one file",
        merge_command,
    )
    parser.add_argument("checkpoint_directory", help="the DCP folder FSDP wrote (e.g. pytorch_model_fsdp_0)")
    parser.add_argument("output_path", help="the folder to write the merged file into")
    parser.add_argument(
        "--unsafe_serialization",
        action="store_true",
        help="write pytorch_model.bin (torch.save) instead of safetensors",
    )
    parser.add_argument(
        "--remove_checkpoint_dir", action="store_true", help="delete the checkpoint folder once merged"
    )
    return parser


def main() -> int:
    """Run the command from ``sys.argv`` (``python -m hasten.commands.merge``)."""
    return merge_command(merge_command_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
