"""Prepared loaders on one process: GradientState bookkeeping, devices, structures, samplers,
epochs, skipping, saving and restoring, and the errors of each."""

from __future__ import annotations

import copy
import io
import json
import pickle
import sys
from collections import namedtuple
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

from hasten.data_loader import (
    DataLoaderAdapter,
    DataLoaderDispatcher,
    DataLoaderShard,
    SeedableRandomSampler,
    SkipBatchSampler,
    SkipDataLoader,
    get_sampler,
    prepare_data_loader,
    skip_first_batches,
)
from hasten.state import GradientState
from hasten.utils.imports import package_version

Pair = namedtuple("Pair", ["x", "y"])


class Encoding(Mapping):  # type: ignore[type-arg]
    """A BatchEncoding-like mapping that is not a dict."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Counting(Dataset):  # type: ignore[type-arg]
    """Counts which samples were read."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.reads: list[int] = []
        self.epochs: list[int] = []

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads.append(index)
        return torch.tensor(float(index))

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


class Batched(Dataset):  # type: ignore[type-arg]
    """Read a whole batch of indices at once (a batch sampler given as ``sampler``)."""

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor(indices)

    def __len__(self) -> int:
        return 8


class Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, length: int) -> None:
        self.length = length
        self.reads = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.length):
            self.reads += 1
            yield torch.tensor(float(i))

    def __len__(self) -> int:
        return self.length


def _values(loader: Any) -> list[list[float]]:
    return [b.tolist() for b in loader]


# --- GradientState ---------------------------------------------------------------------------


def test_end_of_dataloader_is_known_while_the_last_batch_is_used() -> None:
    loader = prepare_data_loader(DataLoader(TensorDataset(torch.arange(10.0)), batch_size=4))
    state = GradientState()
    seen = []
    for _ in loader:
        seen.append((state.in_dataloader, state.active_dataloader is loader, state.end_of_dataloader))
        assert state.remainder == 10 % 4
    assert seen == [(True, True, False), (True, True, False), (True, True, True)]
    assert not state.in_dataloader and state.active_dataloader is None


def test_nested_loaders_and_a_loop_left_early_leave_gradient_state_clean() -> None:
    outer = prepare_data_loader(DataLoader(list(range(4)), batch_size=2))
    inner = prepare_data_loader(DataLoader(list(range(6)), batch_size=2))
    state = GradientState()
    for _ in outer:
        for step, _ in enumerate(inner):
            assert state.active_dataloader is inner
            if step == 1:
                break
        assert state.active_dataloader is outer
    assert state.dataloader_references == [None]
    assert inner.iteration == 0, "an epoch left early does not count"
    assert inner.state_dict()["batches_yielded"] == 0, "and the next one starts afresh"


def test_accumulation_syncs_on_the_last_batch_of_a_prepared_loader() -> None:
    from hasten.accelerator import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=3)
    model = accelerator.prepare(torch.nn.Linear(1, 1))
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(14.0).unsqueeze(1)), batch_size=2))
    for _ in range(2):  # 7 batches: steps sync every 3 batches and at the loader's end
        pattern = []
        for (x,) in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(x).sum())
                pattern.append(accelerator.sync_gradients)
        assert pattern == [False, False, True, False, False, True, True]
    assert accelerator.gather_for_metrics(torch.ones(3)).tolist() == [1.0, 1.0, 1.0], "outside: untrimmed"


def test_remainder_is_unknown_without_a_length_and_with_drop_last() -> None:
    class NoLength(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[int]:
            return iter(range(5))

    loader = prepare_data_loader(DataLoader(NoLength(), batch_size=2))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4]] and loader.remainder == -1
    dropping = prepare_data_loader(DataLoader(list(range(5)), batch_size=2, drop_last=True))
    list(dropping)
    assert dropping.remainder == -1


# --- batches, devices, samplers --------------------------------------------------------------


def _collate_structures(items: list[int]) -> Any:
    x = torch.tensor(items, dtype=torch.float32)
    return {"pair": Pair(x, x + 1), "enc": Encoding({"ids": x.long()}), "tag": "batch"}


def test_batches_of_any_structure_move_to_the_device_and_keep_their_types() -> None:
    loader = prepare_data_loader(
        DataLoader(list(range(6)), batch_size=3, collate_fn=_collate_structures),
        device=torch.device("meta"),
        put_on_device=True,
        non_blocking=True,
    )
    batch = next(iter(loader))
    assert type(batch["pair"]) is Pair and isinstance(batch["enc"], Encoding) and batch["tag"] == "batch"
    assert batch["pair"].x.device.type == "meta" and batch["enc"]["ids"].device.type == "meta"
    unmoved = prepare_data_loader(DataLoader(list(range(6)), batch_size=3, collate_fn=_collate_structures))
    assert next(iter(unmoved))["pair"].x.device.type == "cpu"


@pytest.mark.parametrize("kind", [list, tuple, dict])
def test_flat_batches_take_the_fast_path_to_the_device(kind: type) -> None:
    from hasten.utils.batches import send_to_device

    x, y = torch.ones(2), torch.zeros(2, dtype=torch.long)
    batch: Any = {"x": x, "y": y} if kind is dict else kind([x, y])
    same = send_to_device(batch, torch.device("cpu"))
    moved = send_to_device(batch, "meta")
    values = (lambda b: list(b.values())) if kind is dict else list
    assert type(same) is kind and type(moved) is kind
    assert all(a is b for a, b in zip(values(same), [x, y])), "already there: no copy"
    assert [t.device.type for t in values(moved)] == ["meta", "meta"]
    assert [t.dtype for t in values(moved)] == [torch.float32, torch.int64]


class EveryOther(Sampler[int]):
    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self) -> Iterator[int]:
        return iter(range(0, self.length, 2))

    def __len__(self) -> int:
        return (self.length + 1) // 2


def test_user_samplers_and_batch_samplers_are_sharded() -> None:
    data = list(range(20))
    per_rank = [
        _values(
            prepare_data_loader(
                DataLoader(data, sampler=EveryOther(20), batch_size=2), num_processes=2, process_index=r
            )
        )
        for r in range(2)
    ]
    assert per_rank == [[[0, 2], [8, 10], [16, 18]], [[4, 6], [12, 14], [0, 2]]]

    class Pairs:
        def __iter__(self) -> Iterator[list[int]]:
            return iter([[1, 2], [3, 4], [5, 6]])

        def __len__(self) -> int:
            return 3

    pairs = DataLoader(data, batch_sampler=Pairs())
    assert _values(prepare_data_loader(pairs, num_processes=2, process_index=1)) == [[3, 4], [1, 2]]
    whole = BatchSampler(EveryOther(8), batch_size=2, drop_last=False)
    as_sampler = DataLoader(Batched(), sampler=whole, batch_size=None)
    kept = [b.tolist() for b in prepare_data_loader(as_sampler)]
    assert kept == [[0, 2], [4, 6]], "one process keeps it (Accelerate 1.15 raises TypeError)"
    assert get_sampler(as_sampler) is whole.sampler


def test_unbatched_loaders_keep_their_samples_and_order() -> None:
    torch.manual_seed(0)
    reference = [x.item() for x in DataLoader(torch.arange(6.0), batch_size=None, shuffle=True)]
    torch.manual_seed(0)
    loader = prepare_data_loader(DataLoader(torch.arange(6.0), batch_size=None, shuffle=True))
    assert [x.item() for x in loader] == reference, "no batching added, the shuffle kept"
    assert isinstance(loader.get_sampler(), torch.utils.data.RandomSampler)
    seedable = prepare_data_loader(
        DataLoader(torch.arange(6.0), batch_size=None, shuffle=True), use_seedable_sampler=True
    )
    assert isinstance(seedable.get_sampler(), SeedableRandomSampler) and len(list(seedable)) == 6
    with pytest.raises(ValueError, match=r"batch_size=None over a map-style dataset has no batches to share"):
        prepare_data_loader(DataLoader(torch.arange(6.0), batch_size=None), num_processes=2, process_index=0)


def test_get_sampler_sees_through_the_shard_and_empty_epochs_count() -> None:
    loader = prepare_data_loader(DataLoader(list(range(6)), shuffle=True), num_processes=2, process_index=0)
    assert isinstance(loader.get_sampler(), torch.utils.data.RandomSampler)
    assert loader.get_sampler().generator is loader.synchronized_generator
    empty = prepare_data_loader(DataLoader([]))
    assert list(empty) == [] and empty.iteration == 1


def test_prepared_loaders_are_dataloaders_that_pickle_and_copy() -> None:
    loader = prepare_data_loader(DataLoader(list(range(6)), batch_size=2), num_processes=2, process_index=1)
    assert isinstance(loader, DataLoader) and isinstance(loader, DataLoaderShard)
    assert type(loader) is DataLoaderShard
    for clone in (pickle.loads(pickle.dumps(loader)), copy.deepcopy(loader)):
        assert type(clone) is DataLoaderShard and _values(clone) == _values(loader) == [[2, 3], [0, 1]]
    assert loader.batch_size is None and loader.num_workers == 0, "DataLoader attributes are forwarded"
    with pytest.raises(AttributeError):
        loader.no_such_attribute


def test_set_epoch_reaches_sampler_and_dataset() -> None:
    data = Counting(10)
    loader = prepare_data_loader(DataLoader(data, batch_size=5, shuffle=True), use_seedable_sampler=True)
    sampler = loader.get_sampler()
    assert isinstance(sampler, SeedableRandomSampler)
    loader.set_epoch(3)
    assert sampler.epoch == 3 and data.epochs == [3] and loader.iteration == 3
    list(loader)
    list(loader)
    assert data.epochs == [3, 3, 4] and loader.iteration == 5


def test_seedable_sampler_order_depends_on_seed_and_epoch_only() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = SeedableRandomSampler(range(30), data_seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(5, 1) == order(5, 1) != order(5, 2)
    assert order(5, 1) != order(6, 1)
    sampler = SeedableRandomSampler(range(30), data_seed=5)
    first = list(sampler)
    assert sampler.epoch == 1 and list(sampler) == order(5, 1) and first == order(5, 0)
    assert sampler.state_dict() == {"seed": 5, "epoch": 2}
    with pytest.raises(ValueError, match=r"expected \{'seed': int, 'epoch': int\}, got \{'epoch': 1\}"):
        sampler.load_state_dict({"epoch": 1})


# --- skipping ----------------------------------------------------------------------------------


def test_skip_first_batches_reads_no_skipped_sample_of_a_map_style_dataset() -> None:
    data = Counting(40)
    loader = prepare_data_loader(DataLoader(data, batch_size=4, shuffle=True), use_seedable_sampler=True)
    full = _values(loader)
    data.reads.clear()
    loader.set_epoch(0)
    skipped = skip_first_batches(loader, 7)
    assert isinstance(skipped, DataLoaderShard) and len(skipped) == 3
    assert _values(skipped) == full[7:]
    assert sorted(data.reads) == sorted(int(i) for b in full[7:] for i in b), (
        "only the kept samples were read"
    )
    assert loader.iteration == 1, "the skip loader ran the prepared loader's epoch"


def test_skip_first_batches_of_iterable_and_plain_loaders() -> None:
    stream = Stream(10)
    loader = prepare_data_loader(DataLoader(stream, batch_size=3))
    assert _values(skip_first_batches(loader, 2)) == [[6.0, 7.0, 8.0], [9.0]] and stream.reads == 10
    plain = skip_first_batches(DataLoader(list(range(10)), batch_size=3), 2)
    assert type(plain) is DataLoader and _values(plain) == [[6, 7, 8], [9]]
    assert len(plain) == 2 and plain.batch_sampler.total_length == 4  # type: ignore[union-attr]
    plain_stream = skip_first_batches(DataLoader(Stream(10), batch_size=3), 3)
    assert isinstance(plain_stream, SkipDataLoader) and _values(plain_stream) == [[9.0]]
    state = GradientState()
    ends = [state.end_of_dataloader for _ in skip_first_batches(DataLoader(Stream(10), batch_size=3), 1)]
    assert ends == [False, False, True] and len(plain_stream) == 1
    as_sampler = DataLoader(Batched(), sampler=BatchSampler(range(8), 2, False), batch_size=None)
    assert skip_first_batches(as_sampler, 3).batch_size is None
    assert [b.tolist() for b in skip_first_batches(as_sampler, 3)] == [[6, 7]]
    with pytest.raises(ValueError, match=r"num_batches=-1 must be an int >= 0"):
        skip_first_batches(loader, -1)
    with pytest.raises(ValueError, match=r"skip_batches=1.5 must be an int >= 0"):
        SkipBatchSampler(BatchSampler(range(4), 2, False), 1.5)  # type: ignore[arg-type]


def test_skip_loader_reports_the_prepared_loaders_position() -> None:
    loader = prepare_data_loader(DataLoader(list(range(20)), batch_size=2), num_processes=2, process_index=0)
    skipped = skip_first_batches(loader, 2)
    positions = [loader.state_dict()["batches_yielded"] for _ in skipped]
    assert positions == [3, 4, 0]  # the last batch out means the epoch is done
    assert loader.state_dict()["iteration"] == 1
    again = skip_first_batches(skip_first_batches(loader, 1), 1)
    assert [b.tolist() for b in again] == [[8, 9], [12, 13], [16, 17]]


# --- saving and restoring ----------------------------------------------------------------------


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_is_plain_data() -> None:
    loader = prepare_data_loader(
        DataLoader(list(range(20)), batch_size=2, shuffle=True), num_processes=2, process_index=0
    )
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    assert set(state) == {"iteration", "batches_yielded", "generators", "rng_state"}
    assert state["batches_yielded"] == 1 and set(state["generators"]) == {"sampler"}
    restored = _roundtrip(state)
    assert restored["batches_yielded"] == 1 and torch.equal(restored["rng_state"], state["rng_state"])
    seedable = prepare_data_loader(
        DataLoader(list(range(20)), shuffle=True), use_seedable_sampler=True, data_seed=3
    )
    assert json.loads(json.dumps(seedable.state_dict())) == {
        "iteration": 0,
        "batches_yielded": 0,
        "generators": {},
        "sampler": {"seed": 3, "epoch": 0},
    }


@pytest.mark.parametrize("seedable", [False, True])
@pytest.mark.parametrize("resume", ["skip", "replay"])
def test_the_first_epoch_after_load_state_dict_leaves_the_global_rng_alone(
    seedable: bool, resume: str
) -> None:
    """The checkpointing contract: restoring a mid-epoch state, then the global RNG, then creating
    the iterator (and its first batch) leaves the global RNG as restored; a state saved between
    epochs starts the next one as the uninterrupted run does (drawing as it drew)."""

    def make() -> Any:
        loader = DataLoader(list(range(20)), batch_size=2, shuffle=True)
        return prepare_data_loader(loader, use_seedable_sampler=seedable, rng_types=["generator"])

    torch.manual_seed(0)
    loader = make()
    iterator = iter(loader)
    head = [next(iterator).tolist() for _ in range(3)]
    state, rng = loader.state_dict(), torch.get_rng_state()
    rest = [batch.tolist() for batch in iterator]
    between, rng_between = loader.state_dict(), torch.get_rng_state()
    next_epoch = [batch.tolist() for batch in loader]
    rng_after_next_epoch = torch.get_rng_state()

    torch.manual_seed(1234)  # a new process
    resumed = make()
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    source = skip_first_batches(resumed, state["batches_yielded"]) if resume == "skip" else resumed
    batches = iter(source)
    first = next(batches).tolist()
    assert torch.equal(torch.get_rng_state(), rng), "creating the iterator drew nothing from the global RNG"
    replayed = [first] + [batch.tolist() for batch in batches]
    assert replayed == (rest if resume == "skip" else head + rest)

    torch.manual_seed(99)
    resumed = make()
    resumed.load_state_dict(between)
    torch.set_rng_state(rng_between)
    assert [batch.tolist() for batch in resumed] == next_epoch
    assert torch.equal(torch.get_rng_state(), rng_after_next_epoch), "a fresh epoch draws as it drew"


def test_load_state_dict_refuses_a_state_that_does_not_fit() -> None:
    shuffled = prepare_data_loader(
        DataLoader(list(range(20)), batch_size=2, shuffle=True), num_processes=2, process_index=0
    )
    seedable = prepare_data_loader(DataLoader(list(range(20)), shuffle=True), use_seedable_sampler=True)
    plain = prepare_data_loader(DataLoader(list(range(20))))
    with pytest.raises(ValueError, match=r"DataLoaderShard.load_state_dict: expected a dict, got list"):
        plain.load_state_dict([])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"with keys \['batches_yielded', 'generators', 'iteration'\].*got \['x'\]"
    ):
        plain.load_state_dict({"x": 1})
    with pytest.raises(ValueError, match=r"state\['batches_yielded'\]=-1 must be an int >= 0"):
        plain.load_state_dict({"iteration": 0, "batches_yielded": -1, "generators": {}})
    with pytest.raises(
        ValueError, match=r"holds generators \[\] but this loader draws its order from \['sampler'\]"
    ):
        shuffled.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="saved without a SeedableRandomSampler but this loader has one"):
        seedable.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="saved with a SeedableRandomSampler but this loader has none"):
        plain.load_state_dict(seedable.state_dict())


def test_loaded_state_is_saved_again_unchanged() -> None:
    def make() -> Any:
        return prepare_data_loader(DataLoader(list(range(20)), batch_size=2, shuffle=True), 2, 1)

    loader = make()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    other = make()
    other.load_state_dict(state)
    again = other.state_dict()
    assert again.keys() == state.keys() and again["batches_yielded"] == 3
    assert all(torch.equal(again["generators"][k], state["generators"][k]) for k in state["generators"])


# --- the dispatcher on one process -------------------------------------------------------------


def test_dispatcher_on_one_process() -> None:
    loader = prepare_data_loader(DataLoader(Stream(7), batch_size=3), put_on_device=True, device="cpu")
    assert isinstance(loader, DataLoaderDispatcher) and len(loader) == 3
    assert _values(loader) == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0]]
    assert loader.remainder == 7 % 3 and loader.total_batch_size == 3 and loader.total_dataset_length == 7
    assert _values(skip_first_batches(loader, 1)) == [[3.0, 4.0, 5.0], [6.0]]
    remainders = [loader.remainder for _ in loader]
    assert remainders == [1, 1, 1], "known from the start (Accelerate: -1 until the last batch)"

    def halves(batch: Any, part: slice, process_index: int, num_processes: int) -> Any:
        return batch[part]

    sliced = prepare_data_loader(
        DataLoader(Stream(4), batch_size=2), put_on_device=True, device="cpu", slice_fn_for_dispatch=halves
    )
    skipped = skip_first_batches(sliced, 1)
    assert skipped.slice_fn is halves and _values(skipped) == [[2.0, 3.0]]

    split = prepare_data_loader(
        DataLoader(list(range(8)), batch_size=2),
        put_on_device=True,
        dispatch_batches=True,
        split_batches=True,
    )
    assert _values(split) == [[0, 1], [2, 3], [4, 5], [6, 7]]


# --- stateful loaders and the missing-package error ------------------------------------------


def test_stateful_loader_state_includes_torchdata_position() -> None:
    loader = prepare_data_loader(DataLoader(list(range(10)), batch_size=2), use_stateful_dataloader=True)
    before = loader.state_dict()
    assert before["batches_yielded"] == 0 and "_num_yielded" not in before, "no iterator made to answer"
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    state = _roundtrip(loader.state_dict())
    assert (
        state["_num_yielded"] == 2 and state["batches_yielded"] == 2 and state["_iterator_finished"] is False
    )
    fresh = prepare_data_loader(DataLoader(list(range(10)), batch_size=2), use_stateful_dataloader=True)
    fresh.load_state_dict(state)
    assert _values(fresh) == [[4, 5], [6, 7], [8, 9]], "a stateful loader resumes by itself"
    restored = prepare_data_loader(DataLoader(list(range(10)), batch_size=2), use_stateful_dataloader=True)
    restored.load_state_dict(state)
    assert _values(skip_first_batches(restored, 2)) == [[4, 5], [6, 7], [8, 9]]
    assert _values(restored) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], "the next epoch is whole"
    ours = {"iteration", "batches_yielded", "generators", "rng_state", "sampler"}
    accelerate_written = {k: v for k, v in state.items() if k not in ours}
    fresh.load_state_dict(accelerate_written)
    assert _values(fresh) == [[4, 5], [6, 7], [8, 9]]


def test_stateful_loader_without_torchdata_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchdata", None)  # importlib now finds no torchdata
    package_version.cache_clear()
    try:
        with pytest.raises(
            ImportError, match=r"needs the optional package 'torchdata'.*pip install torchdata"
        ):
            prepare_data_loader(DataLoader(list(range(4))), use_stateful_dataloader=True)
    finally:
        monkeypatch.undo()
        package_version.cache_clear()


def test_bare_adapter_iterates_and_saves() -> None:
    adapter = DataLoaderAdapter(list(range(5)), batch_size=2)
    assert isinstance(adapter, DataLoader) and len(adapter) == 3
    assert _values(adapter) == [[0, 1], [2, 3], [4]] and adapter.iteration == 1
    stateful = DataLoaderAdapter(list(range(5)), use_stateful_dataloader=True, batch_size=2)
    iterator = iter(stateful)
    next(iterator)
    assert stateful.state_dict()["_num_yielded"] == 1


def test_total_batch_size_needs_a_batch_size() -> None:
    class Uneven:
        def __iter__(self) -> Iterator[list[int]]:
            return iter([[0], [1, 2]])

        def __len__(self) -> int:
            return 2

    shard = prepare_data_loader(
        DataLoader(list(range(3)), batch_sampler=Uneven()), num_processes=2, process_index=0
    )
    with pytest.raises(TypeError, match=r"total_batch_size: the batch sampler has no batch_size"):
        shard.total_batch_size
    assert shard.remainder == -1 and [b.tolist() for b in shard] == [[0]] and shard.remainder == -1
    dispatcher = DataLoaderDispatcher(list(range(3)), batch_sampler=Uneven())
    with pytest.raises(TypeError, match=r"total_batch_size: the loader has no batch_size"):
        dispatcher.total_batch_size


def test_an_old_torchdata_is_named_with_the_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    import hasten.data_loading.adapter as adapter

    monkeypatch.setattr(adapter, "is_torchdata_stateful_dataloader_available", lambda: False)
    with pytest.raises(
        ImportError, match=r"needs torchdata >= 0.8.0 .* Upgrade it with: pip install -U torchdata"
    ):
        prepare_data_loader(DataLoader(list(range(4))), use_stateful_dataloader=True)
