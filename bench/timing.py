"""Shared timing helpers for the benchmarks (never run by the test suite).

Each ``bench/bench_*.py`` runs hasten and its comparison (Accelerate, raw torch,
optree) side by side in one process and prints a Markdown table of times and
ratios, ready to paste into ``docs/benchmarks.md`` with the command that made it.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Timing:
    """Seconds per call of one contender: best and median over the repeats."""

    name: str
    best: float
    median: float


def measure(
    name: str,
    function: Callable[[], Any],
    repeat: int = 7,
    number: int | None = None,
    budget: float = 0.2,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``function()``: ``repeat`` rounds of ``number`` calls (chosen to fill ``budget`` s when
    ``None``), by ``clock``."""
    function()  # warm-up
    if number is None:
        start = clock()
        function()
        once = max(clock() - start, 1e-7)
        number = max(1, int(budget / once))
    rounds = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = clock()
            for _ in range(number):
                function()
            rounds.append((clock() - start) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(name, min(rounds), statistics.median(rounds))


def best_interleaved(
    contenders: Sequence[tuple[str, Callable[[], Any]]], rounds: int = 3, repeat: int = 5
) -> list[Timing]:
    """Measure the contenders one after the other, ``rounds`` times; keep each one's best median.

    Interleaving spreads the load of a shared machine over every contender alike.
    """
    best: list[Timing] = []
    for _ in range(rounds):
        timings = [measure(name, function, repeat=repeat) for name, function in contenders]
        best = timings if not best else [min(a, b, key=lambda t: t.median) for a, b in zip(best, timings)]
    return best


def interleave(
    contenders: Sequence[tuple[str, Callable[[], Any]]],
    rounds: int = 31,
    budget: float = 0.01,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
) -> list[Timing]:
    """Time ``contenders`` against each other under the same conditions: ``rounds`` times, each one
    runs a batch of calls (sized to about ``budget`` s), in a shuffled order; median and best batch.

    Interleaving at this grain spreads the load of a shared machine evenly over the contenders.
    ``clock=time.thread_time`` counts only the CPU time of this thread (single-threaded work),
    so time spent waiting for a core while other processes run is left out.
    """
    numbers = []
    for _, function in contenders:
        function()  # warm-up
        start = clock()
        function()
        numbers.append(max(1, int(budget / max(clock() - start, 1e-7))))
    samples: list[list[float]] = [[] for _ in contenders]
    order = list(range(len(contenders)))
    shuffle = random.Random(seed).shuffle
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            shuffle(order)
            for index in order:
                function, number = contenders[index][1], numbers[index]
                start = clock()
                for _ in range(number):
                    function()
                samples[index].append((clock() - start) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [
        Timing(name, min(found), statistics.median(found)) for (name, _), found in zip(contenders, samples)
    ]


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}


def add_clock_option(parser: argparse.ArgumentParser) -> None:
    """The ``--clock`` option of benchmarks that time single-threaded work (read ``CLOCKS[args.clock]``)."""
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this thread's CPU time (steady on a shared machine); wall: elapsed time",
    )


def fmt_seconds(seconds: float) -> str:
    """A duration with a unit that keeps three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale * 0.9995:  # 0.9996 s reads "1 s", not "1e+03 ms"
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(title: str, rows: Sequence[tuple[str, Sequence[Timing]]], baseline: int = 0) -> str:
    """A Markdown table: one row per case, each contender's median time and its ratio to ``baseline``."""
    names = [timing.name for timing in rows[0][1]]
    head = ["case", *names, *[f"{names[baseline]} vs {n}" for i, n in enumerate(names) if i != baseline]]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, timings in rows:
        base = timings[baseline].median
        ratios = [f"{timing.median / base:.2f}×" for i, timing in enumerate(timings) if i != baseline]
        lines.append("| " + " | ".join([case, *[fmt_seconds(t.median) for t in timings], *ratios]) + " |")
    lines.append("")
    lines.append(
        f"Ratios are the other contender's median time over {names[baseline]}'s: above 1× means "
        f"{names[baseline]} is faster."
    )
    return "\n".join(lines)


def rank_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables a launcher sets for ``rank`` of ``world`` processes on 127.0.0.1."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
