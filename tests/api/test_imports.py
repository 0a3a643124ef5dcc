"""The import graph points downward, facades only re-export, and `import hasten` stays lean."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
FACADES = {"hasten", "hasten.utils", "hasten.utils.dataclasses"}

# Layer of each module (ARCHITECTURE.md; docs/design.md records where hasten departs from it).
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        [
            "hasten.utils.constants",
            "hasten.utils.errors",
            "hasten.utils.typing",
            "hasten.utils.imports",
            "hasten.utils.versions",
            "hasten.utils.environment",
            "hasten.utils.numa",
            "hasten.utils.process_env",
            "hasten.utils.device",
            "hasten.utils.torch_xla",
            "hasten.utils.atomic",
            "hasten.utils.progress",
        ],
        0,
    ),
    "hasten.utils.dataclasses": 1,
    "hasten.utils.config_file": 1,
    "hasten.utils.tree": 2,
    "hasten.utils.batches": 2,
    "hasten.utils.precision": 2,
    "hasten.process_group": 3,
    "hasten.state": 3,
    "hasten.logging": 3,
    **dict.fromkeys(
        [
            "hasten.utils.operations",
            "hasten.utils.exchange",
            "hasten.utils.amp",
            "hasten.utils.random",
            "hasten.utils.memory",
            "hasten.utils.parallel",
        ],
        4,
    ),
    **dict.fromkeys(
        [
            "hasten.utils.modeling",
            "hasten.utils.memory_budget",
            "hasten.utils.device_map",
            "hasten.utils.loading",
            "hasten.utils.offload",
            "hasten.utils.checkpoint_reader",
            "hasten.utils.sharding",
        ],
        5,
    ),
    **dict.fromkeys(["hasten.hooks", "hasten.big_modeling", "hasten.utils.bnb"], 6),
    **dict.fromkeys(
        [
            "hasten.accelerator",
            "hasten.engines",
            "hasten.data_loader",
            "hasten.data_loading",
            "hasten.optimizer",
            "hasten.scheduler",
            "hasten.checkpointing",
            "hasten.tracking",
            "hasten.launchers",
            "hasten.utils.deepspeed",
        ],
        7,
    ),
    "hasten.commands": 8,
    "hasten.__main__": 8,
}

OPTIONAL = [
    "deepspeed",
    "bitsandbytes",
    "transformers",
    "torch_xla",
    "torch._dynamo",
    "sympy",
    "accelerate",
    "tqdm",
    "rich",
    "tensorboard",
    "wandb",
    "mlflow",
    "optree",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def _hasten_imports(path: Path) -> list[tuple[int, str]]:
    """Every `hasten` module imported anywhere in the file (also inside functions), with line numbers."""
    found = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "hasten"
            ]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] == "hasten":
                found.append((node.lineno, module))
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in map(_module_name, SOURCES) if name not in FACADES and _layer(name) is None]
    assert not unplaced, f"Give these modules a layer in LAYERS (and ARCHITECTURE/docs/design.md): {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_imports_point_downward_and_never_at_a_facade(path: Path) -> None:
    name = _module_name(path)
    if name in FACADES:
        return
    own = _layer(name)
    assert own is not None
    problems = []
    for line, target in _hasten_imports(path):
        if target in FACADES:
            problems.append(f"line {line}: imports the facade {target!r}; import the concrete module instead")
        elif (layer := _layer(target)) is None or layer > own:
            problems.append(f"line {line}: layer {own} imports {target!r} (layer {layer})")
    assert not problems, f"{name}:\n" + "\n".join(problems)


ENTRY_POINTS = sorted(name for name in map(_module_name, SOURCES) if name != "hasten.__main__")


def _import_fresh(entry: str) -> str | None:
    result = subprocess.run(
        [sys.executable, "-c", f"import {entry}"], capture_output=True, text=True, timeout=180
    )
    return None if result.returncode == 0 else f"`import {entry}` failed:\n{result.stderr[-2000:]}"


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported first, alone, in its own interpreter (three at a time)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        failures = [error for error in pool.map(_import_fresh, ENTRY_POINTS) if error]
    assert not failures, "\n".join(failures)


def test_import_hasten_adds_no_optional_package() -> None:
    """Beyond what `import torch` itself loads (torch imports tqdm when it is installed)."""
    code = (
        "import sys, json, torch; before = set(sys.modules); import hasten, hasten.utils; "
        f"print(json.dumps(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {OPTIONAL!r} "
        "or m.startswith('torch._dynamo'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout) == []


def test_import_hasten_writes_no_environment_variable() -> None:
    code = (
        "import os, json; before = dict(os.environ); import hasten, hasten.utils; "
        "print(json.dumps(dict(os.environ) == before))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout) is True
