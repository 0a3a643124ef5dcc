"""Batch-size search: trials and time to reach a fitting batch size from 512 when the limit is 77.

Run: ``.venv/bin/python bench/bench_batch_size.py`` (needs Accelerate). The trial step allocates a
tensor proportional to the batch size and raises ``torch.OutOfMemoryError("CUDA out of memory.")``
above 77 (a message Accelerate recognises). The process holds a model of ~173k modules and
tensors, as a training process would, so a full garbage collection costs what it costs there.
Contenders: Accelerate's ``find_executable_batch_size``, hasten's (same 0.9 schedule, no full
collection per failure), and hasten's bisecting ``find_largest_executable_batch_size``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_device_map import build
from timing import fmt_seconds

LIMIT, START = 77, 512


def trial_step(tried: list[int]) -> Callable[[int], int]:
    def step(batch_size: int) -> int:
        tried.append(batch_size)
        activations = torch.empty(batch_size, 4096)
        if batch_size > LIMIT:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate more than the limit.")
        return int(activations.shape[0])

    return step


def run(name: str, wrap: Callable[[Callable[[int], int]], Callable[[], int]]) -> tuple[str, int, int, float]:
    tried: list[int] = []
    start = time.perf_counter()
    found = wrap(trial_step(tried))()
    return name, found, len(tried), time.perf_counter() - start


def main() -> None:
    from accelerate.utils import find_executable_batch_size as accelerate_find

    from hasten.utils.memory import find_executable_batch_size, find_largest_executable_batch_size

    model = build("moe", 512)  # keeps ~400k Python objects alive, as a real training process does
    contenders: list[tuple[str, Any]] = [
        ("Accelerate find_executable_batch_size", lambda f: accelerate_find(f, starting_batch_size=START)),
        (
            "hasten find_executable_batch_size",
            lambda f: find_executable_batch_size(f, starting_batch_size=START),
        ),
        (
            "hasten find_largest_executable_batch_size",
            lambda f: find_largest_executable_batch_size(f, starting_batch_size=START),
        ),
    ]
    print(
        f"### From {START} with a limit of {LIMIT} (process holding {sum(1 for _ in model.modules())} "
        "modules)"
    )
    print()
    print("| contender | batch size found | trials | total time | per trial |")
    print("|---|---|---|---|---|")
    for name, wrap in contenders:
        results = [run(name, wrap) for _ in range(3)]
        _, found, trials, _ = results[0]
        seconds = sorted(result[3] for result in results)[1]
        print(f"| {name} | {found} | {trials} | {fmt_seconds(seconds)} | {fmt_seconds(seconds / trials)} |")


if __name__ == "__main__":
    main()
