"""Prepared data loaders: what hasten and Accelerate add per batch over a bare ``DataLoader``, and the
cost of ``skip_first_batches``.

Run: ``.venv/bin/python bench/bench_data_loader.py`` (1 process, then 2 gloo ranks on 127.0.0.1;
needs Accelerate). The data are batches of 32 samples for a 2-layer MLP (16 float features and
an int label, read with one indexing per tensor so that what the wrappers add shows), in order
or shuffled, prepared as ``Accelerator.prepare`` does (``put_on_device`` to the CPU,
``rng_types=["generator"]``). On 2 ranks the bare loader reads a dataset half the size, so all
yield the same number of batches of the same shape; there a fourth contender, the floor, is a
bare ``DataLoader`` over the ``BatchSamplerShard`` hasten reads from (the indices alone).

Each round runs one epoch of 1,000 batches of every contender: the epoch starts one after the
other, the first rotating from round to round (each up to its first batch, after a barrier: on
2 ranks both libraries broadcast the sampler's generator then), then the contenders' batches
are timed in turns of 50 batches each, so the windows of every contender see the same load of
the shared machine. Reported: the least time per batch over all windows (some window runs
undisturbed) minus the bare loader's, and the median over windows of the difference with the
bare loader's window of the same turn; the least epoch start over all rounds.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_interleaved, fmt_seconds

BATCH = 32
BATCHES_PER_RANK = 1000
WINDOW = 50


class MLPData(Dataset):  # type: ignore[type-arg]
    """16 float features and an int label per sample; a batch is read with one indexing per tensor
    (``__getitems__``), so reading costs little and what the wrappers add shows."""

    def __init__(self, samples: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(samples, 16, generator=generator)
        self.y = torch.randint(0, 4, (samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        rows = torch.tensor(indices)
        return [self.x[rows], self.y[rows]]


def _as_read(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


def _loader(samples: int, shuffle: bool = True) -> DataLoader:  # type: ignore[type-arg]
    return DataLoader(MLPData(samples), batch_size=BATCH, shuffle=shuffle, collate_fn=_as_read)


def _prepared(library: Any, world: int, batches: int = BATCHES_PER_RANK, shuffle: bool = True) -> Any:
    loader = _loader(BATCH * batches * world, shuffle)
    return library.prepare_data_loader(
        loader, device=torch.device("cpu"), put_on_device=True, rng_types=["generator"]
    )


@dataclass
class Costs:
    """One contender's figures over all rounds: the least epoch start, the least seconds per batch
    over all windows, and the median over windows of what it took more than the bare loader in
    the same turn (``None`` for the bare loader itself)."""

    start: float
    per_batch: float
    added_median: float | None


def _round(
    loaders: dict[str, Any], barrier: Callable[[], None], turn: int = 0
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One epoch of every contender: each starts in turn (up to its first batch, after a barrier),
    then their batches are timed in turns of ``WINDOW`` batches each, so every contender's
    windows see the same load of the shared machine. Returns the starts and the seconds per
    batch of each window."""
    gc.collect()
    gc.disable()
    try:
        starts: dict[str, float] = {}
        iterators: dict[str, Any] = {}
        names = list(loaders)
        names = names[turn % len(names) :] + names[: turn % len(names)]  # who goes first rotates
        for name in names:
            loader = loaders[name]
            barrier()
            start = time.perf_counter()
            iterators[name] = iter(loader)
            next(iterators[name])
            starts[name] = time.perf_counter() - start
        windows: dict[str, list[float]] = {name: [] for name in loaders}
        while True:
            for name, iterator in iterators.items():
                window_start = time.perf_counter()
                count = sum(1 for _ in itertools.islice(iterator, WINDOW))
                if count < WINDOW:
                    return starts, windows
                windows[name].append((time.perf_counter() - window_start) / WINDOW)
    finally:
        gc.enable()


def _costs(loaders: dict[str, Any], rounds: int, barrier: Callable[[], None]) -> dict[str, Costs]:
    """Each contender's :class:`Costs` over ``rounds`` interleaved epochs (after one warm-up); the
    first contender is the bare loader the others are compared with."""
    bare = next(iter(loaders))
    _round(loaders, barrier)  # warm-up
    starts: dict[str, list[float]] = {name: [] for name in loaders}
    windows: dict[str, list[float]] = {name: [] for name in loaders}
    for turn in range(rounds):
        round_starts, round_windows = _round(loaders, barrier, turn)
        for name in loaders:
            starts[name].append(round_starts[name])
            windows[name] += round_windows[name]
    return {
        name: Costs(
            min(starts[name]),
            min(windows[name]),
            None
            if name == bare
            else statistics.median(mine - base for mine, base in zip(windows[name], windows[bare])),
        )
        for name in loaders
    }


def _first_after_skip(library: Any, loader: Any, skipped: int) -> Any:
    """``skip_first_batches(loader, skipped)`` and its first batch."""
    return next(iter(library.skip_first_batches(loader, skipped)))


def _floor(world: int, shuffle: bool, rank: int) -> DataLoader:  # type: ignore[type-arg]
    """A bare ``DataLoader`` over the ``BatchSamplerShard`` hasten's prepared loader reads from: the
    cost of the indices alone, without the prepared loader around them."""
    from hasten.data_loader import BatchSamplerShard

    data = MLPData(BATCH * BATCHES_PER_RANK * world)
    generator = torch.Generator().manual_seed(0)
    sampler: Any = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
    shard = BatchSamplerShard(BatchSampler(sampler, BATCH, False), world, rank)
    return DataLoader(data, batch_sampler=shard, collate_fn=_as_read)


def _ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.1f}×" if ours > 0 else "∞ (hasten adds nothing)"


def _row(world: int, shuffle: bool, rounds: int, barrier: Callable[[], None], rank: int) -> str:
    import accelerate.data_loader as accelerate_loader

    import hasten.data_loader as hasten_loader

    loaders = {
        "bare DataLoader": _loader(BATCH * BATCHES_PER_RANK, shuffle),
        "hasten": _prepared(hasten_loader, world, shuffle=shuffle),
        "accelerate": _prepared(accelerate_loader, world, shuffle=shuffle),
    }
    if world > 1:
        loaders["floor"] = _floor(world, shuffle, rank)
    costs = _costs(loaders, rounds, barrier)
    bare, ours, theirs = costs["bare DataLoader"], costs["hasten"], costs["accelerate"]
    least = {name: costs[name].per_batch - bare.per_batch for name in loaders}
    median = {name: costs[name].added_median or 0.0 for name in loaders}
    cells = [
        str(world),
        "yes" if shuffle else "no",
        fmt_seconds(bare.per_batch),
        f"{fmt_seconds(least['hasten'])} / {fmt_seconds(median['hasten'])}",
        f"{fmt_seconds(least['accelerate'])} / {fmt_seconds(median['accelerate'])}",
        f"{_ratio(least['accelerate'], least['hasten'])} / {_ratio(median['accelerate'], median['hasten'])}",
        f"{fmt_seconds(least['floor'])} / {fmt_seconds(median['floor'])}" if world > 1 else "—",
        fmt_seconds(bare.start),
        fmt_seconds(ours.start),
        fmt_seconds(theirs.start),
    ]
    return "| " + " | ".join(cells) + " |"


def _measure(world: int, rounds: int, barrier: Callable[[], None], rank: int = 0) -> list[str]:
    import accelerate.data_loader as accelerate_loader

    import hasten.data_loader as hasten_loader

    lines = [_row(world, shuffle, rounds, barrier, rank) for shuffle in (False, True)]
    if world == 1:
        prepared = {
            library: _prepared(library, 1, batches=2000) for library in (hasten_loader, accelerate_loader)
        }
        for skipped in (10, 100, 1000):
            contenders = [
                (library.__name__, partial(_first_after_skip, library, prepared[library], skipped))
                for library in (hasten_loader, accelerate_loader)
            ]
            timings = best_interleaved(contenders)
            lines.append(
                f"| {skipped} | {fmt_seconds(timings[0].median)} | {fmt_seconds(timings[1].median)} |"
            )
        base = _costs({"bare": _loader(BATCH * BATCHES_PER_RANK)}, 3, barrier)["bare"].per_batch
        lines.append(f"| read 1000 batches | {fmt_seconds(base * 1000)} (bare loader) | |")
    return lines


def _header_lines() -> list[str]:
    return [
        "| ranks | shuffled | bare loader, per batch | hasten adds per batch (least / median) | "
        "accelerate adds per batch (least / median) | accelerate's / hasten's (least / median) | "
        "floor: bare loader over hasten's BatchSamplerShard adds | epoch start: bare | hasten | accelerate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def _worker(rank: int, world: int, port: int, rounds: int) -> None:
    ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    os.environ.update(ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    from hasten.state import PartialState

    state = PartialState()
    AcceleratorState(cpu=True, _from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())  # same group
    lines = _measure(world, rounds, state.wait_for_everyone, rank)
    if rank == 0:
        print("\n".join(lines), flush=True)
    state.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print("### Iterating a prepared loader: CPU time per batch of 32, and to start an epoch\n")
    print("\n".join(_header_lines()))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    AcceleratorState(cpu=True, _from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())
    one = _measure(1, args.rounds, lambda: None)
    print("\n".join(one[:2]), flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args.rounds), nprocs=2, join=True)
    print("\n### skip_first_batches(loader, k) and its first batch (1 process, 64,000 samples)\n")
    print("| k | hasten | accelerate |\n|---|---|---|")
    print("\n".join(one[2:]))


if __name__ == "__main__":
    main()
