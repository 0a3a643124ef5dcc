"""The loader only rank 0 reads: it fetches each global batch and sends every rank its slice.

Used for iterable datasets (which cannot be indexed per rank) and with
``dispatch_batches=True``. Each step, rank 0 reads ``num_processes`` batches (one with
``split_batches=True``, or one copied to every rank under tensor parallelism), concatenates them,
and broadcasts a small header (the structure, and whether the data ended) and then the tensors;
every rank keeps its slice. A last global batch that does not divide by the number of ranks is
completed with the epoch's first samples; ``remainder`` says how many of it are real.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import BatchSampler
from torch.utils.data.datapipes.datapipe import IterDataPipe

from hasten.data_loading.adapter import END, DataLoaderAdapter, DataLoaderStateMixin
from hasten.state import GradientState, PartialState
from hasten.utils.batches import (
    concatenate,
    find_batch_size,
    get_data_structure,
    initialize_tensors,
    send_to_device,
    slice_tensors,
)
from hasten.utils.operations import broadcast, broadcast_object_list


@dataclass
class _Step:
    """One step as rank 0 read it: the header every rank receives, and rank 0's tensors and
    torchdata snapshots (before and after reading it)."""

    header: list[Any] = field(default_factory=lambda: [None, True, None])
    batch: Any = None
    padding: Any = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class DataLoaderDispatcher(DataLoaderAdapter, DataLoaderStateMixin):
    """A loader iterated on rank 0 only, which sends every rank its slice of each batch.

    Args:
        dataset: the dataset (rank 0 reads it).
        split_batches: slice each batch of the loader across ranks (its batch size must divide
            by the number of ranks) instead of gathering one batch per rank each step.
        skip_batches: steps to leave out at the start of each epoch (rank 0 reads and drops
            their batches; nothing is sent).
        use_stateful_dataloader: wrap torchdata's ``StatefulDataLoader``.
        slice_fn: how to take a rank's slice (default :func:`~hasten.utils.slice_tensors`); called
            as ``slice_fn(batch, slice, process_index=..., num_processes=...)``.
        torch_device_mesh: with a ``"tp"`` dimension, every rank receives the same batch.
        iteration: the epoch counter to start from.
        **kwargs: the ``DataLoader`` arguments.

    Raises:
        ValueError: a device mesh combining ``"tp"`` with ``"dp"`` or ``"fsdp"``.
    """

    def __init__(
        self,
        dataset: Any,
        split_batches: bool = False,
        skip_batches: int = 0,
        use_stateful_dataloader: bool = False,
        _drop_last: bool = False,
        _non_blocking: bool = False,
        slice_fn: Callable[..., Any] | None = None,
        torch_device_mesh: Any = None,
        iteration: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, use_stateful_dataloader=use_stateful_dataloader, **kwargs)
        self.split_batches = split_batches
        self.gradient_state = GradientState()
        self.state = PartialState()
        self._drop_last = _drop_last
        self._non_blocking = _non_blocking
        self.skip_batches = skip_batches
        self.slice_fn = slice_tensors if slice_fn is None else slice_fn
        self.torch_device_mesh = torch_device_mesh
        self.iteration = iteration
        names = tuple(getattr(torch_device_mesh, "mesh_dim_names", None) or ())
        self.submesh_tp = torch_device_mesh["tp"] if "tp" in names else None
        self.submesh_dp = torch_device_mesh["dp"] if self.submesh_tp is not None and "dp" in names else None
        self.submesh_fsdp = (
            torch_device_mesh["fsdp"] if self.submesh_tp is not None and "fsdp" in names else None
        )
        if self.submesh_tp is not None and (self.submesh_dp is not None or self.submesh_fsdp is not None):
            raise ValueError(
                f"DataLoaderDispatcher: a device mesh with dimensions {names} combines tensor parallelism "
                "with data parallelism, which dispatching cannot serve (every rank would get the same "
                "batch). Use dispatch_batches=False for this mesh."
            )

    # --- reading on rank 0 ----------------------------------------------------------------------

    def _create_iterator(self) -> Iterator[Any] | None:
        base = self.base_dataloader
        if self.state.process_index == 0 or isinstance(base.dataset, IterDataPipe):
            return iter(base)  # data pipes agree on a seed collectively: every rank creates one
        # Elsewhere, draw what creating the iterator would (its base seed), so each rank's RNG
        # streams stay as if it had created one, without starting workers that would read data.
        torch.empty((), dtype=torch.int64).random_(generator=base.generator)
        return None

    def _pull(self, inner: Iterator[Any]) -> tuple[list[Any], bool]:
        """Up to one step's batches of the base loader, and whether the data ended."""
        wanted = 1 if (self.split_batches or self.submesh_tp is not None) else self.state.num_processes
        got: list[Any] = []
        for _ in range(wanted):
            batch = next(inner, END)
            if batch is END:
                return got, True
            got.append(batch)
        return got, False

    def _joined(self, batches: list[Any]) -> Any:
        if self.submesh_tp is not None:
            batches = batches * self.state.num_processes
        if len(batches) == 1:
            return batches[0]
        try:
            return concatenate(batches, dim=0)
        except (RuntimeError, TypeError, ValueError) as error:
            raise RuntimeError(
                "DataLoaderDispatcher: the batches of one step could not be concatenated "
                f"({error}). With dispatch_batches=True (the default for iterable datasets) every batch "
                "of a step must have the same shape beyond dim 0. Pass split_batches=True (rank 0 "
                "reads one batch and slices it) or dispatch_batches=False (each rank reads its own)."
            ) from error

    def _fetch_step(self, inner: Iterator[Any] | None, skip_steps: int) -> _Step:
        """Rank 0 reads a step (after dropping ``skip_steps`` steps); every rank gets its header.

        The header is ``[structure or None, data ended, padding structure or None]``; the
        padding (the epoch's first samples) travels with the first step after a skip.
        """
        step = _Step()
        if self.state.process_index == 0:
            assert inner is not None
            ended = False
            for skipped in range(skip_steps):
                batches, ended = self._pull(inner)
                if skipped == 0 and batches and not self._drop_last:
                    step.padding = self._first_samples(self._joined(batches))
                if ended:
                    break
            stateful = self.use_stateful_dataloader
            if stateful:
                step.before = self._snapshot(finished=False)
            batches, ended = ([], True) if ended else self._pull(inner)
            if stateful and ended:
                step.after = self._snapshot(finished=True)
            if batches and ended and self._drop_last and not self.split_batches:
                batches = []  # a short last step is dropped
            if batches:
                step.batch = self._joined(batches)
                step.header = [
                    get_data_structure(step.batch),
                    ended,
                    None if step.padding is None else get_data_structure(step.padding),
                ]
        broadcast_object_list(step.header)
        return step

    def _first_samples(self, batch: Any) -> Any:
        """The first ``num_processes`` samples of ``batch``, repeated if it has fewer."""
        world = self.state.num_processes
        while find_batch_size(batch) < world:
            batch = concatenate([batch, batch], dim=0)
        rank = self.state.process_index
        return self.slice_fn(batch, slice(0, world), process_index=rank, num_processes=world)

    # --- iterating ------------------------------------------------------------------------------

    def _fetch_first(self, inner: Iterator[Any] | None) -> Any:
        return self._fetch_step(inner, self.skip_batches)

    def __iter__(self) -> Iterator[Any]:
        progress = self._progress
        try:
            inner, current = self._begin_epoch(self.skip_batches)
            rank, world = self.state.process_index, self.state.num_processes
            device, non_blocking = self.state.device, self._non_blocking
            padding: Any = None
            while current.header[0] is not None:
                header, batch, sent_padding = current.header, current.batch, current.padding
                if rank != 0:
                    batch = initialize_tensors(header[0])
                    sent_padding = None if header[2] is None else initialize_tensors(header[2])
                if sent_padding is not None:
                    moved = send_to_device((batch, sent_padding), device, non_blocking=non_blocking)
                    batch, padding = broadcast(moved, from_process=0)
                else:
                    moved = send_to_device(batch, device, non_blocking=non_blocking)
                    batch = broadcast(moved, from_process=0)
                if padding is None and not self._drop_last:
                    padding = self._first_samples(batch)
                observed = find_batch_size(batch)
                last = bool(header[1])
                state_after = current.after
                if not last:
                    upcoming = self._fetch_step(inner, 0)
                    last = upcoming.header[0] is None
                    state_after = upcoming.after if last else upcoming.before
                per_rank = observed // world
                if last and not self._drop_last and observed % world:
                    batch = concatenate([batch, padding], dim=0)
                    per_rank += 1
                part = slice(rank * per_rank, (rank + 1) * per_rank)
                batch = self.slice_fn(batch, part, process_index=rank, num_processes=world)
                if last:
                    self.end_of_dataloader = progress.last_batch_out = True
                    self.remainder = observed
                if state_after is not None:
                    progress.loader_state = state_after
                progress.batches_yielded += 1
                yield batch
                if last:
                    break
                current = upcoming
            progress.finish()
        except GeneratorExit:
            progress.abandon()
            raise
        finally:
            self.end()

    def __len__(self) -> int:
        whole = len(self.base_dataloader)
        if self.split_batches:
            steps = whole
        elif self._drop_last:
            steps = whole // self.state.num_processes
        else:
            steps = math.ceil(whole / self.state.num_processes)
        return max(0, steps - self.skip_batches)

    @property
    def total_batch_size(self) -> int:
        """Samples per step across all ranks."""
        base = self.base_dataloader
        batch_sampler = base.sampler if isinstance(base.sampler, BatchSampler) else base.batch_sampler
        size = base.batch_size if base.batch_size is not None else getattr(batch_sampler, "batch_size", None)
        if size is None:
            raise TypeError("total_batch_size: the loader has no batch_size (batches of any size).")
        return int(size) if self.split_batches else int(size) * self.state.num_processes

    @property
    def total_dataset_length(self) -> int:
        """Samples in the dataset."""
        return len(self.base_dataloader.dataset)
