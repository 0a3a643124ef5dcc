"""The import graph points downward, facades only re-export, and `import hasten` stays lean."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
FACADES = {
    "hasten",
    "hasten.utils",
    "hasten.utils.dataclasses",
    "hasten.utils.other",
    "hasten.utils.fsdp_utils",
}

# The one table of layers: each module (or package) and its layer, one per line. ARCHITECTURE.md gives
# the layers; docs/design.md ("Layers as built") records every module placed beyond or apart from it,
# and test_design_notes_agree_with_the_table keeps those notes true.
LAYERS: dict[str, int] = {
    "hasten.utils.constants": 0,
    "hasten.utils.errors": 0,
    "hasten.utils.typing": 0,
    "hasten.utils.imports": 0,
    "hasten.utils.versions": 0,
    "hasten.utils.environment": 0,
    "hasten.utils.numa": 0,
    "hasten.utils.process_env": 0,
    "hasten.utils.device": 0,
    "hasten.utils.torch_xla": 0,
    "hasten.utils.atomic": 0,
    "hasten.utils.progress": 0,
    "hasten.utils.attributes": 0,
    "hasten.utils.compilation": 0,
    "hasten.utils.ports": 0,
    "hasten.utils.reexport": 0,
    "hasten.utils.shared_dict": 0,
    "hasten.utils.tqdm": 0,
    "hasten.utils.dataclasses": 1,
    "hasten.utils.config_file": 1,
    "hasten.commands.config.config_args": 1,
    "hasten.utils.tree": 2,
    "hasten.utils.batches": 2,
    "hasten.utils.precision": 2,
    "hasten.process_group": 3,
    "hasten.state": 3,
    "hasten.gradient_state": 3,
    "hasten.logging": 3,
    "hasten.utils.operations": 4,
    "hasten.utils.exchange": 4,
    "hasten.utils.gather_plan": 4,
    "hasten.utils.amp": 4,
    "hasten.utils.random": 4,
    "hasten.utils.memory": 4,
    "hasten.utils.parallel": 4,
    "hasten.utils.operation_checks": 4,
    "hasten.utils.modeling": 5,
    "hasten.utils.memory_budget": 5,
    "hasten.utils.device_map": 5,
    "hasten.utils.device_map_checks": 5,
    "hasten.utils.placement": 5,
    "hasten.utils.loading": 5,
    "hasten.utils.offload": 5,
    "hasten.utils.checkpoint_reader": 5,
    "hasten.utils.sharding": 5,
    "hasten.utils.onload": 5,
    "hasten.utils.device_map_search": 5,
    "hasten.utils.ao": 5,
    "hasten.hooks": 6,
    "hasten.big_modeling": 6,
    "hasten.utils.bnb": 6,
    "hasten.layerwise_casting": 6,
    "hasten.accelerator": 7,
    "hasten.data_loader": 7,
    "hasten.data_loading": 7,
    "hasten.optimizer": 7,
    "hasten.scheduler": 7,
    "hasten.checkpointing": 7,
    "hasten.tracking": 7,
    "hasten._tracking": 7,
    "hasten._checkpointing": 7,
    "hasten.launchers": 7,
    "hasten.utils.deepspeed": 7,
    "hasten.engines": 7,
    "hasten.parallelism_config": 7,
    "hasten.utils.fsdp_utils": 7,
    "hasten.utils.launch": 7,
    "hasten.utils.fsdp2": 7,
    "hasten.utils.fsdp_checkpoint": 7,
    "hasten.inference": 7,
    "hasten.local_sgd": 7,
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
    "tensorboardX",
    "comet_ml",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
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
    assert not unplaced, (
        f"Give these modules a layer in LAYERS (and a row in docs/design.md 'Layers as built' when "
        f"ARCHITECTURE.md does not place them): {unplaced}"
    )


DESIGN = SRC.parent / "docs" / "design.md"
_DESIGN_ROW = re.compile(r"^\| `((?:hasten/)?[\w/]+?)(?:\.py|/)` \| (\d)")


def test_design_notes_agree_with_the_table() -> None:
    """Each module docs/design.md places ("Layers as built") is at that layer in LAYERS."""
    text = DESIGN.read_text().split("## Layers as built", 1)[1].split("\n## ", 1)[0]
    rows = [match.groups() for match in map(_DESIGN_ROW.match, text.splitlines()) if match]
    assert rows, "docs/design.md has no 'Layers as built' table"
    noted = {"hasten." + path.removeprefix("hasten/").replace("/", "."): int(layer) for path, layer in rows}
    wrong = {name: (layer, _layer(name)) for name, layer in noted.items() if _layer(name) != layer}
    assert not wrong, f"docs/design.md and LAYERS disagree (design.md, LAYERS): {wrong}"


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


# Run in a fresh interpreter: a forkserver that has imported torch (and nothing of hasten) forks one
# child per module, so each module is still imported first, alone, without paying for torch each time.
_IMPORT_EACH_FIRST = """
import importlib, json, multiprocessing, sys
entries = json.loads(sys.argv[1])
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(["torch"])
failed = []
for start in range(0, len(entries), 2):
    batch = entries[start:start + 2]
    children = [context.Process(target=importlib.import_module, args=(entry,)) for entry in batch]
    for child in children:
        child.start()
    for entry, child in zip(batch, children):
        child.join()
        if child.exitcode != 0:
            failed.append(entry)
print(json.dumps(failed))
"""


def _import_alone(entry: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", f"import {entry}"], capture_output=True, text=True, timeout=180
    )
    return f"`import {entry}` failed:\n{result.stderr[-2000:]}"


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported first, alone, in a process where no hasten module was imported before."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, json.dumps(ENTRY_POINTS)],
        capture_output=True,
        text=True,
        timeout=280,
        check=True,
    )
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(_import_alone(entry) for entry in failed)


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
