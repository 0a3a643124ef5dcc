"""hasten's first demo: each process says who it is, they meet, gather ragged outputs, then
save a checkpoint from the main process and load it back on every process.

Run it on two processes with ``make demo`` (``hasten launch --cpu --num_processes 2
examples/quickstart.py``); run alone with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from hasten import PartialState, init_empty_weights, load_checkpoint_in_model
from hasten.utils import broadcast_object_list, gather, gather_object, pad_across_processes, reduce, save


def checkpoint_round_trip(state: PartialState) -> None:
    """Rank 0 saves its model as safetensors (crash-safe); every rank loads it into a meta model."""
    folder = [tempfile.mkdtemp(prefix="hasten-demo-") if state.is_main_process else None]
    broadcast_object_list(folder)  # one folder for everyone (single machine)
    path = Path(str(folder[0])) / "model.safetensors"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    save(model.state_dict(), path, safe_serialization=True)  # writes on the main process only
    state.wait_for_everyone()
    with init_empty_weights():
        loaded = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    load_checkpoint_in_model(loaded, path)
    x = torch.randn(3, 4)
    same = bool(torch.equal(loaded(x), model(x)))
    agreed = gather_object([same])
    if state.is_main_process:
        print(
            f"Checkpoint saved by rank 0 to {path.name} and loaded back on every rank: identical = {agreed}"
        )


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
        print(
            f"All {state.num_processes} processes met; sum of (rank + 1) = {total.item():g} (expected "
            f"{expected:g})."
        )
        print(f"Gathered ids (padded with -1): {gathered['ids'].tolist()}")
        print(f"Gathered scores: shape {tuple(gathered['scores'].shape)}; {names}")
    checkpoint_round_trip(state)
    state.destroy_process_group()


if __name__ == "__main__":
    main()
