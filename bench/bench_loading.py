"""Checkpoint loading and disk offload: hasten against Accelerate and raw safetensors, one run.

Run: ``.venv/bin/python bench/bench_loading.py [--quick] [--rounds N]`` (needs Accelerate). Prints
Markdown tables for docs/benchmarks.md:

1. a ~1 GiB model loaded into a ``meta`` model from one safetensors file and from 4 shards with
   an index, timed until every weight has been read once; files are in the page cache for every
   contender. hasten and ``load_file`` + ``load_state_dict`` end with weights the model owns;
   Accelerate (and hasten's opt-in ``zero_copy=True``) end with views of the file, read on first
   touch. The floor is the bare copy: fresh memory per tensor, filled by one ``preadv`` each;
2. the same checkpoint loaded into a model whose weights are already real (filled in place);
3. models of 5k-20k small tensors with a tenth mapped to disk (cost per tensor);
4. peak resident memory above a fresh process's baseline while loading the 1 GiB file;
5. ``offload_state_dict`` + ``load_offloaded_weights`` of ~1 GiB against raw numpy memmap.

Each contender is timed ``repeat`` times per round, rounds interleave the contenders, and the
tables give the median of the rounds' medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def bare_copy(path: Path) -> dict[str, torch.Tensor]:
    """The floor: each tensor's bytes read by one ``preadv`` into fresh memory, nothing else."""
    state = {}
    dtypes = {"F32": torch.float32}
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            size = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, size, 8))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                tensor = torch.empty(entry["shape"], dtype=dtypes[entry["dtype"]])
                view = tensor.reshape(-1).view(torch.uint8).numpy()
                os.preadv(fd, [view], 8 + size + entry["data_offsets"][0])
                state[name] = tensor
        finally:
            os.close(fd)
    return state


def _interleaved(contenders: dict[str, Callable[[], Any]], rounds: int, repeat: int) -> list[Timing]:
    """Each contender timed ``repeat`` times per round, rounds interleaved; median of the rounds' medians."""
    medians: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            medians[name].append(measure(name, function, repeat=repeat, number=1).median)
    return [Timing(name, min(values), statistics.median(values)) for name, values in medians.items()]


def _both_layouts(
    folder: Path, rounds: int, contenders: Callable[[Path], dict[str, Callable[[], Any]]]
) -> list[tuple[str, list[Timing]]]:
    """The contenders timed on the single file, then on the 4 shards."""
    return [
        (case, _interleaved(contenders(path), rounds, repeat=3))
        for case, path in (
            ("single file", folder / "model.safetensors"),
            ("4 shards + index", folder / "sharded"),
        )
    ]


def time_loads(folder: Path, layers: int, rounds: int) -> list[tuple[str, list[Timing]]]:
    from accelerate import init_empty_weights as accelerate_empty
    from accelerate.utils import load_checkpoint_in_model as accelerate_load

    from hasten.big_modeling import init_empty_weights
    from hasten.utils.loading import load_checkpoint_in_model

    def empty() -> nn.Module:
        with init_empty_weights():
            return big_model(layers)

    def ours(path: Path, zero_copy: bool = False) -> None:
        model = empty()
        load_checkpoint_in_model(model, path, zero_copy=zero_copy)
        touch(model)

    def theirs(path: Path) -> None:
        with accelerate_empty():
            model = big_model(layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerate_load(model, str(path), device_map={"": "cpu"})
        touch(model)

    def raw(path: Path) -> None:
        model = empty().to_empty(device="cpu")
        for file in _files(path):
            model.load_state_dict(load_file(file), strict=False)  # copies into the model's memory
        touch(model)

    def floor(path: Path) -> None:
        model = empty()
        model.load_state_dict(bare_copy(path), assign=True)
        touch(model)

    return _both_layouts(
        folder,
        rounds,
        lambda path: {
            "hasten": lambda: ours(path),
            "Accelerate (views of the file)": lambda: theirs(path),
            "load_file + load_state_dict": lambda: raw(path),
            "bare copy (floor)": lambda: floor(path),
            "hasten zero_copy=True (views)": lambda: ours(path, zero_copy=True),
        },
    )


def time_real_loads(folder: Path, layers: int, rounds: int) -> list[tuple[str, list[Timing]]]:
    """Loading into a model whose weights already hold memory: hasten fills them in place."""
    from accelerate.utils import load_checkpoint_in_model as accelerate_load

    from hasten.utils.loading import load_checkpoint_in_model

    models = {name: big_model(layers) for name in ("ours", "theirs", "raw")}

    def ours(path: Path) -> None:
        load_checkpoint_in_model(models["ours"], path)
        touch(models["ours"])

    def theirs(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accelerate_load(models["theirs"], str(path), device_map={"": "cpu"})
        touch(models["theirs"])

    def raw(path: Path) -> None:
        for file in _files(path):
            models["raw"].load_state_dict(load_file(file), strict=False)
        touch(models["raw"])

    return _both_layouts(
        folder,
        rounds,
        lambda path: {
            "hasten": lambda: ours(path),
            "Accelerate (replaces them with views)": lambda: theirs(path),
            "load_file + load_state_dict": lambda: raw(path),
        },
    )


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


SECTIONS = ("meta", "real", "small", "peak", "offload")


def run(quick: bool, rounds: int, sections: list[str]) -> None:
    layers = 4 if quick else 16
    with tempfile.TemporaryDirectory(dir=Path.home()) as name:
        folder = Path(name)
        write_checkpoints(folder, layers)
        tables = {
            "meta": lambda: table(
                f"Load {layers * 64} MiB into a meta model and read every weight once",
                time_loads(folder, layers, rounds),
            ),
            "real": lambda: table(
                f"Load {layers * 64} MiB into a model with real weights and read every weight once",
                time_real_loads(folder, layers, rounds),
            ),
            "small": lambda: table(
                "A tenth of the tensors mapped to disk",
                time_small(folder, [2000] if quick else [5000, 10000, 20000]),
            ),
            "peak": lambda: peak_memory(folder, layers),
            "offload": lambda: table(
                f"offload_state_dict + load_offloaded_weights of {layers * 64} MiB",
                time_offload(folder, layers),
            ),
        }
        for section in sections:
            print(tables[section](), end="\n\n", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 MiB and 2000 small tensors")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the load tables")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    arguments = parser.parse_args()
    run(arguments.quick, arguments.rounds, arguments.sections)
