"""Which samples of an iterable dataset each rank reads.

Every rank iterates the whole dataset and keeps its share of each global batch: with
``split_batches=False`` a global batch is ``batch_size * num_processes`` samples and rank ``r``
keeps the ``r``-th run of ``batch_size``; with ``split_batches=True`` a global batch is
``batch_size`` samples and rank ``r`` keeps the ``r``-th run of ``batch_size // num_processes``.
A short last global batch is dropped with ``drop_last``, and otherwise completed with the
samples the epoch started with, so every rank reads the same number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from hasten.data_loading.samplers import _rank_arguments


class IterableDatasetShard(IterableDataset):
    """Rank ``process_index``'s share of an iterable dataset (see the module docstring).

    Args:
        dataset: the iterable dataset of the whole job.
        batch_size: the per-rank batch size (``split_batches=False``) or the global one
            (``split_batches=True``).
        drop_last: drop a short last global batch instead of completing it.
        num_processes: how many ranks share the dataset.
        process_index: this rank.
        split_batches: cut each global batch into ``num_processes`` slices.

    Raises:
        ValueError: a batch size below 1, or ``split_batches`` with a batch size that does not
            divide by ``num_processes`` (some rank would get nothing).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        drop_last: bool = False,
        num_processes: int = 1,
        process_index: int = 0,
        split_batches: bool = False,
    ) -> None:
        _rank_arguments(num_processes, process_index, "IterableDatasetShard")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"IterableDatasetShard: batch_size={batch_size!r} must be an int >= 1 (a DataLoader over an "
                "iterable dataset needs a batch_size to be sharded; with batch_size=None use "
                "dispatch_batches=True)."
            )
        if split_batches and batch_size % num_processes != 0:
            raise ValueError(
                f"IterableDatasetShard: split_batches=True cuts every batch of {batch_size} samples into "
                f"num_processes={num_processes} equal slices; choose a batch size divisible by "
                f"{num_processes} or split_batches=False."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_processes = num_processes
        self.process_index = process_index
        self.split_batches = split_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch and pass it to the dataset when it has ``set_epoch``."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _sizes(self) -> tuple[int, int]:
        """(samples per global batch, samples per rank and global batch)."""
        if self.split_batches:
            return self.batch_size, self.batch_size // self.num_processes
        return self.batch_size * self.num_processes, self.batch_size

    def __len__(self) -> int:
        whole, share = self._sizes()
        rounds = len(self.dataset) // whole if self.drop_last else math.ceil(len(self.dataset) / whole)
        return rounds * share

    def __iter__(self) -> Iterator[Any]:
        generator = getattr(self.dataset, "generator", None)
        if not hasattr(self.dataset, "set_epoch") and isinstance(generator, torch.Generator):
            generator.manual_seed(self.epoch)  # the dataset shuffles with it: same order on every rank
        whole, share = self._sizes()
        start, stop = share * self.process_index, share * (self.process_index + 1)
        first: list[Any] | None = None
        current: list[Any] = []
        for sample in self.dataset:
            current.append(sample)
            if len(current) == whole:
                yield from current[start:stop]
                if first is None:
                    first = current
                current = []
        if self.drop_last or not current:
            return
        pool = first if first is not None else list(current)
        missing = whole - len(current)
        current += [pool[i % len(pool)] for i in range(missing)]
        yield from current[start:stop]
