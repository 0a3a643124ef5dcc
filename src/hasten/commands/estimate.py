"""``hasten estimate-memory``: the memory a model needs per dtype, computed on ``meta`` (nothing loaded)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.utils.imports import is_rich_available, require
from hasten.utils.modeling import calculate_maximum_sizes

BYTES_PER_PARAMETER = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}


def build_on_meta(target: str) -> nn.Module:
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
            str(config_file.parent if path.is_dir() else config_file)
        )
        with init_empty_weights(include_buffers=True):
            return transformers.AutoModel.from_config(config)
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


def estimate_rows(model: nn.Module, dtypes: list[str]) -> list[list[str]]:
    """Per dtype: largest layer, total size, and training with Adam (4 x: weights, gradients, two states)."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    total, (largest, _) = calculate_maximum_sizes(model)
    scale = total / max(parameters, 1)  # bytes per parameter as the model stands (buffers included)
    rows = []
    for dtype in dtypes:
        factor = BYTES_PER_PARAMETER[dtype] / scale if scale else 0
        training = _human(total * factor * 4) if dtype in ("float32", "float16", "bfloat16") else "-"
        rows.append([dtype, _human(largest * factor), _human(total * factor), training])
    return rows


HEADERS = ["dtype", "Largest layer", "Total size", "Training with Adam"]


def estimate_command(args: argparse.Namespace) -> int:
    model = build_on_meta(args.model)
    rows = estimate_rows(model, args.dtypes)
    title = f"Memory to load {args.model} ({type(model).__name__})"
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
