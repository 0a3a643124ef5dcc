"""merge_fsdp_weights: a sharded (DCP) FSDP checkpoint merged into one safetensors file, hasten against
Accelerate, side by side in one process.

Run: ``.venv/bin/python bench/bench_fsdp_merge.py [--megabytes 256]``. The checkpoint is written once
(by DCP, on one process, as FSDP's SHARDED_STATE_DICT save writes it); each round merges it with
both libraries, interleaved, into fresh folders. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from timing import Timing, measure, table


def _checkpoint(folder: Path, megabytes: int) -> None:
    import torch.distributed.checkpoint as dcp

    layers = max(1, megabytes // 4)  # 1024 x 1024 fp32 = 4 MiB each
    state = {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(layers)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP saves as one process
        dcp.save({"model": state}, checkpoint_id=folder)


def main() -> None:
    import accelerate.utils.fsdp_utils as theirs
    from accelerate.state import PartialState as AcceleratePartialState

    import hasten.utils.fsdp_checkpoint as ours

    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    AcceleratePartialState(cpu=True)  # Accelerate's merge logs through its state
    work = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        _checkpoint(work / "pytorch_model_fsdp_0", options.megabytes)

        def merge(library: object, name: str) -> None:
            target = work / name
            shutil.rmtree(target, ignore_errors=True)
            library.merge_fsdp_weights(str(work / "pytorch_model_fsdp_0"), str(target))  # type: ignore[attr-defined]

        timings: list[Timing] = []
        for _ in range(options.rounds):  # interleave the contenders; keep each one's best median
            round_ = [
                measure("hasten", lambda: merge(ours, "ours"), repeat=3, number=1),
                measure("accelerate", lambda: merge(theirs, "theirs"), repeat=3, number=1),
            ]
            timings = (
                round_
                if not timings
                else [min(a, b, key=lambda t: t.median) for a, b in zip(timings, round_)]
            )
        from safetensors.torch import load_file

        a, b = (
            load_file(work / "ours" / "model.safetensors"),
            load_file(work / "theirs" / "model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the merged files differ"
        print(
            table(
                f"merge_fsdp_weights, {options.megabytes} MiB checkpoint (one process)", [("merge", timings)]
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
