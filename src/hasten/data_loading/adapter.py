"""What every prepared loader shares: it wraps a ``DataLoader``, tells ``GradientState`` where it is,
and saves and restores its position and order exactly.

:class:`DataLoaderAdapter` holds the real loader (``base_dataloader``: a ``DataLoader``, or
torchdata's ``StatefulDataLoader`` with ``use_stateful_dataloader=True``), forwards unknown
attributes to it, and answers ``isinstance(loader, DataLoader)`` with ``True`` as Accelerate's
does. It starts each epoch (:meth:`DataLoaderAdapter._begin_epoch`) the one way exact resume
needs: synchronise the RNGs, set the epoch, record what fixes the order, create the inner
iterator and fetch the first batch (see :mod:`hasten.data_loading.progress`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

from hasten.data_loading.progress import (
    Progress,
    global_rng_streams,
    load_progress_state,
    order_generators,
    progress_state,
    restore_global_rng_streams,
)
from hasten.state import GradientState
from hasten.utils.batches import batch_mover
from hasten.utils.imports import is_torchdata_stateful_dataloader_available, package_version, require
from hasten.utils.random import synchronize_rng_states

# DataLoader arguments and their defaults (torch >= 2.6), read from a loader to rebuild it.
_LOADER_DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "shuffle": False,
    "sampler": None,
    "batch_sampler": None,
    "num_workers": 0,
    "collate_fn": None,
    "pin_memory": False,
    "drop_last": False,
    "timeout": 0,
    "worker_init_fn": None,
    "multiprocessing_context": None,
    "generator": None,
    "prefetch_factor": 2,
    "persistent_workers": False,
    "pin_memory_device": "",
    "in_order": True,
}
_SAMPLING = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")
_PROGRESS_KEYS = ("iteration", "batches_yielded", "generators", "rng_state", "sampler")

END = object()  # what a fetch returns when the epoch has no (more) batches


def loader_kwargs(dataloader: Any) -> dict[str, Any]:
    """The arguments ``dataloader`` was built with, except those its (batch) sampler decides."""
    return {
        key: getattr(dataloader, key, default)
        for key, default in _LOADER_DEFAULTS.items()
        if key not in _SAMPLING
    }


def get_sampler(dataloader: Any) -> Any:
    """The index sampler of ``dataloader`` (under its batch sampler, or its sampler itself when it
    does not batch), ``None`` when there is none."""
    if isinstance(dataloader.sampler, BatchSampler):
        return getattr(dataloader.sampler, "sampler", None)
    if dataloader.batch_sampler is None:
        return dataloader.sampler
    return getattr(dataloader.batch_sampler, "sampler", None)


def _stateful_loader_class() -> type[DataLoader]:
    require("torchdata", purpose="use_stateful_dataloader=True (torchdata's StatefulDataLoader)")
    if not is_torchdata_stateful_dataloader_available():
        raise ImportError(
            "use_stateful_dataloader=True needs torchdata >= 0.8.0 (its StatefulDataLoader); torchdata "
            f"{package_version('torchdata')} is installed. Upgrade it with: pip install -U torchdata"
        )
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader


class DataLoaderStateMixin:
    """Tells :class:`~hasten.state.GradientState` which loader runs, whether its last batch was
    yielded (``end_of_dataloader``, known one batch ahead) and how many samples of the last
    global batch are real (``remainder``: ``gather_for_metrics`` keeps that many; ``-1`` when
    unknown)."""

    end_of_dataloader: bool = False
    remainder: int = -1
    _drop_last: bool = False
    gradient_state: GradientState

    def reset(self) -> None:
        """Forget the end-of-epoch flag and the remainder."""
        self.end_of_dataloader = False
        self.remainder = -1

    def begin(self) -> None:
        """An epoch starts: compute the remainder and become the active loader."""
        self.reset()
        if not self._drop_last:
            try:
                length = self.total_dataset_length  # type: ignore[attr-defined]
                self.remainder = int(length) % int(self.total_batch_size)  # type: ignore[attr-defined]
            except (TypeError, AttributeError, ZeroDivisionError, NotImplementedError):
                self.remainder = -1  # no length: gather_for_metrics cannot trim
        self.gradient_state = GradientState()  # the shared record may have been reset since
        self.gradient_state._add_dataloader(self)

    def end(self) -> None:
        """The epoch is over (or was left): stop being the active loader."""
        if self.gradient_state.initialized:  # not reset meanwhile (a loop closed late, at exit)
            self.gradient_state._remove_dataloader(self)


def _new_like(cls: type[Any]) -> Any:
    return object.__new__(cls)


class DataLoaderAdapter:
    """A ``DataLoader`` (or torchdata ``StatefulDataLoader``) wrapped so it can be prepared.

    Args:
        dataset: the dataset to load from.
        use_stateful_dataloader: build torchdata's ``StatefulDataLoader`` (needs torchdata >= 0.8).
        batch_sampler: the batch sampler (``None``: built from ``batch_size``, ``sampler``, ...).
        **kwargs: the other ``DataLoader`` arguments.

    Raises:
        ImportError: ``use_stateful_dataloader=True`` without torchdata (the message names it).
    """

    def __init__(
        self, dataset: Any, use_stateful_dataloader: bool = False, batch_sampler: Any = None, **kwargs: Any
    ) -> None:
        self.use_stateful_dataloader = use_stateful_dataloader
        loader_class = _stateful_loader_class() if use_stateful_dataloader else DataLoader
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which torch >= 2.9 deprecates: not the user's to fix
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            self.base_dataloader: Any = loader_class(dataset, batch_sampler=batch_sampler, **kwargs)
        self._progress = Progress()
        self._sampler_offset = 0  # batches a SkipBatchSampler leaves out (they count as yielded)
        self._pending_loader_state: dict[str, Any] | None = None  # restored, for torchdata

    # --- behaving like the wrapped loader -----------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base_dataloader")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The wrapped loader's class, so ``isinstance(loader, DataLoader)`` holds (as in Accelerate)."""
        return type(self.__dict__["base_dataloader"])

    def __reduce__(self) -> tuple[Any, ...]:
        return (_new_like, (type(self),), self.__dict__)

    def __len__(self) -> int:
        return len(self.base_dataloader)

    def __iter__(self) -> Iterator[Any]:
        return self._iterate(None, False, 0)

    def _iterate(self, device: Any, non_blocking: bool, skip: int) -> Iterator[Any]:
        """One epoch, read one batch ahead so ``end_of_dataloader`` is set while the last batch is
        used; the first ``skip`` batches are fetched and left out; batches go to ``device``."""
        progress = self._progress
        stateful = self.use_stateful_dataloader
        move = None if device is None else batch_mover(device, non_blocking)  # device checked once
        try:
            inner, batch = self._begin_epoch(self._sampler_offset)
            while batch is not END:
                if stateful:
                    progress.loader_state = self._snapshot(finished=False)
                upcoming = next(inner, END)
                if upcoming is END:
                    self.end_of_dataloader = progress.last_batch_out = True
                    if stateful:
                        progress.loader_state = self._snapshot(finished=True)
                progress.batches_yielded += 1
                if skip > 0:
                    skip -= 1
                else:
                    yield batch if move is None else move(batch)
                batch = upcoming
            progress.finish()
        except GeneratorExit:
            progress.abandon()
            raise
        finally:
            if isinstance(self, DataLoaderStateMixin):
                self.end()

    @property
    def iteration(self) -> int:
        """The epoch counter: epochs completed, or what ``set_epoch`` set."""
        return self._progress.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self._progress.iteration = value

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, and pass it to the batch sampler, sampler and dataset that have ``set_epoch``."""
        self.iteration = epoch
        base = self.base_dataloader
        batch_sampler = base.sampler if isinstance(base.sampler, BatchSampler) else base.batch_sampler
        seen: list[Any] = []
        for target in (batch_sampler, get_sampler(base), base.dataset):
            if target is not None and hasattr(target, "set_epoch") and all(target is not t for t in seen):
                seen.append(target)
                target.set_epoch(epoch)

    def get_sampler(self) -> Any:
        """The index sampler (see :func:`get_sampler`)."""
        return get_sampler(self.base_dataloader)

    def set_sampler(self, sampler: Any) -> None:
        """Replace the index sampler under the batch sampler."""
        base = self.base_dataloader
        if isinstance(base.sampler, BatchSampler):
            base.sampler.sampler = sampler
        else:
            base.batch_sampler.sampler = sampler

    # --- epochs ---------------------------------------------------------------------------------

    def _order_generators(self) -> dict[str, torch.Generator]:
        base = self.base_dataloader
        return order_generators(get_sampler(base), base.generator, base.dataset)

    def _rng_setup(self) -> tuple[list[Any] | None, torch.Generator | None]:
        return None, None

    def _create_iterator(self) -> Iterator[Any] | None:
        return iter(self.base_dataloader)

    def _fetch_first(self, inner: Iterator[Any] | None) -> Any:
        assert inner is not None
        return next(inner, END)

    def _begin_epoch(self, position: int) -> tuple[Any, Any]:
        """Start an epoch at batch ``position``; return the inner iterator and the first fetch.

        Synchronises the RNGs in ``rng_types``, passes the epoch on, records what fixes the
        order (or, replaying a restored epoch, draws from the recorded global RNG state and
        afterwards puts every global RNG stream back as the checkpoint left it).
        """
        progress = self._progress
        replay = progress.replay
        streams = global_rng_streams() if replay else None
        try:
            rng_types, generator = self._rng_setup()
            if rng_types:
                synchronize_rng_states(rng_types, generator)
            self.set_epoch(progress.iteration)
            if replay and self.use_stateful_dataloader:
                position = progress.batches_yielded  # torchdata resumes mid-epoch by itself
            epoch_rng = progress.epoch_rng
            progress.start(self._order_generators(), position)
            if replay and epoch_rng is not None:
                torch.set_rng_state(epoch_rng)
            if isinstance(self, DataLoaderStateMixin):
                self.begin()
            if self._pending_loader_state is not None:
                self.base_dataloader.load_state_dict(self._pending_loader_state)
                self._pending_loader_state = None
            inner = self._create_iterator()
            first = self._fetch_first(inner)
        finally:
            if streams is not None:
                restore_global_rng_streams(streams)
        return inner, first

    # --- saving and restoring -----------------------------------------------------------------

    def _loader_state(self) -> dict[str, Any]:
        """torchdata's state of the base loader as of the batches handed out (``{}`` before any)."""
        state = self._progress.loader_state
        return {} if state is None else dict(state)

    def state_dict(self) -> dict[str, Any]:
        """This loader's position and what fixes its epoch's order, as plain data.

        Keys: ``iteration`` (the epoch counter), ``batches_yielded`` (batches handed out in the
        epoch in progress; 0 between epochs), ``generators`` (the state of each generator the
        order is drawn from, by role ``"sampler"`` / ``"loader"`` / ``"dataset"``: at the start
        of the epoch in progress, or now between epochs), ``rng_state`` (the global torch RNG
        state at the start of the epoch in progress, which a sampler without a generator and
        the base seed draw from) and ``sampler`` (``{"seed", "epoch"}`` of a
        :class:`SeedableRandomSampler`). A stateful loader adds torchdata's own keys (position
        included) and ``_iterator_finished``.
        """
        state = progress_state(self._progress, get_sampler(self.base_dataloader), self._order_generators())
        if self.use_stateful_dataloader:
            state = {**self._loader_state(), **state}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next epoch replays the saved one in the same order.

        Iterate the loader to replay that epoch from its start, or
        ``skip_first_batches(loader, state["batches_yielded"])`` to continue where it was (a
        stateful loader continues by itself). Global RNG streams are not advanced by the replayed
        epoch's start.

        Raises:
            ValueError: the state does not fit this loader (see the message).
        """
        owner = type(self).__name__
        if not isinstance(state_dict, dict):
            raise ValueError(f"{owner}.load_state_dict: expected a dict, got {type(state_dict).__name__}.")
        if self.use_stateful_dataloader:
            loader_state = {k: v for k, v in state_dict.items() if k not in _PROGRESS_KEYS}
            finished = bool(loader_state.get("_iterator_finished", False))
            # A finished epoch's state would make torchdata create two iterators (two base-seed
            # draws) for the next one; the next epoch starts afresh without it. The state goes to
            # torchdata when this loader's next epoch starts (a skip loader may run it instead).
            self._pending_loader_state = None if finished or not loader_state else loader_state
            self._progress.loader_state = self._pending_loader_state
            if "iteration" not in state_dict:  # written by Accelerate: torchdata's keys only
                self._progress.replay = bool(loader_state) and not finished
                self._progress.batches_yielded = (
                    0 if finished else int(loader_state.get("_num_yielded", 0) or 0)
                )
                return
        load_progress_state(
            self._progress,
            state_dict,
            get_sampler(self.base_dataloader),
            self._order_generators(),
            owner,
        )

    def _snapshot(self, finished: bool) -> dict[str, Any]:
        """torchdata's state as of the batches fetched so far (stateful loaders)."""
        state = dict(self.base_dataloader.state_dict())
        state["_iterator_finished"] = finished
        offset = self._sampler_offset  # a SkipBatchSampler's batches count as fetched
        if offset:
            for key in ("_sampler_iter_yielded", "_num_yielded"):
                if isinstance(state.get(key), int):
                    state[key] += offset
        return state
