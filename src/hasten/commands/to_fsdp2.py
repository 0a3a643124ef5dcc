"""``hasten to-fsdp2``: rewrite the FSDP1 settings of a launch config file for FSDP2.

Keys FSDP2 keeps are kept; ``fsdp_sharding_strategy`` becomes ``fsdp_reshard_after_forward``
(``FULL_SHARD`` → true, ``SHARD_GRAD_OP`` → false); FSDP1-only keys are dropped. Every change that
is not an exact equivalent (a dropped key, a strategy FSDP2 has no counterpart for) is named in a
warning. The file keeps its format (YAML or JSON) and is written crash-safely.
"""

from __future__ import annotations

import argparse
import enum
import warnings
from pathlib import Path
from typing import Any

from hasten.commands.cli import command_parser
from hasten.utils.config_file import load_config_file, save_config_file
from hasten.utils.constants import FSDP_SHARDING_STRATEGY
from hasten.utils.environment import str_to_bool


class ConversionStatus(enum.Enum):
    """What becomes of an FSDP1 key that has no FSDP2 key."""

    NOT_YET_IMPLEMENTED = 0
    REMOVED = -1


# FSDP1 key -> its FSDP2 key, or why it goes.
ARGUMENT_KEY_MAPPING: dict[str, str | ConversionStatus] = {
    "fsdp_version": "fsdp_version",
    "fsdp_reshard_after_forward": "fsdp_reshard_after_forward",
    "fsdp_auto_wrap_policy": "fsdp_auto_wrap_policy",
    "fsdp_backward_prefetch": ConversionStatus.REMOVED,
    "fsdp_forward_prefetch": ConversionStatus.NOT_YET_IMPLEMENTED,
    "fsdp_cpu_ram_efficient_loading": "fsdp_cpu_ram_efficient_loading",
    "fsdp_offload_params": "fsdp_offload_params",
    "fsdp_sharding_strategy": "fsdp_reshard_after_forward",
    "fsdp_state_dict_type": "fsdp_state_dict_type",
    "fsdp_sync_module_states": ConversionStatus.REMOVED,
    "fsdp_transformer_layer_cls_to_wrap": "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_min_num_params": "fsdp_min_num_params",
    "fsdp_use_orig_params": ConversionStatus.REMOVED,
    "fsdp_activation_checkpointing": "fsdp_activation_checkpointing",
}
# FSDP1 sharding strategy -> reshard_after_forward, and what the FSDP2 setting loses, if anything.
STRATEGY_TO_RESHARD: dict[str, tuple[bool, str | None]] = {
    "FULL_SHARD": (True, None),
    "SHARD_GRAD_OP": (False, None),
    "HYBRID_SHARD": (
        True,
        "FSDP2 shards across all ranks; for hybrid sharding set ParallelismConfig(dp_replicate_size=...)",
    ),
    "HYBRID_SHARD_ZERO2": (
        False,
        "FSDP2 shards across all ranks; for hybrid sharding set ParallelismConfig(dp_replicate_size=...)",
    ),
    "NO_SHARD": (False, "FSDP2 always shards; to replicate the model instead, launch without FSDP (DDP)"),
}


def _strategy_name(value: Any) -> str | None:
    """A sharding strategy by name, from its name or its number (1-5, as the launcher accepts)."""
    text = str(value).strip().upper()
    if text.isdigit() and 1 <= int(text) <= len(FSDP_SHARDING_STRATEGY):
        return FSDP_SHARDING_STRATEGY[int(text) - 1]
    return text if text in STRATEGY_TO_RESHARD else None


def _is_boolean(value: Any) -> bool:
    try:
        str_to_bool(str(value))
    except ValueError:
        return False
    return True


def convert_config_to_fsdp2(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its ``fsdp_config`` rewritten for FSDP2 (``fsdp_version: 2``); changed in place and
    returned. A config without FSDP settings, or already at version 2, is returned unchanged (with a
    warning for the latter)."""
    fsdp = config.get("fsdp_config") or {}
    if not fsdp:
        return config
    if str(fsdp.get("fsdp_version", 1)) == "2":
        warnings.warn(
            "The config already has fsdp_version: 2; nothing converted. If its keys are FSDP1's, set "
            "fsdp_version "
            "to 1 and run again.",
            UserWarning,
            stacklevel=2,
        )
        return config
    converted: dict[str, Any] = {}
    for key, value in fsdp.items():
        target = ARGUMENT_KEY_MAPPING.get(key, key)
        if target is ConversionStatus.REMOVED:
            warnings.warn(f"{key}: {value!r} does not exist in FSDP2; dropped.", UserWarning, stacklevel=2)
            continue
        if target is ConversionStatus.NOT_YET_IMPLEMENTED:
            warnings.warn(
                f"{key}: {value!r} has no FSDP2 equivalent yet; dropped.", UserWarning, stacklevel=2
            )
            continue
        if key in ("fsdp_sharding_strategy", "fsdp_reshard_after_forward") and not isinstance(value, bool):
            name = _strategy_name(value)
            if name is None and key == "fsdp_reshard_after_forward" and _is_boolean(value):
                converted[key] = str_to_bool(str(value), to_bool=True)
                continue
            if name is None:
                raise ValueError(
                    f"{key}: {value!r} is not a sharding strategy; expected one of "
                    f"{list(STRATEGY_TO_RESHARD)} (or "
                    "1-5). Fix the file, then convert it."
                )
            value, loss = STRATEGY_TO_RESHARD[name]
            if loss is not None:
                warnings.warn(
                    f"{key}: {name} becomes fsdp_reshard_after_forward: {value}; {loss}.",
                    UserWarning,
                    stacklevel=2,
                )
        converted[str(target)] = value
    converted["fsdp_version"] = 2
    config["fsdp_config"] = converted
    return config


def load_config(config_file: str) -> dict[str, Any]:
    """The settings in ``config_file`` (YAML or JSON).

    Raises:
        ValueError: the file is empty or not a mapping.
    """
    config = load_config_file(config_file)
    if not config:
        raise ValueError(f"Config file {config_file} is empty; there is nothing to convert.")
    return config


def to_fsdp2_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``to-fsdp2`` command's options (a subcommand of ``subparsers``, or a parser of its own)."""
    description = "Convert a launch config file from FSDP1 to FSDP2 settings."
    parser = command_parser(
        subparsers, "to-fsdp2", description, "rewrite an FSDP1 config file for FSDP2", to_fsdp2_command
    )
    parser.add_argument("--config_file", required=True, help="the config file to convert")
    parser.add_argument(
        "--overwrite", action="store_true", help="write over the config file (or --output_file)"
    )
    parser.add_argument("--output_file", default=None, help="where to write the converted config")
    return parser


def to_fsdp2_command(args: argparse.Namespace) -> int:
    """Convert ``args.config_file`` into ``args.output_file`` (or over itself with ``--overwrite``).

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: neither ``--output_file`` nor ``--overwrite`` was given.
        FileExistsError: ``--output_file`` exists and ``--overwrite`` was not given.
    """
    source = Path(args.config_file)
    if not source.is_file():
        raise FileNotFoundError(f"Config file {source} not found")
    if args.output_file is None and not args.overwrite:
        raise ValueError(
            "pass --output_file to write the converted config there, or --overwrite to replace the file"
        )
    target = Path(args.output_file) if args.output_file is not None else source
    if args.output_file is not None and target.exists() and not args.overwrite:
        raise FileExistsError(f"Output file {target} already exists; pass --overwrite to replace it")
    save_config_file(convert_config_to_fsdp2(load_config(str(source))), target)
    print(f"FSDP2 config written to {target}")
    return 0


def main() -> int:
    """Run the command from ``sys.argv`` (``python -m hasten.commands.to_fsdp2``)."""
    return to_fsdp2_command(to_fsdp2_command_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
