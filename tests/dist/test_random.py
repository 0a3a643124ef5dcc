"""After synchronize_rng_states every rank draws rank 0's numbers; before, they differ (2 and 4 gloo ranks)."""

from __future__ import annotations

import pytest


def _draw_before_and_after() -> tuple[list[float], list[float], list[float]]:
    import torch

    from hasten.state import PartialState
    from hasten.utils.random import set_seed, synchronize_rng_states

    state = PartialState()
    set_seed(100, device_specific=True)  # each rank its own stream
    generator = torch.Generator().manual_seed(7 + state.process_index)
    before = torch.rand(3).tolist()
    synchronize_rng_states(["torch", "generator"], generator=generator)
    after = torch.rand(3).tolist()
    return before, after, torch.rand(2, generator=generator).tolist()


@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
def test_ranks_share_rank_zeros_state(pool: str, request: pytest.FixtureRequest) -> None:
    ranks = request.getfixturevalue(pool)
    results = ranks.run(_draw_before_and_after)
    befores = [before for before, _, _ in results]
    assert len({tuple(before) for before in befores}) == ranks.world_size
    assert all(after == results[0][1] for _, after, _ in results)
    assert all(drawn == results[0][2] for _, _, drawn in results)
