"""Prepared data loaders: what hasten and Accelerate add per batch over a bare ``DataLoader``, and the
cost of ``skip_first_batches``.

Run: ``.venv/bin/python bench/bench_data_loader.py`` (1 process, then 2 gloo ranks on 127.0.0.1;
needs Accelerate). The data are batches of 32 samples for a 2-layer MLP (16 float features and
an int label, read with one indexing per tensor so that what the wrappers add shows), shuffled,
prepared as ``Accelerator.prepare`` does (``put_on_device`` to the CPU,
``rng_types=["generator"]``). On 2 ranks the bare loader reads a dataset half the size, so all
three yield the same number of batches of the same shape. Contenders are interleaved over
several rounds; each round times an epoch of 1,000 batches: its start (up to the first batch;
on 2 ranks both libraries broadcast the sampler's generator then) apart from the batches after
it, timed in windows of 50. The machine is shared, so the least time per batch over all windows
(and the least epoch start over all rounds) is reported: some window runs undisturbed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

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


def _epoch_costs(loader: Any) -> tuple[float, float]:
    """Seconds to start an epoch (up to its first batch), and the least seconds per batch over the
    epoch's windows of ``WINDOW`` batches: on a shared machine, some window runs undisturbed."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        started = time.perf_counter()
        best = float("inf")
        while True:
            window_start = time.perf_counter()
            count = sum(1 for _ in itertools.islice(iterator, WINDOW))
            if count < WINDOW:
                break
            best = min(best, (time.perf_counter() - window_start) / WINDOW)
        return started - start, best
    finally:
        gc.enable()


def _costs(
    loaders: dict[str, Any], rounds: int, barrier: Callable[[], None]
) -> dict[str, tuple[float, float]]:
    """Each contender's best round: (epoch start, seconds per batch), contenders interleaved (the
    best round is the one least disturbed by other processes on a shared machine)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    for loader in loaders.values():
        _epoch_costs(loader)  # warm-up
    for _ in range(rounds):
        for name, loader in loaders.items():
            barrier()
            samples[name].append(_epoch_costs(loader))
    return {
        name: (min(start for start, _ in values), min(batch for _, batch in values))
        for name, values in samples.items()
    }


def _first_after_skip(library: Any, loader: Any, skipped: int) -> Any:
    """``skip_first_batches(loader, skipped)`` and its first batch."""
    return next(iter(library.skip_first_batches(loader, skipped)))


def _row(world: int, shuffle: bool, rounds: int, barrier: Callable[[], None]) -> str:
    import accelerate.data_loader as accelerate_loader

    import hasten.data_loader as hasten_loader

    loaders = {
        "bare DataLoader": _loader(BATCH * BATCHES_PER_RANK, shuffle),
        "hasten": _prepared(hasten_loader, world, shuffle=shuffle),
        "accelerate": _prepared(accelerate_loader, world, shuffle=shuffle),
    }
    costs = _costs(loaders, rounds, barrier)
    base_start, base = costs["bare DataLoader"]
    steady = {name: costs[name][1] - base for name in ("hasten", "accelerate")}
    over_epoch = {
        name: steady[name] + (costs[name][0] - base_start) / BATCHES_PER_RANK
        for name in ("hasten", "accelerate")
    }
    ratio = over_epoch["accelerate"] / over_epoch["hasten"] if over_epoch["hasten"] > 0 else float("inf")
    cells = [
        str(world),
        "yes" if shuffle else "no",
        fmt_seconds(base),
        fmt_seconds(steady["hasten"]),
        fmt_seconds(steady["accelerate"]),
        fmt_seconds(base_start),
        fmt_seconds(costs["hasten"][0]),
        fmt_seconds(costs["accelerate"][0]),
        fmt_seconds(over_epoch["hasten"]),
        fmt_seconds(over_epoch["accelerate"]),
        f"{ratio:.1f}×",
    ]
    return "| " + " | ".join(cells) + " |"


def _measure(world: int, rounds: int, barrier: Callable[[], None]) -> list[str]:
    import accelerate.data_loader as accelerate_loader

    import hasten.data_loader as hasten_loader

    lines = [_row(world, shuffle, rounds, barrier) for shuffle in (False, True)]
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
        base = _costs({"bare": _loader(BATCH * BATCHES_PER_RANK)}, 3, barrier)["bare"][1]
        lines.append(f"| read 1000 batches | {fmt_seconds(base * 1000)} (bare loader) | |")
    return lines


def _header_lines() -> list[str]:
    return [
        "| ranks | shuffled | bare loader, per batch | hasten adds per batch | accelerate adds per batch | "
        "epoch start: bare | hasten | accelerate | added per batch over a 1,000-batch epoch: hasten | "
        "accelerate | accelerate's / hasten's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
    lines = _measure(world, rounds, state.wait_for_everyone)
    if rank == 0:
        print("\n".join(lines), flush=True)
    state.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(
        "### Iterating a prepared loader: CPU time per batch of 32, and to start an epoch (best of rounds)\n"
    )
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
