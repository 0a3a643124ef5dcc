"""PartialState on real gloo groups of 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch

from tests.ranks import RankFailure


def _describe() -> dict[str, object]:
    from hasten import PartialState

    state = PartialState()
    return {
        "rank": state.process_index,
        "local": state.local_process_index,
        "n": state.num_processes,
        "type": state.distributed_type.value,
        "backend": state.backend,
        "device": str(state.device),
        "main": state.is_main_process,
        "last": state.is_last_process,
        "distributed": state.use_distributed,
    }


@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
def test_state_describes_each_rank(pool: str, request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(pool)
    results = ranks.run(_describe)
    n = ranks.world_size
    assert [r["rank"] for r in results] == list(range(n))
    assert all(r["n"] == n and r["type"] == "MULTI_CPU" and r["backend"] == "gloo" for r in results)
    assert [r["main"] for r in results] == [True] + [False] * (n - 1)
    assert [r["last"] for r in results] == [False] * (n - 1) + [True]
    assert all(r["device"] == "cpu" and r["distributed"] for r in results)


def _fails_on_rank_one() -> None:
    from hasten import PartialState

    if PartialState().process_index == 1:
        raise ValueError("deliberate failure")


def test_harness_reports_the_failing_rank(ranks2) -> None:
    with pytest.raises(RankFailure, match=r"rank 1 raised:\nValueError: deliberate failure"):
        ranks2.run(_fails_on_rank_one)
    assert ranks2.run(_describe)[1]["rank"] == 1  # the pool recovers
