"""hasten's first demo: each process says who it is, they meet, and the main process sums up.

Run it on two processes with ``make demo`` (or ``hasten launch --cpu --num_processes 2
examples/quickstart.py``); run alone with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hasten import PartialState


def main() -> None:
    state = PartialState()
    print(
        f"[rank {state.process_index}/{state.num_processes}] local rank {state.local_process_index}, "
        f"device {state.device}, backend {state.backend}, {state.distributed_type.value}",
        flush=True,
    )
    state.wait_for_everyone()

    # Every rank contributes its rank + 1; the sum shows the group really talks.
    value = torch.tensor([state.process_index + 1.0])
    if state.use_distributed:
        dist.all_reduce(value)
    if state.is_main_process:
        expected = state.num_processes * (state.num_processes + 1) / 2
        print(f"All {state.num_processes} processes met; sum of (rank + 1) = {value.item():g} (expected {expected:g}).")
    state.destroy_process_group()


if __name__ == "__main__":
    main()
