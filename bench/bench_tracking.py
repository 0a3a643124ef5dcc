"""Logging scalars to TensorBoard: hasten's TensorBoardTracker against Accelerate's, in one process.

Run: ``.venv/bin/python bench/bench_tracking.py``. Prints a Markdown table for docs/benchmarks.md.
What is timed is one ``tracker.log({...}, step=step)`` call, the call ``Accelerator.log`` makes once per
tracker per step, including the flush to the event file that both trackers do on every call; then the
whole ``accelerator.log({...}, step=step)`` of an ``Accelerator(log_with="tensorboard")`` on each side.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_interleaved, table

import hasten
import hasten.tracking
from hasten.state import PartialState


def _tensors(count: int) -> dict[str, Any]:
    import torch

    return {f"metric_{i}": torch.tensor(0.5 + i) for i in range(count)}


CASES: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("10 float scalars", lambda: {f"metric_{i}": 0.5 + i for i in range(10)}),
    ("10 scalar tensors (e.g. losses)", lambda: _tensors(10)),
    ("1 float scalar", lambda: {"loss": 0.25}),
    ("30 float scalars", lambda: {f"metric_{i}": 0.5 + i for i in range(30)}),
]


def logger(library: Any, folder: str, values: dict[str, Any]) -> tuple[Callable[[], None], Any]:
    tracker = library.TensorBoardTracker("run", folder)
    tracker.start()
    steps = itertools.count()
    return (lambda: tracker.log(values, step=next(steps))), tracker


def main() -> None:
    import accelerate
    import accelerate.tracking as accelerate_tracking

    PartialState()
    accelerate.PartialState()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, make_values) in enumerate(CASES):
            values = make_values()
            ours, our_tracker = logger(hasten.tracking, f"{folder}/hasten{index}", values)
            theirs, their_tracker = logger(accelerate_tracking, f"{folder}/accelerate{index}", values)
            rows.append((name, best_interleaved([("hasten", ours), ("accelerate", theirs)])))
            our_tracker.finish()
            their_tracker.finish()
    print(table("TensorBoardTracker.log per step (flush included, one process)", rows))
    print()
    print(table("Accelerator.log per step, TensorBoard (flush included, one process)", _accelerator_rows()))


def _accelerator_log(library: Any, folder: str, values: dict[str, Any]) -> Callable[[], None]:
    accelerator = library.Accelerator(log_with="tensorboard", project_dir=folder)
    accelerator.init_trackers("run")
    steps = itertools.count()
    return lambda: accelerator.log(values, step=next(steps))


def _accelerator_rows() -> list[tuple[str, Any]]:
    import accelerate

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, make_values) in enumerate(CASES[:2]):
            values = make_values()
            ours = _accelerator_log(hasten, f"{folder}/hasten{index}", values)
            theirs = _accelerator_log(accelerate, f"{folder}/accelerate{index}", values)
            rows.append((name, best_interleaved([("hasten", ours), ("accelerate", theirs)])))
    return rows


if __name__ == "__main__":
    main()
