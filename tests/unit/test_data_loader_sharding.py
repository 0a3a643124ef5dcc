"""Which samples each rank reads, specified by properties (hypothesis), with ranks simulated by
``num_processes`` / ``process_index`` (real gloo ranks: tests/dist/test_data_loader.py).

Over dataset lengths 0..300, batch sizes 1..17, 1..5 ranks, ``drop_last``, ``split_batches``,
``even_batches``, shuffled or not, map-style and iterable:

* without ``even_batches`` (and without ``drop_last``) every sample is read exactly once;
* with ``even_batches`` every rank reads the same number of full batches, every sample at least
  once, and the repeats complete the last global batch after its ``remainder`` real samples, so
  trimming the last gathered batch to ``remainder`` (what ``gather_for_metrics`` does) gives
  every sample exactly once;
* with ``drop_last`` only whole global batches are read, each sample at most once;
* ``len(loader)`` is the number of batches each rank reads.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset

from hasten.data_loader import (
    BatchSamplerShard,
    IterableDatasetShard,
    SeedableRandomSampler,
    prepare_data_loader,
)
from hasten.data_loading.samplers import batches_drawn_at_once


class Numbers(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self) -> Any:
        return iter(range(self.length))

    def __len__(self) -> int:
        return self.length


def _as_is(batch: list[int]) -> list[int]:
    return batch


def _read(
    length: int, batch: int, world: int, drop: bool, split: bool, even: bool, shuffle: bool, iterable: bool
) -> tuple[list[list[list[int]]], list[Any]]:
    """Each rank's batches, and each rank's prepared loader."""
    dataset: Any = Numbers(length) if iterable else list(range(length))
    per_rank, loaders = [], []
    for rank in range(world):
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=batch, shuffle=shuffle, drop_last=drop, collate_fn=_as_is)
        prepared = prepare_data_loader(
            loader,
            num_processes=world,
            process_index=rank,
            split_batches=split,
            even_batches=even,
            use_seedable_sampler=True,
        )
        per_rank.append(list(prepared))
        loaders.append(prepared)
    return per_rank, loaders


def _gathered(per_rank: list[list[list[int]]], remainder: int) -> list[int]:
    """What gather_for_metrics returns over the epoch: each step in rank order, the last trimmed."""
    steps = len(per_rank[0])
    out: list[int] = []
    for step in range(steps):
        joined = [index for batches in per_rank for index in batches[step]]
        if step == steps - 1 and remainder > 0:
            joined = joined[:remainder]
        out += joined
    return out


configurations = st.tuples(
    st.integers(0, 300),  # dataset length
    st.integers(1, 17),  # batch size
    st.integers(1, 5),  # ranks
    st.booleans(),  # drop_last
    st.booleans(),  # split_batches
    st.booleans(),  # even_batches
    st.booleans(),  # shuffle
    st.booleans(),  # iterable dataset
)


@settings(max_examples=250, deadline=None)
@given(configurations)
def test_every_sample_is_read_as_documented(
    config: tuple[int, int, int, bool, bool, bool, bool, bool],
) -> None:
    length, batch, world, drop, split, even, shuffle, iterable = config
    if iterable:
        shuffle = False  # an iterable dataset decides its own order
    if shuffle and length == 0:
        return  # torch's RandomSampler refuses an empty dataset
    if split and world > 1 and batch % world:
        with pytest.raises(ValueError, match="split_batches"):
            _read(length, batch, world, drop, split, even, shuffle, iterable)
        return
    per_rank, loaders = _read(length, batch, world, drop, split, even, shuffle, iterable)
    counts = Counter(index for batches in per_rank for b in batches for index in b)
    share = batch // world if split else batch  # samples per rank and step
    whole = batch if split else batch * world  # samples per step, all ranks
    evened = world > 1 and (iterable or even)  # one rank reads the loader as it is

    for rank, batches in enumerate(per_rank):
        assert len(loaders[rank]) == len(batches), "len(loader) is the number of batches read"
    if drop:
        if world == 1 or (split and not iterable):
            expected = (length // batch) * batch  # whole batches
        elif iterable:
            expected = (length // whole) * whole  # whole global batches
        else:
            expected = ((length // batch) // world) * whole  # whole rounds of whole batches
        assert all(count == 1 for count in counts.values())
        assert set(counts) <= set(range(length)) and sum(counts.values()) == expected
        assert all(len(b) == share for batches in per_rank for b in batches)
        return
    if not evened:
        assert sorted(counts.elements()) == list(range(length)), "exactly once"
        for batches in per_rank:
            assert all(len(b) == share for b in batches[:-1])
        return
    # evened out: same number of full batches everywhere, every sample at least once
    assert set(counts) == set(range(length))
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(b) == share for batches in per_rank for b in batches)
    remainder = loaders[0].remainder
    assert remainder == length % whole
    gathered = _gathered(per_rank, remainder)
    assert sorted(gathered) == list(range(length)), "trimming the last step to `remainder` is exact"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 6), st.integers(2, 5), st.integers(0, 4))
def test_ranks_share_one_shuffled_order_and_epochs_differ(
    length: int, batch: int, world: int, epoch: int
) -> None:
    orders, loaders = [], []
    for rank in range(world):
        torch.manual_seed(rank)  # the seed each rank was started with does not matter: data_seed does
        loader = prepare_data_loader(
            DataLoader(list(range(length)), batch_size=batch, shuffle=True, collate_fn=_as_is),
            num_processes=world,
            process_index=rank,
            even_batches=False,
            use_seedable_sampler=True,
            data_seed=42,
        )
        loader.set_epoch(epoch)
        first = [i for b in loader for i in b]
        loader.set_epoch(epoch)
        assert [i for b in loader for i in b] == first, "set_epoch(e) is reproducible"
        orders.append(first)
        loaders.append(loader)
    assert sorted(i for order in orders for i in order) == list(range(length))
    if length >= 12:
        loaders[0].set_epoch(epoch + 1)
        assert [i for b in loaders[0] for i in b] != orders[0], "another epoch, another order"


def test_batch_sampler_shard_errors_name_the_setting() -> None:
    with pytest.raises(
        ValueError, match=r"batch size must be a multiple of num_processes=3; got batch size 4"
    ):
        BatchSamplerShard(torch.utils.data.BatchSampler(range(10), 4, False), 3, 0, split_batches=True)
    with pytest.raises(ValueError, match=r"process_index=2 must be an int in \[0, 2\)"):
        BatchSamplerShard(torch.utils.data.BatchSampler(range(10), 4, False), 2, 2)
    with pytest.raises(ValueError, match=r"num_processes=0 must be a positive int"):
        BatchSamplerShard(torch.utils.data.BatchSampler(range(10), 4, False), 0, 0)

    class Ragged:  # claims a batch size but yields a short batch in the middle
        batch_size = 3
        drop_last = False

        def __iter__(self) -> Any:
            return iter([[0, 1, 2], [3], [4, 5, 6], [7, 8, 9]])

        def __len__(self) -> int:
            return 4

    with pytest.raises(ValueError, match="a batch of 1 indices before its end although its batch_size is 3"):
        list(BatchSamplerShard(Ragged(), 2, 0))
    assert list(BatchSamplerShard(Ragged(), 2, 1, even_batches=False)) == [[3], [7, 8, 9]]


def test_iterable_shard_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match=r"batch_size=None must be an int >= 1"):
        IterableDatasetShard(Numbers(4), batch_size=None, num_processes=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"batch of 3 samples into num_processes=2 equal slices"):
        IterableDatasetShard(Numbers(4), batch_size=3, num_processes=2, split_batches=True)
    with pytest.raises(
        ValueError, match=r"num_processes=2 equal slices, but the batch size is 1"
    ):  # Accelerate yields nothing
        prepare_data_loader(
            DataLoader(Numbers(4), batch_size=1), num_processes=2, process_index=0, split_batches=True
        )


def test_prepare_errors_name_the_setting() -> None:
    data = list(range(8))
    with pytest.raises(ValueError, match=r"dispatch_batches=True .* needs put_on_device=True"):
        prepare_data_loader(DataLoader(data), dispatch_batches=True)
    with pytest.raises(ValueError, match=r"num_processes=2 equal slices, but the batch size is 3"):
        prepare_data_loader(
            DataLoader(data, batch_size=3), num_processes=2, process_index=0, split_batches=True
        )
    with pytest.raises(ValueError, match=r"process_index=5 must be an int in \[0, 2\)"):
        prepare_data_loader(DataLoader(data), num_processes=2, process_index=5)

    class Plain:
        def __iter__(self) -> Any:
            return iter([[0, 1], [2, 3]])

    with pytest.raises(ValueError, match="batch sampler \\(Plain\\) has no batch_size attribute"):
        prepare_data_loader(
            DataLoader(data, batch_sampler=Plain()), num_processes=2, process_index=0, split_batches=True
        )


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 40),  # dataset length
    st.one_of(st.none(), st.integers(1, 90)),  # num_samples
    st.integers(1, 9),  # batch size
    st.booleans(),  # drop_last
    st.sampled_from(["random", "random-with-generator", "seedable"]),
)
def test_batches_drawn_at_once_are_torchs_batches(
    length: int, num_samples: int | None, batch: int, drop: bool, kind: str
) -> None:
    """The fast path draws the same indices from the same generators as torch's samplers do."""

    def make() -> torch.utils.data.BatchSampler:
        data = range(length)
        sampler: Any
        if kind == "seedable":
            sampler = SeedableRandomSampler(data, num_samples=num_samples, data_seed=4)
            sampler.set_epoch(2)
        else:
            generator = torch.Generator().manual_seed(1) if kind == "random-with-generator" else None
            sampler = torch.utils.data.RandomSampler(data, num_samples=num_samples, generator=generator)
        return torch.utils.data.BatchSampler(sampler, batch, drop)

    outcomes = []
    for fast in (False, True):
        torch.manual_seed(3)
        sampler = make()
        batches = batches_drawn_at_once(sampler) if fast else iter(sampler)
        assert batches is not None
        drawn = list(batches)
        inner = sampler.sampler
        generator = getattr(inner, "generator", None)
        outcomes.append(
            (
                drawn,
                torch.get_rng_state(),
                None if generator is None else generator.get_state(),
                getattr(inner, "epoch", None),
            )
        )
    (slow_batches, slow_rng, slow_gen, slow_epoch), (fast_batches, fast_rng, fast_gen, fast_epoch) = outcomes
    assert fast_batches == slow_batches and fast_epoch == slow_epoch
    assert torch.equal(fast_rng, slow_rng)
    assert (fast_gen is None) == (slow_gen is None) and (slow_gen is None or torch.equal(fast_gen, slow_gen))


def test_other_batch_samplers_are_iterated_as_they_are() -> None:
    class Mine(torch.utils.data.BatchSampler):
        pass

    plain = torch.utils.data.RandomSampler(range(5), replacement=True)
    assert batches_drawn_at_once(torch.utils.data.BatchSampler(plain, 2, False)) is None
    in_order = torch.utils.data.SequentialSampler(range(5))
    assert batches_drawn_at_once(torch.utils.data.BatchSampler(in_order, 2, False)) is None
    assert batches_drawn_at_once(Mine(range(5), 2, False)) is None
    assert batches_drawn_at_once([[0, 1]]) is None


class _AsItIs(torch.utils.data.BatchSampler):
    """torch's BatchSampler under another type: BatchSamplerShard iterates it whole batch by batch."""


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 70),  # dataset length
    st.one_of(st.none(), st.integers(1, 150)),  # num_samples
    st.integers(1, 9),  # batch size
    st.integers(1, 4),  # ranks
    st.booleans(),  # drop_last
    st.booleans(),  # split_batches
    st.booleans(),  # even_batches
    st.sampled_from(["sequential", "random", "random-with-generator", "seedable"]),
)
def test_own_slices_are_the_whole_batches_path(
    length: int,
    num_samples: int | None,
    batch: int,
    world: int,
    drop: bool,
    split: bool,
    even: bool,
    kind: str,
) -> None:
    """Slicing a rank's batches out of the index stream yields what dealing out torch's whole batches
    yields, drawing from the generators at the same moments (their states after every batch)."""
    if split:
        batch *= world
    if kind != "sequential" and length == 0:
        kind = "sequential"  # torch refuses a RandomSampler without data
    for rank in range(world):
        outcomes = []
        for batch_sampler_type in (_AsItIs, torch.utils.data.BatchSampler):
            torch.manual_seed(3)
            data = range(length)
            sampler: Any
            if kind == "sequential":
                sampler = torch.utils.data.SequentialSampler(data)
            elif kind == "seedable":
                sampler = SeedableRandomSampler(data, num_samples=num_samples, data_seed=4)
            else:
                generator = torch.Generator().manual_seed(1) if kind == "random-with-generator" else None
                sampler = torch.utils.data.RandomSampler(data, num_samples=num_samples, generator=generator)
            shard = BatchSamplerShard(batch_sampler_type(sampler, batch, drop), world, rank, split, even)
            trace = []
            for drawn in shard:
                generator_state = getattr(sampler, "generator", None)
                trace.append(
                    (
                        drawn,
                        torch.get_rng_state().sum().item(),
                        None if generator_state is None else generator_state.get_state().sum().item(),
                    )
                )
            trace.append((None, torch.get_rng_state().sum().item(), getattr(sampler, "epoch", None)))
            outcomes.append(trace)
        assert outcomes[1] == outcomes[0]
        assert len(outcomes[1]) - 1 == len(shard)


def test_own_slices_of_a_stream_shorter_than_a_step() -> None:
    from hasten.data_loading.samplers import own_slices

    slices = own_slices(iter([[4, 5], [6]]), 4, 0, 2)
    with pytest.raises(StopIteration) as stop:
        next(slices)
    assert stop.value.value == ([4, 5, 6], [4, 5, 6])
    assert list(own_slices(iter([range(3, 11)]), 4, 1, 2)) == [[4, 5], [8, 9]]
    assert list(own_slices(iter([range(10, 0, -2)]), 2, 0, 1)) == [[10], [6]]
