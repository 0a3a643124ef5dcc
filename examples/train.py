"""Train a small classifier with the ``Accelerator``: the loop of Accelerate's documentation, unchanged
apart from its imports (``accelerate`` -> ``hasten``).

It prepares a model, optimizer, scheduler and two data loaders, accumulates gradients over
two batches, trains under bf16 autocast, clips gradients, measures accuracy with
``gather_for_metrics`` on a validation set of 301 samples (not divisible by the number of
processes, so the last batch is padded and trimmed back) and saves the model as safetensors.

Halfway through it saves the whole training state with ``accelerator.save_state()`` (automatic
checkpoint naming under ``--output_dir``). Run it again with ``--resume``: it loads that state with
``accelerator.load_state()``, finishes the epoch in progress with ``skip_first_batches`` and
trains to the end, then prints whether every loss after the checkpoint equals the first run's, bit
for bit (dropout, shuffling and the optimizer included).

Run it on two processes with ``make demo`` (``hasten launch --cpu --num_processes 2
examples/train.py``, then the same with ``--resume``), or alone with ``python examples/train.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from hasten import Accelerator
from hasten.utils import ProjectConfiguration, set_seed

FEATURES, CLASSES = 16, 4


def make_data(rows: int, seed: int) -> TensorDataset:
    """Points whose class a fixed random linear map decides: learnable, not trivial."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(0))
    features = torch.randn(rows, FEATURES, generator=generator)
    return TensorDataset(features, (features @ teacher).argmax(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--mixed_precision", default="bf16")
    parser.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "hasten-train-demo"))
    parser.add_argument(
        "--resume", action="store_true", help="resume from the checkpoint the first run saved"
    )
    args = parser.parse_args()

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=True),
    )
    checkpoints = os.path.join(args.output_dir, "checkpoints")
    if not args.resume and accelerator.is_main_process and os.path.isdir(checkpoints):
        shutil.rmtree(checkpoints)  # a fresh run numbers its checkpoints from 0
    accelerator.wait_for_everyone()
    set_seed(42)
    train_dataloader = DataLoader(make_data(1024, seed=1), batch_size=16, shuffle=True)
    eval_dataloader = DataLoader(make_data(301, seed=2), batch_size=32)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    total_steps = args.epochs * len(train_dataloader) // args.gradient_accumulation_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.05, 1 - step / total_steps))

    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    accelerator.print(
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, mixed precision "
        f"{accelerator.mixed_precision}, {accelerator.gradient_accumulation_steps} batches per optimizer step"
    )

    step, save_at, first_epoch, epoch_batches = (
        0,
        args.epochs * len(train_dataloader) // 2,
        0,
        train_dataloader,
    )
    record = os.path.join(args.output_dir, f"losses_{accelerator.process_index}.json")
    first_run: dict[str, str] = {}
    if args.resume:
        accelerator.load_state()  # the latest checkpoint: models, optimizer, scheduler, loaders, RNGs, step
        position = train_dataloader.state_dict()  # the epoch in progress and how far it got
        first_epoch = position["iteration"]
        step = first_epoch * len(train_dataloader) + position["batches_yielded"]
        epoch_batches = accelerator.skip_first_batches(train_dataloader, position["batches_yielded"])
        with open(record) as handle:
            first_run = json.load(handle)
        accelerator.print(f"resumed at batch {step} (epoch {first_epoch}) from {checkpoints}")
    run_losses: dict[str, str] = {}

    for epoch in range(first_epoch, args.epochs):
        model.train()
        losses = []
        for inputs, targets in epoch_batches:
            with accelerator.accumulate(model):
                outputs = model(inputs)
                loss = functional.cross_entropy(outputs, targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
            step += 1
            run_losses[str(step)] = loss.item().hex()
            if step == save_at and not args.resume:
                accelerator.print(f"saved the training state at batch {step}: {accelerator.save_state()}")
        epoch_batches = train_dataloader
        mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")

        model.eval()
        correct = seen = 0
        for inputs, targets in eval_dataloader:
            with torch.no_grad():
                predictions = model(inputs).argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, targets))
            correct += int((predictions == references).sum())
            seen += references.numel()
        accelerator.print(
            f"epoch {epoch}: training loss {mean_loss.item():.4f}, validation accuracy {correct / seen:.3f} "
            f"on {seen} samples"
        )

    if args.resume:
        same = all(first_run.get(key) == value for key, value in run_losses.items()) and len(run_losses) > 0
        agree = (
            accelerator.reduce(torch.tensor(float(same)), reduction="sum").item() == accelerator.num_processes
        )
        accelerator.print(
            f"resumed run: {len(run_losses)} losses per process after the checkpoint "
            f"{'match the first run bit for bit' if agree else 'DIFFER from the first run'}"
        )
    else:
        with open(record, "w") as handle:
            json.dump(run_losses, handle)
    accelerator.wait_for_everyone()
    accelerator.save_model(model, args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.print(f"saved {sorted(os.listdir(args.output_dir))} to {args.output_dir}")


if __name__ == "__main__":
    main()
