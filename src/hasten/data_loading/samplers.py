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

from collections.abc import Generator, Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler


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


def _random_chunks(sampler: RandomSampler) -> Iterator[list[int]]:
    """The indices ``RandomSampler.__iter__`` yields (no replacement), a permutation at a time, drawn
    from the same generator at the same moments; a :class:`SeedableRandomSampler` reseeds first and
    moves to the next epoch after, as its own ``__iter__`` does."""
    seedable = sampler if isinstance(sampler, SeedableRandomSampler) else None
    if seedable is not None:
        if seedable.generator is None:
            seedable.generator = torch.Generator(device=torch.get_default_device())
        seedable.generator.manual_seed(seedable.initial_seed + seedable.epoch)
    generator = sampler.generator
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    size, total = len(sampler.data_source), sampler.num_samples
    for _ in range(total // size):
        yield torch.randperm(size, generator=generator).tolist()
    yield torch.randperm(size, generator=generator)[: total % size].tolist()  # drawn even when empty
    if seedable is not None:
        seedable.set_epoch(seedable.epoch + 1)


def _batches_of(chunks: Iterator[list[int]], size: int, drop_last: bool) -> Iterator[list[int]]:
    """``BatchSampler``'s batches, cut from lists of indices."""
    pending: list[int] = []
    for chunk in chunks:
        if pending:
            cut = size - len(pending)
            pending += chunk[:cut]
            chunk = chunk[cut:]
            if len(pending) < size:
                continue
            yield pending
        full = len(chunk) - len(chunk) % size
        for start in range(0, full, size):
            yield chunk[start : start + size]
        pending = chunk[full:]
    if pending and not drop_last:
        yield pending


def batches_drawn_at_once(batch_sampler: Any) -> Iterator[list[int]] | None:
    """The batches of torch's ``BatchSampler`` over a ``RandomSampler`` without replacement, drawn a
    whole permutation at a time (the same indices and generator draws, at a fraction of the cost
    per index: sharding reads every rank's indices); ``None`` for any other batch sampler (torch's
    own iteration of a ``SequentialSampler`` is as fast)."""
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler: Any = batch_sampler.sampler
    if type(sampler) not in (RandomSampler, SeedableRandomSampler) or sampler.replacement:
        return None
    return _batches_of(_random_chunks(sampler), batch_sampler.batch_size, batch_sampler.drop_last)


def index_chunks(batch_sampler: Any) -> Iterator[Sequence[int]] | None:
    """The indices torch's ``BatchSampler`` would cut into batches, as lazily drawn chunks (a
    ``range`` for a ``SequentialSampler``, a permutation at a time for a ``RandomSampler`` without
    replacement, drawn as :func:`batches_drawn_at_once` draws them); ``None`` for any other batch
    sampler. A rank then slices its own batches out of them without building the other ranks'."""
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler: Any = batch_sampler.sampler
    if type(sampler) is SequentialSampler:
        return iter((range(len(sampler.data_source)),))
    if type(sampler) not in (RandomSampler, SeedableRandomSampler) or sampler.replacement:
        return None
    return _random_chunks(sampler)


def own_slices(
    chunks: Iterator[Sequence[int]], step: int, offset: int, width: int
) -> Generator[list[int], None, tuple[list[int], list[int]]]:
    """Cut the index stream ``chunks`` into steps of ``step`` indices and yield the slice
    ``[offset, offset + width)`` of every full step; return the indices left after the last full
    step and the stream's first ``step`` indices (what an uneven end is completed from).

    A chunk is drawn when a slice beyond the previous ones is asked for, as torch's batch
    sampler draws it when the batch that needs it is built.
    """
    flat: Sequence[int] = []
    position = 0
    head: list[int] | None = None
    for chunk in chunks:
        flat = [*flat[position:], *chunk] if position < len(flat) else chunk
        ranged = type(flat) is range and flat.step == 1  # a SequentialSampler's: only this rank's ints
        if not ranged and type(flat) is not list:
            flat = list(flat)
        position = 0
        if head is None and len(flat) >= step:  # nothing was yielded yet: flat is the whole stream
            head = list(flat[:step])
        rounds = len(flat) // step
        stop = offset + rounds * step
        if ranged:
            origin = flat.start  # type: ignore[attr-defined]
            for start in range(origin + offset, origin + stop, step):
                yield list(range(start, start + width))
        else:
            for start in range(offset, stop, step):
                yield flat[start : start + width]  # type: ignore[misc]
        position = rounds * step
    rest = list(flat[position:])
    return rest, (rest if head is None else head)


class _Wrapper(BatchSampler):
    """A batch sampler around another; ``sampler`` reaches the index sampler inside."""

    batch_sampler: Iterable[list[Any]]

    @property
    def sampler(self) -> Any:
        """The index sampler under the wrapped batch sampler (``None`` when it has none)."""
        return getattr(self.batch_sampler, "sampler", None)

    @sampler.setter
    def sampler(self, sampler: Any) -> None:
        self.batch_sampler.sampler = sampler  # type: ignore[attr-defined]


def _cycled(pool: list[Any], start: int, count: int) -> list[Any]:
    """``count`` items of ``pool`` from position ``start``, wrapping around as often as needed."""
    size = len(pool)
    return [pool[(start + i) % size] for i in range(count)]


class BatchSamplerShard(_Wrapper):
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

    def _source(self) -> Iterator[list[Any]]:
        fast = batches_drawn_at_once(self.batch_sampler)
        return iter(self.batch_sampler) if fast is None else fast

    def _iter_split(self) -> Iterator[list[Any]]:
        size = self.batch_size
        assert size is not None
        width = size // self.num_processes
        start, stop = width * self.process_index, width * (self.process_index + 1)
        chunks = index_chunks(self.batch_sampler)
        if chunks is not None:  # slices cut from the index stream: the same, without whole batches
            rest, head = yield from own_slices(chunks, size, start, width)
            if rest and not self.drop_last:
                if not self.even_batches:
                    if len(rest) > start:
                        yield rest[start:stop]
                else:
                    yield (rest + _cycled(head, 0, size - len(rest)))[start:stop]
            return
        first: list[Any] | None = None
        for batch in self._source():
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
        chunks = index_chunks(self.batch_sampler)
        if chunks is not None and size is not None:  # this rank's batches cut from the index stream
            yield from self._iter_interleaved_stream(chunks, size)
            return
        keep_all = not self.even_batches and not self.drop_last
        wrap = self.even_batches and not self.drop_last
        head: list[list[Any]] = []  # the first round, to complete the last one from
        round_: list[list[Any]] = []
        iterator = self._source()
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

    def _iter_interleaved_stream(self, chunks: Iterator[Sequence[int]], size: int) -> Iterator[list[Any]]:
        """What :meth:`_iter_interleaved` yields, with this rank's batches sliced out of the index
        stream (the other ranks' are never built)."""
        world, rank = self.num_processes, self.process_index
        rest, first = yield from own_slices(chunks, size * world, rank * size, size)
        if not rest or self.drop_last:
            return
        last_round = [rest[start : start + size] for start in range(0, len(rest), size)]
        if not self.even_batches:
            if rank < len(last_round):
                yield last_round[rank]
            return
        first_round = [first[start : start + size] for start in range(0, len(first), size)]
        yield self._completed(last_round, first_round)

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


class SkipBatchSampler(_Wrapper):
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

    def __iter__(self) -> Iterator[list[Any]]:
        fast = batches_drawn_at_once(self.batch_sampler)
        iterator = iter(self.batch_sampler) if fast is None else fast
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
