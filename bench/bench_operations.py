"""Collectives on 2 gloo ranks: hasten against Accelerate and raw torch.distributed, in the same processes.

Run: ``.venv/bin/python bench/bench_operations.py`` (spawns 2 ranks on 127.0.0.1; needs Accelerate).
Both ranks run the same calls in the same order, a fixed number of times, and rank 0 prints
Markdown tables for docs/benchmarks.md. Contenders are interleaved over several rounds and
the median of the rounds' medians is reported.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, measure, table


def _ragged(rank: int, width: int) -> dict[str, Any]:
    """16 tensors in a nested structure, each with a different number of rows on each rank."""

    def t(i: int) -> torch.Tensor:
        return torch.full((20 + (i % 5) + 3 * rank, width), float(rank))

    return {f"head{i}": [t(2 * i), (t(2 * i + 1),)] for i in range(8)}


def _even(width: int) -> dict[str, Any]:
    return {
        f"head{i}": [torch.ones(24, width), (torch.ones(24, width, dtype=torch.int64),)] for i in range(8)
    }


def _cases(rank: int) -> list[tuple[str, list[tuple[str, Callable[[], Any]]]]]:
    import torch.distributed as dist
    from accelerate.utils import operations as acc

    import hasten.utils as hasten

    world = dist.get_world_size()
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def raw_gather(tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(world * tensor.numel())
        all_gather_single(out, tensor)
        return out

    def floor_gather(tensor: torch.Tensor) -> torch.Tensor:
        """The least a checked gather can do: one small all-gather (the shapes) and the raw one."""
        shapes = torch.empty(world * 8, dtype=torch.int64)
        all_gather_single(shapes, torch.zeros(8, dtype=torch.int64))
        return raw_gather(tensor)

    def raw_gather_object(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return [x for part in out for x in part]

    def raw_broadcast_object_list(objects: list[Any]) -> list[Any]:
        dist.broadcast_object_list(objects, src=0)
        return objects

    small_objects = [{"id": rank * 100 + i, "text": f"sample {i}", "score": 0.5 * i} for i in range(8)]
    big_objects = [os.urandom(1 << 20)]
    cases = []
    for label, width in (
        ("small (16 x ~22x8 floats, fits the envelope)", 8),
        ("large (16 x ~22x512 floats)", 512),
    ):
        data = _ragged(rank, width)
        cases.append(
            (
                f"pad_across_processes + gather, {label}",
                [
                    ("hasten", lambda d=data: hasten.gather(hasten.pad_across_processes(d))),
                    ("accelerate", lambda d=data: acc.gather(acc.pad_across_processes(d))),
                ],
            )
        )
    even = _even(64)
    cases += [
        (
            "gather, 16 same-shape tensors of 2 dtypes (nested)",
            [
                ("hasten", lambda: hasten.gather(even)),
                ("accelerate", lambda: acc.gather(even)),
            ],
        ),
        (
            "reduce(sum), 8 float tensors (nested)",
            [
                ("hasten", lambda: hasten.reduce({k: v[0] for k, v in even.items()}, "sum")),
                ("accelerate", lambda: acc.reduce({k: v[0] for k, v in even.items()}, "sum")),
            ],
        ),
        (
            "gather_object, 8 small dicts per rank",
            [
                ("hasten", lambda: hasten.gather_object(small_objects)),
                ("accelerate", lambda: acc.gather_object(small_objects)),
                ("raw all_gather_object", lambda: raw_gather_object(small_objects)),
            ],
        ),
        (
            "gather_object, 1 MiB of bytes per rank",
            [
                ("hasten", lambda: hasten.gather_object(big_objects)),
                ("accelerate", lambda: acc.gather_object(big_objects)),
                ("raw all_gather_object", lambda: raw_gather_object(big_objects)),
            ],
        ),
        (
            "broadcast_object_list, 8 small dicts",
            [
                ("hasten", lambda: hasten.broadcast_object_list(list(small_objects))),
                ("accelerate", lambda: acc.broadcast_object_list(list(small_objects))),
                ("raw broadcast_object_list", lambda: raw_broadcast_object_list(list(small_objects))),
            ],
        ),
        (
            "broadcast_object_list, 1 MiB of bytes",
            [
                ("hasten", lambda: hasten.broadcast_object_list(list(big_objects))),
                ("accelerate", lambda: acc.broadcast_object_list(list(big_objects))),
                ("raw broadcast_object_list", lambda: raw_broadcast_object_list(list(big_objects))),
            ],
        ),
    ]
    for mebibytes in (1, 16, 64):
        one = torch.full((mebibytes * 262_144,), float(rank))  # float32
        cases.append(
            (
                f"gather, one {mebibytes} MiB tensor",
                [
                    ("hasten", lambda t=one: hasten.gather(t)),
                    ("accelerate", lambda t=one: acc.gather(t)),
                    ("raw all_gather_single", lambda t=one: raw_gather(t)),
                    ("floor: small + raw all_gather_single", lambda t=one: floor_gather(t)),
                ],
            )
        )
    return cases


def _worker(rank: int, world: int, port: int, rounds: int, number: int, selected: str | None) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from accelerate.state import PartialState as AcceleratePartialState

    from hasten.state import PartialState

    state = PartialState()
    AcceleratePartialState(cpu=True)  # adopts the same gloo group
    rows = []
    for case, contenders in _cases(rank):
        if selected and selected not in case:
            continue
        # Large gathers take tens of milliseconds: fewer calls per repeat (the same on both ranks).
        large = " MiB tensor" in case and not case.startswith("gather, one 1 ")
        calls = max(2, number // 16) if large else number
        runs: dict[str, list[Timing]] = {name: [] for name, _ in contenders}
        for _ in range(rounds):
            for name, function in contenders:
                state.wait_for_everyone()
                runs[name].append(measure(name, function, repeat=3, number=calls))
        rows.append(
            (
                case,
                [
                    Timing(name, min(t.best for t in found), sorted(t.median for t in found)[len(found) // 2])
                    for name, found in runs.items()
                ],
            )
        )
    if rank == 0:
        for case, timings in rows:
            print(table(case, [(f"{world} gloo ranks", timings)]))
            print()
    state.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--number", type=int, default=20, help="calls per timed repeat")
    parser.add_argument("--only", default=None, help="run only the cases whose title contains this")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args.rounds, args.number, args.only), nprocs=2, join=True)


if __name__ == "__main__":
    main()
