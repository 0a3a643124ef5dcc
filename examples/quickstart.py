"""hasten's first demo: each process says who it is, they meet, then gather ragged outputs.

Run it on two processes with ``make demo`` (or ``torchrun --standalone --nproc_per_node 2
examples/quickstart.py``); run alone with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import torch

from hasten import PartialState
from hasten.utils import gather, gather_object, pad_across_processes, reduce


def main() -> None:
    state = PartialState()
    rank = state.process_index
    print(
        f"[rank {rank}/{state.num_processes}] local rank {state.local_process_index}, "
        f"device {state.device}, backend {state.backend}, {state.distributed_type.value}",
        flush=True,
    )
    state.wait_for_everyone()

    # Every rank contributes its rank + 1; the sum shows the group really talks.
    total = reduce(torch.tensor([rank + 1.0]), reduction="sum")

    # Each rank "predicts" a different number of rows: rank r has r + 2 of them.
    outputs = {"ids": torch.arange(rank + 2) + 10 * rank, "scores": torch.full((rank + 2, 2), rank + 0.5)}
    padded = pad_across_processes(outputs, dim=0, pad_index=-1)  # every rank now has the same shape
    gathered = gather(padded)  # concatenated along dim 0, in rank order
    names = gather_object([f"rank {rank} had {rank + 2} rows"])

    if state.is_main_process:
        expected = state.num_processes * (state.num_processes + 1) / 2
        print(f"All {state.num_processes} processes met; sum of (rank + 1) = {total.item():g} (expected {expected:g}).")
        print(f"Gathered ids (padded with -1): {gathered['ids'].tolist()}")
        print(f"Gathered scores: shape {tuple(gathered['scores'].shape)}; {names}")
    state.destroy_process_group()


if __name__ == "__main__":
    main()
