"""``prepare_data_loader``: turn a user's ``DataLoader`` into the loader one rank of the job iterates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler

from hasten.data_loading.adapter import get_sampler, loader_kwargs
from hasten.data_loading.dispatch import DataLoaderDispatcher
from hasten.data_loading.iterable import IterableDatasetShard
from hasten.data_loading.samplers import BatchSamplerShard, SeedableRandomSampler, _rank_arguments
from hasten.data_loading.shard import DataLoaderShard
from hasten.state import PartialState
from hasten.utils.dataclasses.enums import DistributedType, RNGType


def _mesh_share(
    mesh: Any, distributed_type: DistributedType, num_processes: int, process_index: int
) -> tuple[int, int]:
    """(number of data shards, this rank's shard) under a device mesh: ranks that differ only along
    the tensor- or context-parallel dimensions read the same data."""
    names = tuple(mesh.mesh_dim_names or ())

    def size(name: str) -> int:
        return int(mesh[name].size()) if name in names else 1

    if distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed's config decides the data-parallel split
        return num_processes // size("tp"), process_index // size("tp")
    return size("dp_shard") * size("dp_replicate"), process_index // (size("tp") * size("cp"))


def _split_batch_size(dataloader: DataLoader, num_processes: int) -> None:
    """Check that ``split_batches`` can cut every batch into ``num_processes`` equal slices."""
    size = dataloader.batch_size
    if size is None:
        size = getattr(dataloader.batch_sampler, "batch_size", None)
    if size is None:
        raise ValueError(
            "split_batches=True needs a batch size to split: the DataLoader's batch_size is None and its "
            f"batch sampler ({type(dataloader.batch_sampler).__name__}) has no batch_size attribute. Give "
            "the batch sampler a batch_size, or use split_batches=False."
        )
    if num_processes > 1 and size % num_processes != 0:
        raise ValueError(
            f"split_batches=True cuts every batch into num_processes={num_processes} equal slices, but the "
            f"batch size is {size}. Use a batch size divisible by {num_processes}, or split_batches=False."
        )


def _seedable(sampler: RandomSampler, data_seed: int | None) -> SeedableRandomSampler:
    return SeedableRandomSampler(
        data_source=sampler.data_source,
        replacement=sampler.replacement,
        num_samples=sampler._num_samples,
        generator=sampler.generator,
        data_seed=data_seed,
    )


def _attach_generator(sampler: Any) -> torch.Generator | None:
    """The generator the sampler shuffles with; one seeded from the global RNG is given to a sampler
    that has none, so every rank can be given rank 0's state when an epoch starts."""
    if not hasattr(sampler, "generator"):
        return None
    if sampler.generator is None:
        generator = torch.Generator(device=torch.get_default_device())
        generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        sampler.generator = generator
    generator = sampler.generator
    return generator if isinstance(generator, torch.Generator) else None


def prepare_data_loader(
    dataloader: DataLoader,
    device: torch.device | None = None,
    num_processes: int | None = None,
    process_index: int | None = None,
    split_batches: bool = False,
    put_on_device: bool = False,
    rng_types: list[str | RNGType] | None = None,
    dispatch_batches: bool | None = None,
    even_batches: bool = True,
    slice_fn_for_dispatch: Callable[..., Any] | None = None,
    use_seedable_sampler: bool = False,
    data_seed: int | None = None,
    non_blocking: bool = False,
    use_stateful_dataloader: bool = False,
    torch_device_mesh: Any = None,
) -> DataLoader:
    """Wrap ``dataloader`` so this rank reads its share of every epoch.

    Args:
        dataloader: the ``DataLoader`` of the whole job.
        device: where ``put_on_device`` moves the batches.
        num_processes: how many ranks share the data (default: the running job's).
        process_index: this rank (default: the running job's).
        split_batches: cut each batch into ``num_processes`` slices (the batch size must divide
            by it) instead of giving each rank whole batches.
        put_on_device: move every batch to ``device``.
        rng_types: RNGs to synchronise from rank 0 at each epoch start (``"torch"``, ``"cuda"``,
            ``"generator"``: the sampler's generator, ...).
        dispatch_batches: rank 0 reads and sends every rank its slice (default: for iterable
            datasets when ``put_on_device``); needs ``put_on_device``.
        even_batches: complete the last round with samples from the start so every rank gets
            the same number of full batches (map-style datasets).
        slice_fn_for_dispatch: how a dispatched batch is sliced (default ``slice_tensors``).
        use_seedable_sampler: shuffle with :class:`SeedableRandomSampler` (order from
            ``seed + epoch``, the same on every rank).
        data_seed: that sampler's seed (default: torch's initial seed).
        non_blocking: copy batches to the device asynchronously.
        use_stateful_dataloader: back the loader by torchdata's ``StatefulDataLoader``.
        torch_device_mesh: a ``DeviceMesh``: ranks that differ only along ``"tp"`` / ``"cp"`` read
            the same data.

    Returns:
        A :class:`DataLoaderShard` (or :class:`DataLoaderDispatcher`); ``isinstance(..., DataLoader)``
        holds for both.

    Raises:
        ValueError: ``dispatch_batches`` without ``put_on_device``; ``split_batches`` with a batch
            size that does not divide by ``num_processes``; a rank outside the job.
    """
    dataset = dataloader.dataset
    iterable = isinstance(dataset, IterableDataset)
    if dispatch_batches is None:
        dispatch_batches = bool(put_on_device and iterable)
    if dispatch_batches and not put_on_device:
        raise ValueError(
            "prepare_data_loader: dispatch_batches=True sends batches from rank 0 to every device and "
            "needs put_on_device=True."
        )
    state = PartialState()
    num_processes = state.num_processes if num_processes is None else num_processes
    process_index = state.process_index if process_index is None else process_index
    if torch_device_mesh is not None:
        num_processes, process_index = _mesh_share(
            torch_device_mesh, state.distributed_type, num_processes, process_index
        )
    _rank_arguments(num_processes, process_index, "prepare_data_loader")
    if split_batches:
        _split_batch_size(dataloader, num_processes)

    sampler_is_batch_sampler = isinstance(dataloader.sampler, BatchSampler)
    index_source: Any = None
    if not iterable:
        index_source = dataloader.sampler if sampler_is_batch_sampler else dataloader.batch_sampler
    sampler = get_sampler(dataloader)
    if use_seedable_sampler and isinstance(sampler, RandomSampler):
        sampler = _seedable(sampler, data_seed)
    synchronized_generator = None
    sharded = num_processes != 1 or state.distributed_type == DistributedType.MEGATRON_LM
    if sharded and not dispatch_batches:
        if iterable:
            generator = getattr(dataset, "generator", None)
            synchronized_generator = generator if isinstance(generator, torch.Generator) else None
            dataset = IterableDatasetShard(
                dataset,
                batch_size=dataloader.batch_size,  # type: ignore[arg-type]
                drop_last=dataloader.drop_last,
                num_processes=num_processes,
                process_index=process_index,
                split_batches=split_batches,
            )
        else:
            if not use_seedable_sampler:
                synchronized_generator = _attach_generator(sampler)
            index_source = BatchSamplerShard(
                index_source,
                num_processes=num_processes,
                process_index=process_index,
                split_batches=split_batches,
                even_batches=even_batches,
            )

    kwargs = loader_kwargs(dataloader)
    if rng_types is not None:
        rng_types = [
            kind for kind in rng_types if synchronized_generator is not None or str(kind) != RNGType.GENERATOR
        ]
    if iterable:
        kwargs["drop_last"] = dataloader.drop_last
        size = dataloader.batch_size
        divide = split_batches and not dispatch_batches and size is not None
        kwargs["batch_size"] = size // num_processes if divide else size  # type: ignore[operator]
    elif sampler_is_batch_sampler:
        kwargs["sampler"] = index_source
        kwargs["batch_size"] = dataloader.batch_size
    else:
        kwargs["batch_sampler"] = index_source

    prepared: DataLoaderShard | DataLoaderDispatcher
    if dispatch_batches:
        kwargs.pop("generator")
        prepared = DataLoaderDispatcher(
            dataset,
            split_batches=split_batches,
            _drop_last=dataloader.drop_last,
            _non_blocking=non_blocking,
            slice_fn=slice_fn_for_dispatch,
            use_stateful_dataloader=use_stateful_dataloader,
            torch_device_mesh=torch_device_mesh,
            **kwargs,
        )
    else:
        prepared = DataLoaderShard(
            dataset,
            device=device if put_on_device else None,
            rng_types=rng_types,
            synchronized_generator=synchronized_generator,
            _drop_last=dataloader.drop_last,
            _non_blocking=non_blocking,
            use_stateful_dataloader=use_stateful_dataloader,
            torch_device_mesh=torch_device_mesh,
            **kwargs,
        )
    if isinstance(sampler, SeedableRandomSampler):
        prepared.set_sampler(sampler)
    return prepared  # type: ignore[return-value]
