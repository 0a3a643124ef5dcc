"""Checkpoint loading and disk offload: hasten against Accelerate and raw safetensors, one run.

Run: ``.venv/bin/python bench/bench_loading.py [--quick]`` (needs Accelerate). Prints Markdown
tables for docs/benchmarks.md:

1. a ~1 GiB model loaded into a ``meta`` model from one safetensors file and from 4 shards with
   an index, timed until every weight has been read once (safetensors maps files lazily, so the
   touch is part of the load); files are in the page cache for every contender;
2. models of 5k-20k small tensors with a tenth mapped to disk (cost per tensor);
3. peak resident memory above a fresh process's baseline while loading the 1 GiB file;
4. ``offload_state_dict`` + ``load_offloaded_weights`` of ~1 GiB against raw numpy memmap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, measure, table

WIDTH = 4096


def big_model(layers: int = 16) -> nn.Module:
    """``layers`` x 64 MiB of float32 weights (16 layers: 1 GiB)."""
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))


def many_small(count: int) -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in range(count)))


def touch(model: nn.Module) -> float:
    return float(sum(float(p.detach().float().sum()) for p in model.parameters()))


def write_checkpoints(folder: Path, layers: int) -> None:
    from hasten.utils.sharding import save_sharded_safetensors

    torch.manual_seed(0)
    model = big_model(layers)
    state = model.state_dict()
    save_file(state, folder / "model.safetensors")
    shard = sum(t.numel() * 4 for t in state.values()) // 4 + 1
    save_sharded_safetensors(state, folder / "sharded", max_shard_size=shard)


def time_loads(folder: Path, layers: int) -> list[tuple[str, list[Timing]]]:
    from accelerate import init_empty_weights as accelerate_empty
    from accelerate.utils import load_checkpoint_in_model as accelerate_load

    from hasten.big_modeling import init_empty_weights
    from hasten.utils.loading import load_checkpoint_in_model

    def ours(path: Path) -> None:
        with init_empty_weights():
            model = big_model(layers)
        load_checkpoint_in_model(model, path)
        touch(model)

    def theirs(path: Path) -> None:
        with accelerate_empty():
            model = big_model(layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerate_load(model, str(path), device_map={"": "cpu"})
        touch(model)

    def raw(path: Path) -> None:
        with init_empty_weights():
            model = big_model(layers)
        state: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        for file in files:
            state.update(load_file(file))
        model.load_state_dict(state, assign=True)
        touch(model)

    rows = []
    for case, path in (
        ("single file", folder / "model.safetensors"),
        ("4 shards + index", folder / "sharded"),
    ):
        rows.append(
            (
                case,
                [
                    measure("hasten", lambda: ours(path), repeat=5, number=1),
                    measure("Accelerate", lambda: theirs(path), repeat=5, number=1),
                    measure("safetensors load_file + assign", lambda: raw(path), repeat=5, number=1),
                ],
            )
        )
    return rows


def time_small(folder: Path, counts: list[int]) -> list[tuple[str, list[Timing]]]:
    from accelerate import init_empty_weights as accelerate_empty
    from accelerate.utils import load_checkpoint_in_model as accelerate_load

    from hasten.big_modeling import init_empty_weights
    from hasten.utils.loading import load_checkpoint_in_model

    rows = []
    for count in counts:
        path = folder / f"small-{count}.safetensors"
        save_file(many_small(count).state_dict(), path)
        device_map = {str(i): ("disk" if i % 10 == 0 else "cpu") for i in range(count)}

        def ours() -> None:
            with init_empty_weights():
                model = many_small(count)
            load_checkpoint_in_model(
                model, path, device_map=device_map, offload_folder=folder / "ours-offload"
            )

        def theirs() -> None:
            with accelerate_empty():
                model = many_small(count)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                accelerate_load(
                    model, str(path), device_map=device_map, offload_folder=str(folder / "acc-offload")
                )

        rows.append(
            (
                f"{count} tensors",
                [
                    measure("hasten", ours, repeat=3, number=1),
                    measure("Accelerate", theirs, repeat=3 if count <= 10000 else 1, number=1),
                ],
            )
        )
    return rows


PEAK = """
import sys, warnings, torch
sys.path.insert(0, {bench!r})
from bench_loading import big_model, touch
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'): return int(line.split()[1]) * 1024
    return 0
which, path, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == 'hasten':
    from hasten.big_modeling import init_empty_weights
    from hasten.utils.loading import load_checkpoint_in_model as load
    kwargs = {{}}
else:
    from accelerate import init_empty_weights
    from accelerate.utils import load_checkpoint_in_model as load
    kwargs = {{'device_map': {{'': 'cpu'}}}}
with init_empty_weights():
    model = big_model(layers)
base = hwm()
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    load(model, path, **kwargs)
touch(model)
print(hwm() - base)
"""


def peak_memory(folder: Path, layers: int) -> str:
    size = (folder / "model.safetensors").stat().st_size
    lines = [
        "### Peak resident memory while loading the single file (fresh process each)",
        "",
        "| contender | peak above baseline | x checkpoint size |",
        "|---|---|---|",
    ]
    for which in ("hasten", "accelerate"):
        code = PEAK.format(bench=str(Path(__file__).resolve().parent))
        out = subprocess.run(
            [sys.executable, "-c", code, which, str(folder / "model.safetensors"), str(layers)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        peak = int(out)
        lines.append(f"| {which} | {peak / 2**20:.0f} MiB | {peak / size:.2f}x |")
    return "\n".join(lines)


def time_offload(folder: Path, layers: int) -> list[tuple[str, list[Timing]]]:
    from hasten.utils.offload import load_offloaded_weights, offload_state_dict

    state = big_model(layers).state_dict()
    model = big_model(layers)

    def ours() -> None:
        target = folder / "offload-ours"
        shutil.rmtree(target, ignore_errors=True)
        offload_state_dict(target, state)
        load_offloaded_weights(model, json.loads((target / "index.json").read_text()), target)
        touch(model)

    def raw() -> None:
        target = folder / "offload-raw"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for name, tensor in state.items():
            array = np.memmap(target / f"{name}.dat", dtype=np.float32, mode="w+", shape=tuple(tensor.shape))
            array[:] = tensor.numpy()
            array.flush()
        total = 0.0
        for name, tensor in state.items():
            total += float(
                np.memmap(target / f"{name}.dat", dtype=np.float32, mode="r", shape=tuple(tensor.shape)).sum()
            )

    return [
        (
            "~1 GiB write + read",
            [measure("hasten", ours, repeat=3, number=1), measure("numpy memmap", raw, repeat=3, number=1)],
        )
    ]


def run(quick: bool) -> None:
    layers = 4 if quick else 16
    with tempfile.TemporaryDirectory(dir=Path.home()) as name:
        folder = Path(name)
        write_checkpoints(folder, layers)
        print(
            table(
                f"Load {layers * 64} MiB into a meta model and read every weight once",
                time_loads(folder, layers),
            )
        )
        print()
        print(
            table(
                "A tenth of the tensors mapped to disk",
                time_small(folder, [2000] if quick else [5000, 10000, 20000]),
            )
        )
        print()
        print(peak_memory(folder, layers))
        print()
        print(
            table(
                f"offload_state_dict + load_offloaded_weights of {layers * 64} MiB",
                time_offload(folder, layers),
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB and 2000 small tensors")
    run(parser.parse_args().quick)
