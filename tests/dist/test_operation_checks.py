"""verify_operation, chained_operation and gather_tensor_shape on a real gloo group of 2 ranks."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from hasten.state import PartialState
from hasten.utils.errors import DistributedOperationException
from hasten.utils.operation_checks import chained_operation, gather_tensor_shape, verify_operation
from hasten.utils.operations import gather
from tests.ranks import RankPool


@chained_operation
@verify_operation
def _user_gather(tensor: Any) -> Any:
    return gather(tensor)


def _on_rank_verify(debug: bool) -> list[str]:
    if debug:
        os.environ["ACCELERATE_DEBUG_MODE"] = "1"  # the pool restores the environment after each task
        PartialState._reset_state()
    state = PartialState()
    same = _user_gather({"x": torch.ones(2, 3)})
    outcomes = [str(tuple(same["x"].shape))]
    try:
        _user_gather(tensor={"x": torch.ones(2 + state.process_index, 3)})
        outcomes.append("nothing raised")
    except DistributedOperationException as error:
        cause = error.__cause__
        outcomes += [str(error), str(cause)]
    return outcomes


def test_verify_operation_reports_each_ranks_shapes_in_debug_mode(ranks2: RankPool) -> None:
    for outcome in ranks2.run(_on_rank_verify, True):
        assert outcome[0] == "(4, 3)"
        assert outcome[1].startswith(
            "Error found while calling `tests.dist.test_operation_checks._user_gather`"
        )
        assert "Cannot apply desired operation due to shape mismatches" in outcome[2]
        assert "Process 0: {'x': [2, 3]}" in outcome[2]
        assert "Process 1: {'x': [3, 3]}" in outcome[2]


def test_without_debug_mode_the_collective_checks_itself(ranks2: RankPool) -> None:
    # hasten's gather always checks shapes; verify_operation adds nothing outside debug mode.
    for outcome in ranks2.run(_on_rank_verify, False):
        assert outcome[0] == "(4, 3)"
        assert outcome[1].startswith("Error found while calling")
        assert "gather" in outcome[2] and "rank" in outcome[2]


def _on_rank_shape(holder: int | None) -> Any:
    state = PartialState()
    tensor = torch.zeros(5, 2, dtype=torch.float16) if state.process_index == holder else None
    try:
        shape, dtype = gather_tensor_shape(tensor)
    except DistributedOperationException as error:
        return str(error)
    return shape.tolist(), str(dtype)


def test_gather_tensor_shape_from_the_one_rank_that_has_it(ranks2: RankPool) -> None:
    assert ranks2.run(_on_rank_shape, 1) == [([5, 2], "torch.float16")] * 2
    expected = (
        "gather_tensor_shape: exactly one process must pass a tensor (the others None); it was passed on 0"
    )
    assert all(message.startswith(expected) for message in ranks2.run(_on_rank_shape, None))


def test_gather_tensor_shape_on_one_process() -> None:
    shape, dtype = gather_tensor_shape(torch.ones(3, dtype=torch.int8))
    assert shape.tolist() == [3] and dtype == torch.int8
    with pytest.raises(DistributedOperationException, match="it was passed on the only process"):
        gather_tensor_shape(None)


def test_gathered_parameters_does_nothing_without_zero3() -> None:
    # (ZeRO-3 partitioning itself hangs in DeepSpeed on CPU with gloo here, so the DeepSpeed branch is
    # not exercised; it is one call to deepspeed.zero.GatheredParameters.)
    from hasten.state import AcceleratorState
    from hasten.utils.operation_checks import GatheredParameters

    AcceleratorState()
    layer = torch.nn.Linear(2, 2)
    with GatheredParameters(layer.weight, modifier_rank=0):
        assert tuple(layer.weight.shape) == (2, 2)
