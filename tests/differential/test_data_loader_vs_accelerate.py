"""hasten's data loaders against Accelerate 1.15's: the same batches for the same seed and settings.

Single-process comparisons simulate ranks with ``num_processes`` / ``process_index``; the
2-rank comparisons run both libraries side by side on real gloo ranks. Where hasten
deliberately differs (docs/design.md), the cases stay on the ground both define the same way
and the difference has its own test.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, TensorDataset

import hasten.data_loader as ours
from tests.ranks import RankPool

theirs = pytest.importorskip("accelerate.data_loader")


@pytest.fixture(autouse=True)
def _accelerate_state() -> Any:
    """Accelerate's RNG synchronisation needs its AcceleratorState; forget it afterwards."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    AcceleratorState(_from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class Stream(IterableDataset):  # type: ignore[type-arg]
    """0, 1, ..., length - 1 as one-element tensors."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self) -> Any:
        return (torch.tensor([float(i)]) for i in range(self.length))

    def __len__(self) -> int:
        return self.length


def _epochs(loader: Any, epochs: int = 2) -> list[list[list[float]]]:
    out = []
    for _ in range(epochs):
        out.append([(b[0] if isinstance(b, (list, tuple)) else b).flatten().tolist() for b in loader])
    return out


def _both(
    make: Any, seed: int, world: int, rank: int, **options: Any
) -> tuple[list[Any], list[Any], torch.Tensor, torch.Tensor]:
    results, states = [], []
    for library in (theirs, ours):
        torch.manual_seed(seed)
        loader = library.prepare_data_loader(make(), num_processes=world, process_index=rank, **options)
        results.append(_epochs(loader))
        states.append(torch.get_rng_state())
    return results[0], results[1], states[0], states[1]


MAP_CASES = list(
    itertools.product(
        [0, 1, 7, 16, 23],  # dataset length
        [1, 4],  # batch size
        [1, 2, 3],  # world size
        [False, True],  # drop_last
        [False, True],  # split_batches
        [False, True],  # even_batches
        [False, True],  # shuffle
        [False, True],  # use_seedable_sampler
    )
)


@pytest.mark.parametrize("length, batch, world, drop, split, even, shuffle, seedable", MAP_CASES[::3])
def test_map_style_batches_and_rng_match(
    length: int, batch: int, world: int, drop: bool, split: bool, even: bool, shuffle: bool, seedable: bool
) -> None:
    if split and batch % world:
        pytest.skip("split_batches needs a divisible batch size (an error in both)")
    if shuffle and length == 0:
        pytest.skip("torch's RandomSampler refuses an empty dataset")
    data = TensorDataset(torch.arange(float(length)))
    for rank in range(world):
        a, h, rng_a, rng_h = _both(
            lambda: DataLoader(data, batch_size=batch, shuffle=shuffle, drop_last=drop),
            seed=11,
            world=world,
            rank=rank,
            split_batches=split,
            even_batches=even,
            use_seedable_sampler=seedable,
            rng_types=["generator"],
        )
        assert h == a
        assert torch.equal(rng_h, rng_a)  # the same draws from the global RNG


@pytest.mark.parametrize(
    "length, batch, world, drop, split",
    [
        (n, b, w, d, s)
        for n, b, w, d, s in itertools.product(
            [0, 1, 5, 12, 13], [1, 2, 4], [1, 2, 3], [False, True], [False, True]
        )
        if not (s and b % w) and not (s and b == 1 and w > 1)
    ],
)
def test_iterable_batches_match(length: int, batch: int, world: int, drop: bool, split: bool) -> None:
    for rank in range(world):
        a, h, _, _ = _both(
            lambda: DataLoader(Stream(length), batch_size=batch, drop_last=drop),
            seed=3,
            world=world,
            rank=rank,
            split_batches=split,
        )
        assert h == a


def test_custom_batch_sampler_and_batch_sampler_as_sampler_match() -> None:
    data = TensorDataset(torch.arange(30.0))

    class Uneven:  # batches of several sizes, no batch_size attribute
        def __iter__(self) -> Any:
            return iter([[0, 1, 2], [3], [4, 5], [6, 7, 8, 9], [10]])

        def __len__(self) -> int:
            return 5

    for world, rank in [(2, 0), (2, 1), (3, 2)]:
        a, h, _, _ = _both(
            lambda: DataLoader(data, batch_sampler=Uneven()), 0, world, rank, even_batches=False
        )
        assert h == a
        a, h, _, _ = _both(lambda: DataLoader(data, batch_sampler=Uneven()), 0, world, rank)
        assert h == a

        def as_sampler() -> DataLoader:  # type: ignore[type-arg]
            batches = BatchSampler(RandomSampler(data), batch_size=4, drop_last=False)
            return DataLoader(data, sampler=batches, batch_size=None)

        a, h, _, _ = _both(as_sampler, 5, world, rank)
        assert h == a


def test_skip_first_batches_matches() -> None:
    data = TensorDataset(torch.arange(40.0))
    for world, rank, seedable in [(1, 0, True), (2, 1, True), (2, 0, False)]:
        outputs = []
        for library in (theirs, ours):
            torch.manual_seed(4)
            loader = library.prepare_data_loader(
                DataLoader(data, batch_size=3, shuffle=True),
                num_processes=world,
                process_index=rank,
                use_seedable_sampler=seedable,
            )
            outputs.append(_epochs(library.skip_first_batches(loader, 2), epochs=1))
        assert outputs[1] == outputs[0]


def test_state_mixin_flags_match() -> None:
    data = TensorDataset(torch.arange(10.0))
    seen = []
    for library in (theirs, ours):
        loader = library.prepare_data_loader(DataLoader(data, batch_size=4), num_processes=2, process_index=1)
        flags = []
        for _ in loader:
            flags.append((loader.end_of_dataloader, loader.remainder))
        seen.append((flags, loader.total_batch_size, loader.total_dataset_length, len(loader)))
    assert seen[1] == seen[0]


@pytest.mark.parametrize(
    "name",
    [
        "prepare_data_loader",
        "skip_first_batches",
        "BatchSamplerShard",
        "IterableDatasetShard",
        "DataLoaderShard",
        "DataLoaderDispatcher",
        "SkipBatchSampler",
        "SkipDataLoader",
        "DataLoaderAdapter",
        "get_sampler",
    ],
)
def test_signatures_match(name: str) -> None:
    def parameters(obj: Any) -> list[tuple[str, Any, Any]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]

    assert parameters(getattr(ours, name)) == parameters(getattr(theirs, name))


# --- real ranks ----------------------------------------------------------------------------------


def _side_by_side(kind: str) -> list[Any]:
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    from hasten.state import PartialState

    PartialState()
    AcceleratorState(cpu=True, _from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())
    try:
        return _compare_on_ranks(kind)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _compare_on_ranks(kind: str) -> list[Any]:
    results = []
    for library in (theirs, ours):
        torch.manual_seed(9)
        if kind == "dispatch-iterable":
            loader = DataLoader(Stream(23), batch_size=3)
            options: dict[str, Any] = {"put_on_device": True, "device": torch.device("cpu")}
        elif kind == "dispatch-split":
            loader = DataLoader(TensorDataset(torch.arange(21.0)), batch_size=4, shuffle=True)
            options = {"put_on_device": True, "device": torch.device("cpu"), "dispatch_batches": True}
            options["split_batches"] = True
        else:
            loader = DataLoader(TensorDataset(torch.arange(21.0)), batch_size=4, shuffle=True)
            options = {"rng_types": ["generator"]}
        prepared = library.prepare_data_loader(loader, **options)
        epochs = []
        for _ in range(2):
            epoch = []
            for b in prepared:  # Accelerate's dispatcher knows the remainder only at the end (hasten earlier)
                remainder = prepared.remainder if prepared.end_of_dataloader else None
                epoch.append(((b[0] if isinstance(b, list) else b).flatten().tolist(), remainder))
            epochs.append(epoch)
        results.append((epochs, torch.get_rng_state()))
    (a, rng_a), (h, rng_h) = results
    assert h == a
    assert torch.equal(rng_h, rng_a)
    return h


@pytest.mark.parametrize("kind", ["shard", "dispatch-iterable", "dispatch-split"])
def test_two_ranks_match(kind: str, ranks2: RankPool) -> None:
    per_rank = ranks2.run(_side_by_side, kind)
    assert per_rank[0] != per_rank[1]  # the ranks read different data
