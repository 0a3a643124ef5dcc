"""One small seeded training run, written three ways: raw torch by hand, and through an
``Accelerator`` (hasten's or Accelerate's, the library being the only difference).

Used by the equivalence tests on 1, 2 and 4 ranks. Every run returns the loss of each batch
(as seen on this rank) and the final weights, so runs can be compared bit for bit.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

ROWS, FEATURES, HIDDEN, CLASSES, BATCH = 96, 8, 16, 3, 4


def dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    features = torch.randn(ROWS, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    return torch.utils.data.TensorDataset(features, labels)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def raw_loader(world: int, rank: int, whole_batches: bool = False) -> torch.utils.data.DataLoader[Any]:
    """Batches of this rank's samples, in order: ``DistributedSampler`` on several ranks, or with
    ``whole_batches`` every ``world``-th batch of the whole dataset starting at ``rank`` (how a
    prepared loader shards; the dataset divides evenly, so nothing is repeated)."""
    data = dataset()
    if whole_batches:
        batches = list(torch.utils.data.BatchSampler(range(ROWS), BATCH, drop_last=False))
        return torch.utils.data.DataLoader(data, batch_sampler=batches[rank::world])
    sampler = (
        torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        if world > 1
        else None
    )
    return torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)


def _optimizer(parameters: Any) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(parameters, lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return optimizer, scheduler


def raw_run(
    steps: int = 1, precision: str = "no", epochs: int = 2, whole_batches: bool = False
) -> tuple[list[float], dict[str, Any]]:
    """The loop written by hand: DDP when several ranks, ``no_sync`` while accumulating, the scheduler
    stepped once per process per optimizer step (as a single-process schedule expects). With
    ``whole_batches`` the data is sharded as a prepared loader shards it, and the last batch of
    each epoch completes an accumulation, as a prepared loader makes it."""
    world, rank = _world()
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimizer, scheduler = _optimizer(ddp.parameters())
    loader = raw_loader(world, rank, whole_batches)
    losses, count = [], 0
    for _ in range(epochs):
        for batch, (x, y) in enumerate(loader, start=1):
            count += 1
            end = whole_batches and batch == len(loader)  # a prepared loader syncs at its end
            sync = count % steps == 0 or end
            count = 0 if end else count
            context = ddp.no_sync() if world > 1 and not sync else _Null()
            with context:
                if precision == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        out = ddp(x)
                    out = out.float()
                else:
                    out = ddp(x)
                loss = functional.cross_entropy(out, y)
                (loss / steps if steps > 1 else loss).backward()
            if sync:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
                optimizer.step()
                for _ in range(world):
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


def library_run(
    library: str, steps: int = 1, precision: str = "no", epochs: int = 2, prepare_loader: bool = False
) -> tuple[list[float], dict[str, Any]]:
    """The same loop through ``library``'s ``Accelerator`` (``"hasten"`` or ``"accelerate"``).

    Without ``prepare_loader`` the data comes from :func:`raw_loader` on both sides, so only
    the Accelerator's training mechanics are compared.
    """
    lib = importlib.import_module(library)
    accelerator = lib.Accelerator(cpu=True, gradient_accumulation_steps=steps, mixed_precision=precision)
    net = model()
    optimizer, scheduler = _optimizer(net.parameters())
    if prepare_loader:
        loader = torch.utils.data.DataLoader(dataset(), batch_size=BATCH)
        loader, net, optimizer, scheduler = accelerator.prepare(loader, net, optimizer, scheduler)
    else:
        loader = raw_loader(accelerator.num_processes, accelerator.process_index)
        net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    losses, _ = accelerated_epochs(accelerator, net, optimizer, scheduler, loader, epochs)
    weights = accelerator.get_state_dict(net)
    return losses, {k: v.detach().clone() for k, v in weights.items()}


def train_prepared(accelerator: Any) -> tuple[Any, list[float], list[Any], dict[str, Any] | None]:
    """Prepare the model, optimizer and scheduler with ``accelerator``, train them on
    :func:`raw_loader`'s batches; returns the prepared model, the losses, the clipping norms and
    ``get_state_dict`` of the model."""
    net = model()
    optimizer, scheduler = _optimizer(net.parameters())
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    loader = raw_loader(accelerator.num_processes, accelerator.process_index)
    losses, norms = accelerated_epochs(accelerator, net, optimizer, scheduler, loader)
    return net, losses, norms, accelerator.get_state_dict(net)


def accelerated_epochs(
    accelerator: Any, net: Any, optimizer: Any, scheduler: Any, loader: Any, epochs: int = 2
) -> tuple[list[float], list[Any]]:
    """The loop through a prepared model (``accumulate``, ``backward``, clipping on synchronising
    batches, ``step``); returns each batch's loss and each norm ``clip_grad_norm_`` returned."""
    losses, norms = [], []
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(net):
                loss = functional.cross_entropy(net(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norms.append(accelerator.clip_grad_norm_(net.parameters(), 1.0))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
    return losses, norms


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: Any) -> None:
        return None


def same_run(a: tuple[list[float], dict[str, Any]], b: tuple[list[float], dict[str, Any]]) -> bool:
    """Bit-for-bit the same losses and final weights."""
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
