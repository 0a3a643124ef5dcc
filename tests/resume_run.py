"""A seeded training run that saves its state, may kill itself, and may resume: what the exact-resume
and crash-safety tests start as real processes (``python -m tests.resume_run ...``, one per rank).

The run: dropout, a shuffled loader (``SeedableRandomSampler`` or a plain ``RandomSampler``),
gradient accumulation 2, AdamW, a scheduler, fp32 or bf16 autocast, ``EPOCHS`` epochs. Every
loss is appended to ``<out>/losses_<rank>.txt`` as it is computed (``float.hex``, exact).

* ``--save-every K`` saves with ``save_state()`` (automatic naming) every K batches.
* ``--kill-at S`` kills the process with SIGKILL right after batch S.
* ``--resume`` starts with ``load_state()`` and the documented recipe: continue the loader's
  epoch with ``skip_first_batches(loader, state["batches_yielded"])``, then keep iterating.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from hasten import Accelerator
from hasten.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

EPOCHS, ROWS, BATCH = 3, 48, 4


def build(args: argparse.Namespace) -> tuple[Accelerator, nn.Module, object, object, object]:
    accelerator = Accelerator(
        mixed_precision=args.precision,
        gradient_accumulation_steps=2,
        project_config=ProjectConfiguration(
            project_dir=args.project, automatic_checkpoint_naming=True, total_limit=args.total_limit
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=args.seedable),
    )
    set_seed(args.seed)
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(ROWS, 8, generator=generator)
    labels = torch.randint(0, 3, (ROWS,), generator=generator)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(features, labels), batch_size=BATCH, shuffle=True
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.8)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    set_seed(args.seed + 1000 if args.resume else args.seed)  # a new process draws differently
    return accelerator, model, optimizer, loader, scheduler


def run(argv: list[str]) -> None:
    """One run with the command-line arguments ``argv`` (also called in-process for the uninterrupted run)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", default="no")
    parser.add_argument("--seedable", action="store_true")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--total-limit", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    accelerator, model, optimizer, loader, scheduler = build(args)
    out = Path(args.out) / f"losses_{accelerator.process_index}.txt"
    done = 0
    first_epoch: object = loader
    if args.resume:
        accelerator.load_state()
        state = loader.state_dict()
        done = state["iteration"] * len(loader) + state["batches_yielded"]
        first_epoch = accelerator.skip_first_batches(loader, state["batches_yielded"])
        with open(Path(args.out) / f"resumed_{accelerator.process_index}.txt", "w") as handle:
            handle.write(str(done))
    with open(out, "a") as record:
        epochs = [first_epoch] + [loader] * EPOCHS
        for epoch_loader in epochs:
            if done >= EPOCHS * len(loader):
                break
            for inputs, targets in epoch_loader:  # type: ignore[attr-defined]
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = functional.cross_entropy(model(inputs).float(), targets)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                done += 1
                record.write(f"{done} {loss.item().hex()}\n")
                record.flush()
                if args.save_every and done % args.save_every == 0:
                    accelerator.save_state()
                if done == args.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run(sys.argv[1:])
