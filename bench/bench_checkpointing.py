"""``save_state`` / ``load_state`` of a ~100 MiB model with AdamW: hasten against Accelerate, on 1 and 2
processes (gloo on 127.0.0.1), in one run.

Run: ``.venv/bin/python bench/bench_checkpointing.py [--rounds 5] [--mib 100]``. Prints Markdown tables for
docs/benchmarks.md. hasten's save includes what makes it crash-safe (every file synced, the folder
written beside its final name and renamed into place); Accelerate's writes in place without syncing.
Both save the model as safetensors and the optimizer (~2x the model) with ``torch.save``. Each round
saves a fresh folder with each library, then loads each back (from the page cache, for both alike),
the loads in an order that rotates every round: a load that directly follows its own library's save
would pay for what that save left behind (a synced save leaves the next ~0.3 s of file reading
slower, whoever reads), not for its own work. Times are rank 0's, between barriers.

A third contender is the floor for a crash-safe save: Accelerate's ``save_state`` into a staging
folder, then what durability adds to it (every file it wrote and the folder synced, the folder
renamed into place, its parent synced), so the two libraries are compared at the same guarantee.
The floor for a load is the same files read by hand: ``load_file`` + ``load_state_dict`` for the
model, ``torch.load`` + ``load_state_dict`` for the optimizer (no RNG file, no checks).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, rank_environment, table

WIDTH = 2048  # one Linear(2048, 2048) is 16 MiB of fp32 weights


def _prepared(library: str, mib: int) -> tuple[Any, nn.Module, Any]:
    module = __import__(library)
    accelerator = module.Accelerator(cpu=True)  # Accelerate forms a CPU group only when told
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(max(1, round(mib / 16)))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, WIDTH)).sum().backward()
    optimizer.step()  # the optimizer state exists (2 tensors per parameter)
    optimizer.zero_grad()
    return accelerator, model, optimizer


def _timed(accelerator: Any, call: Any) -> float:
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    call()
    accelerator.wait_for_everyone()
    return time.perf_counter() - start


def _synced_save(accelerator: Any, target: str) -> None:
    from hasten._checkpointing.folders import commit

    staging = Path(f"{target}.staging")
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(staging, Path(target))  # what hasten does to make a written folder durable and atomic


FLOOR = "accelerate, synced and renamed (floor)"
BY_HAND = "by hand (floor)"


def _load_by_hand(model: nn.Module, optimizer: Any, folder: str) -> None:
    """The least a load does: the model's and the optimizer's files read into them, nothing checked."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(f"{folder}/model.safetensors"))
    optimizer.load_state_dict(torch.load(f"{folder}/optimizer.bin", weights_only=True, map_location="cpu"))


def _run(rank: int, world: int, port: int, rounds: int, mib: int, folder: str, results: Any) -> None:
    os.environ.update(rank_environment(rank, world, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    contenders = {library: _prepared(library, mib) for library in ("hasten", "accelerate")}
    times: dict[str, list[float]] = {f"{kind} {lib}": [] for kind in ("save", "load") for lib in contenders}
    times[f"save {FLOOR}"] = []
    times[f"load {BY_HAND}"] = []
    accelerate, accelerate_model, accelerate_optimizer = contenders["accelerate"]
    bare_model = accelerate.unwrap_model(accelerate_model)  # Accelerate saves the bare model's keys
    for round_index in range(rounds + 1):  # the first round warms up
        floor_target = f"{folder}/floor_{round_index}"
        floor = _timed(accelerate, lambda: _synced_save(accelerate, floor_target))
        if round_index:
            times[f"save {FLOOR}"].append(floor)
        targets = {library: f"{folder}/{library}_{round_index}" for library in contenders}
        loads: dict[str, Callable[[], None]] = {
            library: functools.partial(accelerator.load_state, targets[library])
            for library, (accelerator, _, _) in contenders.items()
        }
        by_hand = (bare_model, accelerate_optimizer, targets["accelerate"])
        loads[BY_HAND] = functools.partial(_load_by_hand, *by_hand)
        for library, (accelerator, _, _) in contenders.items():
            saved = _timed(accelerator, lambda a=accelerator, t=targets[library]: a.save_state(t))
            if round_index:
                times[f"save {library}"].append(saved)
        order = list(loads)
        for name in order[round_index % len(order) :] + order[: round_index % len(order)]:
            loaded = _timed(accelerate, loads[name])
            if round_index:
                times[f"load {name}"].append(loaded)
        accelerate.wait_for_everyone()
        if rank == 0:
            for target in (floor_target, *targets.values()):
                shutil.rmtree(target)
    if rank == 0:
        results.put(times)
    if dist.is_initialized():
        dist.destroy_process_group()


def _timing(name: str, samples: list[float]) -> Timing:
    return Timing(name, min(samples), statistics.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=100, help="model size in MiB (fp32 weights)")
    args = parser.parse_args()
    rows: dict[str, list[tuple[str, list[Timing]]]] = {"save_state": [], "load_state": []}
    context = mp.get_context("spawn")
    for world in (1, 2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        results = context.SimpleQueue()
        with tempfile.TemporaryDirectory() as folder:
            mp.start_processes(
                _run,
                args=(world, port, args.rounds, args.mib, folder, results),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
        times = results.get()
        for kind in ("save_state", "load_state"):
            short = kind.split("_")[0]
            names = ("hasten", "accelerate", FLOOR if short == "save" else BY_HAND)
            timings = [_timing(lib, times[f"{short} {lib}"]) for lib in names]
            rows[kind].append((f"{world} process{'es' if world > 1 else ''}", timings))
    for kind, kind_rows in rows.items():
        print(table(f"{kind} of a {args.mib} MiB model with AdamW (median of {args.rounds})", kind_rows))
        print()


if __name__ == "__main__":
    main()
