"""Which indices each rank reads: a per-epoch seeded shuffle and the batch sampler that shards batches.

:class:`BatchSamplerShard` is where a mistake would silently train on the wrong data, so its
rules are written out here and checked by property tests:

* **interleaved** (``split_batches=False``): the batches of the wrapped sampler are dealt out in
  rounds of ``num_processes``; rank ``r`` takes batch ``r`` of every round.
* **split** (``split_batches=True``): every batch is cut into ``num_processes`` equal slices;
  rank ``r`` takes slice ``r``.
* the last round (or last batch) may be short. With the wrapped sampler's ``drop_last`` it is
  dropped. Otherwise, with ``even_batches=True`` it is completed with indices from the start of
  the epoch (cycling through the first round's indices) so every rank gets the same number of
  full batches; with ``even_batches=False`` each rank takes what is there, so every index is
  read exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, RandomSampler


def _rank_arguments(num_processes: Any, process_index: Any, caller: str) -> None:
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"{caller}: num_processes={num_processes!r} must be a positive int.")
    if (
        isinstance(process_index, bool)
        or not isinstance(process_index, int)
        or not 0 <= process_index < num_processes
    ):
        raise ValueError(
            f"{caller}: process_index={process_index!r} must be an int in [0, {num_processes}) "
            f"(num_processes={num_processes})."
        )


class SeedableRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order is a function of ``seed + epoch`` only.

    Every rank that builds it with the same seed reads the same permutation, epoch after epoch,
    and a run can be resumed by restoring ``(seed, epoch)`` (:meth:`state_dict`). ``set_epoch``
    chooses the epoch; a full pass also moves to the next epoch by itself.

    Args:
        *args, **kwargs: as ``torch.utils.data.RandomSampler``.
        data_seed: the seed; ``None`` takes torch's initial seed (the one ``set_seed`` sets).
    """

    def __init__(self, *args: Any, data_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial_seed = int(data_seed) if data_seed is not None else torch.random.initial_seed()
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        if self.generator is None:
            self.generator = torch.Generator(device=torch.get_default_device())
        self.generator.manual_seed(self.initial_seed + self.epoch)
        yield from super().__iter__()
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next pass reads."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """``{"seed": ..., "epoch": ...}``: all that defines the next pass's order."""
        return {"seed": int(self.initial_seed), "epoch": int(self.epoch)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, dict) or set(state) != {"seed", "epoch"}:
            raise ValueError(
                "SeedableRandomSampler.load_state_dict: expected {'seed': int, 'epoch': int}, got "
                f"{state!r}."
            )
        self.initial_seed = int(state["seed"])
        self.epoch = int(state["epoch"])


def _cycled(pool: list[Any], start: int, count: int) -> list[Any]:
    """``count`` items of ``pool`` from position ``start``, wrapping around as often as needed."""
    size = len(pool)
    return [pool[(start + i) % size] for i in range(count)]


class BatchSamplerShard(BatchSampler):
    """The batches of ``batch_sampler`` that rank ``process_index`` of ``num_processes`` reads.

    Args:
        batch_sampler: the batch sampler of the whole job (any iterable of index lists; its
            ``batch_size`` and ``drop_last`` attributes are used when present).
        num_processes: how many ranks share the batches.
        process_index: this rank.
        split_batches: cut each batch into ``num_processes`` slices instead of dealing out
            whole batches (the batch size must divide by ``num_processes``).
        even_batches: complete the last round with indices from the start so every rank gets
            the same number of full batches (see the module docstring).

    Raises:
        ValueError: ``split_batches`` with a batch size that does not divide by ``num_processes``;
            a batch sampler that yields batches of several sizes with ``even_batches=True``.
    """

    def __init__(
        self,
        batch_sampler: Iterable[list[Any]],
        num_processes: int = 1,
        process_index: int = 0,
        split_batches: bool = False,
        even_batches: bool = True,
    ) -> None:
        _rank_arguments(num_processes, process_index, "BatchSamplerShard")
        self.batch_sampler = batch_sampler
        self.num_processes = num_processes
        self.process_index = process_index
        self.split_batches = split_batches
        self.even_batches = even_batches
        self.batch_size: int | None = getattr(batch_sampler, "batch_size", None)  # type: ignore[assignment]
        self.drop_last: bool = bool(getattr(batch_sampler, "drop_last", False))
        if split_batches and (self.batch_size is None or self.batch_size % num_processes != 0):
            raise ValueError(
                f"BatchSamplerShard: split_batches=True cuts every batch into {num_processes} equal slices, "
                f"so the batch size must be a multiple of num_processes={num_processes}; got batch size "
                f"{self.batch_size}. Choose a batch size divisible by {num_processes}, or "
                "split_batches=False."
            )

    @property
    def sampler(self) -> Any:
        """The index sampler under the wrapped batch sampler (``None`` when it has none)."""
        return getattr(self.batch_sampler, "sampler", None)

    @sampler.setter
    def sampler(self, sampler: Any) -> None:
        self.batch_sampler.sampler = sampler  # type: ignore[attr-defined]

    @property
    def total_length(self) -> int:
        """The number of batches of the wrapped sampler (all ranks together)."""
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def _last_batch_size(self) -> int | None:
        """The size of the wrapped sampler's last batch, when it can be known without iterating."""
        sampler = self.sampler
        if self.batch_size is None or not isinstance(sampler, Sized):
            return None
        rest = len(sampler) % self.batch_size
        return self.batch_size if rest == 0 or self.drop_last else rest

    def __len__(self) -> int:
        batches = len(self.batch_sampler)  # type: ignore[arg-type]
        world, rank = self.num_processes, self.process_index
        if self.split_batches:
            last = self._last_batch_size()
            short = (
                not self.even_batches
                and batches > 0
                and last is not None
                and last <= rank * (self.batch_size // world)  # type: ignore[operator]
            )
            return batches - 1 if short else batches
        rounds, rest = divmod(batches, world)
        if rest == 0 or self.drop_last:
            return rounds
        if self.even_batches:
            return rounds + 1
        return rounds + (1 if rank < rest else 0)

    def __iter__(self) -> Iterator[list[Any]]:
        if self.split_batches:
            return self._iter_split()
        return self._iter_interleaved()

    def _iter_split(self) -> Iterator[list[Any]]:
        size = self.batch_size
        assert size is not None
        width = size // self.num_processes
        start, stop = width * self.process_index, width * (self.process_index + 1)
        first: list[Any] | None = None
        for batch in self.batch_sampler:
            if first is None:
                first = list(batch)
            if len(batch) == size:
                yield batch[start:stop]
            elif self.drop_last:
                continue
            elif not self.even_batches:
                if len(batch) > start:
                    yield batch[start:stop]
            else:  # a short batch: complete it from the start of the epoch
                yield (list(batch) + _cycled(first, 0, size - len(batch)))[start:stop]

    def _iter_interleaved(self) -> Iterator[list[Any]]:
        world, rank, size = self.num_processes, self.process_index, self.batch_size
        keep_all = not self.even_batches and not self.drop_last
        wrap = self.even_batches and not self.drop_last
        head: list[list[Any]] = []  # the first round, to complete the last one from
        round_: list[list[Any]] = []
        iterator = iter(self.batch_sampler)
        for batch in iterator:
            if wrap and len(head) < world:
                head.append(batch)
            round_.append(batch)
            if len(round_) < world:
                continue
            if keep_all or size is None or len(batch) == size:
                yield round_[rank]
                round_ = []
                continue
            if next(iterator, None) is not None:
                raise ValueError(
                    f"BatchSamplerShard: the batch sampler yielded a batch of {len(batch)} indices before "
                    f"its end although its batch_size is {size}; with drop_last or even_batches, batches of "
                    "several sizes would be dropped or evened out wrongly. Pass even_batches=False and a "
                    "batch sampler with drop_last=False (every batch is then used as it is)."
                )
            break  # the last batch is short: the round is finished below
        if not round_ or self.drop_last:
            return
        if not self.even_batches:
            if rank < len(round_):
                yield round_[rank]
            return
        yield self._completed(round_, head)

    def _completed(self, round_: list[list[Any]], head: list[list[Any]]) -> list[Any]:
        """Rank ``process_index``'s batch of the last round, completed from the start of the epoch."""
        rank, size = self.process_index, self.batch_size
        if size is None:  # batches of any size: whole batches of the first round fill the gaps
            return round_[rank] if rank < len(round_) else head[(rank - len(round_)) % len(head)]
        pool = [index for batch in head for index in batch]
        last = round_[-1]
        real = len(round_) - (1 if len(last) < size else 0)  # full batches in the round
        if rank < real:
            return round_[rank]
        used = 0 if len(last) == size else size - len(last)
        if rank == real and len(last) < size:
            return list(last) + _cycled(pool, 0, used)
        offset = used + (rank - len(round_) if len(last) < size else rank - real) * size
        return _cycled(pool, offset, size)


class SkipBatchSampler(BatchSampler):
    """The batches of ``batch_sampler`` after its first ``skip_batches`` (their samples are never read).

    Args:
        batch_sampler: the batch sampler to skip into.
        skip_batches: how many of its first batches to leave out.
    """

    def __init__(self, batch_sampler: Iterable[list[Any]], skip_batches: int = 0) -> None:
        if isinstance(skip_batches, bool) or not isinstance(skip_batches, int) or skip_batches < 0:
            raise ValueError(f"SkipBatchSampler: skip_batches={skip_batches!r} must be an int >= 0.")
        self.batch_sampler = batch_sampler
        self.skip_batches = skip_batches
        self.batch_size: int | None = getattr(batch_sampler, "batch_size", None)  # type: ignore[assignment]
        self.drop_last: bool = bool(getattr(batch_sampler, "drop_last", False))

    @property
    def sampler(self) -> Any:
        """The index sampler under the wrapped batch sampler (``None`` when it has none)."""
        return getattr(self.batch_sampler, "sampler", None)

    @sampler.setter
    def sampler(self, sampler: Any) -> None:
        self.batch_sampler.sampler = sampler  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[list[Any]]:
        iterator = iter(self.batch_sampler)
        for _ in range(self.skip_batches):
            if next(iterator, None) is None:
                return
        yield from iterator

    @property
    def total_length(self) -> int:
        """The number of batches of the wrapped sampler, skipped ones included."""
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip_batches)  # type: ignore[arg-type]
