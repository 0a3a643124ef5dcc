"""Prepared data loaders: what hasten and Accelerate add per batch over a bare ``DataLoader``, and the
cost of ``skip_first_batches``.

Run: ``.venv/bin/python bench/bench_data_loader.py`` (1 process, then 2 gloo ranks on 127.0.0.1;
needs Accelerate). The data are batches of 32 samples for a 2-layer MLP (16 float features and
an int label), shuffled, prepared as ``Accelerator.prepare`` does (``put_on_device`` to the CPU,
``rng_types=["generator"]``). On 2 ranks the bare loader reads a dataset half the size, so all
three yield the same number of batches of the same shape. Contenders are interleaved over
several rounds; each round times whole epochs in CPU time of the process (``time.process_time``:
the machine is shared, and wall time there measures the other processes too), and the best
round is reported.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import fmt_seconds

BATCH = 32
BATCHES_PER_RANK = 1000


def _data(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 16, generator=generator), torch.randint(0, 4, (samples,)))


def _prepared(library: Any, world: int, batches: int = BATCHES_PER_RANK) -> Any:
    loader = DataLoader(_data(BATCH * batches * world), batch_size=BATCH, shuffle=True)
    return library.prepare_data_loader(
        loader, device=torch.device("cpu"), put_on_device=True, rng_types=["generator"]
    )


def _epoch_seconds(loader: Any, epochs: int) -> float:
    """CPU seconds of this process for ``epochs`` epochs (waits for other processes not counted, so
    the figure holds on a busy machine)."""
    start = time.process_time()
    for _ in range(epochs):
        for _batch in loader:
            pass
    return time.process_time() - start


def _per_batch(
    loaders: dict[str, Any], rounds: int, epochs: int, barrier: Callable[[], None]
) -> dict[str, float]:
    """Best round's seconds per batch, contenders interleaved (the best round is the one least
    disturbed by other processes on a shared machine)."""
    samples: dict[str, list[float]] = {name: [] for name in loaders}
    for loader in loaders.values():
        _epoch_seconds(loader, 1)  # warm-up
    for _ in range(rounds):
        for name, loader in loaders.items():
            barrier()
            seconds = _epoch_seconds(loader, epochs)
            samples[name].append(seconds / (epochs * BATCHES_PER_RANK))
    return {name: min(values) for name, values in samples.items()}


def _index_seconds(world: int, rounds: int) -> float:
    """CPU seconds per yielded batch that sharding spends on the other ranks' indices: iterating
    the whole job's batch sampler, minus one rank's share of it (both libraries pay this)."""

    def sampler(samples: int) -> Any:
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(range(samples), generator=generator), BATCH, False
        )

    def best(batches: Any) -> float:
        times = []
        for _ in range(rounds):
            start = time.process_time()
            for _batch in batches:
                pass
            times.append(time.process_time() - start)
        return min(times) / BATCHES_PER_RANK

    whole, share = sampler(BATCH * BATCHES_PER_RANK * world), sampler(BATCH * BATCHES_PER_RANK)
    return best(whole) - best(share)


def _skip_seconds(library: Any, loader: Any, skipped: int, repeat: int) -> float:
    """Median seconds to make ``skip_first_batches(loader, skipped)`` and get its first batch."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        next(iter(library.skip_first_batches(loader, skipped)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(world: int, rank: int, rounds: int, epochs: int, barrier: Callable[[], None]) -> list[str]:
    import accelerate.data_loader as accelerate_loader

    import hasten.data_loader as hasten_loader

    bare = DataLoader(_data(BATCH * BATCHES_PER_RANK), batch_size=BATCH, shuffle=True)
    loaders = {
        "bare DataLoader": bare,
        "hasten": _prepared(hasten_loader, world),
        "accelerate": _prepared(accelerate_loader, world),
    }
    per_batch = _per_batch(loaders, rounds, epochs, barrier)
    base = per_batch["bare DataLoader"]
    added = {name: per_batch[name] - base for name in ("hasten", "accelerate")}
    indices = _index_seconds(world, rounds) if world > 1 else 0.0
    own = {name: cost - indices for name, cost in added.items()}
    ratio = own["accelerate"] / own["hasten"] if own["hasten"] > 0 else float("inf")
    lines = [
        f"| {world} | {fmt_seconds(base)} | {fmt_seconds(per_batch['hasten'])} | "
        f"{fmt_seconds(per_batch['accelerate'])} | {fmt_seconds(added['hasten'])} | "
        f"{fmt_seconds(added['accelerate'])} | {fmt_seconds(indices) if world > 1 else '—'} | "
        f"{fmt_seconds(own['hasten'])} | {fmt_seconds(own['accelerate'])} | {ratio:.1f}× |"
    ]
    if world == 1:
        for skipped in (10, 100, 1000):
            row = [f"| {skipped} |"]
            for library in (hasten_loader, accelerate_loader):
                prepared = _prepared(library, 1, batches=2000)
                row.append(f" {fmt_seconds(_skip_seconds(library, prepared, skipped, 9))} |")
            lines.append("".join(row))
        lines.append(f"| read 1000 batches | {fmt_seconds(base * 1000)} (bare loader) | |")
    return lines


def _header_lines() -> list[str]:
    return [
        "| ranks | bare DataLoader | hasten | accelerate | hasten adds | accelerate adds | "
        "of which other ranks' indices | hasten's own | accelerate's own | accelerate's own / hasten's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def _worker(rank: int, world: int, port: int, rounds: int, epochs: int) -> None:
    ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    os.environ.update(ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    from hasten.state import PartialState

    state = PartialState()
    AcceleratorState(cpu=True, _from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())  # same group
    lines = _measure(world, rank, rounds, epochs, state.wait_for_everyone)
    if rank == 0:
        print("\n".join(lines), flush=True)
    state.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed round")
    args = parser.parse_args()
    print("### Iterating a prepared loader: time per batch of 32 (best of rounds)\n")
    print("\n".join(_header_lines()))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    AcceleratorState(cpu=True, _from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())
    one = _measure(1, 0, args.rounds, args.epochs, lambda: None)
    print(one[0], flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args.rounds, args.epochs), nprocs=2, join=True)
    print("\n### skip_first_batches(loader, k) and its first batch (1 process, median of 9)\n")
    print("| k | hasten | accelerate |\n|---|---|---|")
    print("\n".join(one[1:]))


if __name__ == "__main__":
    main()
