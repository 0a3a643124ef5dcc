"""Prepared loaders on real gloo ranks (2 and 4): every sample read once, gathers trimmed exactly,
one shuffled order for all ranks, dispatching, device meshes, and errors that reach every rank."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from tests.ranks import RankPool
from tests.unit.test_data_loader_sharding import Numbers

LENGTH = 29  # prime: uneven for every world size and batch size used here


def _tensor(items: list[int]) -> torch.Tensor:
    return torch.tensor(items)


Pair = namedtuple("Pair", ["first", "second"])


def _structured(items: list[int]) -> dict[str, Any]:
    ids = torch.tensor(items)
    return {"ids": ids, "pair": Pair(ids.float(), [ids * 2]), "mask": ids > 3}


def _loader(kind: str) -> Any:
    from hasten.data_loader import prepare_data_loader

    cpu = torch.device("cpu")
    if kind == "map-uneven":
        source = DataLoader(list(range(LENGTH)), batch_size=3, shuffle=True, collate_fn=_tensor)
        return prepare_data_loader(source, rng_types=["generator"], even_batches=False)
    if kind == "map-even":
        source = DataLoader(list(range(LENGTH)), batch_size=3, shuffle=True, collate_fn=_tensor)
        return prepare_data_loader(source, rng_types=["generator"])
    if kind == "map-split":
        source = DataLoader(list(range(LENGTH)), batch_size=4, shuffle=True, collate_fn=_tensor)
        return prepare_data_loader(source, rng_types=["generator"], split_batches=True)
    if kind == "seedable":
        source = DataLoader(list(range(LENGTH)), batch_size=2, shuffle=True, collate_fn=_tensor)
        return prepare_data_loader(source, use_seedable_sampler=True, data_seed=17)
    if kind == "stateful":
        source = DataLoader(list(range(LENGTH)), batch_size=3, shuffle=True, collate_fn=_tensor)
        return prepare_data_loader(source, rng_types=["generator"], use_stateful_dataloader=True)
    if kind == "iterable":
        return prepare_data_loader(DataLoader(Numbers(LENGTH), batch_size=2, collate_fn=_tensor))
    if kind == "dispatch":
        source = DataLoader(Numbers(LENGTH), batch_size=2, collate_fn=_tensor)
        return prepare_data_loader(source, device=cpu, put_on_device=True)
    if kind == "dispatch-split":
        source = DataLoader(list(range(LENGTH)), batch_size=4, shuffle=True, collate_fn=_tensor)
        return prepare_data_loader(
            source, device=cpu, put_on_device=True, dispatch_batches=True, split_batches=True
        )
    raise AssertionError(kind)


def read_and_gather(kind: str) -> tuple[list[int], list[int], list[bool]]:
    """(what this rank read, the epoch gathered and trimmed as gather_for_metrics does, end flags)."""
    from hasten.state import GradientState, PartialState
    from hasten.utils.operations import gather
    from hasten.utils.random import set_seed

    set_seed(100 + PartialState().process_index)  # ranks start with different global RNG states
    loader = _loader(kind)
    state = GradientState()
    mine: list[int] = []
    gathered: list[int] = []
    ends: list[bool] = []
    for batch in loader:
        mine += batch.tolist()
        if kind == "map-uneven":  # ranks read different numbers of batches: nothing to gather
            continue
        everyone = gather(batch)
        ends.append(state.end_of_dataloader)
        if state.end_of_dataloader and state.remainder > 0:
            everyone = everyone[: state.remainder]
        gathered += everyone.tolist()
    return mine, gathered, ends


KINDS = ["map-uneven", "map-even", "map-split", "seedable", "stateful", "iterable", "dispatch", "dispatch-split"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
def test_every_sample_once_on_real_ranks(kind: str, pool: str, request: pytest.FixtureRequest) -> None:
    ranks: RankPool = request.getfixturevalue(pool)
    results = ranks.run(read_and_gather, kind)
    read = [index for mine, _, _ in results for index in mine]
    if kind == "map-uneven":  # no repeats: each sample read by exactly one rank
        assert sorted(read) == list(range(LENGTH))
        return
    assert set(read) == set(range(LENGTH))
    assert len({len(mine) for mine, _, _ in results}) == 1, "every rank reads as much"
    for _, gathered, ends in results:
        assert sorted(gathered) == list(range(LENGTH)), "the trimmed gather holds each sample once"
        assert ends[-1] and not any(ends[:-1])


def _mesh_reads(dims: tuple[str, ...], shape: tuple[int, ...], deepspeed: bool) -> list[int]:
    from torch.distributed.device_mesh import init_device_mesh

    from hasten.data_loader import prepare_data_loader
    from hasten.state import AcceleratorState
    from hasten.utils.environment import patch_environment

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=dims)
    with patch_environment(accelerate_use_deepspeed="true" if deepspeed else ""):
        AcceleratorState()
        loader = prepare_data_loader(
            DataLoader(list(range(12)), batch_size=2, collate_fn=_tensor), torch_device_mesh=mesh
        )
        return [i for batch in loader for i in batch.tolist()]


def test_device_mesh_shares_data_along_tensor_parallel_ranks(ranks4: RankPool) -> None:
    reads = ranks4.run(_mesh_reads, ("dp_shard", "tp"), (2, 2), False)
    assert reads[0] == reads[1] and reads[2] == reads[3]
    assert sorted(reads[0] + reads[2]) == list(range(12))
    everything = ranks4.run(_mesh_reads, ("cp", "tp"), (2, 2), False)
    assert all(r == list(range(12)) for r in everything), "no data-parallel dimension: all read everything"
    deepspeed = ranks4.run(_mesh_reads, ("cp", "tp"), (2, 2), True)
    assert deepspeed[0] == deepspeed[1] != deepspeed[2] == deepspeed[3], "DeepSpeed splits by tp only"


def _dispatch_under_tensor_parallelism(dims: tuple[str, ...], shape: tuple[int, ...]) -> list[int] | str:
    from torch.distributed.device_mesh import init_device_mesh

    from hasten.data_loader import prepare_data_loader

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=dims)
    try:
        loader = prepare_data_loader(
            DataLoader(Numbers(8), batch_size=2, collate_fn=_tensor),
            device=torch.device("cpu"),
            put_on_device=True,
            torch_device_mesh=mesh,
        )
    except ValueError as error:  # returned, so the pool stays up: every rank must get here
        return str(error)
    return [i for batch in loader for i in batch.tolist()]


def _dispatcher_with_data_parallel_mesh() -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from hasten.data_loader import DataLoaderDispatcher

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    try:
        DataLoaderDispatcher(Numbers(8), batch_size=2, torch_device_mesh=mesh)
    except ValueError as error:
        return str(error)
    return "no error"


def test_dispatch_under_tensor_parallelism(ranks4: RankPool) -> None:
    reads = ranks4.run(_dispatch_under_tensor_parallelism, ("tp",), (4,))
    assert all(r == list(range(8)) for r in reads), "every tensor-parallel rank gets the same batches"
    for message in ranks4.run(_dispatcher_with_data_parallel_mesh):
        assert "dimensions ('dp', 'tp') combines tensor parallelism with data parallelism" in message
    for message in ranks4.run(_dispatch_under_tensor_parallelism, ("data", "tp"), (2, 2)):
        assert "cannot split data along the device mesh {'data': 2, 'tp': 2}" in str(message)


def _bad_batches(items: list[int]) -> torch.Tensor:
    return torch.zeros(len(items), 1 + items[0] % 2)  # the width changes from batch to batch


def _dispatch_unconcatenable() -> str:
    from hasten.data_loader import prepare_data_loader

    loader = prepare_data_loader(
        DataLoader(Numbers(8), batch_size=1, collate_fn=_bad_batches),
        device=torch.device("cpu"),
        put_on_device=True,
    )
    try:
        list(loader)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_read_error_on_rank_zero_reaches_every_rank(ranks2: RankPool) -> None:
    first, second = ranks2.run(_dispatch_unconcatenable, timeout=60)
    assert first.startswith("DataLoaderDispatcher: the batches of one step could not be concatenated")
    assert second.startswith("DataLoaderDispatcher: rank 0 could not read the next batch: RuntimeError: ")


def _skip_matches_the_epoch(kind: str, skipped: int) -> tuple[list[list[int]], list[list[int]]]:
    from hasten.data_loader import skip_first_batches
    from hasten.utils.random import set_seed

    set_seed(5)
    loader = _loader(kind)
    saved = loader.state_dict(), torch.get_rng_state()  # what a checkpoint holds
    full = [batch.tolist() for batch in loader]
    loader.load_state_dict(saved[0])
    torch.set_rng_state(saved[1])
    return full[skipped:], [batch.tolist() for batch in skip_first_batches(loader, skipped)]


@pytest.mark.parametrize(
    "kind", ["map-even", "map-split", "seedable", "stateful", "iterable", "dispatch", "dispatch-split"]
)
@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
def test_skip_first_batches_yields_the_rest_of_the_epoch(
    kind: str, pool: str, request: pytest.FixtureRequest
) -> None:
    ranks: RankPool = request.getfixturevalue(pool)
    for expected, got in ranks.run(_skip_matches_the_epoch, kind, 2):
        assert got == expected and got, "the same batches, the padded last step included"


def _dispatch_structures() -> list[Any]:
    from hasten.data_loader import prepare_data_loader

    loader = prepare_data_loader(
        DataLoader(Numbers(7), batch_size=2, collate_fn=_structured),
        device=torch.device("cpu"),
        put_on_device=True,
    )
    out = []
    for batch in loader:
        assert type(batch["pair"]) is Pair and isinstance(batch["pair"].second, list)
        assert batch["mask"].dtype == torch.bool and batch["pair"].first.dtype == torch.float32
        assert torch.equal(batch["pair"].second[0], batch["ids"] * 2)
        out.append(batch["ids"].tolist())
    return out


def test_dispatched_batches_keep_their_structure(ranks2: RankPool) -> None:
    first, second = ranks2.run(_dispatch_structures)
    assert first == [[0, 1], [4, 5]] and second == [[2, 3], [6, 0]]
