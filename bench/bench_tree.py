"""Tree traversal: hasten against Accelerate and optree.tree_map, side by side in one process.

Run: ``.venv/bin/python bench/bench_tree.py`` (needs the bench extra: ``make .venv/.hasten-bench``).
Prints Markdown tables for docs/benchmarks.md. CPU to CPU, so what is timed is the traversal
and the per-leaf call, not data movement.
"""

from __future__ import annotations

import argparse
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, measure, table

import hasten.utils as hasten

Pair = namedtuple("Pair", ["left", "right"])
HALF = (torch.float16, torch.bfloat16)


def flat_batch() -> dict[str, torch.Tensor]:
    """A typical language-model batch: three tensors in a dict."""
    return {
        "input_ids": torch.zeros(8, 128, dtype=torch.long),
        "attention_mask": torch.ones(8, 128, dtype=torch.long),
        "labels": torch.zeros(8, dtype=torch.long),
    }


def nested(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """About 1,000 small tensors in dicts, lists, tuples and namedtuples, four levels deep."""

    def t() -> torch.Tensor:
        return torch.ones(4, 4, dtype=dtype)

    return {
        f"block{i}": {"weight": t(), "bias": t(), "extra": [t(), t(), (t(), t())], "pair": Pair(t(), t())}
        for i in range(125)
    }


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _round_robin(contenders: list[tuple[str, Callable[[], Any]]], rounds: int) -> list[Timing]:
    """Interleave the contenders ``rounds`` times and keep each one's median of medians."""
    runs: dict[str, list[Timing]] = {name: [] for name, _ in contenders}
    for _ in range(rounds):
        for name, function in contenders:
            runs[name].append(measure(name, function, repeat=5, budget=0.05))
    return [
        Timing(name, min(t.best for t in found), sorted(t.median for t in found)[len(found) // 2])
        for name, found in runs.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    import optree
    from accelerate.utils import convert_to_fp32 as acc_fp32
    from accelerate.utils import operations as acc

    cpu = torch.device("cpu")
    detach = torch.Tensor.detach
    cases: list[tuple[str, list[tuple[str, Callable[[], Any]]]]] = []
    for label, data in (("flat batch (3 tensors)", flat_batch()), ("nested (1,000 tensors)", nested())):
        cases.append(
            (
                f"send_to_device, {label}",
                [
                    ("hasten", lambda d=data: hasten.send_to_device(d, "cpu")),
                    ("accelerate", lambda d=data: acc.send_to_device(d, "cpu")),
                    ("optree.tree_map", lambda d=data: optree.tree_map(lambda x: x.to(cpu), d)),
                ],
            )
        )
        cases.append(
            (
                f"recursively_apply(identity: pure traversal), {label}",
                [
                    ("hasten", lambda d=data: hasten.recursively_apply(_identity, d)),
                    ("accelerate", lambda d=data: acc.recursively_apply(_identity, d)),
                    ("optree.tree_map", lambda d=data: optree.tree_map(_identity, d)),
                ],
            )
        )
        cases.append(
            (
                f"recursively_apply(detach), {label}",
                [
                    ("hasten", lambda d=data: hasten.recursively_apply(detach, d)),
                    ("accelerate", lambda d=data: acc.recursively_apply(detach, d)),
                    ("optree.tree_map", lambda d=data: optree.tree_map(detach, d)),
                ],
            )
        )
    half = nested(torch.bfloat16)
    batches = [nested(), nested()]
    data = nested()
    cases += [
        (
            "convert_to_fp32, nested bf16 (1,000 tensors)",
            [
                ("hasten", lambda: hasten.convert_to_fp32(half)),
                ("accelerate", lambda: acc_fp32(half)),
                (
                    "optree.tree_map",
                    lambda: optree.tree_map(lambda x: x.float() if x.dtype in HALF else x, half),
                ),
            ],
        ),
        (
            "slice_tensors, nested (1,000 tensors)",
            [
                ("hasten", lambda: hasten.slice_tensors(data, slice(0, 2))),
                ("accelerate", lambda: acc.slice_tensors(data, slice(0, 2))),
                ("optree.tree_map", lambda: optree.tree_map(lambda x: x[0:2], data)),
            ],
        ),
        (
            "concatenate, 2 nested batches (1,000 tensors each)",
            [
                ("hasten", lambda: hasten.concatenate(batches)),
                ("accelerate", lambda: acc.concatenate(batches)),
                ("optree.tree_map", lambda: optree.tree_map(lambda *xs: torch.cat(xs), *batches)),
            ],
        ),
    ]
    rows = [(case, _round_robin(contenders, rounds)) for case, contenders in cases]
    print(table("Tree traversal (CPU to CPU, medians)", rows))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
