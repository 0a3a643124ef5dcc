"""Data loaders for one rank of a job: sharding, dispatch, seedable shuffling, exact resume.

What ``Accelerator.prepare`` does to a ``DataLoader``, usable on its own:
:func:`prepare_data_loader` decides which samples this rank reads (:class:`BatchSamplerShard`
for map-style datasets, :class:`IterableDatasetShard` or :class:`DataLoaderDispatcher` for
iterable ones), :func:`skip_first_batches` resumes an epoch part-way, and every prepared loader
has ``state_dict()`` / ``load_state_dict()`` holding its position and what fixes its order.
The pieces live in :mod:`hasten.data_loading`; this module is their public path, as in Accelerate.
"""

from __future__ import annotations

from hasten.data_loading.adapter import DataLoaderAdapter, DataLoaderStateMixin, get_sampler
from hasten.data_loading.dispatch import DataLoaderDispatcher
from hasten.data_loading.iterable import IterableDatasetShard
from hasten.data_loading.prepare import prepare_data_loader
from hasten.data_loading.samplers import BatchSamplerShard, SeedableRandomSampler, SkipBatchSampler
from hasten.data_loading.shard import DataLoaderShard
from hasten.data_loading.skip import SkipDataLoader, skip_first_batches

__all__ = [
    "BatchSamplerShard",
    "DataLoaderAdapter",
    "DataLoaderDispatcher",
    "DataLoaderShard",
    "DataLoaderStateMixin",
    "IterableDatasetShard",
    "SeedableRandomSampler",
    "SkipBatchSampler",
    "SkipDataLoader",
    "get_sampler",
    "prepare_data_loader",
    "skip_first_batches",
]
