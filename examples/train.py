"""Train a small classifier with the ``Accelerator``: the loop of Accelerate's documentation, unchanged
apart from its imports (``accelerate`` -> ``hasten``).

It prepares a model, optimizer, scheduler and two data loaders, accumulates gradients over
two batches, trains under bf16 autocast, clips gradients, measures accuracy with
``gather_for_metrics`` on a validation set of 301 samples (not divisible by the number of
processes, so the last batch is padded and trimmed back) and saves the model as safetensors.

Run it on two processes with ``make demo`` (``hasten launch --cpu --num_processes 2
examples/train.py``), or alone with ``python examples/train.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from hasten import Accelerator
from hasten.utils import set_seed

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
    args = parser.parse_args()

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
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

    for epoch in range(args.epochs):
        model.train()
        losses = []
        for inputs, targets in train_dataloader:
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

    accelerator.wait_for_everyone()
    accelerator.save_model(model, args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.print(f"saved {sorted(os.listdir(args.output_dir))} to {args.output_dir}")


if __name__ == "__main__":
    main()
