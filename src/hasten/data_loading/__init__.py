"""The pieces behind :mod:`hasten.data_loader`, one concept per module.

``samplers`` decides which indices each rank reads, ``iterable`` does the same for
iterable datasets, ``progress`` records where a loader is in its epochs (for exact
resume), ``adapter`` wraps a ``DataLoader``, ``shard`` and ``dispatch`` are the two
prepared loaders, ``skip`` starts an epoch part-way, and ``prepare`` puts it together.
Import the public names from :mod:`hasten.data_loader`.
"""
