"""``hasten estimate-memory``: the memory a model needs per dtype, computed on ``meta`` (nothing loaded)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.commands.cli import command_parser
from hasten.utils.imports import is_rich_available, require
from hasten.utils.modeling import calculate_maximum_sizes

BYTES_PER_PARAMETER = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


def build_on_meta(target: str, trust_remote_code: bool = False) -> nn.Module:
    """The model named by ``target``: a transformers config (folder or ``config.json``) or
    ``module:factory``."""
    path = Path(target)
    if path.exists():
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ValueError(
                f"{target!r} is a folder without config.json; point at a model folder or a config file"
            )
        require("transformers", extra="test", purpose="build a model from a config.json")
        import transformers

        config = transformers.AutoConfig.from_pretrained(
            str(config_file.parent if path.is_dir() else config_file), trust_remote_code=trust_remote_code
        )
        with init_empty_weights(include_buffers=True):
            return transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    module_name, _, factory_name = target.partition(":")
    if not factory_name:
        raise ValueError(
            f"{target!r} is neither an existing path nor a `module:factory` name (e.g. mypkg.models:build)"
        )
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load {target!r}: {error}") from None
    with init_empty_weights(include_buffers=True):
        model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError


def _sizes(model: nn.Module, dtypes: list[str]) -> list[tuple[str, float, float, float]]:
    """Per dtype: largest layer, total size and training with Adam (4 x: weights, gradients, two
    states; -1 for the integer dtypes, which are not trained), in bytes."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    total, (largest, _) = calculate_maximum_sizes(model)
    scale = total / max(parameters, 1)  # bytes per parameter as the model stands (buffers included)
    sizes = []
    for dtype in dtypes:
        factor = BYTES_PER_PARAMETER[dtype] / scale if scale else 0
        training = total * factor * 4 if dtype in ("float32", "float16", "bfloat16") else -1
        sizes.append((dtype, largest * factor, total * factor, training))
    return sizes


def estimate_rows(model: nn.Module, dtypes: list[str]) -> list[list[str]]:
    """Per dtype, as text: largest layer, total size, and training with Adam (``-`` when not estimated)."""
    return [
        [dtype, _human(largest), _human(total), _human(training) if training >= 0 else "-"]
        for dtype, largest, total, training in _sizes(model, dtypes)
    ]


HEADERS = ["dtype", "Largest layer", "Total size", "Training with Adam"]


def estimate_command(args: argparse.Namespace) -> int:
    model = _model(args)
    rows = estimate_rows(model, args.dtypes)
    title = f"Memory to load {args.model_name} ({type(model).__name__})"
    if is_rich_available():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for header in HEADERS:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return 0
    widths = [max(len(str(cell)) for cell in column) for column in zip(HEADERS, *rows)]
    print(title)
    for row in [HEADERS, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    return 0


def _model(args: argparse.Namespace) -> nn.Module:
    """The model ``args`` names, built on ``meta`` (a timm architecture with ``--library_name timm``)."""
    if getattr(args, "library_name", None) == "timm":
        require("timm", purpose="estimate-memory --library_name timm")
        import timm

        with init_empty_weights(include_buffers=True):
            return timm.create_model(args.model_name, pretrained=False)
    return build_on_meta(args.model_name, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def gather_data(args: argparse.Namespace) -> list[list[Any]]:
    """Per dtype of ``args.dtypes``: ``[dtype, largest layer, total size, training with Adam]`` in bytes
    (training ``-1`` for the integer dtypes), for the model ``args.model_name`` built on ``meta``."""
    return [list(row) for row in _sizes(_model(args), args.dtypes)]


def estimate_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``estimate-memory`` command's options (a subcommand of ``subparsers``, or a parser of its own)."""
    description = "Memory a model needs, per dtype, computed on meta (nothing is loaded or downloaded)."
    parser = command_parser(
        subparsers,
        "estimate-memory",
        description,
        "memory a model needs, per dtype, without loading it",
        estimate_command,
    )
    parser.add_argument(
        "model_name",
        help="a folder or config.json (transformers), a `module:factory` path, or a timm architecture",
    )
    parser.add_argument("--library_name", choices=["timm", "transformers"], help="how to build the model")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float16", "int8", "int4"],
        choices=list(BYTES_PER_PARAMETER),
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run the model code a local transformers folder ships",
    )
    return parser


def main() -> int:
    """Run ``hasten estimate-memory`` from ``sys.argv`` (``python -m hasten.commands.estimate``)."""
    return estimate_command(estimate_command_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
