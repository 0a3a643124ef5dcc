"""Tree traversal: hasten against Accelerate and optree.tree_map, side by side in one process.

Run: ``.venv/bin/python bench/bench_tree.py`` (needs the bench extra: ``make .venv/.hasten-bench``).
Prints Markdown tables for docs/benchmarks.md. CPU to CPU, so what is timed is the traversal
and the per-leaf call, not data movement.
"""

from __future__ import annotations

import argparse
import operator
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import CLOCKS, Timing, add_clock_option, fmt_seconds, interleave, table

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


Contenders = list[tuple[str, Callable[[], Any]]]


def _traversal_cases(optree: Any, acc: Any) -> list[tuple[str, Contenders]]:
    """send_to_device and recursively_apply on the flat batch and the nested structure."""
    cpu = torch.device("cpu")
    detach = torch.Tensor.detach
    cases: list[tuple[str, Contenders]] = []
    for label, data in (("flat batch (3 tensors)", flat_batch()), ("nested (1,000 tensors)", nested())):
        leaves, tuples = _leaves(data), _as_tuples(data)
        cases += [
            (
                f"send_to_device, {label}",
                [
                    ("hasten", lambda d=data: hasten.send_to_device(d, "cpu")),
                    ("accelerate", lambda d=data: acc.send_to_device(d, "cpu")),
                    ("optree.tree_map", lambda d=data: optree.tree_map(lambda x: x.to(cpu), d)),
                ],
            ),
            (
                f"recursively_apply(identity: pure traversal), {label}",
                [
                    ("hasten", lambda d=data: hasten.recursively_apply(_identity, d)),
                    ("accelerate", lambda d=data: acc.recursively_apply(_identity, d)),
                    ("optree.tree_map", lambda d=data: optree.tree_map(_identity, d)),
                ],
            ),
            (
                f"recursively_apply(detach), {label}",
                [
                    ("hasten", lambda d=data: hasten.recursively_apply(detach, d)),
                    ("accelerate", lambda d=data: acc.recursively_apply(detach, d)),
                    ("optree.tree_map", lambda d=data: optree.tree_map(detach, d)),
                    ("bare loop", lambda xs=leaves: [x.detach() for x in xs]),
                    ("hand walk", lambda d=data: _hand_walk(detach, d)),
                    # The namedtuple path: the same structure with plain tuples in place of the Pairs.
                    ("hasten, tuples", lambda d=tuples: hasten.recursively_apply(detach, d)),
                ],
            ),
        ]
    return cases


def _as_tuples(data: Any) -> Any:
    """``data`` with its namedtuples replaced by plain tuples (the flat batch has none)."""
    if isinstance(data, dict):
        return {key: _as_tuples(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        items = [_as_tuples(value) for value in data]
        return items if isinstance(data, list) else tuple(items)
    return data


def _leaves(data: Any) -> list[torch.Tensor]:
    from hasten.utils.tree import tree_leaves

    return tree_leaves(data)


def _hand_walk(func: Callable[[Any], Any], node: Any) -> Any:
    """The least a Python walk of :func:`nested` pays: written for exactly its four container types
    (no test, no error path), with the per-leaf call inline as in hasten's comprehensions."""
    cls = type(node)
    if cls is dict:
        return {k: func(v) if type(v) is torch.Tensor else _hand_walk(func, v) for k, v in node.items()}
    items = [func(v) if type(v) is torch.Tensor else _hand_walk(func, v) for v in node]
    return items if cls is list else tuple(items) if cls is tuple else cls._make(items)


def _hand_cat(node: Any, other: Any) -> Any:
    """:func:`_hand_walk` over two structures of the same shape, concatenating each pair of leaves."""
    cls = type(node)
    cat = torch.cat
    if cls is dict:
        return {
            k: cat((v, w)) if type(v) is torch.Tensor else _hand_cat(v, w)
            for (k, v), w in zip(node.items(), other.values())
        }
    items = [cat((v, w)) if type(v) is torch.Tensor else _hand_cat(v, w) for v, w in zip(node, other)]
    return items if cls is list else tuple(items) if cls is tuple else cls._make(items)


def _floor_cases(optree: Any, acc: Any, acc_fp32: Any) -> list[tuple[str, Contenders]]:
    """convert_to_fp32, slice_tensors and concatenate on the nested structure, with two floors:
    the same per-leaf torch call in a bare loop over the leaves (flattened beforehand), and in
    the least Python walk of the structure (:func:`_hand_walk`)."""
    half, data, batches = nested(torch.bfloat16), nested(), [nested(), nested()]
    half_leaves, leaves = _leaves(half), _leaves(data)
    left, right = _leaves(batches[0]), _leaves(batches[1])
    rows = slice(0, 2)
    return [
        (
            "convert_to_fp32, nested bf16 (1,000 tensors)",
            [
                ("hasten", lambda: hasten.convert_to_fp32(half)),
                ("bare loop", lambda: [x.float() for x in half_leaves]),
                ("hand walk", lambda: _hand_walk(lambda x: x.float() if x.dtype in HALF else x, half)),
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
                ("hasten", lambda: hasten.slice_tensors(data, rows)),
                ("bare loop", lambda: [x[rows] for x in leaves]),
                ("hand walk", lambda: _hand_walk(operator.itemgetter(rows), data)),
                ("accelerate", lambda: acc.slice_tensors(data, rows)),
                ("optree.tree_map", lambda: optree.tree_map(lambda x: x[rows], data)),
            ],
        ),
        (
            "concatenate, 2 nested batches (1,000 tensors each)",
            [
                ("hasten", lambda: hasten.concatenate(batches)),
                ("bare loop", lambda: [torch.cat((a, b)) for a, b in zip(left, right)]),
                ("hand walk", lambda: _hand_cat(*batches)),
                ("accelerate", lambda: acc.concatenate(batches)),
                ("optree.tree_map", lambda: optree.tree_map(lambda *xs: torch.cat(xs), *batches)),
            ],
        ),
    ]


def _floor_table(rows: list[tuple[str, list[Timing]]]) -> str:
    """hasten against its floors (the bare loop, the hand-written walk), then against Accelerate."""
    lines = [
        "### Against the floors: the same per-leaf torch calls in a bare loop and in a hand-written walk",
        "",
        "| case | hasten | bare loop | hand walk | hasten ÷ bare loop | hand walk ÷ bare loop "
        "| hasten ÷ hand walk | accelerate | hasten vs accelerate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, timings in rows:
        by_name = {timing.name: timing.median for timing in timings}
        ours, floor, hand = by_name["hasten"], by_name["bare loop"], by_name["hand walk"]
        theirs = by_name["accelerate"]
        lines.append(
            f"| {case} | {fmt_seconds(ours)} | {fmt_seconds(floor)} | {fmt_seconds(hand)} "
            f"| {ours / floor:.3f}× | {hand / floor:.3f}× | {ours / hand:.3f}× "
            f"| {fmt_seconds(theirs)} | {theirs / ours:.2f}× |"
        )
        if "hasten, tuples" in by_name:
            tuples = by_name["hasten, tuples"]
            lines.append(
                f"| {case}, namedtuples replaced by tuples | {fmt_seconds(tuples)} | | | | | "
                f"namedtuples ÷ tuples: {ours / tuples:.3f}× | | |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=41, help="interleaved batches per contender")
    add_clock_option(parser)
    parser.add_argument("--only", default=None, help="run only the cases whose title contains this")
    args = parser.parse_args()
    import optree
    from accelerate.utils import convert_to_fp32 as acc_fp32
    from accelerate.utils import operations as acc

    clock = CLOCKS[args.clock]
    cases = _traversal_cases(optree, acc)
    floors = _floor_cases(optree, acc, acc_fp32)
    rows = [
        (case, interleave(contenders, args.rounds, clock=clock))
        for case, contenders in cases + floors
        if not args.only or args.only in case
    ]
    keep = ("hasten", "accelerate", "optree.tree_map")
    print(
        table(
            "Tree traversal (CPU to CPU, medians)",
            [(case, [t for name in keep for t in timings if t.name == name]) for case, timings in rows],
        )
    )
    print()
    with_floor = [row for row in rows if any(t.name == "bare loop" for t in row[1])]
    if with_floor:
        print(_floor_table(with_floor))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
