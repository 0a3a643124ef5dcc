"""Save a training state again and again, until killed: what the crash-safety tests SIGKILL at random
moments (``python -m tests.save_forever <project_dir>``, one process per rank).

Before save number ``i`` every weight is set to ``i`` and each rank's torch RNG is seeded with
``seed_of(i, rank)``, so a loaded checkpoint tells which save it came from and can be checked
bit for bit. Rank 0 prints ``saving i`` and ``saved i`` around each ``save_state()``.
"""

from __future__ import annotations

import sys

import torch

from hasten import Accelerator
from hasten.utils import ProjectConfiguration

WIDTH = 1024  # 4 MiB of weights, 12 MiB with AdamW's state: a save takes tens of milliseconds


def seed_of(iteration: int, rank: int) -> int:
    return 1000 * iteration + rank


def prepared(project_dir: str) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
    accelerator = Accelerator(
        project_config=ProjectConfiguration(
            project_dir=project_dir, automatic_checkpoint_naming=True, total_limit=2
        )
    )
    model = torch.nn.Linear(WIDTH, WIDTH)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, WIDTH)).sum().backward()
    optimizer.step()
    return accelerator, model, optimizer


def main(project_dir: str) -> None:
    accelerator, model, _ = prepared(project_dir)
    iteration = 0
    while True:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(iteration)
        torch.manual_seed(seed_of(iteration, accelerator.process_index))
        if accelerator.is_main_process:
            print(f"saving {iteration}", flush=True)
        accelerator.save_state()
        if accelerator.is_main_process:
            print(f"saved {iteration}", flush=True)
        iteration += 1


if __name__ == "__main__":
    main(sys.argv[1])
