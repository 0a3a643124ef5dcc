"""PartialState on real gloo groups of 2 and 4 ranks, and how a group forms (or fails to)."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import pytest
import torch

from tests.ranks import RankFailure, run_on_ranks

POOLS = ["ranks2", "ranks4"]


def _describe() -> dict[str, object]:
    from hasten.state import PartialState

    state = PartialState()
    return {
        "rank": state.process_index, "local": state.local_process_index, "n": state.num_processes,
        "type": state.distributed_type.value, "backend": state.backend, "device": str(state.device),
        "main": state.is_main_process, "last": state.is_last_process, "distributed": state.use_distributed,
    }


@pytest.mark.parametrize("pool", POOLS)
def test_state_describes_each_rank(pool: str, request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(pool)
    results = ranks.run(_describe)
    n = ranks.world_size
    assert [r["rank"] for r in results] == list(range(n)) == [r["local"] for r in results]
    assert all(r["n"] == n and r["type"] == "MULTI_CPU" and r["backend"] == "gloo" for r in results)
    assert [r["main"] for r in results] == [True] + [False] * (n - 1)
    assert [r["last"] for r in results] == [False] * (n - 1) + [True]
    assert all(r["device"] == "cpu" and r["distributed"] for r in results)


def _split(inputs: object, apply_padding: bool) -> object:
    from hasten.state import PartialState

    with PartialState().split_between_processes(inputs, apply_padding=apply_padding) as share:
        return share


@pytest.mark.parametrize("pool", POOLS)
def test_split_lists_tuples_and_dicts(pool: str, request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(pool)
    n = ranks.world_size
    items = list(range(7))
    shares = ranks.run(_split, items, False)
    assert sum(shares, []) == items  # contiguous, in rank order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    padded = ranks.run(_split, tuple(items), True)
    assert all(isinstance(s, tuple) and len(s) == len(padded[0]) for s in padded)
    assert [x for s in padded for x in s][: len(items)] == items[: len(items)] or n == 4
    dicts = ranks.run(_split, {"a": items, "b": [str(i) for i in items]}, False)
    assert [d["a"] for d in dicts] == shares and [d["b"] for d in dicts] == [[str(i) for i in s] for s in shares]


def test_split_pads_with_the_last_item_of_each_share(ranks4) -> None:
    # 6 items over 4 ranks: shares of 2, 2, 1, 1; padded to 2 each with the share's last item.
    assert ranks4.run(_split, list(range(6)), True) == [[0, 1], [2, 3], [4, 4], [5, 5]]
    # Fewer items than ranks: the empty share is padded with the very last item.
    assert ranks4.run(_split, ["a", "b", "c"], True) == [["a"], ["b"], ["c"], ["c"]]
    assert ranks4.run(_split, ["a", "b", "c"], False) == [["a"], ["b"], ["c"], []]


def test_split_tensors(ranks2) -> None:
    data = torch.arange(10).reshape(5, 2)
    shares = ranks2.run(_split, data, False)
    assert torch.equal(torch.cat(shares), data) and [len(s) for s in shares] == [3, 2]
    padded = ranks2.run(_split, data, True)
    assert [len(s) for s in padded] == [3, 3] and torch.equal(padded[1][2], data[4])


def test_split_refuses_uneven_dicts_and_other_types(ranks2) -> None:
    with pytest.raises(RankFailure, match=r"every value of the dict to have the same length; got \{'a': 2, 'b': 3\}"):
        ranks2.run(_split, {"a": [1, 2], "b": [1, 2, 3]}, False)
    with pytest.raises(RankFailure, match=r"takes a list, tuple, tensor or dict of those; got set"):
        ranks2.run(_split, {1, 2}, False)


def _record_order(path: str, local: bool) -> None:
    from hasten.state import PartialState

    state = PartialState()
    context = state.local_main_process_first() if local else state.main_process_first()
    with context:
        if state.is_main_process:
            time.sleep(0.3)  # without ordering, the others would write first
        with open(path, "a") as handle:
            handle.write(f"{state.process_index}\n")


@pytest.mark.parametrize("local", [False, True])
def test_main_process_goes_first(ranks4, tmp_path: Path, local: bool) -> None:
    path = tmp_path / "order.txt"
    ranks4.run(_record_order, str(path), local)
    order = path.read_text().split()
    assert order[0] == "0" and sorted(order) == ["0", "1", "2", "3"]


def _which_ran() -> list[str]:
    from hasten.state import PartialState

    state = PartialState()
    ran: list[str] = []
    state.on_main_process(lambda: ran.append("main"))()
    state.on_local_main_process(lambda: ran.append("local_main"))()
    state.on_last_process(lambda: ran.append("last"))()
    state.on_process(process_index=1)(lambda: ran.append("one"))()
    state.on_local_process(local_process_index=2)(lambda: ran.append("local_two"))()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state.print("printed")
    if out.getvalue():
        ran.append(out.getvalue().strip())
    return ran


def test_decorators_pick_their_process(ranks4) -> None:
    assert ranks4.run(_which_ran) == [["main", "local_main", "printed"], ["one"], ["local_two"], ["last"]]


def _log(main_process_only: bool, in_order: bool) -> str:
    import logging

    from hasten.logging import get_logger
    from hasten.state import PartialState

    state = PartialState()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = get_logger(f"hasten.test.{state.process_index}", log_level="INFO")
    logger.logger.addHandler(handler)
    try:
        logger.info("rank %d", state.process_index, main_process_only=main_process_only, in_order=in_order)
    finally:
        logger.logger.removeHandler(handler)
    return stream.getvalue().strip()


def test_logging_main_process_only_and_in_order(ranks2) -> None:
    assert ranks2.run(_log, True, False) == ["rank 0", ""]
    assert ranks2.run(_log, False, False) == ["rank 0", "rank 1"]
    assert ranks2.run(_log, False, True) == ["rank 0", "rank 1"]


# --- forming the group: fresh processes ---------------------------------------------------------


def _join_and_barrier(timeout: float, late_rank: int | None = None, delay: float = 0.0) -> str:
    from hasten.state import PartialState

    state = PartialState(timeout=timeout)
    if state.process_index == late_rank:
        time.sleep(delay)
        return "late"
    state.wait_for_everyone()
    return state.backend or ""


def test_a_missing_peer_at_rendezvous_is_named_after_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_on_ranks(_join_and_barrier, 2, 2.0, ranks=[0], timeout=60)
    message = str(failure.value)
    assert "RendezvousTimeoutError: Rank 0 of 2 could not join the process group at tcp://127.0.0.1:" in message
    assert "within 2 s: the other ranks did not all connect to it" in message
    assert "InitProcessGroupKwargs(timeout=...)" in message
    assert time.monotonic() - started < 40


def test_an_unreachable_rank_zero_is_named_after_the_timeout() -> None:
    with pytest.raises(RankFailure, match=r"Rank 1 of 2 could not join .* rank 0 could not be reached there"):
        run_on_ranks(_join_and_barrier, 2, 2.0, ranks=[1], timeout=60)


def test_a_rank_that_hangs_before_the_barrier_is_named_after_the_group_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_on_ranks(_join_and_barrier, 2, 2.0, 1, 30.0, timeout=25)  # rank 1 hangs far past the timeout
    message = str(failure.value)
    assert "rank 0 raised:\nRendezvousTimeoutError: wait_for_everyone on rank 0: not every rank arrived" in message
    assert "Ranks 1 failed to pass monitoredBarrier in 2000 ms" in message
    assert time.monotonic() - started < 25
