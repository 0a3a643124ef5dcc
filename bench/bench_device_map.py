"""Model sizes and device maps: hasten against Accelerate on models of 6k to 173k entries, on meta.

Run: ``.venv/bin/python bench/bench_device_map.py [--quick]`` (needs Accelerate, from the test or
bench extra). Entries are parameters + modules. Two families: a deep transformer stack and a
mixture-of-experts model of 48 layers with 16 to 512 small experts each. Prints Markdown tables
(times, ratios, time per entry) for docs/benchmarks.md, and checks both libraries give the same map.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import CLOCKS, add_clock_option, fmt_seconds, interleave, measure, table

from hasten.big_modeling import init_empty_weights
from hasten.utils import device_map as hasten_map
from hasten.utils import modeling as hasten_sizes


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)


class DecoderLayer(nn.Module):
    def __init__(self, width: int, experts: int = 0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width)
        if experts:
            self.router = nn.Linear(width, experts, bias=False)
            self.experts = nn.ModuleList(MLP(width, width) for _ in range(experts))
        else:
            self.mlp = MLP(width, 4 * width)


class Decoder(nn.Module):
    def __init__(self, layers: int, width: int, experts: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, width)
        self.layers = nn.ModuleList(DecoderLayer(width, experts) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1000, bias=False)


def entries(model: nn.Module) -> int:
    return sum(1 for _ in model.modules()) + sum(1 for _ in model.parameters())


def build(kind: str, scale: int) -> nn.Module:
    with init_empty_weights():
        return Decoder(scale, 64) if kind == "stack" else Decoder(48, 32, experts=scale)


def _against_accelerate(
    model: nn.Module,
    case: str,
    count: int,
    budget: dict[Any, int],
    split: dict[Any, int],
    size_rows: list[Any],
    budget_rows: list[Any],
    split_rows: list[Any],
    clock: Callable[[], float],
) -> None:
    """hasten and Accelerate on one model: sizes, the CPU + disk map and the split-heavy map."""
    from accelerate.utils import modeling as accelerate_modeling

    repeat = 3 if count > 50_000 else 5
    size_rows.append(
        (
            case,
            [
                measure("hasten", lambda: hasten_sizes.compute_module_sizes(model), repeat, 1, clock=clock),
                measure(
                    "Accelerate",
                    lambda: accelerate_modeling.compute_module_sizes(model),
                    repeat,
                    1,
                    clock=clock,
                ),
            ],
        )
    )
    for rows, memory, no_split in ((budget_rows, budget, ["DecoderLayer"]), (split_rows, split, None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = hasten_map.infer_auto_device_map(model, dict(memory), no_split)
            theirs = accelerate_modeling.infer_auto_device_map(model, dict(memory), no_split)
            assert dict(ours) == dict(theirs), f"{case}: the maps differ"
            timings = [
                measure(
                    "hasten",
                    lambda: hasten_map.infer_auto_device_map(model, dict(memory), no_split),
                    repeat,
                    1,
                    clock=clock,
                ),
                measure(
                    "Accelerate",
                    lambda: accelerate_modeling.infer_auto_device_map(model, dict(memory), no_split),
                    1 if count > 50_000 else 3,
                    1,
                    clock=clock,
                ),
            ]
        rows.append((case, timings))


def run(quick: bool, only_linearity: bool, rounds: int, clock: Callable[[], float]) -> None:
    families = [("stack", [220, 800, 2800, 6400]), ("moe", [16, 64, 224, 512])]
    if quick:
        families = [("stack", [220, 800]), ("moe", [16, 64])]
    size_rows, budget_rows, split_rows, curve = [], [], [], []
    for kind, scales in families:
        for scale in scales:
            model = build(kind, scale)
            count = entries(model)
            case = f"{kind} {count // 1000}k"
            total = hasten_sizes.compute_module_sizes(model)[""]
            budget = {"cpu": int(total * 0.3)}
            split = {**{index: int(total * 0.025) for index in range(8)}, "cpu": int(total * 0.1)}
            if not only_linearity:
                _against_accelerate(
                    model, case, count, budget, split, size_rows, budget_rows, split_rows, clock
                )
            # hasten and torch's own walk of the same model, interleaved, for the linearity ratios.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours_sizes, ours_map, floor = interleave(
                    [
                        ("sizes", lambda: hasten_sizes.compute_module_sizes(model)),
                        ("map", lambda: hasten_map.infer_auto_device_map(model, dict(split), None)),
                        ("walk", lambda: sum(t.numel() for _, t in model.named_parameters())),
                    ],
                    rounds=rounds,
                    budget=0.05,
                    clock=clock,
                )
            curve.append((kind, count, ours_sizes.median, ours_map.median, floor.median))
    if not only_linearity:
        print(table("compute_module_sizes (model on meta)", size_rows))
        print()
        print(
            table(
                "infer_auto_device_map: CPU at 30% of the model + disk, "
                "no_split_module_classes=['DecoderLayer']",
                budget_rows,
            )
        )
        print()
        print(
            table(
                "infer_auto_device_map: 8 devices at 2.5% each, CPU at 10%, disk; nothing kept whole",
                split_rows,
            )
        )
        print()
    print("### hasten's time per entry (linearity)")
    print()
    # The floor: torch's own walk over the same tensors, which slows per entry as the model
    # outgrows the CPU caches; the last column shows whether hasten grows beyond that.
    print(
        "| family | entries | compute_module_sizes per entry | split-heavy map per entry "
        "| named_parameters walk per entry | sizes ÷ walk | map ÷ walk |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, count, sizes_time, map_time, walk_time in curve:
        print(
            f"| {kind} | {count} | {fmt_seconds(sizes_time / count)} | {fmt_seconds(map_time / count)} "
            f"| {fmt_seconds(walk_time / count)} | {sizes_time / walk_time:.3f} "
            f"| {map_time / walk_time:.3f} |"
        )
    print()
    print("Growth of the ratio to the walk, largest model over smallest (target: at most 1.15):")
    print()
    for kind in dict.fromkeys(kind for kind, *_ in curve):
        points = [row for row in curve if row[0] == kind]
        (_, small, s0, m0, w0), (_, large, s1, m1, w1) = points[0], points[-1]
        print(
            f"- {kind} ({small} to {large} entries): compute_module_sizes {(s1 / w1) / (s0 / w0):.3f}, "
            f"split-heavy infer_auto_device_map {(m1 / w1) / (m0 / w0):.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="only the two smaller sizes of each family")
    parser.add_argument(
        "--linearity", action="store_true", help="only hasten against the walk (no Accelerate timings)"
    )
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds for the linearity ratios")
    add_clock_option(parser)
    args = parser.parse_args()
    # Both libraries log that the 8 planned devices are absent here, on every call: not timed.
    logging.disable(logging.WARNING)
    run(
        args.quick,
        args.linearity,
        args.rounds,
        CLOCKS[args.clock],
    )
