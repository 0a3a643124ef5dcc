"""The loader every rank iterates by itself: its own share of the batches, moved to its device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler

from hasten.data_loading.adapter import DataLoaderAdapter, DataLoaderStateMixin
from hasten.data_loading.iterable import IterableDatasetShard
from hasten.data_loading.samplers import BatchSamplerShard, SkipBatchSampler
from hasten.state import GradientState


def sharding_of(batch_sampler: Any) -> tuple[int | None, int, bool]:
    """(batch size, number of ranks, split_batches) of a batch sampler, through skip wrappers."""
    while isinstance(batch_sampler, SkipBatchSampler):
        batch_sampler = batch_sampler.batch_sampler
    size = getattr(batch_sampler, "batch_size", None)
    if isinstance(batch_sampler, BatchSamplerShard):
        return size, batch_sampler.num_processes, batch_sampler.split_batches
    return size, 1, False


class DataLoaderShard(DataLoaderAdapter, DataLoaderStateMixin):
    """A loader that yields this rank's share of the batches, on ``device``.

    It reads one batch ahead, so ``end_of_dataloader`` is already ``True`` while the last batch
    is being used (gradient accumulation syncs there), and tells ``GradientState`` the
    ``remainder`` of the last global batch (``gather_for_metrics`` drops the rest).

    Args:
        dataset: the dataset (an :class:`IterableDatasetShard` for a sharded iterable one).
        device: move every batch there (``None``: leave them where the loader puts them).
        rng_types: RNGs to synchronise from rank 0 when each epoch starts (``"torch"``,
            ``"cuda"``, ``"generator"``, ...; see :class:`~hasten.utils.RNGType`).
        synchronized_generator: the generator ``"generator"`` means (the sampler's).
        skip_batches: batches to fetch and leave out at the start of each epoch.
        use_stateful_dataloader: wrap torchdata's ``StatefulDataLoader``.
        torch_device_mesh: kept for Accelerate's signature (the sharding is decided by the
            batch sampler ``prepare_data_loader`` builds).
        iteration: the epoch counter to start from.
        **kwargs: the ``DataLoader`` arguments (``batch_sampler``, ``num_workers``, ...).
    """

    def __init__(
        self,
        dataset: Any,
        device: torch.device | str | None = None,
        rng_types: list[Any] | None = None,
        synchronized_generator: torch.Generator | None = None,
        skip_batches: int = 0,
        use_stateful_dataloader: bool = False,
        _drop_last: bool = False,
        _non_blocking: bool = False,
        torch_device_mesh: Any = None,
        iteration: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, use_stateful_dataloader=use_stateful_dataloader, **kwargs)
        self.device = device
        self.rng_types = rng_types
        self.synchronized_generator = synchronized_generator
        self.skip_batches = skip_batches
        self.gradient_state = GradientState()
        self._drop_last = _drop_last
        self._non_blocking = _non_blocking
        self.torch_device_mesh = torch_device_mesh
        self.iteration = iteration

    def _rng_setup(self) -> tuple[list[Any] | None, torch.Generator | None]:
        return self.rng_types, self.synchronized_generator

    def __iter__(self) -> Iterator[Any]:
        return self._iterate(self.device, self._non_blocking, self.skip_batches)

    def __len__(self) -> int:
        return max(0, len(self.base_dataloader) - self.skip_batches)

    @property
    def total_batch_size(self) -> int:
        """Samples per step across all ranks: the batch size, times the ranks unless batches are split."""
        dataset = self.base_dataloader.dataset
        if isinstance(dataset, IterableDatasetShard):
            return dataset.batch_size if dataset.split_batches else dataset.batch_size * dataset.num_processes
        base = self.base_dataloader
        batch_sampler = base.sampler if isinstance(base.sampler, BatchSampler) else base.batch_sampler
        size, world, split = sharding_of(batch_sampler)
        if size is None:
            raise TypeError("total_batch_size: the batch sampler has no batch_size (batches of any size).")
        return size if split else size * world

    @property
    def total_dataset_length(self) -> int:
        """Samples in the whole dataset (all ranks together, before any repeats)."""
        dataset = self.base_dataloader.dataset
        if isinstance(dataset, IterableDatasetShard):
            return len(dataset.dataset)
        if hasattr(dataset, "total_length"):
            return int(dataset.total_length)
        return len(dataset)
