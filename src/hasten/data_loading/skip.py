"""Starting an epoch part-way: ``skip_first_batches`` and the loaders it returns.

For a map-style dataset the skip happens in the batch sampler (:class:`SkipBatchSampler`), so the
skipped samples are never read. A loader made from a prepared one shares its progress: while it
runs, the prepared loader's ``state_dict()`` reports its position, and when it finishes the epoch
the prepared loader moves on to the next one, as if it had run the epoch itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from hasten.data_loading.adapter import DataLoaderAdapter, DataLoaderStateMixin, loader_kwargs
from hasten.data_loading.dispatch import DataLoaderDispatcher
from hasten.data_loading.samplers import SkipBatchSampler
from hasten.data_loading.shard import DataLoaderShard
from hasten.state import GradientState


class SkipDataLoader(DataLoaderAdapter, DataLoaderStateMixin):
    """A loader that fetches and leaves out the first ``skip_batches`` batches of each epoch.

    Prefer :func:`skip_first_batches`, which does not read the skipped samples of a map-style
    dataset.

    Args:
        dataset: the dataset.
        skip_batches: batches to leave out at the start of each epoch.
        use_stateful_dataloader: wrap torchdata's ``StatefulDataLoader``.
        **kwargs: the ``DataLoader`` arguments.
    """

    def __init__(
        self, dataset: Any, skip_batches: int = 0, use_stateful_dataloader: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(dataset, use_stateful_dataloader=use_stateful_dataloader, **kwargs)
        self.skip_batches = skip_batches
        self.gradient_state = GradientState()

    def __iter__(self) -> Iterator[Any]:
        return self._iterate(None, False, self.skip_batches)

    def __len__(self) -> int:
        return max(0, len(self.base_dataloader) - self.skip_batches)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _shard_like(loader: DataLoaderShard, num_batches: int) -> DataLoaderShard:
    base = loader.base_dataloader
    kwargs = loader_kwargs(base)
    skip_in_loader = 0
    offset = 0
    if isinstance(base.dataset, IterableDataset):
        kwargs.update(batch_size=base.batch_size, drop_last=base.drop_last)
        skip_in_loader = num_batches
    else:
        sampler_is_batch_sampler = isinstance(base.sampler, BatchSampler)
        index_source = base.sampler if sampler_is_batch_sampler else base.batch_sampler
        if loader.use_stateful_dataloader and _is_stateful(index_source):
            skip_in_loader = num_batches  # torchdata saves that sampler's own state: keep it the same one
            if sampler_is_batch_sampler:
                kwargs.update(sampler=index_source, batch_size=base.batch_size)
            else:
                kwargs["batch_sampler"] = index_source
        else:
            skipping = SkipBatchSampler(index_source, skip_batches=num_batches)
            offset = loader._sampler_offset + num_batches
            if sampler_is_batch_sampler:
                kwargs.update(sampler=skipping, batch_size=base.batch_size)
            else:
                kwargs["batch_sampler"] = skipping
    skipped = DataLoaderShard(
        base.dataset,
        device=loader.device,
        rng_types=loader.rng_types,
        synchronized_generator=loader.synchronized_generator,
        skip_batches=loader.skip_batches + skip_in_loader,
        use_stateful_dataloader=loader.use_stateful_dataloader,
        _drop_last=loader._drop_last,
        _non_blocking=loader._non_blocking,
        torch_device_mesh=loader.torch_device_mesh,
        **kwargs,
    )
    skipped._sampler_offset = offset
    return skipped


def _dispatcher_like(loader: DataLoaderDispatcher, num_batches: int) -> DataLoaderDispatcher:
    base = loader.base_dataloader
    kwargs = loader_kwargs(base)
    kwargs.pop("generator")
    if isinstance(base.dataset, IterableDataset):
        kwargs.update(batch_size=base.batch_size, drop_last=base.drop_last)
    elif isinstance(base.sampler, BatchSampler):
        kwargs.update(sampler=base.sampler, batch_size=base.batch_size)
    else:
        kwargs["batch_sampler"] = base.batch_sampler
    return DataLoaderDispatcher(
        base.dataset,
        split_batches=loader.split_batches,
        skip_batches=loader.skip_batches + num_batches,
        use_stateful_dataloader=loader.use_stateful_dataloader,
        _drop_last=loader._drop_last,
        _non_blocking=loader._non_blocking,
        slice_fn=loader.slice_fn,
        torch_device_mesh=loader.torch_device_mesh,
        **kwargs,
    )


def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
    """A loader that yields the batches of ``dataloader``'s epoch after its first ``num_batches``.

    For a prepared loader it yields, in the same order, exactly what the uninterrupted epoch
    yields after its first ``num_batches`` (also after ``load_state_dict``: the resume recipe),
    and shares the prepared loader's progress (see the module docstring). A map-style dataset's
    skipped samples are never read; an iterable dataset's are read and dropped (on rank 0 only
    for a :class:`DataLoaderDispatcher`, which also reads a map-style dataset's).

    Raises:
        ValueError: ``num_batches`` is not an int >= 0.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(f"skip_first_batches: num_batches={num_batches!r} must be an int >= 0.")
    made: Any
    if isinstance(dataloader, DataLoaderDispatcher):
        made = _dispatcher_like(dataloader, num_batches)
    elif isinstance(dataloader, DataLoaderShard):
        made = _shard_like(dataloader, num_batches)
    else:
        kwargs = loader_kwargs(dataloader)
        if isinstance(dataloader.dataset, IterableDataset):
            kwargs.update(batch_size=dataloader.batch_size, drop_last=dataloader.drop_last)
            return SkipDataLoader(dataloader.dataset, skip_batches=num_batches, **kwargs)
        if isinstance(dataloader.sampler, BatchSampler):
            skipping = SkipBatchSampler(dataloader.sampler, skip_batches=num_batches)
            return DataLoader(
                dataloader.dataset, sampler=skipping, batch_size=dataloader.batch_size, **kwargs
            )
        skipping = SkipBatchSampler(dataloader.batch_sampler, skip_batches=num_batches)
        return DataLoader(dataloader.dataset, batch_sampler=skipping, **kwargs)
    made._progress = dataloader._progress
    return made
